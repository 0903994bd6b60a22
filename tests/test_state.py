"""TrainState as a pytree, and its RNG."""

import torch
from torch import nn

import loopkit as lk
from loopkit import optim


def make_state(seed=0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    return lk.TrainState.create(model, optim.adam(amsgrad=True), seed=seed)


def test_state_is_a_pytree():
    state = make_state()
    leaves, spec = lk.tree.tree_flatten(state)
    assert all(isinstance(x, torch.Tensor) for x in leaves)
    rebuilt = lk.tree.tree_unflatten(leaves, spec)
    assert isinstance(rebuilt, lk.TrainState)
    doubled = lk.tree.tree_map(lambda x: x * 2 if x.is_floating_point() else x, state)
    torch.testing.assert_close(doubled.params["0.weight"], 2 * state.params["0.weight"])
    names, _ = lk.tree.flatten_with_names(state)
    assert ".params['0.weight']" in names and ".buffers['1.running_mean']" in names


def test_torch_func_and_compile_see_through_the_state():
    state = make_state()

    def total(s: lk.TrainState) -> torch.Tensor:
        return sum((p**2).sum() for p in s.params.values())

    grads = torch.func.grad(lambda params: total(state.replace(params=params)))(state.params)
    torch.testing.assert_close(grads["0.weight"], 2 * state.params["0.weight"])
    stacked = lk.tree.tree_map(lambda a, b: torch.stack([a, b]), state, make_state(seed=1))
    assert isinstance(stacked, lk.TrainState)
    per_member = torch.func.vmap(total)(stacked)
    torch.testing.assert_close(per_member, torch.stack([total(state), total(state)]))
    compiled = torch.compile(total, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(state), total(state))


def test_state_fields_and_replace():
    state = make_state()
    assert state.step.dtype == torch.int64 and int(state.step) == 0
    assert set(state.params) == {"0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"}
    assert set(state.buffers) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    later = state.replace(step=state.step + 5)
    assert int(later.step) == 5 and int(state.step) == 0


def test_rng_matches_manual_seed():
    rng = lk.rng_for(7)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        want = torch.rand(5)
    with lk.rng_scope(rng) as advanced:
        got = torch.rand(5)
    assert torch.equal(got, want)
    assert not torch.equal(advanced["cpu"], rng["cpu"])
    with lk.rng_scope(advanced):
        after = torch.rand(5)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        torch.rand(5)
        assert torch.equal(after, torch.rand(5))


def test_tree_map_takes_is_leaf_and_matches_torch_pytree():
    import torch.utils._pytree as pytree

    tree = {"a": torch.ones(2), "b": torch.zeros(3)}
    rest = {"b": torch.ones(3), "a": torch.ones(2)}  # another key order: matched by key
    got = lk.tree.tree_map(torch.add, tree, rest)
    want = pytree.tree_map(torch.add, tree, rest)
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    nested = {"a": (1, 2), "b": [3]}
    assert lk.tree.tree_map(len, nested, is_leaf=lambda x: isinstance(x, (tuple, list))) == {
        "a": 2,
        "b": 1,
    }
