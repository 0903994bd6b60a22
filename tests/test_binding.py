"""ModuleBinding: the same call as torch.func.functional_call, on any module structure."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

import loopkit as lk
from loopkit.binding import ModuleBinding
from tests.helpers import build_mlp, mlp_specs


class Tied(nn.Module):
    """An embedding and an output head sharing one weight, a submodule used twice, a
    buffer the forward reassigns and one it updates in place, a 0-dim param."""

    def __init__(self, vocab=7, d=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.blocks = nn.ModuleList([self.mix, nn.Tanh(), self.mix])
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight
        self.scale = nn.Parameter(torch.tensor(0.7))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("running", torch.zeros(d))
        self.register_buffer("unused", None)

    def forward(self, tokens, *, shift=0.0):
        self.calls = self.calls + 1
        h = self.emb(tokens)
        for block in self.blocks:
            h = block(h)
        self.running.mul_(0.5).add_(h.detach().mean(0))
        return self.head(h) * self.scale + shift


def _fresh(module, generator):
    """A random value for each param and buffer, as a step's state would hold them."""
    out = {}
    for k, v in [*module.named_parameters(), *module.named_buffers()]:
        if v.is_floating_point():
            out[k] = torch.randn(v.shape, generator=generator, dtype=v.dtype)
        else:
            out[k] = v.clone() + 3
    return out


def _named(module):
    return [*module.named_parameters(), *module.named_buffers()]


def _both(module, tensors, args, kwargs=None):
    """(out, tensors after) through functional_call (on a copy of the module: with a
    shared submodule, torch 2.13's functional_call restores the module's tensors in an
    order that leaves the given ones in place) and through a binding. The binding must
    leave the module holding its own tensor objects: those given unchanged, the others
    changed as functional_call changes the copy's (a BatchNorm buffer not given is the
    module's own, updated in place)."""
    own = [(k, v, v.clone()) for k, v in _named(module)]
    twin = copy.deepcopy(module)
    results = []
    with torch.no_grad():
        given = dict(tensors)
        torch.manual_seed(0)  # the same Dropout masks
        results.append((functional_call(twin, given, args, kwargs or {}), given))
        given = dict(tensors)
        torch.manual_seed(0)
        results.append((ModuleBinding(module)(given, args, kwargs or {}), given))
    for (k, v, before), (k2, v2), (_, v3) in zip(own, _named(module), _named(twin), strict=True):
        assert k == k2 and v2 is v, k
        assert torch.equal(v, before if k in tensors else v3), k
    return results


def _assert_same(results):
    (want_out, want_t), (got_out, got_t) = results
    torch.testing.assert_close(got_out, want_out, rtol=0, atol=0)
    assert got_t.keys() == want_t.keys()
    for k in want_t:
        torch.testing.assert_close(got_t[k], want_t[k], rtol=0, atol=0, msg=k)


@settings(max_examples=25, deadline=None)
@given(spec=mlp_specs(), seed=st.integers(0, 2**16), drop=st.sets(st.integers(0, 20)))
def test_binding_equals_functional_call_on_random_mlps(spec, seed, drop):
    """Random MLPs (BatchNorm updating its buffers in place), given all, some or none of
    their tensors: the same output, the same tensors written back, the module untouched."""
    model = build_mlp(spec, seed).train()
    g = torch.Generator().manual_seed(seed)
    tensors = _fresh(model, g)
    tensors = {k: v for i, (k, v) in enumerate(tensors.items()) if i not in drop}
    x = torch.randn(4, spec.in_dim, generator=g)
    _assert_same(_both(model, tensors, (x,)))


@pytest.mark.parametrize("tied_name", ["emb.weight", "head.weight"])
def test_binding_unties_shared_tensors_and_handles_reassigned_buffers(tied_name):
    torch.manual_seed(0)
    model = Tied()
    g = torch.Generator().manual_seed(1)
    tensors = _fresh(model, g)  # named_parameters gives one name per shared tensor
    assert "head.weight" not in tensors
    if tied_name == "head.weight":  # the other name of the same tensor
        tensors["head.weight"] = tensors.pop("emb.weight")
    tokens = torch.randint(0, 7, (6,), generator=g)
    results = _both(model, tensors, (tokens,), {"shift": 0.25})
    _assert_same(results)
    (_, after), _ = results
    assert int(after["calls"]) == int(tensors["calls"]) + 1  # reassigned: written back


def test_binding_defers_to_functional_call_for_names_it_does_not_own():
    model = Tied()
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 7, (3,), generator=g)
    # Both names of one tied tensor, equal values: allowed.
    tensors = _fresh(model, g)
    tensors["head.weight"] = tensors["emb.weight"]
    _assert_same(_both(model, tensors, (tokens,)))
    # Different values: functional_call's own error.
    tensors["head.weight"] = tensors["emb.weight"] + 1
    with pytest.raises(ValueError, match="tied"):
        with torch.no_grad():
            ModuleBinding(model)(tensors, (tokens,), {})
    # A name that is no param or buffer: functional_call sets it as an attribute.
    model = nn.Sequential(nn.Linear(3, 2))
    tensors = {**_fresh(model, g), "extra": torch.ones(1)}
    _assert_same(_both(model, tensors, (torch.randn(4, 3),)))
    assert not hasattr(model, "extra")


def test_binding_follows_changes_to_the_module_after_it_was_made():
    """A replaced submodule or param, a newly tied weight: the binding looks again."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
    )
    binding = ModuleBinding(model)
    x = torch.randn(5, 3)

    first = _fresh(model, torch.Generator().manual_seed(3))  # a state made before the changes

    def check():
        for tensors in (first, _fresh(model, torch.Generator().manual_seed(4))):
            try:
                want = functional_call(model, dict(tensors), (x,))
            except (ValueError, KeyError) as e:  # two values for what is now one tied tensor
                with pytest.raises(type(e)):  # (a KeyError: torch 2.13's check trips itself)
                    binding(dict(tensors), (x,), {})
                continue
            torch.testing.assert_close(binding(dict(tensors), (x,), {}), want, rtol=0, atol=0)

    check()
    model[2] = nn.Linear(4, 4)
    check()
    model[0].weight = nn.Parameter(torch.zeros(4, 3))
    check()
    model[2].extra = nn.Linear(4, 4)  # a new submodule, tied to an existing weight
    model[2].extra.weight = model[2].weight
    model[2].register_forward_hook(lambda m, args, out: out + m.extra(args[0]))
    check()
    model[4].bias = None
    check()
    model[3].weight = model[2].weight  # now tied: one name in a new state's tensors
    check()
    model[1].register_buffer("offset", None)  # a None slot, filled later
    check()
    model[1].offset = torch.ones(1)
    check()


def test_binding_restores_the_module_when_the_forward_raises():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(5, 2))  # mismatched: raises
    own = [v for v in model.parameters()]
    tensors = _fresh(model, torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError):
        ModuleBinding(model)(tensors, (torch.randn(2, 3),), {})
    assert [v for v in model.parameters()] == own
    assert all(isinstance(v, nn.Parameter) for v in model.parameters())


def test_train_step_through_the_binding_equals_functional_call(monkeypatch):
    """The eager train step with its binding and with plain functional_call (the binding
    disabled) give identical states, on a model with tied weights and reassigned buffers."""
    from loopkit import step as step_module

    def loss(net, batch):
        tokens, target = batch
        return nn.functional.cross_entropy(net(tokens), target)

    torch.manual_seed(0)
    model = Tied()
    opt = lk.optim.adamw(lr=1e-2)
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randint(0, 7, (8,), generator=g), torch.randint(0, 7, (8,), generator=g))
               for _ in range(3)]  # fmt: skip
    states = []
    for bound in (True, False):
        if not bound:
            monkeypatch.setattr(step_module, "ModuleBinding", lambda module: None)
        step = lk.train_step(model, loss, opt)
        state = lk.TrainState.create(model, opt, seed=0)
        for batch in batches:
            state, _ = step(state, batch)
        states.append(state)
    for x, y in zip(*(lk.tree.tree_leaves(s) for s in states), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert int(states[0].buffers["calls"]) == 3


def test_binding_writes_back_the_slot_of_the_name_given():
    """A buffer registered at two places, given under its second name and reassigned by
    the forward there: the value written back is that slot's, as functional_call's."""

    class Counter(nn.Module):
        def forward(self, x):
            self.buf = self.buf + 1
            return x + self.buf

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Identity(), Counter()
            self.a.register_buffer("buf", torch.zeros(()))
            self.b.register_buffer("buf", self.a.buf)

        def forward(self, x):
            return self.b(x)

    model = Two()
    for name in ["a.buf", "b.buf"]:
        _assert_same(_both(model, {name: torch.tensor(5.0)}, (torch.zeros(()),)))


def test_a_model_holding_a_torchscript_submodule_still_trains():
    """TorchScript submodules keep their tensors out of plain dicts: the binding leaves
    such a model to functional_call, as before."""
    torch.manual_seed(0)
    model = nn.Sequential(torch.jit.script(nn.Linear(3, 2)), nn.Tanh())
    x = torch.randn(4, 3)
    tensors = _fresh(model, torch.Generator().manual_seed(0))
    want = functional_call(model, dict(tensors), (x,))
    torch.testing.assert_close(ModuleBinding(model)(dict(tensors), (x,), {}), want)
    opt = lk.optim.sgd(lr=0.1)
    state = lk.TrainState.create(model, opt)
    new, _ = lk.train_step(model, lambda net, b: net(b).square().mean(), opt)(state, x)
    assert not torch.equal(new.params["0.weight"], state.params["0.weight"])


class Counted(nn.Module):
    """Registers its call counter on its first call (or fills its ``None`` slot then)."""

    def __init__(self, slot):
        super().__init__()
        if slot:
            self.register_buffer("count", None)

    def forward(self, x):
        if getattr(self, "count", None) is None:
            self.register_buffer("count", torch.zeros(()))
        self.count = self.count + 1
        return x * self.count


@pytest.mark.parametrize("slot", [False, True])
def test_binding_refuses_a_tensor_the_forward_registers_and_restores_the_module(slot):
    """Such a tensor would stay in the module, outside the given tensors (a step's state).
    Given (as a state made after one forward holds it), it is read and written back as
    functional_call does."""
    model = nn.Sequential(nn.Linear(3, 2), Counted(slot))
    x = torch.randn(4, 3)
    tensors = _fresh(model, torch.Generator().manual_seed(0))
    binding = ModuleBinding(model)
    for _ in range(2):  # refused again: it was not left registered
        with pytest.raises(lk.StepError, match=r"registered \['1.count'\].*one forward before"):
            binding(dict(tensors), (x,), {})
        assert getattr(model[1], "count", None) is None
        assert ("count" in model[1]._buffers) == slot
    model(x)
    tensors = _fresh(model, torch.Generator().manual_seed(0))
    _assert_same(_both(model, tensors, (x,)))
    given = dict(tensors)
    binding(given, (x,), {})
    assert torch.equal(given["1.count"], tensors["1.count"] + 1)
