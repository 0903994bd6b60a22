"""The pure train step against the ordinary imperative loop (the oracle)."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import loopkit as lk
from loopkit import optim
from tests.helpers import (
    KWARGS,
    assert_state_matches,
    batch_sizes,
    build_mlp,
    imperative_run,
    loss_fn,
    make_batches,
    mlp_specs,
    run_steps,
)

# equal_nan: a maximizing optimizer with a large lr can diverge, in torch's loop as in ours.
FP32 = dict(rtol=1e-5, atol=1e-6, equal_nan=True)
FP64 = dict(rtol=1e-10, atol=1e-12, equal_nan=True)


def run_loopkit(model, batches, opt, seed, **step_kwargs):
    state = lk.TrainState.create(model, opt, seed=seed)
    return run_steps(lk.train_step(model, loss_fn, opt, **step_kwargs), state, batches)


@given(
    spec=mlp_specs(),
    opt_name_kwargs=st.sampled_from(sorted(KWARGS)).flatmap(
        lambda name: KWARGS[name].map(lambda kw: (name, kw))
    ),
    sizes=batch_sizes(),
    clip_norm=st.sampled_from([None, 0.1, 1.0, 100.0]),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_train_step_matches_imperative_loop(spec, opt_name_kwargs, sizes, clip_norm, seed, dtype):
    name, kwargs = opt_name_kwargs
    model = build_mlp(spec, seed, dtype)
    batches = make_batches(spec, sizes, seed, dtype)
    opt = getattr(optim, name)(**kwargs)
    state, losses = run_loopkit(model, batches, opt, seed, clip_norm=clip_norm)
    ref, ref_losses = imperative_run(model, batches, name, kwargs, seed=seed, clip_norm=clip_norm)
    tol = FP32 if dtype == torch.float32 else FP64
    torch.testing.assert_close(losses, ref_losses, **tol)
    assert_state_matches(state, ref, **tol)
    assert int(state.step) == len(batches)


@given(
    spec=mlp_specs(),
    warmup=st.integers(1, 6),
    start_factor=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**16),
)
def test_lr_schedule_matches_torch_scheduler(spec, warmup, start_factor, seed):
    model = build_mlp(spec, seed, torch.float64)
    batches = make_batches(spec, [8] * 5, seed, torch.float64)
    opt = optim.sgd(lr=optim.schedules.linear_warmup(0.1, warmup, start_factor), momentum=0.9)
    state, losses = run_loopkit(model, batches, opt, seed)

    def sched(o):
        return torch.optim.lr_scheduler.LinearLR(o, start_factor, 1.0, total_iters=warmup)

    ref, ref_losses = imperative_run(
        model, batches, "sgd", dict(lr=0.1, momentum=0.9), seed=seed, scheduler=sched
    )
    torch.testing.assert_close(losses, ref_losses, **FP64)
    assert_state_matches(state, ref, **FP64)


def test_dropout_masks_come_from_the_state():
    spec_model = nn.Sequential(nn.Linear(4, 64), nn.Dropout(0.5), nn.Linear(64, 2))
    opt = optim.sgd(lr=0.1)
    step = lk.train_step(spec_model, loss_fn, opt)
    batch = (torch.randn(16, 4), torch.randint(0, 2, (16,)))
    a = lk.TrainState.create(spec_model, opt, seed=1)
    b = lk.TrainState.create(spec_model, opt, seed=2)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    sa1, _ = step(a, batch)
    sa2, _ = step(a, batch)
    sb, _ = step(b, batch)
    # Same state, same masks; another seed, other masks; the caller's RNG is untouched.
    assert all(torch.equal(sa1.params[k], sa2.params[k]) for k in sa1.params)
    assert not all(torch.equal(sa1.params[k], sb.params[k]) for k in sa1.params)
    assert torch.equal(torch.get_rng_state(), before)
    # The rng advances, so the next step draws new masks.
    assert not torch.equal(sa1.rng["cpu"], a.rng["cpu"])


def test_step_is_pure():
    model = nn.Sequential(
        nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 2)
    )
    model.train(False)  # the step sets training mode for the call and restores this
    before = copy.deepcopy(model.state_dict())
    opt = optim.adamw(lr=0.1)
    state = lk.TrainState.create(model, opt, seed=0)
    snapshot = lk.tree.tree_map(torch.clone, state)
    step = lk.train_step(model, loss_fn, opt, clip_norm=1.0)
    new, _ = step(state, (torch.randn(5, 3), torch.randint(0, 2, (5,))))
    for got, want in zip(lk.tree.tree_leaves(state), lk.tree.tree_leaves(snapshot), strict=True):
        assert torch.equal(got, want)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not model.training and not any(m.training for m in model.modules())
    assert not torch.equal(new.buffers["1.running_mean"], state.buffers["1.running_mean"])
    assert int(new.buffers["1.num_batches_tracked"]) == 1


def test_state_does_not_alias_the_module():
    model = nn.Linear(3, 2)
    state = lk.TrainState.create(model, optim.sgd(lr=0.1), seed=0)
    for name, p in model.named_parameters():
        assert state.params[name].data_ptr() != p.data_ptr()
        assert not state.params[name].requires_grad


def test_frozen_parameters_are_not_trained():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    opt = optim.sgd(lr=0.1, weight_decay=0.1)
    state = lk.TrainState.create(model, opt, seed=0)
    assert "0.weight" not in state.params and "0.weight" in state.buffers
    batches = [(torch.randn(6, 3), torch.randint(0, 2, (6,))) for _ in range(3)]
    step = lk.train_step(model, loss_fn, opt)
    for b in batches:
        state, _ = step(state, b)
    ref, _ = imperative_run(model, batches, "sgd", dict(lr=0.1, weight_decay=0.1), seed=0)
    assert_state_matches(state, ref, **FP32)


def test_eval_step_uses_eval_semantics():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2)
    )
    opt = optim.sgd(lr=0.1)
    state = lk.TrainState.create(model, opt, seed=0)
    step = lk.train_step(model, loss_fn, opt)
    for _ in range(3):
        state, _ = step(state, (torch.randn(8, 3), torch.randint(0, 2, (8,))))
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    metrics = lk.eval_step(model, loss_fn)(state, (x, y))
    reference = copy.deepcopy(model)
    reference.load_state_dict(state.params | state.buffers)
    reference.eval()
    with torch.no_grad():
        want = F.cross_entropy(reference(x), y)
    torch.testing.assert_close(metrics["loss"], want, rtol=0, atol=0)
    assert model.training  # restored
    assert not metrics["loss"].requires_grad


def test_loss_fn_may_return_only_a_loss():
    model = nn.Linear(3, 1)
    opt = optim.sgd(lr=0.1)
    step = lk.train_step(model, lambda net, b: F.mse_loss(net(b[0]), b[1]), opt)
    _, metrics = step(lk.TrainState.create(model, opt), (torch.randn(4, 3), torch.randn(4, 1)))
    assert set(metrics) == {"loss"}


# --- errors ------------------------------------------------------------------------------


def _linear_setup():
    model = nn.Linear(3, 2)
    opt = optim.sgd(lr=0.1)
    return model, opt, lk.TrainState.create(model, opt)


def test_non_scalar_loss_is_rejected():
    model, opt, state = _linear_setup()
    step = lk.train_step(
        model, lambda net, b: F.cross_entropy(net(b[0]), b[1], reduction="none"), opt
    )
    with pytest.raises(lk.LossError, match=r"scalar loss, got shape \(4,\).*mean"):
        step(state, (torch.randn(4, 3), torch.randint(0, 2, (4,))))


def test_non_tensor_loss_is_rejected():
    model, opt, state = _linear_setup()
    step = lk.train_step(model, lambda net, b: 1.0, opt)
    with pytest.raises(lk.LossError, match="floating-point tensor loss"):
        step(state, (torch.randn(4, 3), torch.randint(0, 2, (4,))))


def test_bad_batch_names_the_step_and_shapes():
    model, opt, state = _linear_setup()
    step = lk.train_step(model, loss_fn, opt)
    state, _ = step(state, (torch.randn(4, 3), torch.randint(0, 2, (4,))))
    with pytest.raises(lk.StepError, match=r"train step 1 .*float32\[4, 5\], int64\[4\]") as info:
        step(state, (torch.randn(4, 5), torch.randint(0, 2, (4,))))
    assert "mat1 and mat2" in str(info.value)


def test_non_floating_parameters_are_rejected():
    frozen_int = nn.Linear(2, 2)
    frozen_int.weight = nn.Parameter(torch.ones(2, 2, dtype=torch.int64), requires_grad=False)
    state = lk.TrainState.create(frozen_int, optim.sgd())  # not trained: kept as a constant
    assert "weight" in state.buffers and "weight" not in state.params
    complex_model = nn.Linear(2, 2, dtype=torch.complex64)
    with pytest.raises(TypeError, match="'weight' has dtype torch.complex64.*real floating"):
        lk.TrainState.create(complex_model, optim.sgd())
    with pytest.raises(TypeError, match=r"param \['w'\] has dtype torch.int64"):
        optim.adam().init({"w": torch.ones(2, dtype=torch.int64)})


def test_invalid_clip_norm():
    model, opt, _ = _linear_setup()
    with pytest.raises(ValueError, match="clip_norm"):
        lk.train_step(model, loss_fn, opt, clip_norm=0.0)


def test_compile_options_without_compile_are_rejected():
    model, opt, _ = _linear_setup()
    with pytest.raises(TypeError, match="torch.compile options: pass compile=True"):
        lk.train_step(model, loss_fn, opt, mode="max-autotune")


class RunningMean(nn.Module):
    """A layer that reassigns its buffer in forward (not in place), as some normalisers do."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, 2)
        self.register_buffer("mean", torch.zeros(d))

    def forward(self, x):
        if self.training:
            self.mean = 0.9 * self.mean + 0.1 * x.mean(0).detach()
        return self.lin(x - self.mean)


def test_buffers_reassigned_in_forward_are_kept():
    torch.manual_seed(0)
    model = RunningMean(3)
    opt = optim.sgd(lr=0.1)
    batches = [(torch.randn(6, 3) + 2, torch.randint(0, 2, (6,))) for _ in range(3)]

    def twice(net, batch):  # two calls per step: the second sees the first's update
        loss_a, _ = loss_fn(net, batch)
        loss_b, _ = loss_fn(net, batch)
        return (loss_a + loss_b) / 2

    state = lk.TrainState.create(model, opt)
    step = lk.train_step(model, twice, opt)
    for b in batches:
        state, _ = step(state, b)
    ref = copy.deepcopy(model)
    topt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for b in batches:
        topt.zero_grad()
        twice(ref, b).backward()
        topt.step()
    assert_state_matches(state, ref, **FP32)
    assert torch.equal(model.mean, torch.zeros(3))  # the module itself is untouched


class FrozenBatchNorm(nn.Sequential):
    """Keeps its BatchNorm in eval mode whatever train() is asked: a common fine-tuning idiom."""

    def train(self, mode=True):
        super().train(mode)
        self[1].eval()
        return self


def test_train_overrides_are_honoured():
    torch.manual_seed(0)
    model = FrozenBatchNorm(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
    with torch.no_grad():  # non-trivial running statistics
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model.eval()
    batches = [(torch.randn(8, 3), torch.randint(0, 2, (8,))) for _ in range(3)]
    opt = optim.adam(lr=1e-2)
    state = lk.TrainState.create(model, opt)
    step = lk.train_step(model, loss_fn, opt)
    for b in batches:
        state, _ = step(state, b)
    ref, _ = imperative_run(model, batches, "adam", dict(lr=1e-2), seed=0)
    assert_state_matches(state, ref, **FP32)
    assert int(state.buffers["1.num_batches_tracked"]) == 0
    assert not any(m.training for m in model.modules())  # restored


def test_metrics_may_be_numbers():
    model, opt, state = _linear_setup()

    def with_numbers(net, batch):
        loss, _ = loss_fn(net, batch)
        return loss, {"batch": batch[0].shape[0], "flag": True, "scale": 0.5}

    _, metrics = lk.train_step(model, with_numbers, opt)(
        state, (torch.randn(4, 3), torch.randint(0, 2, (4,)))
    )
    assert metrics["batch"].item() == 4 and metrics["scale"].item() == 0.5
    with pytest.raises(lk.LossError, match="metric 'name' must be a tensor or a number"):
        lk.train_step(model, lambda net, b: (loss_fn(net, b)[0], {"name": "x"}), opt)(
            state, (torch.randn(4, 3), torch.randint(0, 2, (4,)))
        )


def test_loss_fn_returning_a_triple_is_named():
    model, opt, state = _linear_setup()
    step = lk.train_step(model, lambda net, b: (*loss_fn(net, b), 1), opt)
    with pytest.raises(lk.LossError, match="got a 3-tuple"):
        step(state, (torch.randn(4, 3), torch.randint(0, 2, (4,))))


def test_out_of_memory_passes_through_unchanged():
    model, opt, state = _linear_setup()

    def oom(net, batch):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        lk.train_step(model, oom, opt)(state, (torch.randn(4, 3), None))


def test_sparse_parameters_are_rejected():
    model = nn.Linear(2, 2)
    model.weight = nn.Parameter(torch.eye(2).to_sparse())
    with pytest.raises(TypeError, match="'weight' is torch.sparse_coo.*to_dense"):
        lk.TrainState.create(model, optim.sgd())


def test_train_overrides_are_honoured_when_every_flag_is_already_set():
    """A fresh model has every flag True already; its train() override must still run (the
    step skips model.train() only for modules without an override)."""
    torch.manual_seed(0)
    model = FrozenBatchNorm(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
    assert all(m.training for m in model.modules())
    opt = optim.sgd(lr=0.1)
    step = lk.train_step(model, loss_fn, opt)
    state, _ = step(
        lk.TrainState.create(model, opt), (torch.randn(8, 3), torch.randint(0, 2, (8,)))
    )
    assert int(state.buffers["1.num_batches_tracked"]) == 0  # BatchNorm stayed in eval mode
    assert all(m.training for m in model.modules())  # restored


class Scaled(nn.Linear):
    """A train() override with a side effect beyond the flags (e.g. a train-time scale)."""

    def train(self, mode: bool = True):
        self.scale = 2.0 if mode else 1.0
        return super().train(mode)

    def forward(self, x):
        return super().forward(x) * self.scale


def test_what_a_train_override_set_is_undone_after_the_step():
    """The step runs ``model.train(True)``; afterwards the model is as it was: flags and what
    its override set (a plain ``model(x)`` after the step once ran with the train-time
    scale)."""
    model = Scaled(3, 2)
    model.eval()
    opt = optim.sgd(lr=0.1)
    seen = []

    def loss(net, b):
        seen.append(net.module.scale)
        return loss_fn(net, b)

    batch = (torch.randn(4, 3), torch.randint(0, 2, (4,)))
    lk.train_step(model, loss, opt)(lk.TrainState.create(model, opt), batch)
    assert seen == [2.0] and model.scale == 1.0 and not model.training


class PartlyUsed(nn.Module):
    """A BatchNorm, a param the loss never reaches, and a buffer reassigned from params."""

    def __init__(self):
        super().__init__()
        self.fc, self.bn, self.unused = nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(2, 2)
        self.register_buffer("last", torch.zeros(4))

    def forward(self, x):
        h = self.bn(self.fc(x))
        self.last = h.mean(0)  # depends on the params: must come back detached
        return h


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eager_autograd_path_equals_grad_and_value(monkeypatch, dtype):
    """Outside torch.func transforms the eager step takes its gradient from one
    torch.autograd.grad; it must give exactly what grad_and_value gives."""
    from loopkit import step as step_module

    def run():
        torch.manual_seed(0)
        model = PartlyUsed().to(dtype)
        opt = optim.adamw(lr=1e-2, weight_decay=0.1)
        step = lk.train_step(model, lambda net, b: (net(b).pow(2).mean(), {"n": 3}), opt)
        state = lk.TrainState.create(model, opt)
        for i in range(3):
            state, metrics = step(
                state, torch.randn(5, 3, dtype=dtype, generator=torch.Generator().manual_seed(i))
            )
        return state, metrics

    fast, fast_metrics = run()
    monkeypatch.setattr(step_module, "_plain_autograd_applies", lambda params: False)
    ref, ref_metrics = run()
    for (path, got), want in zip(
        lk.tree.flatten_with_names(fast)[0].items(), lk.tree.tree_leaves(ref), strict=True
    ):
        assert torch.equal(got, want), path
        assert not got.requires_grad and got.grad_fn is None, path
    assert fast_metrics.keys() == ref_metrics.keys()
    for k in ref_metrics:
        assert torch.equal(fast_metrics[k], ref_metrics[k]) and not fast_metrics[k].requires_grad
    # The unused param got a zero gradient: AdamW only decayed it.
    assert torch.equal(fast.opt_state[0].exp_avg["unused.weight"], torch.zeros(2, 2, dtype=dtype))


def test_eager_step_under_torch_func_transforms_and_outer_autograd():
    """Under vmap and with params that require grad (an outer autograd graph), the step uses
    grad_and_value: it vmaps, and gradients flow to the outer graph."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = optim.sgd(lr=0.5)
    step = lk.train_step(model, lambda net, b: net(b).pow(2).mean(), opt)
    state = lk.TrainState.create(model, opt)
    x = torch.randn(4, 3)

    w = state.params["weight"].clone().requires_grad_()
    outer, _ = step(state.replace(params={**state.params, "weight": w}), x)
    outer.params["weight"].sum().backward()  # d(w - lr * grad(w)) / dw exists
    assert w.grad is not None and torch.isfinite(w.grad).all()

    members = [state, state.replace(params={k: v * 2 for k, v in state.params.items()})]
    ensemble, _ = lk.ensemble_step(step)(lk.ensemble.stack(members), x)
    for member, got in zip(members, lk.ensemble.unstack(ensemble), strict=True):
        want, _ = step(member, x)
        for k in want.params:
            torch.testing.assert_close(got.params[k], want.params[k], rtol=1e-6, atol=1e-7)


def test_eager_step_keeps_the_graph_to_a_batch_that_requires_grad(monkeypatch):
    """Differentiating through a step to its batch (dataset distillation) works in plain
    eager mode as with grad_and_value: same new params, same gradient to the batch."""
    from loopkit import step as step_module

    def run():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
        opt = optim.sgd(lr=0.5)
        step = lk.train_step(model, lambda net, b: (net(b[0]) - b[1]).pow(2).mean(), opt)
        x = torch.randn(6, 3, requires_grad=True)
        state, _ = step(lk.TrainState.create(model, opt), (x, torch.randn(6, 1)))
        state.params["0.weight"].sum().backward()
        return state.params["0.weight"].detach(), x.grad

    fast_w, fast_dx = run()
    monkeypatch.setattr(step_module, "_plain_autograd_applies", lambda params: False)
    ref_w, ref_dx = run()
    torch.testing.assert_close(fast_w, ref_w, rtol=0, atol=0)
    assert fast_dx is not None and ref_dx is not None
    torch.testing.assert_close(fast_dx, ref_dx, rtol=1e-6, atol=1e-7)


def test_eager_step_trains_under_inference_and_no_grad_modes():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = optim.sgd(lr=0.5)
    step = lk.train_step(model, lambda net, b: net(b).pow(2).mean(), opt)
    state, x = lk.TrainState.create(model, opt), torch.randn(4, 3)
    want, _ = step(state, x)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            got, _ = step(state, x)
        torch.testing.assert_close(got.params["weight"], want.params["weight"], rtol=0, atol=0)
        assert not torch.equal(got.params["weight"], state.params["weight"])


def test_a_mode_switch_inside_loss_fn_does_not_leak_out_of_the_step():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))

    def loss_fn(net, x):
        net.module.eval()  # e.g. a teacher pass, left in eval mode
        with torch.no_grad():
            target = net(x)
        net.module.train()
        net.module[1].eval()
        return F.mse_loss(net(x), target)

    opt = optim.sgd(lr=0.1)
    lk.train_step(model, loss_fn, opt)(lk.TrainState.create(model, opt), torch.randn(8, 3))
    assert all(m.training for m in model.modules())


class Checkpointed(nn.Module):
    """A block under activation checkpointing: its backward recomputes the forward."""

    def __init__(self, width: int, p: float, reentrant: bool = False):
        super().__init__()
        self.reentrant = reentrant
        self.inp, self.out = nn.Linear(5, width), nn.Linear(width, 3)
        self.block = nn.Sequential(
            nn.Linear(width, width), nn.BatchNorm1d(width), nn.Tanh(), nn.Dropout(p)
        )

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        h = checkpoint(self.block, torch.tanh(self.inp(x)), use_reentrant=self.reentrant)
        return self.out(h)


def _torch_loop(model, loss_fn, make_opt, batches, seed):
    """The imperative loop on a copy of ``model``, the global generator seeded as the
    state's ``rng`` is."""
    model = copy.deepcopy(model).train()
    opt = make_opt(model.parameters())
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for batch in batches:
            opt.zero_grad()
            out = loss_fn(model, batch)
            (out[0] if isinstance(out, tuple) else out).backward()
            opt.step()
    return model


@given(width=st.integers(2, 12), p=st.sampled_from([0.0, 0.3]), seed=st.integers(0, 2**16))
def test_activation_checkpointing_matches_the_imperative_loop(width, p, seed):
    """The backward's recomputation sees the step's params and buffers, not the module's
    own: the same gradients as torch's loop, and BatchNorm's statistics updated by the
    forward and again by the recomputation, as torch's are; Dropout's recomputed masks are
    the forward's."""
    torch.manual_seed(seed)
    model = Checkpointed(width, p).double()
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(6, 5, generator=g, dtype=torch.float64),
                torch.randint(0, 3, (6,), generator=g)) for _ in range(3)]  # fmt: skip
    opt = optim.sgd(lr=0.3, momentum=0.9)
    state, _ = run_loopkit(model, batches, opt, seed)
    want = _torch_loop(
        model, loss_fn, lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.9), batches, seed
    )
    assert_state_matches(state, want, **FP64)


def test_reentrant_checkpointing_is_named_with_its_fix():
    model = Checkpointed(4, 0.0, reentrant=True)
    opt = optim.sgd(lr=0.1)
    step = lk.train_step(model, loss_fn, opt)
    with pytest.raises(lk.StepError, match="use_reentrant=False"):
        step(lk.TrainState.create(model, opt), (torch.randn(4, 5), torch.randint(0, 3, (4,))))


@pytest.mark.parametrize("kind", ["train", "eval"])
def test_a_forward_that_writes_its_params_leaves_the_input_state_intact(kind):
    """Embedding(max_norm) renormalises its weight in place during the forward. The step
    reads the state's tensors without ever writing them; the new state is torch's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 6, max_norm=1.0), nn.Flatten(), nn.Linear(18, 4))

    def loss(net, batch):
        return F.cross_entropy(net(batch[0]), batch[1])

    x, y = torch.randint(0, 10, (5, 3)), torch.randint(0, 4, (5,))
    opt = optim.sgd(lr=0.5)
    state = lk.TrainState.create(model, opt)
    snapshot = lk.tree.tree_map(torch.clone, state)
    if kind == "train":
        new, _ = lk.train_step(model, loss, opt)(state, (x, y))
        want = _torch_loop(model, loss, lambda ps: torch.optim.SGD(ps, lr=0.5), [(x, y)], 0)
        assert_state_matches(new, want, rtol=1e-6, atol=1e-7)
    else:
        lk.eval_step(model, loss)(state, (x, y))
    for got, before in zip(lk.tree.tree_leaves(state), lk.tree.tree_leaves(snapshot), strict=True):
        assert torch.equal(got, before)


def test_a_frozen_param_written_by_the_forward_stays_intact_in_the_input_state():
    model = nn.Sequential(nn.Embedding(10, 6, max_norm=1.0), nn.Flatten(), nn.Linear(18, 4))
    model[0].weight.requires_grad_(False)
    opt = optim.sgd(lr=0.5)
    state = lk.TrainState.create(model, opt)
    before = state.buffers["0.weight"].clone()
    x, y = torch.randint(0, 10, (5, 3)), torch.randint(0, 4, (5,))
    new, _ = lk.train_step(model, lambda net, b: F.cross_entropy(net(b[0]), b[1]), opt)(
        state, (x, y)
    )
    assert torch.equal(state.buffers["0.weight"], before)
    want = _torch_loop(
        model, lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        lambda ps: torch.optim.SGD(ps, lr=0.5), [(x, y)], 0,
    )  # fmt: skip
    assert_state_matches(new, want, rtol=1e-6, atol=1e-7)


def _input_penalty_loss(net, batch):
    """Cross-entropy plus a penalty on the gradient with respect to the inputs (R1,
    WGAN-GP style): the input is a leaf loss_fn makes and drops."""
    x, y = batch
    x = x.clone().requires_grad_()
    loss = F.cross_entropy(net(x), y)
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    return loss + 0.1 * gx.pow(2).sum()


@given(seed=st.integers(0, 2**16), steps=st.integers(2, 4))
def test_a_gradient_penalty_on_the_inputs_trains_like_torch(seed, steps):
    """The penalty's own input leaf is no tensor the caller could differentiate to, so the
    new state carries no autograd graph and every step runs as the first."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(8, 6, generator=g, dtype=torch.float64),
                torch.randint(0, 4, (8,), generator=g)) for _ in range(steps)]  # fmt: skip
    opt = optim.adam(lr=0.05)
    state = lk.TrainState.create(model, opt)
    step = lk.train_step(model, _input_penalty_loss, opt)
    for batch in batches:
        state, metrics = step(state, batch)
    assert not any(t.requires_grad for t in lk.tree.tree_leaves(state))
    assert not metrics["loss"].requires_grad
    want = _torch_loop(
        model, _input_penalty_loss, lambda ps: torch.optim.Adam(ps, lr=0.05), batches, 0
    )
    assert_state_matches(state, want, **FP64)


def test_a_state_of_another_model_or_optimizer_is_named():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    batch = (torch.randn(4, 3), torch.randint(0, 2, (4,)))
    adam, sgd = optim.adam(lr=0.1), optim.sgd(lr=0.1, momentum=0.9)
    state = lk.TrainState.create(model, adam)
    step = lk.train_step(model, loss_fn, adam)
    missing = state.replace(params={k: v for k, v in state.params.items() if k != "2.bias"})
    with pytest.raises(lk.StepError, match=r"missing \['2.bias'\].*TrainState.create"):
        step(missing, batch)
    with pytest.raises(lk.StepError, match="ScaleByAdamState.*TraceState.*TrainState.create"):
        lk.train_step(model, loss_fn, sgd)(state, batch)


@pytest.mark.parametrize("kind", ["numpy", "shared"])
def test_states_of_tensors_without_copy_on_write_storage_train_as_any(kind):
    """torch cannot make copy-on-write views of numpy-backed or shared-memory storage: such
    tensors are handed to the model as they are."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = optim.adam(lr=0.1)
    state = lk.TrainState.create(model, opt)
    odd = {k: torch.from_numpy(v.numpy().copy()) for k, v in state.params.items()}
    if kind == "shared":
        odd = {k: v.clone().share_memory_() for k, v in state.params.items()}
    batch = (torch.randn(5, 3), torch.randint(0, 2, (5,)))
    step = lk.train_step(model, loss_fn, opt)
    want, _ = step(state, batch)
    got, _ = step(state.replace(params=odd), batch)
    for k in want.params:
        assert torch.equal(got.params[k], want.params[k])
    lk.eval_step(model, loss_fn)(state.replace(params=odd), batch)


def test_a_batch_computed_from_a_leaf_keeps_the_graph_to_that_leaf(monkeypatch):
    """The leaf behind a batch tensor (x = leaf.double()) is held by the graph only, yet the
    caller differentiates to it through x: the step keeps the graph, as grad_and_value."""
    from loopkit import step as step_module

    def hypergradient():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
        opt = optim.sgd(lr=0.5)
        step = lk.train_step(model, lambda net, b: (net(b[0]) - b[1]).pow(2).mean(), opt)
        x = torch.randn(6, 3, requires_grad=True).double()  # nothing else holds the leaf
        state, _ = step(lk.TrainState.create(model, opt), (x, torch.randn(6, 1).double()))
        (dx,) = torch.autograd.grad(state.params["0.weight"].sum(), x)
        return dx

    fast = hypergradient()
    monkeypatch.setattr(step_module, "_plain_autograd_applies", lambda params: False)
    torch.testing.assert_close(fast, hypergradient(), **FP64)


class SometimesRenormed(nn.Module):
    """Renormalises its embedding in place only for batches smaller than 8."""

    def __init__(self):
        super().__init__()
        self.emb, self.out = nn.Embedding(10, 4), nn.Linear(4, 3)

    def forward(self, x):
        norm = 1.0 if x.shape[0] < 8 else None
        return self.out(F.embedding(x, self.emb.weight, max_norm=norm).mean(1))


def test_a_forward_that_writes_its_params_only_sometimes_is_warned_of_then_guarded():
    torch.manual_seed(0)
    model, opt = SometimesRenormed(), optim.sgd(lr=0.1)
    step = lk.train_step(model, lambda n, b: F.cross_entropy(n(b[0]), b[1]), opt)

    def batch(n):
        return torch.randint(0, 10, (n, 3)), torch.randint(0, 3, (n,))

    state, _ = step(lk.TrainState.create(model, opt), batch(8))  # writes nothing
    with pytest.warns(UserWarning, match=r"wrote in place into the state's \['emb.weight'\]"):
        state, _ = step(state, batch(4))  # modified the state it was given
    before = state.params["emb.weight"].clone()
    step(state, batch(4))
    assert torch.equal(state.params["emb.weight"], before)


def test_a_first_call_protects_shared_memory_and_inference_mode_states():
    """Copy-on-write views cannot be made of shared-memory storage (the step copies it) and
    an inference tensor has no version counter (the step keeps passing views)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=0.5), nn.Flatten(), nn.Linear(12, 3))
    opt = optim.sgd(lr=0.1)

    def loss(net, batch):
        return F.cross_entropy(net(batch[0]), batch[1])

    batch = (torch.randint(0, 10, (5, 3)), torch.randint(0, 3, (5,)))
    state = lk.TrainState.create(model, opt)
    shared = state.replace(params={k: v.clone().share_memory_() for k, v in state.params.items()})
    before = shared.params["0.weight"].clone()
    lk.train_step(model, loss, opt)(shared, batch)
    assert torch.equal(shared.params["0.weight"], before)
    evaluate = lk.eval_step(model, loss)
    before = state.params["0.weight"].clone()
    for _ in range(2):
        with torch.inference_mode():
            evaluate(state, batch)
        assert torch.equal(state.params["0.weight"], before)


@pytest.mark.parametrize("kind", ["register_hook", "register_post_accumulate_grad_hook"])
def test_gradient_hooks_on_parameters_are_named_with_the_fix(kind):
    """The step differentiates copies of the state's params: a hook on the module's own
    Parameter would never run, so the step refuses it rather than ignore it."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = optim.sgd(lr=0.1)
    state = lk.TrainState.create(model, opt)
    batch = (torch.randn(4, 3), torch.randint(0, 2, (4,)))
    hook = (lambda g: g * 0) if kind == "register_hook" else (lambda p: None)
    handle = getattr(model[2].weight, kind)(hook)
    for step in (lk.train_step(model, loss_fn, opt), lk.dp_train_step(model, loss_fn, opt,
                 max_grad_norm=1.0, noise_multiplier=0.0)):  # fmt: skip
        with pytest.raises(lk.StepError, match=rf"'2.weight'.*{kind}.*never run.*Transform"):
            step(state, batch)
    handle.remove()
    lk.train_step(model, loss_fn, opt)(state, batch)


def _embedding_model(bag, sparse, seed, dtype):
    torch.manual_seed(seed)
    if bag:
        emb = nn.EmbeddingBag(10, 4, mode="sum", sparse=sparse)
        return nn.Sequential(emb, nn.Linear(4, 3)).to(dtype)
    return nn.Sequential(nn.Embedding(10, 4, sparse=sparse), nn.Flatten(), nn.Linear(12, 3)).to(
        dtype
    )


# torch.optim takes sparse gradients in SGD and Adagrad without weight decay; its
# clip_grad_norm_ takes none.
def _torch_takes_sparse(name, kwargs, clip_norm):
    return clip_norm is None and name in ("sgd", "adagrad") and not kwargs.get("weight_decay")


@settings(max_examples=25)
@given(
    opt_name_kwargs=st.sampled_from(sorted(KWARGS)).flatmap(
        lambda name: KWARGS[name].map(lambda kw: (name, kw))
    ),
    bag=st.booleans(),
    clip_norm=st.sampled_from([None, 0.5]),
    seed=st.integers(0, 2**16),
)
def test_sparse_embeddings_train_as_torch_trains_them(opt_name_kwargs, bag, clip_norm, seed):
    """``sparse=True`` embeddings: where torch.optim takes their sparse gradients (SGD,
    Adagrad) the step matches its sparse updates; elsewhere it matches the same model with
    ``sparse=False`` (the same gradient, dense), which every optimizer takes."""
    name, kwargs = opt_name_kwargs
    model = _embedding_model(bag, True, seed, torch.float64)
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randint(0, 10, (6, 3), generator=g), torch.randint(0, 3, (6,), generator=g))
               for _ in range(3)]  # fmt: skip
    opt = getattr(optim, name)(**kwargs)
    state, losses = run_loopkit(model, batches, opt, seed, clip_norm=clip_norm)
    reference = model
    if not _torch_takes_sparse(name, kwargs, clip_norm):
        reference = _embedding_model(bag, False, seed, torch.float64)
    ref, ref_losses = imperative_run(reference, batches, name, kwargs, seed=seed,
                                     clip_norm=clip_norm)  # fmt: skip
    torch.testing.assert_close(losses, ref_losses, **FP64)
    assert_state_matches(state, ref, **FP64)
    assert model[0].sparse  # restored after each call


@pytest.mark.parametrize("change", ["freeze", "unfreeze"])
def test_changing_requires_grad_after_the_state_was_made_is_named_with_the_fix(change):
    """The state decides what trains: a param frozen (or unfrozen) after
    ``TrainState.create`` would silently keep training (stay fixed), where torch's loop
    stops (starts) updating it."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model[0].weight.requires_grad_(change == "freeze")
    opt = optim.sgd(lr=0.1)
    batch = (torch.randn(4, 3), torch.randint(0, 2, (4,)))
    step = lk.train_step(model, loss_fn, opt)
    state, _ = step(lk.TrainState.create(model, opt), batch)
    model[0].weight.requires_grad_(change == "unfreeze")
    pattern = r"\['0.weight'\].*requires_grad.*optim.freeze.*TrainState.create"
    with pytest.raises(lk.StepError, match=pattern):
        step(state, batch)  # the same step
    with pytest.raises(lk.StepError, match=pattern):
        lk.train_step(model, loss_fn, opt)(state, batch)  # a step built after the change
    for s in (step, lk.train_step(model, loss_fn, opt)):  # a state made after it trains
        new, _ = s(lk.TrainState.create(model, opt), batch)
        assert ("0.weight" in new.params) == (change == "unfreeze")


class Warm(nn.Module):
    """Registers a warm-up counter on its first forward (or fills a None slot there)."""

    def __init__(self, slot):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        if slot:
            self.register_buffer("n", None)

    def forward(self, x):
        if getattr(self, "n", None) is None:
            self.register_buffer("n", torch.zeros(()))
        if self.training:
            self.n += 1
        return self.lin(x) * torch.clamp(self.n / 3, max=1.0)


@pytest.mark.parametrize("slot", [False, True])
def test_a_buffer_the_forward_registers_is_named_with_the_fix(slot):
    """A buffer the forward creates would live in the module, not the state: the step
    would be impure (the same state giving other losses) and a checkpoint would lose it."""
    torch.manual_seed(0)
    model, opt = Warm(slot), optim.sgd(lr=0.1)
    batch = (torch.randn(4, 3), torch.randint(0, 2, (4,)))
    state = lk.TrainState.create(model, opt)
    for make in (lk.train_step, lambda m, f, o: lk.eval_step(m, f)):
        with pytest.raises(lk.StepError, match=r"registered \['n'\].*forward before "
                                               r"lk.TrainState.create"):  # fmt: skip
            make(model, loss_fn, opt)(state, batch)
        assert getattr(model, "n", None) is None  # the module is as it was
    model(batch[0])  # the fix
    state = lk.TrainState.create(model, opt)
    step = lk.train_step(model, loss_fn, opt)
    first = [step(state, batch)[1]["loss"] for _ in range(2)]
    assert torch.equal(first[0], first[1])
    assert int(step(state, batch)[0].buffers["n"]) == 2


def test_eval_step_draws_from_the_rng_it_is_given():
    """eval does not advance ``rng``: the same state draws the same numbers; a state with
    another ``rng`` (as the eval_step docstring shows, for MC dropout) draws others."""
    model = nn.Sequential(nn.Linear(4, 32), nn.Linear(32, 2))

    def mc_loss(net, batch):
        return F.cross_entropy(F.dropout(net(batch[0]), 0.5, training=True), batch[1])

    state = lk.TrainState.create(model, optim.sgd(lr=0.1))
    evaluate = lk.eval_step(model, mc_loss)
    batch = (torch.randn(16, 4), torch.randint(0, 2, (16,)))
    same = {float(evaluate(state, batch)["loss"]) for _ in range(3)}
    draws = {float(evaluate(state.replace(rng=lk.rng_for(i)), batch)["loss"]) for i in range(3)}
    assert len(same) == 1 and len(draws) == 3


@pytest.mark.parametrize("shape", [(1,), (1, 1)])
def test_a_one_element_loss_trains_as_its_scalar(shape):
    """``loss.backward()`` takes any one-element loss (its implicit gradient is 1)."""
    model, opt, state = _linear_setup()
    batch = (torch.randn(4, 3), torch.randint(0, 2, (4,)))

    def shaped(net, b):
        loss, aux = loss_fn(net, b)
        return loss.reshape(shape), aux

    want_state, want = lk.train_step(model, loss_fn, opt)(state, batch)
    got_state, got = lk.train_step(model, shaped, opt)(state, batch)
    assert got["loss"].shape == ()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_state.params, want_state.params, rtol=0, atol=0)
    torch.testing.assert_close(lk.eval_step(model, shaped)(state, batch), want, rtol=0, atol=0)


@pytest.mark.parametrize("precision", [None, "bf16"])
def test_a_loss_scaler_without_fp16_scales_the_loss_as_grad_scaler(precision):
    """Regression: the loss was scaled only with precision='fp16', while the scaler always
    divides the gradients by the scale, so with a scaler at another precision training ran
    2**16 times too slowly. torch's GradScaler scales the loss whatever the autocast: the
    step equals its loop (scale growth included), and refuses clip_norm, which would clip
    the scaled gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g))
               for _ in range(4)]  # fmt: skip
    scaling = dict(init_scale=2.0**10, growth_interval=2)
    opt = lk.precision.dynamic_loss_scale(optim.sgd(lr=0.1, momentum=0.9), **scaling)
    state, losses = run_loopkit(model, batches, opt, 0, precision=precision)
    _, metrics = lk.train_step(model, loss_fn, opt, precision=precision)(
        lk.TrainState.create(model, opt), batches[0]
    )
    assert float(metrics["loss_scale"]) == 2.0**10

    ref = copy.deepcopy(model)
    torch_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", **scaling)
    want = []
    for batch in batches:
        torch_opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss, _ = loss_fn(ref, batch)
        scaler.scale(loss).backward()
        scaler.step(torch_opt)
        scaler.update()
        want.append(loss.detach().float())
    torch.testing.assert_close(losses.float(), torch.stack(want), **FP32)
    assert_state_matches(state, ref, **FP32)
    assert float(state.opt_state.scale) == scaler.get_scale() == 2.0**12

    step = lk.train_step(model, loss_fn, opt, precision=precision, clip_norm=1.0)
    with pytest.raises(lk.StepError, match="clip_norm with a loss scaler .* scaled gradients"):
        step(lk.TrainState.create(model, opt), batches[0])


def test_numpy_scalar_metrics_become_tensors():
    """Regression: NumPy scalars other than np.float64 (a float subclass) were refused. They
    become tensors of their dtype, in the eager and the compiled step (where Dynamo traces
    them as 0-dim arrays)."""
    model = nn.Linear(3, 2)
    opt = optim.sgd(lr=0.1)
    values = {
        "f32": np.float32(0.5),
        "i64": np.int64(3),
        "flag": np.bool_(True),
        "f64": np.float64(2),
    }

    def with_metrics(net, batch):
        return loss_fn(net, batch)[0], dict(values)

    batch = (torch.randn(4, 3), torch.randint(0, 2, (4,)))
    for kwargs in ({}, {"compile": True, "backend": "aot_eager"}):
        step = lk.train_step(model, with_metrics, opt, **kwargs)
        _, metrics = step(lk.TrainState.create(model, opt), batch)
        for k, v in values.items():
            assert metrics[k].item() == v.item(), (k, kwargs)
        assert metrics["f32"].dtype == torch.float32 and metrics["flag"].dtype == torch.bool


@pytest.mark.compile
@pytest.mark.parametrize("compile", [False, True])
def test_a_loss_that_depends_on_no_parameter_is_an_error(compile):
    """torch's ``loss.backward()`` refuses a loss without a graph (computed under no_grad,
    detached, rebuilt from ``.item()``); the step once trained on with zero gradients, its
    params moved by weight decay alone. Compiled, the same error (the check is fixed per
    trace). A loss that ignores some params still gives them zeros (README)."""
    model = nn.Linear(3, 2)
    opt = optim.sgd(lr=0.1, weight_decay=0.5)
    batch = (torch.randn(4, 3), torch.randint(0, 2, (4,)))

    def detached(net, b):
        return F.cross_entropy(net(b[0]), b[1]).detach()

    state = lk.TrainState.create(model, opt)
    with pytest.raises(lk.LossError, match="the loss depends on no parameter"):
        lk.train_step(model, detached, opt, compile=compile)(state, batch)
