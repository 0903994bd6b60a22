"""Masks, parameter groups, freezing, accumulation and averaging against torch.optim's
param_groups, the imperative accumulation loop and AveragedModel."""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import loopkit as lk
from loopkit import optim
from tests.helpers import assert_state_matches, build_mlp, loss_fn, make_batches, mlp_specs

FP32 = dict(rtol=1e-5, atol=1e-6)
FP64 = dict(rtol=1e-10, atol=1e-12)


def is_matrix(name, p):
    return p.ndim > 1


def run(model, opt, batches, seed=0, **kw):
    state = lk.TrainState.create(model, opt, seed=seed)
    step = lk.train_step(model, loss_fn, opt, **kw)
    for b in batches:
        state, _ = step(state, b)
    return state


def torch_loop(model, make_opt, batches, seed=0, every=1, after_step=None):
    """The imperative loop; with every=k, k micro-batches per step via (loss / k).backward()."""
    model = copy.deepcopy(model).train()
    opt = make_opt(model)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for i, b in enumerate(batches):
            loss, _ = loss_fn(model, b)
            (loss / every).backward()
            if (i + 1) % every == 0:
                opt.step()
                opt.zero_grad()
                if after_step:
                    after_step(model)
    return model


@given(spec=mlp_specs(batchnorm=False), seed=st.integers(0, 2**16), wd=st.floats(1e-3, 0.2),
       lr_ratio=st.floats(0.1, 10.0))  # fmt: skip
def test_param_groups_match_torch(spec, seed, wd, lr_ratio):
    """Matrices: AdamW with decay; vectors: another lr and no decay -- torch's param_groups."""
    model = build_mlp(spec, seed, torch.float64)
    batches = make_batches(spec, [8, 8, 8], seed, torch.float64)
    opt = optim.multi_transform(
        {
            "decay": optim.adamw(lr=1e-2, weight_decay=wd),
            "no_decay": optim.adamw(lr=1e-2 * lr_ratio, weight_decay=0.0),
        },
        lambda name, p: "decay" if p.ndim > 1 else "no_decay",
    )
    state = run(model, opt, batches, seed)

    def torch_opt(m):
        named = list(m.named_parameters())
        return torch.optim.AdamW(
            [
                {"params": [p for _, p in named if p.ndim > 1], "weight_decay": wd},
                {"params": [p for _, p in named if p.ndim <= 1], "weight_decay": 0.0,
                 "lr": 1e-2 * lr_ratio},
            ],
            lr=1e-2,
        )  # fmt: skip

    assert_state_matches(state, torch_loop(model, torch_opt, batches, seed), **FP64)


@given(spec=mlp_specs(batchnorm=False), seed=st.integers(0, 2**16))
def test_masked_weight_decay_leaves_masked_leaves_alone(spec, seed):
    model = build_mlp(spec, seed)
    params = lk.TrainState.create(model, optim.sgd()).params
    tx = optim.masked(optim.add_decayed_weights(0.5), is_matrix)
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    out, _ = tx.update(grads, tx.init(params), params)
    for k, p in params.items():
        want = grads[k] + 0.5 * p if p.ndim > 1 else grads[k]
        assert torch.equal(out[k], want), k


def test_freeze_keeps_params_still_and_trains_the_rest():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    frozen = {"0.weight", "0.bias"}
    opt = optim.freeze(optim.adamw(lr=1e-2, weight_decay=0.1), lambda n, p: n in frozen)
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(4)]
    state = run(model, opt, batches)
    for name in frozen:
        assert torch.equal(state.params[name], dict(model.named_parameters())[name])

    def torch_opt(m):
        return torch.optim.AdamW(
            [p for n, p in m.named_parameters() if n not in frozen], lr=1e-2, weight_decay=0.1
        )

    assert_state_matches(state, torch_loop(model, torch_opt, batches), **FP32)


@given(spec=mlp_specs(), every=st.integers(1, 4), seed=st.integers(0, 2**16),
       name=st.sampled_from(["sgd", "adam", "adamw"]))  # fmt: skip
def test_accumulation_matches_the_imperative_loop(spec, every, seed, name):
    model = build_mlp(spec, seed, torch.float64)
    batches = make_batches(spec, [8] * (2 * every), seed, torch.float64)
    kwargs = dict(lr=1e-2, weight_decay=0.01) | ({"momentum": 0.9} if name == "sgd" else {})
    inner = getattr(optim, name)(**kwargs)
    state = run(model, optim.accumulate(inner, every), batches, seed)
    torch_cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    ref = torch_loop(model, lambda m: torch_cls(m.parameters(), **kwargs), batches, seed, every)
    assert_state_matches(state, ref, **FP64)


@given(spec=mlp_specs(batchnorm=False, dropout=0.0), every=st.integers(2, 4),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_accumulation_equals_one_step_on_the_big_batch(spec, every, seed):
    model = build_mlp(spec, seed, torch.float64)
    micro = make_batches(spec, [6] * every, seed, torch.float64)
    big = [(torch.cat([b[0] for b in micro]), torch.cat([b[1] for b in micro]))]
    inner = optim.adam(lr=1e-2)
    accumulated = run(model, optim.accumulate(inner, every), micro)
    one_step = run(model, inner, big)
    for k in one_step.params:
        torch.testing.assert_close(accumulated.params[k], one_step.params[k], **FP64)


def test_accumulate_rejects_bad_every():
    with pytest.raises(ValueError, match="every must be a positive integer"):
        optim.accumulate(optim.sgd(), 0)


@pytest.mark.parametrize("kind", ["ema", "swa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(spec=mlp_specs(batchnorm=False, dropout=0.0), seed=st.integers(0, 2**16),
       decay=st.floats(0.5, 0.999), start=st.integers(0, 3), every=st.integers(1, 3))  # fmt: skip
def test_averaging_matches_averaged_model(kind, dtype, spec, seed, decay, start, every):
    model = build_mlp(spec, seed, dtype)
    batches = make_batches(spec, [8] * 7, seed, dtype)
    average = (
        optim.ema(decay, start=start, every=every)
        if kind == "ema"
        else optim.swa(start=start, every=every)
    )
    # SGD inside: averaging is what is tested, and SGD adds no rounding amplification of its own
    opt = optim.chain(optim.sgd(lr=0.05, momentum=0.9), average)
    state = run(model, opt, batches, seed)

    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    holder = {}
    steps = [0]

    def make_opt(m):
        fn = get_ema_multi_avg_fn(decay) if kind == "ema" else None
        holder["avg"] = AveragedModel(m, multi_avg_fn=fn)
        return torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)

    def after_step(m):
        steps[0] += 1
        t = steps[0]
        if t >= start and (t - start) % every == 0:
            holder["avg"].update_parameters(m)

    ref = torch_loop(model, make_opt, batches, seed, after_step=after_step)
    assert_state_matches(state, ref, **(FP32 if dtype == torch.float32 else FP64))
    averaged = optim.averaged_params(state.opt_state)
    tol = FP32 if dtype == torch.float32 else FP64
    for name, p in holder["avg"].module.named_parameters():
        torch.testing.assert_close(averaged[name], p.detach(), **tol)


@pytest.mark.parametrize("foreach", [None, True, False])
def test_clip_by_value_matches_torch(foreach):
    g = {"a": torch.randn(5, 3) * 3, "b": torch.randn(4) * 3, "c": torch.tensor([float("nan")])}
    ps = [torch.zeros_like(v, requires_grad=True) for v in g.values()]
    for p, v in zip(ps, g.values(), strict=True):
        p.grad = v.clone()
    torch.nn.utils.clip_grad_value_(ps, 1.5, foreach=foreach)
    out, _ = optim.clip_by_value(1.5, foreach=foreach).update(g, (), None)
    for p, k in zip(ps, g, strict=True):
        torch.testing.assert_close(out[k], p.grad, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("foreach", [None, True, False])
@pytest.mark.parametrize("clip", ["norm", "value"])
def test_clip_foreach_on_a_device_without_foreach_kernels_as_torch(clip, foreach):
    """torch raises for ``foreach=True`` where the device has no multi-tensor kernels (here
    the meta device) and falls back to per-tensor ops for ``None``; so does loopkit."""
    grads = {"a": torch.zeros(3, device="meta"), "b": torch.zeros(2, device="meta")}
    ps = [torch.zeros_like(v, requires_grad=True) for v in grads.values()]
    for p, v in zip(ps, grads.values(), strict=True):
        p.grad = v.clone()
    if clip == "norm":
        want = _outcome(torch.nn.utils.clip_grad_norm_, ps, 1.0, foreach=foreach)
        tx = optim.clip_by_global_norm(1.0, foreach=foreach)
    else:
        want = _outcome(torch.nn.utils.clip_grad_value_, ps, 1.0, foreach=foreach)
        tx = optim.clip_by_value(1.0, foreach=foreach)
    assert _outcome(tx.update, grads, (), None) == want


def _outcome(fn, *args, **kwargs) -> str:
    try:
        fn(*args, **kwargs)
    except RuntimeError as e:
        return f"RuntimeError: {e}"
    return "ran"


def test_labels_must_cover_every_param():
    tx = optim.multi_transform({"a": optim.sgd()}, {"w": "a"})
    with pytest.raises(ValueError, match=r"no entry for \['b'\]"):
        tx.init({"w": torch.zeros(2), "b": torch.zeros(2)})
    tx = optim.multi_transform({"a": optim.sgd()}, lambda n, p: "z")
    with pytest.raises(ValueError, match=r"labels \['z'\] have no transform"):
        tx.init({"w": torch.zeros(2)})


@pytest.mark.parametrize("average", [optim.ema, optim.swa])
def test_averaging_compiles_once(average):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = nn.Linear(3, 2)
    opt = optim.chain(optim.sgd(lr=0.1), average())
    counter = CompileCounter()
    step = lk.train_step(model, lambda net, b: net(b).pow(2).mean(), opt, compile=True,
                         backend=counter)  # fmt: skip
    state = lk.TrainState.create(model, opt)
    for _ in range(4):
        state, _ = step(state, torch.randn(5, 3))
    assert counter.frame_count == 1


def test_ema_inside_accumulate_sees_real_updates_only():
    params = {"w": torch.zeros(2)}
    tx = optim.accumulate(optim.chain(optim.sgd(lr=1.0), optim.ema(0.5)), 2)
    state = tx.init(params)
    for g in [1.0, 3.0, 1.0, 1.0]:  # two real updates: -2 (mean of 1, 3) then -1
        updates, state = tx.update({"w": torch.full((2,), g)}, state, params)
        params = optim.apply_updates(params, updates)
    # first average = copy of -2; second = lerp(-2, -3, 0.5) = -2.5
    torch.testing.assert_close(optim.averaged_params(state)["w"], torch.full((2,), -2.5))
