"""Per-sample gradients and DP-SGD against naive per-example loops."""

import copy

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

import loopkit as lk
from loopkit import optim
from tests.helpers import build_mlp, loss_fn, make_batches, mlp_specs

FP32 = dict(rtol=1e-5, atol=1e-6)
FP64 = dict(rtol=1e-10, atol=1e-12)


def loop_grads(model, batch):
    """The oracle: one backward per example, on a batch of one."""
    x, y = batch
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        loss, _ = loss_fn(model, (x[i : i + 1], y[i : i + 1]))
        loss.backward()
        rows.append({k: p.grad.clone() for k, p in model.named_parameters()})
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


@given(
    spec=mlp_specs(batchnorm=False, dropout=0.0),
    n=st.integers(1, 9),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_per_sample_grads_equal_a_loop_over_examples(spec, n, seed, dtype):
    model = build_mlp(spec, seed, dtype)
    (batch,) = make_batches(spec, [n], seed, dtype)
    state = lk.TrainState.create(model, optim.sgd(lr=0.1))
    grads, losses, metrics = lk.per_sample_grads(model, loss_fn, state.params, state.buffers, batch)
    want = loop_grads(model, batch)
    tol = FP32 if dtype == torch.float32 else FP64
    assert set(grads) == set(want)
    for k in want:
        torch.testing.assert_close(grads[k], want[k], **tol)
    assert losses.shape == (n,) and metrics["acc"].shape == (n,)


def naive_dp_sgd(model, batches, make_opt, *, max_grad_norm, noise_multiplier, seed):
    """DP-SGD written out: per-example backward, clip, sum, noise from a generator seeded
    like the TrainState, average, torch.optim step."""
    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_opt(params)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for batch in batches:
            grads = loop_grads(model, batch)
            per_example = [grads[k] for k, _ in model.named_parameters()]
            norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in per_example]).sum(0).sqrt()
            factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
            for p, g in zip(params, per_example, strict=True):
                total = (g * factor.view(-1, *([1] * (g.ndim - 1)))).sum(0)
                # N(0, (sigma C)^2) with sigma = 0 is no noise, also for C = inf
                std = noise_multiplier * max_grad_norm if noise_multiplier else 0.0
                noise = std * torch.randn_like(p)
                p.grad = (total + noise) / len(g)
            opt.step()
    return model


@pytest.mark.parametrize("name", ["sgd", "adam"])
@given(
    spec=mlp_specs(batchnorm=False, dropout=0.0),
    max_grad_norm=st.sampled_from([0.01, 0.5, 100.0, float("inf")]),
    noise_multiplier=st.sampled_from([0.0, 0.5, 1.1]),
    seed=st.integers(0, 2**16),
)
def test_dp_sgd_matches_the_naive_form_with_the_same_noise(
    name, spec, max_grad_norm, noise_multiplier, seed
):
    """max_grad_norm=inf (no clipping) goes with no noise only: it once made every param
    NaN (0 * inf noise)."""
    assume(noise_multiplier == 0 or max_grad_norm < float("inf"))
    model = build_mlp(spec, seed, torch.float64)
    batches = make_batches(spec, [6, 6, 6], seed, torch.float64)
    opt = optim.sgd(lr=0.1, momentum=0.9) if name == "sgd" else optim.adam(lr=1e-2)
    step = lk.dp_train_step(
        model, loss_fn, opt, max_grad_norm=max_grad_norm, noise_multiplier=noise_multiplier
    )
    state = lk.TrainState.create(model, opt, seed=seed)
    for batch in batches:
        state, metrics = step(state, batch)

    def make_opt(ps):
        if name == "sgd":
            return torch.optim.SGD(ps, lr=0.1, momentum=0.9)
        return torch.optim.Adam(ps, lr=1e-2)

    ref = naive_dp_sgd(
        model, batches, make_opt, max_grad_norm=max_grad_norm,
        noise_multiplier=noise_multiplier, seed=seed,
    )  # fmt: skip
    for k, p in ref.named_parameters():
        torch.testing.assert_close(state.params[k], p.detach(), **FP64)
    assert 0.0 <= float(metrics["clipped"]) <= 1.0


def test_dp_step_noise_comes_from_the_state():
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = optim.sgd(lr=0.1)
    step = lk.dp_train_step(model, loss_fn, opt, max_grad_norm=1.0, noise_multiplier=1.0)
    batch = (torch.randn(4, 3), torch.randint(0, 2, (4,)))
    a = lk.TrainState.create(model, opt, seed=0)
    s1, _ = step(a, batch)
    s2, _ = step(a, batch)
    s3, _ = step(lk.TrainState.create(model, opt, seed=1), batch)
    assert torch.equal(s1.params["0.weight"], s2.params["0.weight"])
    assert not torch.equal(s1.params["0.weight"], s3.params["0.weight"])


def test_dp_step_rejects_batchnorm_and_bad_arguments():
    opt = optim.sgd(lr=0.1)
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(TypeError, match=r"'1' is BatchNorm1d.*GroupNorm or LayerNorm"):
        lk.dp_train_step(bn, loss_fn, opt, max_grad_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="max_grad_norm must be positive"):
        lk.dp_train_step(nn.Linear(3, 2), loss_fn, opt, max_grad_norm=0, noise_multiplier=1.0)
    empty = (torch.randn(0, 3), torch.zeros(0, dtype=torch.long))
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="need at least one example: the batch is empty"):
        lk.per_sample_grads(model, loss_fn, dict(model.named_parameters()), {}, empty)
    step = lk.dp_train_step(model, loss_fn, opt, max_grad_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(lk.StepError, match="need at least one example"):
        step(lk.TrainState.create(model, opt), empty)
    for bad in (-1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="noise_multiplier must be a finite number >= 0"):
            lk.dp_train_step(nn.Linear(3, 2), loss_fn, opt, max_grad_norm=1, noise_multiplier=bad)
    with pytest.raises(ValueError, match="infinite standard deviation: give a finite clipping"):
        lk.dp_train_step(
            nn.Linear(3, 2), loss_fn, opt, max_grad_norm=float("inf"), noise_multiplier=0.5
        )


def test_dp_step_metrics_are_means_over_the_examples_of_any_shape_and_dtype():
    """A vector metric keeps its shape; a count or a flag becomes the fraction of examples.
    The reference: loss_fn on each example alone, averaged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4))

    def loss(net, batch):
        x, y = batch
        logits = net(x)
        right = logits.argmax(-1) == y
        return torch.nn.functional.cross_entropy(logits, y), {
            "logits": logits.mean(0), "correct": right.sum(), "all_right": right.all(), "n": 1,
        }  # fmt: skip

    opt = optim.sgd(lr=0.1)
    state = lk.TrainState.create(model, opt)
    batch = (torch.randn(6, 3), torch.randint(0, 4, (6,)))
    _, got = lk.dp_train_step(model, loss, opt, max_grad_norm=1.0, noise_multiplier=0.0)(
        state, batch
    )
    net = lk.Net(model, state.params, state.buffers)
    each = [loss(net, (batch[0][i : i + 1], batch[1][i : i + 1]))[1] for i in range(6)]
    for k in ("logits", "correct", "all_right", "n"):
        want = torch.stack([torch.as_tensor(m[k]).float() for m in each]).mean(0)
        torch.testing.assert_close(got[k], want, rtol=1e-6, atol=1e-7, msg=k)


def test_per_sample_grads_names_a_batchnorm_that_uses_batch_statistics():
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    state = lk.TrainState.create(bn, optim.sgd(lr=0.1))
    batch = (torch.randn(5, 3), torch.randint(0, 2, (5,)))
    with pytest.raises(TypeError, match=r"'1' is BatchNorm1d.*GroupNorm or LayerNorm"):
        lk.per_sample_grads(bn, loss_fn, state.params, state.buffers, batch)
    bn.eval()  # running statistics: each example's gradient exists
    grads, losses, _ = lk.per_sample_grads(bn, loss_fn, state.params, state.buffers, batch)
    assert losses.shape == (5,) and grads["0.weight"].shape == (5, 4, 3)


class _SharedTwice(nn.Module):
    """A Linear reached at two places of the module tree (``a`` and ``b.1``)."""

    def __init__(self):
        super().__init__()
        lin = nn.Linear(4, 4)
        self.a, self.b, self.o = lin, nn.Sequential(nn.Tanh(), lin), nn.Linear(4, 3)

    def forward(self, x):
        return self.o(self.b(self.a(x)))


def test_a_submodule_shared_at_two_places_keeps_its_own_parameters():
    """Regression: per_sample_grads and dp_train_step called torch's functional_call, which
    (torch 2.13) left the given, functorch-wrapped tensors in a submodule that appears at
    two places in the tree (as a Net made without a binding did). The module keeps its own
    Parameters; the results equal the per-example loop and the naive DP-SGD."""
    torch.manual_seed(0)
    model = _SharedTwice().double()
    own = dict(model.named_parameters(remove_duplicate=False))
    batches = [(torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,)))
               for _ in range(2)]  # fmt: skip
    opt = optim.sgd(lr=0.1)
    state = lk.TrainState.create(model, opt, seed=3)
    moved = {k: v + 1.0 for k, v in state.params.items()}  # not the module's values
    grads, _, _ = lk.per_sample_grads(model, loss_fn, moved, state.buffers, batches[0])
    assert _own_parameters(model, own)
    want = loop_grads(_with_params(model, moved), batches[0])
    for k in want:
        torch.testing.assert_close(grads[k], want[k], **FP64)
    lk.Net(model, moved, state.buffers)(batches[0][0])  # a Net made without a binding
    assert _own_parameters(model, own)
    step = lk.dp_train_step(model, loss_fn, opt, max_grad_norm=0.5, noise_multiplier=0.5)
    for batch in batches:
        state, _ = step(state, batch)
    assert _own_parameters(model, own)
    assert all(type(p) is nn.Parameter for p in own.values())
    ref = naive_dp_sgd(model, batches, lambda ps: torch.optim.SGD(ps, lr=0.1),
                       max_grad_norm=0.5, noise_multiplier=0.5, seed=3)  # fmt: skip
    for k, p in ref.named_parameters():
        torch.testing.assert_close(state.params[k], p.detach(), **FP64)


def _own_parameters(model, own):
    """Whether ``model`` holds, at each name, the Parameter ``own`` has there."""
    now = dict(model.named_parameters(remove_duplicate=False))
    return now.keys() == own.keys() and all(now[k] is p for k, p in own.items())


def _with_params(model, params):
    """A copy of ``model`` holding ``params``."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(params[k])
    return model


class _Counting(nn.Module):
    """A forward that writes its buffers in place: a counter, and a scale it reads."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x):
        self.seen += 1
        self.scale.mul_(2.0)
        return self.lin(x) * self.scale


def test_a_forward_that_writes_its_buffers_in_place_sees_them_as_given_per_example():
    """Regression: a forward updating a buffer in place (a counter, running statistics)
    raised torch.func's "mutate a captured Tensor". Each example sees the buffers as
    given (its gradient is that of the example alone on a fresh copy of the state), the
    writes are discarded, and the state's buffers are unchanged; a write of a per-example
    value into a buffer, which cannot be made, is named."""
    torch.manual_seed(0)
    model = _Counting()
    opt = optim.sgd(lr=0.1)
    state = lk.TrainState.create(model, opt, seed=0)
    batch = (torch.randn(4, 3), torch.randint(0, 2, (4,)))
    before = lk.tree.tree_map(torch.clone, state.buffers)
    grads, losses, _ = lk.per_sample_grads(model, loss_fn, state.params, state.buffers, batch)
    x, y = batch
    rows = [loop_grads(copy.deepcopy(model), (x[i : i + 1], y[i : i + 1])) for i in range(4)]
    want = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}  # fresh buffers each
    for k in want:
        torch.testing.assert_close(grads[k], want[k], **FP32)
    step = lk.dp_train_step(model, loss_fn, opt, max_grad_norm=100.0, noise_multiplier=0.0)
    new, metrics = step(state, batch)
    torch.testing.assert_close(metrics["loss"], losses.mean())
    for k, v in before.items():
        assert torch.equal(state.buffers[k], v) and torch.equal(new.buffers[k], v), k
    mean = {k: g.mean(0) for k, g in want.items()}
    for k, p in state.params.items():
        torch.testing.assert_close(new.params[k], p - 0.1 * mean[k], **FP32)

    class Running(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.register_buffer("mean", torch.zeros(3))

        def forward(self, x):
            self.mean.mul_(0.9).add_(0.1 * x.mean(0))
            return self.lin(x)

    running = Running()
    state = lk.TrainState.create(running, opt)
    with pytest.raises(lk.StepError, match=r"into a buffer in place.*self\.m = 0\.9"):
        lk.per_sample_grads(running, loss_fn, state.params, state.buffers, batch)


def test_per_sample_grads_names_keys_that_are_no_parameter_and_parameters_left_out():
    """Like ``functional_call(strict=True)``: a misspelt or missing parameter would
    otherwise be read from the module itself (its gradient silently absent, or zeros for
    the misspelt key). A parameter passed in ``buffers`` is held fixed, as TrainState holds
    ``requires_grad=False`` ones; a tied parameter counts by any of its names."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    state = lk.TrainState.create(model, optim.sgd(lr=0.1))
    batch = (torch.randn(5, 3), torch.randint(0, 2, (5,)))
    typo = {("0.wieght" if k == "0.weight" else k): v for k, v in state.params.items()}
    with pytest.raises(ValueError, match=r"\['0.wieght'\] name no parameter or buffer"):
        lk.per_sample_grads(model, loss_fn, typo, state.buffers, batch)
    missing = {k: v for k, v in state.params.items() if k != "2.bias"}
    with pytest.raises(ValueError, match=r"parameters \['2.bias'\] are in neither params"):
        lk.per_sample_grads(model, loss_fn, missing, state.buffers, batch)

    frozen = {"2.bias": state.params["2.bias"]}
    grads, losses, _ = lk.per_sample_grads(model, loss_fn, missing, frozen, batch)
    want = loop_grads(model, batch)
    assert set(grads) == set(missing) and losses.grad_fn is None
    for k in grads:
        torch.testing.assert_close(grads[k], want[k], **FP32)

    tied = nn.Sequential(nn.Embedding(6, 4), nn.Linear(4, 6, bias=False))
    tied[1].weight = tied[0].weight
    x = torch.randint(0, 6, (3, 2))
    params = {"1.weight": tied[0].weight.detach()}  # the tied weight by its second name
    grads, _, _ = lk.per_sample_grads(
        tied, lambda net, b: net(b).logsumexp(-1).mean(), params, {}, x
    )
    assert grads["1.weight"].shape == (3, 6, 4)


def test_per_sample_grads_of_a_sparse_embedding_are_its_dense_gradients():
    """Per-sample gradients of ``Embedding(sparse=True)`` (vmap cannot batch sparse ones)
    are the dense gradients, as train_step takes them; the module keeps ``sparse=True``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 3, sparse=True), nn.Flatten(), nn.Linear(6, 2))
    ids, y = torch.randint(0, 7, (4, 2)), torch.randint(0, 2, (4,))

    def ce(net, b):
        return nn.functional.cross_entropy(net(b[0]), b[1])

    state = lk.TrainState.create(model, optim.sgd(lr=0.1))
    grads, _, _ = lk.per_sample_grads(model, ce, state.params, state.buffers, (ids, y))
    assert model[0].sparse
    for i in range(4):
        model.zero_grad()
        ce(model, (ids[i : i + 1], y[i : i + 1])).backward()
        for k, p in model.named_parameters():
            want = p.grad.to_dense() if p.grad.is_sparse else p.grad
            torch.testing.assert_close(grads[k][i], want, **FP32)
