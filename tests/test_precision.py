"""Mixed precision against torch's own: autocast loops and torch.amp.GradScaler."""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import loopkit as lk
from loopkit import optim
from loopkit.precision import LossScaleState, dynamic_loss_scale
from tests.helpers import loss_fn

# A value that overflows float16 (max 65504) when multiplied into a gradient.
INF = float("inf")


@given(
    grads=st.lists(
        st.lists(
            st.sampled_from([0.5, -1.0, 3e-3, 2.0, INF, -INF, float("nan")]), min_size=3, max_size=3
        ),
        min_size=1,
        max_size=12,
    ),
    init_scale=st.sampled_from([1.0, 2.0**4, 2.0**16, 2.0**127]),
    # factors that are not powers of two round differently in float32 than in float64
    growth_factor=st.sampled_from([2.0, 1.5, 1.7, 3.0, 1.1]),
    backoff_factor=st.sampled_from([0.5, 0.25, 0.3, 0.7, 0.9]),
    growth_interval=st.integers(1, 4),
)
def test_loss_scaler_decides_as_grad_scaler(
    grads, init_scale, growth_factor, backoff_factor, growth_interval
):
    """Fed the same scaled gradients, the scaler keeps GradScaler's scale after every step,
    skips the same steps, and leaves the params where torch.optim.SGD + GradScaler does
    (2**127 grows past float32's range: both keep the scale)."""
    kw = dict(
        init_scale=init_scale,
        growth_factor=growth_factor,
        backoff_factor=backoff_factor,
        growth_interval=growth_interval,
    )
    p = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    torch_opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", **kw)
    tx = dynamic_loss_scale(optim.sgd(lr=0.1, momentum=0.9), **kw)
    params = {"p": p.detach().clone()}
    state = tx.init(params)
    for g in grads:
        torch_opt.zero_grad()
        scaler.scale((p * torch.tensor(g)).sum()).backward()  # grad: g * scale
        scaled = p.grad.clone()
        scaler.step(torch_opt)
        scaler.update()
        updates, state = tx.update({"p": scaled}, state, params)
        params = optim.apply_updates(params, updates)
        assert float(state.scale) == scaler.get_scale()
        assert int(state.growth_tracker) == scaler._get_growth_tracker()
        torch.testing.assert_close(params["p"], p.detach(), rtol=1e-6, atol=1e-7)


def test_loss_scaler_validates_like_grad_scaler():
    with pytest.raises(ValueError, match="growth factor"):
        dynamic_loss_scale(optim.sgd(), growth_factor=1.0)
    for factor in (1.0, 0.0, -0.5):  # torch takes 0 and below, which break the scale
        with pytest.raises(ValueError, match="backoff factor must be between 0 and 1"):
            dynamic_loss_scale(optim.sgd(), backoff_factor=factor)
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients.*float32"):
        dynamic_loss_scale(optim.sgd()).init({"w": torch.ones(2, dtype=torch.float16)})
    with pytest.raises(ValueError, match="growth_interval"):
        dynamic_loss_scale(optim.sgd(), growth_interval=0)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(),
                         nn.Linear(32, 4))  # fmt: skip


def _batches(n=5):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 4, (16,), generator=g))
            for _ in range(n)]  # fmt: skip


def test_bf16_step_matches_the_imperative_autocast_loop():
    model, batches = _model(), _batches()
    ref = copy.deepcopy(model)
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = optim.adamw(lr=1e-2)
    step = lk.train_step(model, loss_fn, opt, precision="bf16")
    state = lk.TrainState.create(model, opt)
    for batch in batches:
        torch_opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = loss_fn(ref, batch)
        loss.backward()
        torch_opt.step()
        state, metrics = step(state, batch)
        assert metrics["loss"] == loss.detach()  # the same bf16 computation
    for name, p in ref.named_parameters():
        assert state.params[name].dtype == torch.float32  # fp32 master params
        torch.testing.assert_close(state.params[name], p.detach(), rtol=1e-5, atol=1e-6)


def test_fp16_step_matches_the_imperative_grad_scaler_loop():
    """init_scale 2**24 overflows float16 in the first steps: the same steps are skipped,
    the scale backs off and then grows (growth_interval=2) as GradScaler's."""
    model, batches = _model(), _batches(8)
    kw = dict(init_scale=2.0**24, growth_interval=2)
    ref = copy.deepcopy(model)
    torch_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", **kw)
    opt = dynamic_loss_scale(optim.sgd(lr=0.05, momentum=0.9), **kw)
    step = lk.train_step(model, loss_fn, opt, precision="fp16")
    state = lk.TrainState.create(model, opt)
    scales = []
    for batch in batches:
        torch_opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss, _ = loss_fn(ref, batch)
        scaler.scale(loss).backward()
        scaler.step(torch_opt)
        scaler.update()
        state, metrics = step(state, batch)
        scales.append(float(metrics["loss_scale"]))
        assert float(state.opt_state.scale) == scaler.get_scale()
    assert scales[0] > min(scales)  # it did back off
    for name, p in ref.named_parameters():
        torch.testing.assert_close(state.params[name], p.detach(), rtol=1e-5, atol=1e-6)


def test_a_schedule_counts_the_updates_the_scaler_applied():
    """Skipped steps keep the inner state, the schedule's count included: as a loop that
    steps its scheduler only when ``scaler.step`` did not skip."""
    model, batches = _model(), _batches(8)
    kw = dict(init_scale=2.0**24, growth_interval=2)
    ref = copy.deepcopy(model)
    torch_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(torch_opt, step_size=2, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", **kw)
    lr = optim.schedules.step_lr(0.1, step_size=2, gamma=0.5)
    opt = dynamic_loss_scale(optim.sgd(lr=lr, momentum=0.9), **kw)
    step = lk.train_step(model, loss_fn, opt, precision="fp16")
    state = lk.TrainState.create(model, opt)
    skipped = 0
    for batch in batches:
        torch_opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss, _ = loss_fn(ref, batch)
        scaler.scale(loss).backward()
        scale = scaler.get_scale()
        scaler.step(torch_opt)
        scaler.update()
        if scaler.get_scale() < scale:
            skipped += 1
        else:
            sched.step()
        state, _ = step(state, batch)
    assert skipped > 0
    for name, p in ref.named_parameters():
        torch.testing.assert_close(state.params[name], p.detach(), rtol=1e-5, atol=1e-6)


def test_precision_errors_name_the_fix():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="precision must be"):
        lk.train_step(model, loss_fn, optim.sgd(), precision="fp8")
    with pytest.raises(ValueError, match=r"dynamic_loss_scale\(chain\(clip_by_global_norm"):
        lk.train_step(model, loss_fn, dynamic_loss_scale(optim.sgd()), precision="fp16",
                      clip_norm=1.0)  # fmt: skip
    step = lk.train_step(model, loss_fn, optim.sgd(), precision="fp16")
    state = lk.TrainState.create(model, optim.sgd())
    with pytest.raises(lk.StepError, match="dynamic_loss_scale"):
        step(state, (torch.randn(4, 3), torch.randint(0, 2, (4,))))
    scaled = dynamic_loss_scale(optim.sgd())
    assert isinstance(lk.TrainState.create(model, scaled).opt_state, LossScaleState)


def test_bfloat16_gradients_are_unscaled_in_float32_as_grad_scaler_does():
    """A scale that is not a power of two: its reciprocal rounded to bfloat16 would move
    the update by 0.1%; GradScaler multiplies in float32 and rounds once."""
    kw = dict(init_scale=2.0**16 * 0.3**3)
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(64).bfloat16())
    scaler = torch.amp.GradScaler("cpu", **kw)
    scaler.scale((p * torch.randn(64).bfloat16()).sum()).backward()
    params, scaled = {"p": p.detach().clone()}, {"p": p.grad.clone()}
    torch_opt = torch.optim.SGD([p], lr=1.0)
    scaler.step(torch_opt)
    tx = dynamic_loss_scale(optim.sgd(lr=1.0), **kw)
    updates, _ = tx.update(scaled, tx.init(params), params)
    assert torch.equal(optim.apply_updates(params, updates)["p"], p.detach())


@given(
    every=st.sampled_from([1, 2, 4]),
    overflows=st.sets(st.integers(0, 8), max_size=3),
    growth_interval=st.integers(1, 3),
    weight_decay=st.sampled_from([0.0, 0.01]),
)
def test_fp16_accumulation_follows_torch_amp_recipe(every, overflows, growth_interval,
                                                    weight_decay):  # fmt: skip
    """``dynamic_loss_scale(accumulate(opt, k))`` against torch's AMP recipe for gradient
    accumulation: ``scaler.scale(loss / k).backward()`` per micro-batch, ``scaler.step``
    and ``scaler.update`` once per k. An overflowing micro-batch (inputs scaled past
    float16's range) skips its whole window, and the scale changes once per window.
    ``k`` is a power of two: torch divides the loss by ``k`` before the float16 backward,
    loopkit the float32 gradients after it, which round alike only then (with k = 3 one
    weight in 1024 differed by 3e-5 after three windows, all decisions equal). The inner
    optimizer is SGD: with Adam, 1-ulp differences between its update and torch's
    (3e-8 after one step, on bitwise equal gradients) flip some params' float16 casts in
    later forwards, which Adam's normalised steps then carry past 1e-6."""
    model = _model()
    g = torch.Generator().manual_seed(2)
    batches = [
        (torch.randn(16, 6, generator=g) * (1e4 if i in overflows else 1.0),
         torch.randint(0, 4, (16,), generator=g))
        for i in range(9)
    ]  # fmt: skip
    kw = dict(init_scale=2.0**12, growth_interval=growth_interval)
    hyper = dict(lr=0.05, momentum=0.9, weight_decay=weight_decay)
    ref = copy.deepcopy(model)
    torch_opt = torch.optim.SGD(ref.parameters(), **hyper)
    scaler = torch.amp.GradScaler("cpu", **kw)
    opt = dynamic_loss_scale(optim.accumulate(optim.sgd(**hyper), every), **kw)
    step = lk.train_step(model, loss_fn, opt, precision="fp16")
    state = lk.TrainState.create(model, opt)
    for i, batch in enumerate(batches):
        with torch.autocast("cpu", dtype=torch.float16):
            loss, _ = loss_fn(ref, batch)
        scaler.scale(loss / every).backward()
        if (i + 1) % every == 0:
            scaler.step(torch_opt)
            scaler.update()
            torch_opt.zero_grad()
        state, metrics = step(state, batch)
        assert float(state.opt_state.scale) == scaler.get_scale()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(state.params[name], p.detach(), rtol=1e-5, atol=1e-6)


def test_a_loss_scaler_inside_another_transform_is_named_with_the_fix():
    model = nn.Linear(3, 2)
    batch = (torch.randn(4, 3), torch.randint(0, 2, (4,)))
    for opt in (optim.chain(dynamic_loss_scale(optim.sgd())),
                optim.accumulate(dynamic_loss_scale(optim.sgd()), 2)):  # fmt: skip
        for precision in (None, "fp16"):
            step = lk.train_step(model, loss_fn, opt, precision=precision)
            with pytest.raises(lk.StepError, match="inside another transform.*outermost"):
                step(lk.TrainState.create(model, opt), batch)


def test_accumulate_deeper_than_the_scalers_direct_inner_is_named_with_the_fix():
    """``dynamic_loss_scale(chain(clip, accumulate(opt, k)))`` decided per micro-batch (the
    scale moved and an overflow skipped one micro-batch of a window), against torch's AMP
    recipe, silently; it is an error naming the composition that follows the recipe, which
    still builds."""
    params = {"w": torch.zeros(3)}
    for nested in (
        optim.chain(optim.accumulate(optim.sgd(lr=0.1), 2)),
        optim.chain(optim.clip_by_global_norm(1.0), optim.accumulate(optim.sgd(lr=0.1), 2)),
    ):
        with pytest.raises(ValueError, match=r"direct inner transform.*dynamic_loss_scale\(acc"):
            dynamic_loss_scale(nested).init(params)
    fine = dynamic_loss_scale(optim.accumulate(optim.chain(optim.clip_by_global_norm(1.0),
                                                           optim.sgd(lr=0.1)), 2))  # fmt: skip
    fine.init(params)
