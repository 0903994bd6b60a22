"""Functional optimizers against torch.optim on random params and gradients."""

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import loopkit as lk
from loopkit import optim
from tests.helpers import KWARGS, TORCH_OPTIMIZERS, OpCounter

# fp32: 1e-5 relative. The absolute floor is for elements that cancel to near zero from O(1)
# terms: torch's `param.add_(grad, alpha=-lr)` rounds once (a fused multiply-add), loopkit's
# `p + (-lr * g)` twice, so such an element may differ by one ulp of its O(1) terms (2.4e-7
# at magnitude 2; hypothesis found one for SGD with nesterov, maximize and weight decay).
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-13)}


@st.composite
def params_and_grads(draw, dtype):
    """A dict of random tensors (names and shapes like a model's) and `steps` gradients."""
    seed = draw(st.integers(0, 2**16))
    shapes = draw(st.lists(st.lists(st.integers(1, 5), max_size=3), min_size=1, max_size=4))
    steps = draw(st.integers(1, 6))
    g = torch.Generator().manual_seed(seed)
    params = {
        f"layer{i}.w": torch.randn(tuple(s), generator=g, dtype=dtype) for i, s in enumerate(shapes)
    }
    grads = [
        {k: torch.randn(v.shape, generator=g, dtype=dtype) for k, v in params.items()}
        for _ in range(steps)
    ]
    return params, grads


def torch_reference(params, grads, name, kwargs):
    ps = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = TORCH_OPTIMIZERS[name](ps.values(), **kwargs)
    for gs in grads:
        for k, p in ps.items():
            p.grad = gs[k].clone()
        opt.step()
    return {k: v.detach() for k, v in ps.items()}


def loopkit_run(params, grads, tx):
    state = tx.init(params)
    for gs in grads:
        updates, state = tx.update(gs, state, params)
        params = optim.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(KWARGS))
@given(data=st.data())
def test_optimizer_matches_torch_optim(name, dtype, data):
    kwargs = data.draw(KWARGS[name])
    params, grads = data.draw(params_and_grads(dtype))
    got, _ = loopkit_run(params, grads, getattr(optim, name)(**kwargs))
    want = torch_reference(params, grads, name, kwargs)
    for k in want:
        torch.testing.assert_close(got[k], want[k], **TOL[dtype])


def test_defaults_match_torch():
    for name, cls in TORCH_OPTIMIZERS.items():
        ours = inspect.signature(getattr(optim, name)).parameters
        theirs = inspect.signature(cls).parameters
        for arg, p in ours.items():
            assert arg in theirs, f"{name}: {arg} is not a torch.optim.{cls.__name__} argument"
            assert p.default == theirs[arg].default, f"{name}({arg}) default differs"


def test_adam_decoupled_weight_decay_is_adamw():
    params = {"w": torch.randn(3, 4, dtype=torch.float64)}
    grads = [{"w": torch.randn(3, 4, dtype=torch.float64)} for _ in range(3)]
    a, _ = loopkit_run(
        params, grads, optim.adam(lr=0.1, weight_decay=0.1, decoupled_weight_decay=True)
    )
    b, _ = loopkit_run(params, grads, optim.adamw(lr=0.1, weight_decay=0.1))
    torch.testing.assert_close(a["w"], b["w"], rtol=0, atol=0)


def test_lr_is_kept_in_the_state():
    params = {"w": torch.zeros(2)}
    tx = optim.sgd(lr=optim.schedules.linear(1.0, start_factor=0.5, total_iters=2))
    _, state = loopkit_run(params, [{"w": torch.ones(2)}] * 3, tx)
    lr_state = state[-1]
    assert lr_state.lr.dtype == torch.float64 and float(lr_state.lr) == 1.0
    assert int(lr_state.count) == 3


@given(
    lr=st.floats(1e-4, 10.0),
    start=st.floats(0.01, 1.0),
    end=st.floats(0.0, 1.0),
    total=st.integers(-3, 20) | st.floats(0.1, 20.0),  # torch takes any number
    steps=st.integers(1, 40),
)
def test_linear_schedule_matches_linear_lr(lr, start, end, total, steps):
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=lr)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start, end, total_iters=total)
    ours = optim.schedules.linear(lr, start, end, total)
    for t in range(steps):
        got = float(ours(torch.tensor(t)))
        want = sched.get_last_lr()[0]
        # torch updates the lr recursively, so where the exact lr is 0 (end_factor=0) it
        # holds rounding noise of order 1e-17 * lr: compare relative to the base lr there.
        assert got == pytest.approx(want, rel=1e-12, abs=1e-12 * lr)
        opt.step()
        sched.step()


def test_constant_schedule_and_warmup():
    assert float(optim.schedules.constant(0.3)(torch.tensor(7))) == 0.3
    warm = optim.schedules.linear_warmup(1.0, warmup_steps=4, start_factor=0.2)
    values = [float(warm(torch.tensor(t))) for t in range(6)]
    assert values == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])


MIXED = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@given(
    max_norm=st.floats(1e-3, 10.0),
    norm_type=st.sampled_from([2.0, 1.0, 3.0, float("inf")]),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.float64, "mixed"]),
    foreach=st.sampled_from([None, True, False]),
)
def test_clip_by_global_norm_matches_clip_grad_norm(max_norm, norm_type, seed, dtype, foreach):
    """Bitwise torch's, for each of its ``foreach`` choices, also for a mix of dtypes (the
    coefficient is not rounded to a float16 leaf's dtype before it scales it)."""
    g = torch.Generator().manual_seed(seed)
    dtypes = MIXED if dtype == "mixed" else (dtype,) * 4
    grads = {f"g{i}": torch.randn(i + 1, 3, generator=g).to(d) for i, d in enumerate(dtypes)}
    ps = [torch.zeros_like(v, requires_grad=True) for v in grads.values()]
    for p, v in zip(ps, grads.values(), strict=True):
        p.grad = v.clone()
    norm = torch.nn.utils.clip_grad_norm_(ps, max_norm, norm_type, foreach=foreach)
    clip = optim.clip_by_global_norm(max_norm, norm_type, foreach=foreach)
    clipped, _ = clip.update(grads, (), None)
    total = optim.global_norm(grads, norm_type, foreach=foreach)
    torch.testing.assert_close(total, norm, rtol=0, atol=0)
    for p, k in zip(ps, grads, strict=True):
        torch.testing.assert_close(clipped[k], p.grad, rtol=0, atol=0)


# --- validation: the conditions torch.optim rejects --------------------------------------


TORCH_CLASSES = {**TORCH_OPTIMIZERS, "muon": torch.optim.Muon}
NAN = float("nan")
# Values of a number argument that torch rejects somewhere, or that sit on a boundary: each
# given to every numeric argument of every optimizer. A NaN fails `not 0.0 <= x` but passes
# SGD's `x < 0.0`; ints and tensors are printed as given.
BAD_NUMBERS = [-1.0, -1, NAN, 0.0, 1.0, 1.5, 0.5, torch.tensor(-1.0), torch.tensor([-0.5])]


def _number_arguments(name: str) -> list[str]:
    """The numeric arguments, less Muon's ``ns_steps``, which fixes the structure: loopkit
    checks it when the optimizer is built, torch at its first step."""
    factory = getattr(optim, name)
    static = getattr(factory, "static_args", ())
    return [
        arg
        for arg, p in inspect.signature(factory).parameters.items()
        if isinstance(p.default, (int, float))
        and not isinstance(p.default, bool)
        and arg not in static
    ]


def _argument_cases() -> list[tuple[str, dict]]:
    cases = [
        (name, {arg: value})
        for name in TORCH_CLASSES
        for arg in _number_arguments(name)
        for value in BAD_NUMBERS
    ]
    pairs = {
        "betas": [(NAN, 0.999), (0.9, 1.0), (-0.1, 0.9), (0.9,), (0.9, 1.0, 0.5), (0, 0.999),
                  (0.9, 1), (torch.tensor(0.9), 0.999), (torch.tensor(0.9), torch.tensor(0.99)),
                  (torch.tensor(1.0), torch.tensor(0.99))],
        "etas": [(1.5, 1.2), (0.5, 0.9), (NAN, 1.2), (0.0, 1.2), (0.5, 1.0),
                 (torch.tensor(0.5), torch.tensor(0.9))],
        "step_sizes": [(1.0, 0.1), (-1.0, 50)],
        "eps": [(-1.0, 1e-3), (None, -1e-3), (NAN, 1e-3), (None, NAN)],
    }  # fmt: skip
    for name in TORCH_CLASSES:
        arguments = inspect.signature(getattr(optim, name)).parameters
        for arg, values in pairs.items():
            if arg in arguments and isinstance(arguments[arg].default, tuple):
                cases += [(name, {arg: v}) for v in values]
        cases.append((name, {"lr": torch.tensor([0.1, 0.2])}))
    cases += [
        ("sgd", dict(nesterov=True)),
        ("sgd", dict(nesterov=True, momentum=0.9, dampening=0.1)),
        ("sgd", dict(nesterov=True, momentum=0.9, dampening=NAN)),
        ("sgd", dict(nesterov=True, momentum=NAN)),
        ("muon", dict(adjust_lr_fn="foo")),
        ("muon", dict(adjust_lr_fn="match_rms_adamw")),
    ]
    return cases


def _outcome(build, *args, **kwargs) -> str:
    try:
        build(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 -- the outcome compared is any error
        return f"{type(e).__name__}: {e}"
    return "accepted"


@pytest.mark.parametrize(
    "name, kwargs", _argument_cases(), ids=lambda x: x if isinstance(x, str) else repr(x)
)
def test_validation_matches_torch(name, kwargs):
    """Every optimizer rejects what torch rejects, with its exception and message, and
    accepts what it accepts (its exact comparisons: a NaN passes where torch's check does)."""
    torch_params = [torch.zeros(2, 2, requires_grad=True)]  # Muon takes matrices only
    want = _outcome(TORCH_CLASSES[name], torch_params, **kwargs)
    assert _outcome(getattr(optim, name), **kwargs) == want


def test_lr_of_wrong_type():
    with pytest.raises(TypeError, match="lr must be a number or a schedule"):
        optim.sgd(lr="0.1")


def test_lr_accepts_what_torch_accepts():
    import numpy as np

    params = {"w": torch.ones(3)}
    grads = [{"w": torch.full((3,), 0.5)}]
    want = torch_reference(params, grads, "sgd", dict(lr=0.25))
    for lr in (np.float32(0.25), torch.tensor(0.25), 0.25):
        got, _ = loopkit_run(params, grads, optim.sgd(lr=lr))
        torch.testing.assert_close(got["w"], want["w"])
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=float("nan"))  # accepted by torch
    optim.sgd(lr=float("nan"))  # ... and so here


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("sgd", dict(lr=0.1, momentum=NAN)),  # SGD's checks are `x < 0.0`: NaN passes
        ("sgd", dict(lr=0.1, momentum=0.5, weight_decay=NAN)),
        ("sgd", dict(lr=NAN)),
    ],
)
def test_arguments_torch_accepts_step_as_in_torch(name, kwargs):
    params = {"w": torch.linspace(-1.0, 1.0, 5), "b": torch.ones(2)}
    grads = [{k: torch.full_like(v, 0.5 * (i + 1)) for k, v in params.items()} for i in range(3)]
    want = torch_reference(params, grads, name, kwargs)
    got, _ = loopkit_run(params, grads, getattr(optim, name)(**kwargs))
    for k in want:
        torch.testing.assert_close(got[k], want[k], equal_nan=True)


@pytest.mark.parametrize("name", ["adam", "adamw", "adamax", "nadam", "radam"])
def test_more_than_two_betas_fail_at_once_where_torch_fails_at_its_first_step(name):
    p = torch.zeros(2, requires_grad=True)
    opt = TORCH_OPTIMIZERS[name]([p], betas=(0.8, 0.9, 0.5))  # torch checks two, takes three
    p.grad = torch.ones(2)
    with pytest.raises(ValueError):
        opt.step()
    with pytest.raises(ValueError, match="betas must be a pair"):
        getattr(optim, name)(betas=(0.8, 0.9, 0.5))


def test_schedule_may_return_a_number():
    params = {"w": torch.zeros(2)}
    tx = optim.sgd(lr=lambda step: 0.5)
    got, state = loopkit_run(params, [{"w": torch.ones(2)}] * 2, tx)
    torch.testing.assert_close(got["w"], torch.full((2,), -1.0))
    assert state[-1].lr.dtype == torch.float64


def test_grads_params_mismatch_is_named():
    tx = optim.adamw()
    params = {"a": torch.zeros(2), "b": torch.zeros(3)}
    state = tx.init(params)
    with pytest.raises(
        ValueError, match=r"grads does not match params: missing \['b'\]; unexpected \['c'\]"
    ):
        tx.update({"a": torch.ones(2), "c": torch.ones(3)}, state, params)
    with pytest.raises(ValueError, match="updates does not match params"):
        optim.apply_updates(params, {"a": torch.ones(2)})


def test_chain_composes_in_order():
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.scale_by_learning_rate(0.5))
    params = {"w": torch.zeros(2)}
    updates, _ = tx.update({"w": torch.tensor([3.0, 4.0])}, tx.init(params), params)
    torch.testing.assert_close(updates["w"], torch.tensor([-0.3, -0.4]), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="chain of 2 transforms got a state of length 1"):
        tx.update({"w": torch.ones(2)}, ((),), params)


def test_a_number_lr_lives_in_the_state_and_can_be_changed():
    params = {"w": torch.zeros(2)}
    tx = optim.chain(optim.multi_transform(
        {"a": optim.sgd(lr=0.5), "b": optim.adam(lr=0.1)}, lambda n, p: "a"
    ))  # fmt: skip
    state = tx.init(params)
    assert [float(x) for x in optim.learning_rates(state)] == [0.5, 0.1]
    state = optim.set_learning_rate(state, lambda lr: lr * 0.1)
    assert [float(x) for x in optim.learning_rates(state)] == pytest.approx([0.05, 0.01])
    updates, state = tx.update({"w": torch.ones(2)}, state, params)
    torch.testing.assert_close(updates["w"], torch.full((2,), -0.05))
    with pytest.raises(ValueError, match="holds no learning rate"):
        optim.set_learning_rate(optim.identity().init(params), 0.1)


def test_changing_the_lr_does_not_recompile():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = torch.nn.Linear(3, 2)
    opt = optim.adamw(lr=1e-2)
    counter = CompileCounter()
    step = lk.train_step(model, lambda net, b: net(b).pow(2).mean(), opt, compile=True,
                         backend=counter)  # fmt: skip
    state = lk.TrainState.create(model, opt)
    state, _ = step(state, torch.randn(4, 3))
    for lr in (1e-3, 5e-4, 0.0):
        state = state.replace(opt_state=optim.set_learning_rate(state.opt_state, lr))
        before = state.params
        state, _ = step(state, torch.randn(4, 3))
    assert counter.frame_count == 1
    # lr = 0: AdamW's step (decay and direction both scale with lr) leaves params unchanged
    for k in before:
        assert torch.equal(state.params[k], before[k])


@given(
    seed=st.integers(0, 2**16),
    shapes=st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9)), min_size=1, max_size=3),
    steps=st.integers(1, 4),
    lr=st.floats(1e-4, 0.05),
    weight_decay=st.sampled_from([0.0, 0.1]),
    momentum=st.floats(0.0, 0.99),
    nesterov=st.booleans(),
    adjust_lr_fn=st.sampled_from([None, "original", "match_rms_adamw"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_muon_matches_torch(seed, shapes, steps, lr, weight_decay, momentum, nesterov,
                            adjust_lr_fn, dtype):  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    params = {f"w{i}": torch.randn(s, generator=g, dtype=dtype) for i, s in enumerate(shapes)}
    grads = [
        {k: torch.randn(v.shape, generator=g, dtype=dtype) for k, v in params.items()}
        for _ in range(steps)
    ]
    kwargs = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                  adjust_lr_fn=adjust_lr_fn)  # fmt: skip
    ps = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.Muon(ps.values(), **kwargs)
    for gs in grads:
        for k, p in ps.items():
            p.grad = gs[k].clone()
        opt.step()
    got, _ = loopkit_run(params, grads, optim.muon(**kwargs))
    for k in ps:
        torch.testing.assert_close(got[k], ps[k].detach(), **TOL[dtype])


def test_muon_with_adamw_for_the_rest_matches_torch():
    """The usual setup: Muon on weight matrices, AdamW on biases, as two torch optimizers."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    batches = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(4)]
    opt = optim.multi_transform(
        {"muon": optim.muon(lr=0.02), "adamw": optim.adamw(lr=1e-3)},
        lambda name, p: "muon" if p.ndim == 2 else "adamw",
    )
    state = lk.TrainState.create(model, opt)
    step = lk.train_step(model, lambda net, b: F.cross_entropy(net(b[0]), b[1]), opt)
    for b in batches:
        state, _ = step(state, b)
    ref = copy.deepcopy(model)
    matrices = [p for p in ref.parameters() if p.ndim == 2]
    others = [p for p in ref.parameters() if p.ndim != 2]
    opts = [torch.optim.Muon(matrices, lr=0.02), torch.optim.AdamW(others, lr=1e-3)]
    for x, y in batches:
        for o in opts:
            o.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        for o in opts:
            o.step()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(state.params[name], p.detach(), rtol=1e-5, atol=1e-6)


def test_muon_rejects_non_matrices_with_a_fix():
    with pytest.raises(ValueError, match=r"2D parameters.*\['b'\].*multi_transform"):
        optim.muon().init({"w": torch.zeros(3, 3), "b": torch.zeros(3)})


def test_clip_error_if_nonfinite():
    grads = {"a": torch.tensor([1.0, float("inf")])}
    p = torch.zeros(2, requires_grad=True)
    p.grad = grads["a"].clone()
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_([p], 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="non-finite, so it cannot be clipped"):
        optim.clip_by_global_norm(1.0, error_if_nonfinite=True).update(grads, (), None)
    optim.clip_by_global_norm(1.0).update(grads, (), None)  # off by default, as in torch


def _cycle(t):
    """A momentum/beta1 schedule with torch-friendly ops: 0.85 <-> 0.95 every 3 updates."""
    return 0.9 + 0.05 * torch.cos(torch.as_tensor(t, dtype=torch.float64) * torch.pi / 3)


def _from_zero(t):
    """A momentum warmup that starts at exactly 0 (torch skips momentum while it is 0)."""
    return torch.clamp(torch.as_tensor(t, dtype=torch.float64) - 2, min=0) * 0.3


@pytest.mark.parametrize(
    "name, schedule",
    [(n, s) for n in ("sgd", "sgd_nesterov", "sgd_dampening") for s in (_cycle, _from_zero)]
    + [(n, _cycle) for n in ("adam", "adamw", "adamax", "nadam", "radam", "rmsprop")],
)
def test_scheduled_momentum_matches_torch_param_group_changes(name, schedule):
    """What CyclicLR/OneCycleLR do to torch: set the group's momentum (SGD, RMSprop) or
    betas[0] (Adam) before each step. A schedule in place of the number does the same here."""
    params = {"w": torch.randn(4, 3, dtype=torch.float64), "b": torch.randn(3, dtype=torch.float64)}
    g = torch.Generator().manual_seed(0)
    grads = [{k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in params.items()}
             for _ in range(7)]  # fmt: skip
    if name.startswith("sgd") or name == "rmsprop":
        if name == "rmsprop":
            kw = dict(lr=0.01, weight_decay=0.01, centered=True)
        else:
            kw = dict(lr=0.1, weight_decay=0.01, nesterov=name == "sgd_nesterov",
                      dampening=0.3 if name == "sgd_dampening" else 0.0)  # fmt: skip
        tx = getattr(optim, name[:3] if name != "rmsprop" else name)(momentum=schedule, **kw)

        def make(ps):
            return TORCH_OPTIMIZERS[name[:3] if name != "rmsprop" else name](ps, momentum=0.9, **kw)

        def set_value(group, v):
            group["momentum"] = v

    else:
        tx = getattr(optim, name)(lr=1e-2, betas=(schedule, 0.99))
        cls = {"adam": "Adam", "adamw": "AdamW", "adamax": "Adamax", "nadam": "NAdam",
               "radam": "RAdam"}[name]  # fmt: skip

        def make(ps):
            return getattr(torch.optim, cls)(ps, lr=1e-2, betas=(0.9, 0.99))

        def set_value(group, v):
            group["betas"] = (v, 0.99)

    ps = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = make(ps.values())
    for t, gs in enumerate(grads):
        set_value(opt.param_groups[0], float(schedule(t)))
        for k, p in ps.items():
            p.grad = gs[k].clone()
        opt.step()
    got, _ = loopkit_run(params, grads, tx)
    for k in ps:
        torch.testing.assert_close(got[k], ps[k].detach(), **TOL[torch.float64])


@pytest.mark.parametrize("name", ["asgd", "adafactor", "sgd", "adamw"])
def test_set_learning_rate_matches_torch_changing_the_group_lr(name):
    params = {"w": torch.randn(4, 3, dtype=torch.float64), "b": torch.randn(3, dtype=torch.float64)}
    g = torch.Generator().manual_seed(1)
    grads = [{k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in params.items()}
             for _ in range(6)]  # fmt: skip
    lrs = [0.05, 0.05, 0.01, 0.01, 0.002, 0.02]
    tx = getattr(optim, name)(lr=lrs[0])
    state = tx.init(params)
    got = params
    ps = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = TORCH_OPTIMIZERS[name](ps.values(), lr=lrs[0])
    for lr, gs in zip(lrs, grads, strict=True):
        state = optim.set_learning_rate(state, lr)
        updates, state = tx.update(gs, state, got)
        got = optim.apply_updates(got, updates)
        opt.param_groups[0]["lr"] = lr
        for k, p in ps.items():
            p.grad = gs[k].clone()
        opt.step()
    for k in ps:
        torch.testing.assert_close(got[k], ps[k].detach(), **TOL[torch.float64])


@pytest.mark.parametrize("name", ["sgd_schedule", "asgd", "adam", "adafactor", "nadam"])
def test_scalar_params_keep_their_dtype_and_compile_once(name):
    """0-dim params (a temperature, a scale) must not be promoted to float64 by the float64
    scalars that hold bias corrections, schedules and the lr."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    tx = optim.sgd(lr=0.1, momentum=_cycle) if name == "sgd_schedule" else getattr(optim, name)()
    params = {"w": torch.randn(3, 2), "temperature": torch.tensor(1.5)}
    state = tx.init(params)
    counter = CompileCounter()

    @torch.compile(fullgraph=True, backend=counter)
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optim.apply_updates(params, updates), state, updates

    for _ in range(3):
        grads = {k: torch.randn_like(v) for k, v in params.items()}
        params, state, updates = step(params, state, grads)
    assert counter.frame_count == 1
    assert all(u.dtype == torch.float32 for u in updates.values())
    assert all(x.dtype != torch.float64 for x in lk.tree.tree_leaves(state) if x.ndim > 0)


def test_clipping_keeps_bfloat16_grads_bfloat16():
    bf16 = torch.bfloat16
    params = {"w": torch.randn(3, 2, dtype=bf16), "scale": torch.tensor(1.0, dtype=bf16),
              "norm": torch.ones(2)}  # fmt: skip
    tx = optim.chain(optim.clip_by_global_norm(0.1), optim.adamw(lr=1e-2))
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    updates, _ = tx.update(grads, tx.init(params), params)
    assert {k: u.dtype for k, u in updates.items()} == {k: p.dtype for k, p in params.items()}


def test_adafactor_takes_eps1_from_the_first_param_as_torch_does():
    params = {"a": torch.randn(3, 2, dtype=torch.float64), "b": torch.randn(4) * 1e-3}
    grads = [{"a": torch.randn(3, 2, dtype=torch.float64) * 1e-6, "b": torch.randn(4) * 1e-6}]
    ps = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.Adafactor(ps.values(), lr=0.01)
    for k, p in ps.items():
        p.grad = grads[0][k].clone()
    opt.step()
    got, _ = loopkit_run(params, grads, optim.adafactor(lr=0.01))
    for k in ps:
        torch.testing.assert_close(got[k], ps[k].detach(), rtol=1e-6, atol=1e-9)


def _storages(tree) -> list[int]:
    return [x.untyped_storage().data_ptr() for x in lk.tree.tree_leaves(tree)
            if isinstance(x, torch.Tensor) and x.numel()]  # fmt: skip


@pytest.mark.parametrize("name", [*sorted(TORCH_OPTIMIZERS), "adafactor"])
@pytest.mark.parametrize("lr", ["float", "tensor", "schedule", "injected"])
@pytest.mark.parametrize("default", [torch.float32, torch.float64])
def test_new_states_share_no_tensor(name, lr, default):
    """Regression: a state's lr was the injected (or given) lr tensor itself, shared by
    every state built from the optimizer, and ASGD's lr and eta were one tensor under a
    float64 default dtype. A donated step writes a state's tensors in place, so that wrote
    into other states and into the optimizer. Each state's tensors must be its own."""
    factory = getattr(optim, name)
    given = torch.tensor(0.01, dtype=torch.float64)
    if lr == "injected":
        tx = optim.inject_hyperparams(factory)(lr=0.01)
    else:
        value = {"float": 0.01, "tensor": given, "schedule": lambda t: 0.01 + 0.0 * t}[lr]
        tx = factory(lr=value)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        params = {"w": torch.randn(3, 2), "b": torch.randn(3)}
        first, second = tx.init(params), tx.init(params)
    finally:
        torch.set_default_dtype(previous)
    own = _storages(first)
    assert len(set(own)) == len(own), "two leaves of one state share a tensor"
    assert not set(own) & set(_storages(second)), "two states share a tensor"
    assert not set(own) & set(_storages((params, given))), "a state holds a given tensor"


# Params torch multiplies by a factor each step: decoupled decay (`p *= 1 - lr * wd`), ASGD's
# `p *= 1 - lambd * eta`, Adafactor's decay and relative step size. A +-inf entry (a causal
# attention bias) stays inf in torch; an update `p + (-lr * wd * p)` would make it NaN.
INF_CASES = {
    "adamw": ("adamw", dict(lr=0.01, weight_decay=0.1)),
    "adam_decoupled": ("adam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    "nadam_decoupled": ("nadam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    "radam_decoupled": ("radam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    "muon": ("muon", dict(lr=0.02, weight_decay=0.1)),
    "asgd": ("asgd", dict(lr=0.01, lambd=0.1, t0=2.0)),
    "adafactor": ("adafactor", dict(lr=0.01, weight_decay=0.1)),
    # where torch itself turns an inf into NaN (L2 decay puts inf in the gradient)
    "sgd_l2": ("sgd", dict(lr=0.1, momentum=0.9, weight_decay=0.1)),
    "adam_l2": ("adam", dict(lr=0.01, weight_decay=0.1)),
    "asgd_l2": ("asgd", dict(lr=0.01, weight_decay=0.1)),
}


def _with_infs(seed: int, matrices_only: bool, grad_at_inf: bool):
    """Params holding -inf and +inf entries, and gradients that are zero there (a masked
    attention bias) or, with ``grad_at_inf``, not."""
    g = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(3, 4, generator=g, dtype=torch.float64)}
    if not matrices_only:
        params["b"] = torch.randn(5, generator=g, dtype=torch.float64)
    infs = {k: torch.rand(v.shape, generator=g) < 0.3 for k, v in params.items()}
    infs["w"][0, 1] = True
    for k, p in params.items():
        p[infs[k]] = float("-inf")
        p.view(-1)[-1] = float("inf")
        infs[k].view(-1)[-1] = True
    grads = [
        {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in params.items()}
        for _ in range(4)
    ]
    if not grad_at_inf:
        for gs in grads:
            for k, gi in gs.items():
                gi[infs[k]] = 0.0
    return params, grads


@pytest.mark.parametrize("case", sorted(INF_CASES))
@pytest.mark.parametrize("grad_at_inf", [False, True])
@given(seed=st.integers(0, 2**16))
def test_an_infinite_param_stays_as_torch_keeps_it(case, grad_at_inf, seed):
    name, kwargs = INF_CASES[case]
    params, grads = _with_infs(seed, name == "muon", grad_at_inf)
    torch_cls = torch.optim.Muon if name == "muon" else TORCH_OPTIMIZERS[name]
    ps = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch_cls(ps.values(), **kwargs)
    for gs in grads:
        for k, p in ps.items():
            p.grad = gs[k].clone()
        opt.step()
    tx = getattr(optim, name)(**kwargs)
    by_update, _ = loopkit_run(params, grads, tx)
    by_apply, state = params, tx.init(params)
    for gs in grads:
        by_apply, state = optim.apply_gradients(tx, gs, state, by_apply)
    for got in (by_update, by_apply):
        for k, p in ps.items():
            torch.testing.assert_close(got[k], p.detach(), equal_nan=True, **TOL[torch.float64])
    if name == "asgd":
        ax = state[-1].ax
        for k, p in ps.items():
            torch.testing.assert_close(ax[k], opt.state[p]["ax"], equal_nan=True)


@pytest.mark.compile
def test_an_infinite_param_stays_as_torch_keeps_it_compiled():
    params, grads = _with_infs(0, True, False)
    txs = {"adamw": optim.adamw(lr=0.01), "asgd": optim.asgd(lr=0.01, lambd=0.1, t0=2.0)}

    @torch.compile(fullgraph=True)
    def step(params, states, grads):
        out = {}
        for name, tx in txs.items():
            updates, states[name] = tx.update(grads, states[name], params[name])
            out[name] = optim.apply_updates(params[name], updates)
        return out, states

    got = {name: params for name in txs}
    states = {name: tx.init(params) for name, tx in txs.items()}
    for gs in grads:
        got, states = step(got, states, gs)
    for name, kwargs in (("adamw", dict(lr=0.01)), ("asgd", dict(lr=0.01, lambd=0.1, t0=2.0))):
        want = torch_reference(params, grads, name, kwargs)
        torch.testing.assert_close(got[name]["w"], want["w"], equal_nan=True, **TOL[torch.float64])


# Every numeric argument with a valid non-default value (so that each link it feeds runs).
HYPERPARAMETERS = {
    "sgd": dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "adam": dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.01),
    "adamw": dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.01),
    "rmsprop": dict(lr=0.01, alpha=0.9, eps=1e-6, weight_decay=0.01, momentum=0.5),
    "adagrad": dict(lr=0.1, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1,
                    eps=1e-8),
    "adamax": dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.01),
    "nadam": dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.01, momentum_decay=0.01),
    "radam": dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.01),
    "adadelta": dict(lr=1.0, rho=0.8, eps=1e-5, weight_decay=0.01),
    "asgd": dict(lr=0.01, lambd=0.01, alpha=0.7, t0=2.0, weight_decay=0.01),
    "rprop": dict(lr=0.01, etas=(0.4, 1.3), step_sizes=(1e-5, 10.0)),
    "adafactor": dict(lr=0.01, beta2_decay=-0.7, eps=(1e-20, 1e-3), d=1.5, weight_decay=0.01),
    "muon": dict(lr=0.02, weight_decay=0.1, momentum=0.9, eps=1e-6),
}  # fmt: skip


def _tensor_cases() -> list[tuple[str, str, int | None]]:
    """(optimizer, argument, index in a tuple argument or None)."""
    return [
        (name, arg, i)
        for name, kwargs in HYPERPARAMETERS.items()
        for arg, value in kwargs.items()
        for i in (range(len(value)) if isinstance(value, tuple) else [None])
    ]


@pytest.mark.parametrize("name, arg, index", _tensor_cases())
def test_a_one_element_tensor_hyperparameter_is_read_as_a_scalar(name, arg, index):
    """torch reads a one-element tensor hyperparameter as a scalar (``_to_scalar``): a
    ``[1]``-shaped one must not broadcast a 0-dim param (or its state) to ``[1]``."""

    def given(make):
        kwargs = dict(HYPERPARAMETERS[name])
        value = kwargs[arg]
        if index is None:
            kwargs[arg] = make(value)
        else:  # Adam and AdamW take both betas as tensors or neither
            both = name in ("adam", "adamw") and arg == "betas"
            kwargs[arg] = tuple(make(v) if i == index or both else v for i, v in enumerate(value))
        return getattr(optim, name)(**kwargs)

    shapes = {"w": (3, 2), "v": (2, 3)} if name == "muon" else {"t": (), "w": (3,), "m": (2, 2)}
    g = torch.Generator().manual_seed(0)
    params = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    grads = [{k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in params.items()}
             for _ in range(3)]  # fmt: skip
    got, state = loopkit_run(params, grads, given(lambda v: torch.tensor([v], dtype=torch.float64)))
    want, want_state = loopkit_run(
        params, grads, given(lambda v: torch.tensor(v, dtype=torch.float64))
    )
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in params.items()}
    for x, y in zip(lk.tree.tree_leaves(state), lk.tree.tree_leaves(want_state), strict=True):
        assert x.shape == y.shape
    for k in params:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


@pytest.mark.parametrize(
    "name, kwargs, where, example",
    [
        ("muon", dict(momentum=_cycle), "momentum", "momentum=schedule"),
        ("sgd", dict(weight_decay=_cycle), "weight_decay", "weight_decay=schedule"),
        ("sgd", dict(momentum=0.9, dampening=_cycle), "dampening", "dampening=schedule"),
        ("adam", dict(weight_decay=_cycle), "weight_decay", "weight_decay=schedule"),
        ("adamw", dict(betas=(0.9, _cycle)), r"betas\[1\]", r"betas=\(0.9, schedule\)"),
        ("nadam", dict(betas=(_cycle, _cycle)), r"betas\[1\]", r"betas=\(schedule, schedule\)"),
        ("adagrad", dict(lr_decay=_cycle), "lr_decay", "lr_decay=schedule"),
        ("rmsprop", dict(alpha=_cycle), "alpha", "alpha=schedule"),
        ("rprop", dict(etas=(_cycle, 1.2)), r"etas\[0\]", r"etas=\(schedule, 1.2\)"),
    ],
)
def test_a_schedule_where_a_number_is_read_names_the_argument_and_the_fix(
    name, kwargs, where, example
):
    """torch's CyclicLR/OneCycleLR cycle any optimizer's ``momentum``; a schedule for an
    argument read as a number here gets an error that names it and says how to schedule it
    (and the fix it names runs)."""
    fix = rf"optim.inject_hyperparams\(optim.{name}\)\({example}\)"
    with pytest.raises(TypeError, match=rf"optim.{name} takes {where} as a number.*{fix}"):
        getattr(optim, name)(**kwargs)
    tx = optim.inject_hyperparams(getattr(optim, name))(**kwargs)
    params = {"w": torch.randn(3, 2)}
    optim.apply_gradients(tx, {"w": torch.ones(3, 2)}, tx.init(params), params)


SWITCHES = ("foreach", "capturable", "differentiable", "fused")


def test_torch_implementation_switches_are_taken_as_torch_takes_them():
    """Code ported from torch.optim passes ``foreach``, ``capturable``, ``differentiable``:
    each optimizer takes those torch's does, with its defaults, and they change nothing."""
    params = {"w": torch.randn(3, 2, dtype=torch.float64), "b": torch.randn(2, dtype=torch.float64)}
    grads = [{k: torch.randn_like(v) for k, v in params.items()} for _ in range(3)]
    for name, cls in {**TORCH_CLASSES, "adafactor": torch.optim.Adafactor}.items():
        ours = inspect.signature(getattr(optim, name)).parameters
        theirs = inspect.signature(cls).parameters
        for switch in SWITCHES:
            assert (switch in ours) == (switch in theirs), f"{name}: {switch}"
        if name == "muon":
            params_, grads_ = {"w": params["w"]}, [{"w": g["w"]} for g in grads]
        else:
            params_, grads_ = params, grads
        want, _ = loopkit_run(params_, grads_, getattr(optim, name)())
        for switch in ("capturable", "differentiable", "foreach"):
            if switch not in ours or (name == "rmsprop" and switch == "foreach"):
                continue
            for value in (True, False):
                got, _ = loopkit_run(params_, grads_, getattr(optim, name)(**{switch: value}))
                for k in want:
                    torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
            with pytest.raises(TypeError, match=f"{switch} must be None, True or False"):
                getattr(optim, name)(**{switch: "yes"})


@pytest.mark.parametrize("name", sorted(HYPERPARAMETERS))
def test_a_none_gradient_is_named_with_the_fix(name):
    """``torch.autograd.grad(..., allow_unused=True)`` gives None for a param the loss does
    not use (torch.optim skips a param whose ``.grad`` is None). Every path of the pure API
    names it and says what to do, rather than failing inside a transform."""
    params = {"w": torch.randn(3, 2), "unused": torch.randn(2, 2)}
    grads = {"w": torch.ones(3, 2), "unused": None}
    tx = getattr(optim, name)()
    state = tx.init(params)
    fix = r"grads\['unused'\] is None.*torch.zeros_like"
    with pytest.raises(ValueError, match=fix):
        optim.apply_gradients(tx, grads, state, params)
    with pytest.raises(ValueError, match=fix):
        tx.update(grads, state, params)
    if name not in ("asgd", "adafactor", "sgd", "muon"):  # these need the params
        with pytest.raises(ValueError, match=fix):
            tx.update(grads, state)
    with pytest.raises(ValueError, match=r"updates\['unused'\] is None"):
        optim.apply_updates(params, grads)


@pytest.mark.parametrize("name", sorted(KWARGS))
@given(data=st.data())
def test_an_update_makes_no_tensor_from_host_data(name, data):
    """After ``init``, an eager update creates no tensor from Python values (``lift_fresh``):
    on an accelerator that is a blocking host-to-device copy at every step (on the H200,
    SGD and RMSprop momentum made a flag with ``torch.tensor``; tests/test_cuda.py checks
    for every sync with CUDA's sync debug mode). ``fused=False`` and ``foreach=False`` are
    drawn too: on the CPU they run the chain that CUDA runs where no kernel fits."""
    accepted = inspect.signature(getattr(optim, name)).parameters
    switches = {k: False for k in ("fused", "foreach") if k in accepted}
    kwargs = {**data.draw(KWARGS[name]), **data.draw(st.sampled_from([{}, switches]))}
    params, grads = data.draw(params_and_grads(torch.float32))
    tx = getattr(optim, name)(**kwargs)
    state = tx.init(params)
    for gs in grads[:2]:
        with OpCounter() as ops:
            params, state = optim.apply_gradients(tx, gs, state, params)
        assert ops.count["lift_fresh"] == 0, kwargs


@pytest.mark.parametrize("name", ["sgd", "adam", "adagrad", "rmsprop"])
def test_a_sparse_gradient_the_update_cannot_take_is_named(name):
    """A sparse gradient given to the pure API, where the update fails on it, is a
    TypeError naming the gradient and the fix; torch's own error names a backend kernel
    (``aten::where.self ... 'SparseCPU'``). SGD without momentum or decay takes it, as
    torch's SGD does, with torch's numbers."""
    params = {"emb": torch.randn(5, 3)}
    grads = {"emb": torch.randn(5, 3).to_sparse()}
    kwargs = dict(lr=0.1, momentum=0.9) if name in ("sgd", "rmsprop") else dict(lr=0.1)
    tx = getattr(optim, name)(**kwargs)
    for call in (optim.apply_gradients, lambda tx, g, s, p: tx.update(g, s, p)):
        with pytest.raises(TypeError, match=r"grads\['emb'\] is a sparse tensor .*to_dense\(\)"):
            call(tx, grads, tx.init(params), params)
    plain = optim.sgd(lr=0.1)
    got, _ = optim.apply_gradients(plain, grads, plain.init(params), params)
    torch.testing.assert_close(got["emb"], params["emb"] - 0.1 * grads["emb"].to_dense())


def test_errors_that_are_not_about_sparsity_pass_through_unchanged():
    """Running out of memory (which callers catch by type) and other errors are not
    relabelled as a sparse-gradient problem, even where a gradient is sparse."""
    from loopkit.optim.aliases import _dense_only

    grads = {"emb": torch.randn(5, 3).to_sparse()}
    for error in (torch.OutOfMemoryError("out of memory (simulated)"), RuntimeError("other")):

        def failing(*args, error=error):
            raise error

        with pytest.raises(type(error)) as caught:
            _dense_only(failing, grads, None, None)
        assert caught.value is error
