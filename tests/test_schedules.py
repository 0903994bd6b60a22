"""Learning-rate schedules against torch.optim.lr_scheduler, step by step."""

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch.optim import lr_scheduler as L

from loopkit.optim import schedules as S

LR = st.floats(1e-4, 10.0)
GAMMA = st.floats(0.1, 1.2) | st.just(0.0)


def torch_trajectory(make, lr, steps, read="lr", optimizer="sgd"):
    """What torch reports for t = 0..steps: ``make(opt)`` builds the scheduler, and
    optimizer.step() then scheduler.step() run between points. ``read`` is "lr"
    (get_last_lr) or "momentum" (the value the scheduler set in the param group)."""
    p = torch.zeros(1, requires_grad=True)
    if optimizer == "sgd":
        opt = torch.optim.SGD([p], lr=lr, momentum=0.9)
    else:
        opt = torch.optim.Adam([p], lr=lr)
    sched = make(opt)
    out = []
    for t in range(steps + 1):
        group = opt.param_groups[0]
        if read == "lr":
            out.append(sched.get_last_lr()[0])
        else:
            out.append(group["momentum"] if optimizer == "sgd" else group["betas"][0])
        if t < steps:
            opt.step()
            sched.step()
    return out


def assert_matches(schedule, want, abs_tol=0.0):
    """schedule(t) == want[t] within 1e-12 relative (abs_tol only where a test says why)."""
    for t, w in enumerate(want):
        got = schedule(torch.tensor(t))
        assert got.dtype == torch.float64 and got.shape == ()
        assert float(got) == pytest.approx(w, rel=1e-12, abs=abs_tol), f"t={t}"


# --- multiplicative schedules ---------------------------------------------------------------


# lr_lambdas that work on a Python int (torch) and on a float64 tensor (loopkit)
LAMBDAS = {
    "exp": lambda a, k: lambda t: a**t,
    "inverse": lambda a, k: lambda t: 1.0 / (1.0 + a * t),
    "sawtooth": lambda a, k: lambda t: (t % k + 1) / k,
    "power": lambda a, k: lambda t: (1 + t) ** -a,
}


@given(
    lr=LR,
    kind=st.sampled_from(sorted(LAMBDAS)),
    a=st.floats(0.5, 1.0),
    k=st.integers(1, 7),
    steps=st.integers(0, 40),
)
def test_lambda_lr(lr, kind, a, k, steps):
    fn = LAMBDAS[kind](a, k)
    want = torch_trajectory(lambda o: L.LambdaLR(o, fn), lr, steps)
    assert_matches(S.lambda_lr(lr, fn), want)


@given(
    lr=LR,
    factors=st.lists(st.floats(0.5, 1.5), min_size=1, max_size=5),
    total=st.integers(0, 40),
)
def test_multiplicative_lr(lr, factors, total):
    def fn(j):
        return factors[j % len(factors)]

    want = torch_trajectory(lambda o: L.MultiplicativeLR(o, fn), lr, total)
    ours = S.multiplicative_lr(lr, fn, total)
    assert_matches(ours, want)
    assert float(ours(torch.tensor(total + 5))) == want[-1]  # held past total_steps


@given(lr=LR, step_size=st.integers(1, 10), gamma=GAMMA, steps=st.integers(0, 60))
def test_step_lr(lr, step_size, gamma, steps):
    want = torch_trajectory(lambda o: L.StepLR(o, step_size, gamma), lr, steps)
    assert_matches(S.step_lr(lr, step_size, gamma), want)


@given(
    lr=LR,
    milestones=st.lists(st.integers(-3, 30), max_size=6),  # unsorted, repeated, negative
    gamma=GAMMA,
    steps=st.integers(0, 40),
)
def test_multi_step_lr(lr, milestones, gamma, steps):
    want = torch_trajectory(lambda o: L.MultiStepLR(o, milestones, gamma), lr, steps)
    assert_matches(S.multi_step_lr(lr, milestones, gamma), want)


@given(
    lr=LR,
    # (a subnormal factor makes torch's undo, lr * factor * (1 / factor), overflow to inf)
    factor=st.floats(1e-6, 1.0) | st.just(0.0),
    total_iters=st.integers(-2, 20),
    steps=st.integers(0, 40),
)
def test_constant_lr(lr, factor, total_iters, steps):
    # torch divides by factor to undo it at total_iters (ZeroDivisionError for 0)
    assume(not (factor == 0.0 and 0 < total_iters <= steps))
    want = torch_trajectory(lambda o: L.ConstantLR(o, factor, total_iters), lr, steps)
    assert_matches(S.constant_lr(lr, factor, total_iters), want)


@given(lr=LR, gamma=GAMMA, steps=st.integers(0, 60))
def test_exponential_lr(lr, gamma, steps):
    want = torch_trajectory(lambda o: L.ExponentialLR(o, gamma), lr, steps)
    assert_matches(S.exponential_lr(lr, gamma), want)


@given(
    lr=LR,
    total_iters=st.integers(-1, 40),
    power=st.floats(0.0, 4.0),
    extra=st.integers(0, 10),
)
def test_polynomial_lr(lr, total_iters, power, extra):
    steps = max(total_iters, 0) + extra
    want = torch_trajectory(lambda o: L.PolynomialLR(o, total_iters, power), lr, steps)
    assert_matches(S.polynomial_lr(lr, total_iters, power), want)


# --- cosine and cyclic schedules ------------------------------------------------------------


@given(
    lr=LR,
    T_max=st.integers(1, 100),
    eta_frac=st.floats(0.0, 1.5) | st.just(0.0),
    extra=st.integers(0, 5),
)
def test_cosine_annealing(lr, T_max, eta_frac, extra):
    eta_min = eta_frac * lr
    steps = 3 * T_max + extra  # past T_max torch's recursion rises and falls again
    want = torch_trajectory(lambda o: L.CosineAnnealingLR(o, T_max, eta_min), lr, steps)
    assert_matches(S.cosine_annealing(lr, T_max, eta_min), want)


@given(
    lr=LR,
    T_0=st.integers(1, 30),
    T_mult=st.integers(1, 10),
    eta_frac=st.floats(0.0, 1.0),
    steps=st.integers(0, 300),
)
def test_cosine_annealing_warm_restarts(lr, T_0, T_mult, eta_frac, steps):
    eta_min = eta_frac * lr
    want = torch_trajectory(
        lambda o: L.CosineAnnealingWarmRestarts(o, T_0, T_mult, eta_min), lr, steps
    )
    assert_matches(S.cosine_annealing_warm_restarts(lr, T_0, T_mult, eta_min), want)


@pytest.mark.parametrize("T_0", [1, 3, 29, 2**62 - 1, 2**70])
@pytest.mark.parametrize("T_mult", [1, 2, 4, 10, 2**40])
def test_cosine_annealing_warm_restarts_periods_past_int64(T_0, T_mult):
    """Periods that end past int64 (a count never gets there, torch's Python ints do)."""
    want = torch_trajectory(lambda o: L.CosineAnnealingWarmRestarts(o, T_0, T_mult, 0.1), 1.0, 200)
    assert_matches(S.cosine_annealing_warm_restarts(1.0, T_0, T_mult, 0.1), want)


@given(
    lr=LR,
    whole=st.integers(0, 20),
    fraction=st.floats(0.1, 0.9),
    eta_frac=st.floats(0.0, 1.5) | st.just(0.0),
)
def test_cosine_annealing_with_a_fractional_T_max(lr, whole, fraction, eta_frac):
    T_max, eta_min = whole + fraction, eta_frac * lr
    try:
        want = torch_trajectory(lambda o: L.CosineAnnealingLR(o, T_max, eta_min), lr, 100)
    except ZeroDivisionError:  # torch divides by a trough that is exactly 0
        assume(False)
    # the schedule replays torch's step-by-step recursion (its rounding drifts from the
    # cosine near the troughs): the very same numbers
    schedule = S.cosine_annealing(lr, T_max, eta_min)
    assert [float(schedule(torch.tensor(t))) for t in range(len(want))] == want


CYCLE = dict(
    step_size_up=st.integers(1, 12),
    step_size_down=st.none() | st.integers(0, 12),
    mode=st.sampled_from(["triangular", "triangular2", "exp_range"]),
    gamma=st.floats(0.8, 1.0),
    steps=st.integers(0, 80),
)


@given(
    base_lr=LR,
    max_lr=LR,
    momenta=st.tuples(st.floats(0.5, 0.99), st.floats(0.5, 0.99)),
    optimizer=st.sampled_from(["sgd", "adam"]),
    **CYCLE,
)
def test_cyclic_lr_and_momentum(
    base_lr, max_lr, momenta, optimizer, step_size_up, step_size_down, mode, gamma, steps
):
    base_m, max_m = momenta
    cycle = dict(step_size_up=step_size_up, step_size_down=step_size_down, mode=mode, gamma=gamma)

    def make(o):
        return L.CyclicLR(o, base_lr, max_lr, **cycle, base_momentum=base_m, max_momentum=max_m)

    lrs = torch_trajectory(make, 1.0, steps, optimizer=optimizer)  # CyclicLR overwrites lr
    momenta = torch_trajectory(make, 1.0, steps, read="momentum", optimizer=optimizer)
    assert_matches(S.cyclic_lr(base_lr, max_lr, **cycle), lrs)
    assert_matches(S.cyclic_momentum(base_m, max_m, **cycle), momenta)


@given(
    base_lr=LR,
    max_lr=LR,
    a=st.floats(0.5, 1.0),
    scale_mode=st.sampled_from(["cycle", "iterations", "other"]),  # torch: not "cycle"
    **CYCLE,
)
def test_cyclic_lr_custom_scale_fn(
    base_lr, max_lr, a, scale_mode, step_size_up, step_size_down, mode, gamma, steps
):
    def scale_fn(x):
        return a**x

    cycle = dict(
        step_size_up=step_size_up,
        step_size_down=step_size_down,
        scale_fn=scale_fn,
        scale_mode=scale_mode,
    )
    want = torch_trajectory(lambda o: L.CyclicLR(o, base_lr, max_lr, **cycle), 1.0, steps)
    assert_matches(S.cyclic_lr(base_lr, max_lr, **cycle), want)


@given(
    max_lr=LR,
    total=st.integers(1, 100) | st.tuples(st.integers(1, 10), st.integers(1, 10)),
    pct_start=st.floats(0.0, 1.0),
    anneal_strategy=st.sampled_from(["cos", "linear"]),
    div_factor=st.floats(1.0, 100.0),
    final_div_factor=st.floats(1.0, 1e4),
    three_phase=st.booleans(),
    momenta=st.tuples(st.floats(0.5, 0.99), st.floats(0.5, 0.99)),
    optimizer=st.sampled_from(["sgd", "adam"]),
)
def test_one_cycle_lr_and_momentum(
    max_lr,
    total,
    pct_start,
    anneal_strategy,
    div_factor,
    final_div_factor,
    three_phase,
    momenta,
    optimizer,
):
    if isinstance(total, tuple):
        length = dict(epochs=total[0], steps_per_epoch=total[1])
        steps = total[0] * total[1]
    else:
        length, steps = dict(total_steps=total), total
    phases = dict(pct_start=pct_start, anneal_strategy=anneal_strategy, three_phase=three_phase)
    base_m, max_m = momenta
    divs = dict(div_factor=div_factor, final_div_factor=final_div_factor)

    def make(o):
        momenta = dict(base_momentum=base_m, max_momentum=max_m)
        return L.OneCycleLR(o, max_lr, **length, **phases, **divs, **momenta)

    try:
        ours = S.one_cycle_lr(max_lr, **length, **phases, **divs)
    except ValueError:  # an empty phase: torch divides by zero when it reaches it
        with pytest.raises(ZeroDivisionError):
            torch_trajectory(make, 1.0, steps, optimizer=optimizer)
        return
    momentum = S.one_cycle_momentum(base_m, max_m, **length, **phases)
    lrs = torch_trajectory(make, 1.0, steps, optimizer=optimizer)  # OneCycleLR overwrites lr
    momenta = torch_trajectory(make, 1.0, steps, read="momentum", optimizer=optimizer)
    assert_matches(ours, lrs)
    assert_matches(momentum, momenta)
    assert float(ours(torch.tensor(steps + 3))) == float(ours(torch.tensor(steps)))


def test_cyclic_and_one_cycle_reject_what_torch_rejects():
    with pytest.raises(ValueError, match="mode"):
        S.cyclic_lr(0.1, 1.0, mode="sawtooth")
    with pytest.raises(ValueError, match="step_size_up"):
        S.cyclic_lr(0.1, 1.0, step_size_up=0)
    with pytest.raises(ValueError, match="total_steps OR"):
        S.one_cycle_lr(1.0)
    with pytest.raises(ValueError, match="positive integer total_steps"):
        S.one_cycle_lr(1.0, total_steps=0)
    with pytest.raises(ValueError, match="positive integer epochs"):
        S.one_cycle_lr(1.0, epochs=0, steps_per_epoch=3)
    with pytest.raises(ValueError, match="pct_start"):
        S.one_cycle_lr(1.0, total_steps=10, pct_start=1.5)
    with pytest.raises(ValueError, match="anneal_strategy"):
        S.one_cycle_momentum(total_steps=10, anneal_strategy="exp")
    with pytest.raises(ValueError, match="phase 0 is empty"):  # torch: ZeroDivisionError
        S.one_cycle_lr(1.0, total_steps=10, pct_start=0.1)


# Arguments torch takes but fails on later (ZeroDivisionError, a never-ending or
# inside-out schedule), or that it does not validate: rejected here when the schedule is built.
@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: S.step_lr(1.0, step_size=0), "step_size"),
        (lambda: S.step_lr(1.0, step_size=-2.5), "step_size"),
        # not whole: torch would never decay, undo the factor or restart the next scheduler
        (lambda: S.step_lr(1.0, step_size=0.1), "first is step 3602879701896397"),
        (lambda: S.multi_step_lr(1.0, [1, 2.5]), "milestone.*would never decay"),
        (lambda: S.constant_lr(1.0, 0.5, total_iters=2.5), "total_iters.*forever"),
        (lambda: S.sequential([S.constant(1.0)] * 2, [2.5]), "milestone.*never restart"),
        (lambda: S.polynomial_lr(1.0, total_iters=math.nan), "total_iters"),
        (lambda: S.reduce_on_plateau(1.0, patience=math.nan), "patience"),
        (lambda: S.reduce_on_plateau(1.0, cooldown="2"), "cooldown"),
        (lambda: S.multiplicative_lr(1.0, lambda j: 0.9, total_steps=-1), "total_steps"),
        (lambda: S.cosine_annealing(1.0, T_max=0), "T_max"),
        (lambda: S.cosine_annealing(1.0, T_max=-2.5), "T_max"),
        (lambda: S.sequential([S.constant(1.0)] * 3, [4, 2]), "non-decreasing"),
        (lambda: S.warmup_cosine(1.0, warmup_steps=5, total_steps=5), "greater than"),
        (lambda: S.reduce_on_plateau(1.0, min_lr=[]), "one min_lr per param group"),
    ],
)
def test_invalid_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def _sgd() -> torch.optim.SGD:
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0, momentum=0.9)


def _step_lr(o):
    return L.StepLR(o, 1)


# (torch scheduler of an optimizer, the same arguments here): each must raise what the other
# raises, with the same message, or neither raise.
SCHEDULER_ARGUMENTS = [
    *[(lambda o, kw=kw: L.LinearLR(o, **kw), lambda kw=kw: S.linear(1.0, **kw))
      for kw in [dict(start_factor=0.0), dict(start_factor=1.5), dict(start_factor=float("nan")),
                 dict(end_factor=-0.1), dict(end_factor=1.5), dict(end_factor=float("nan")),
                 dict(total_iters=-2)]],
    *[(lambda o, f=f: L.ConstantLR(o, factor=f), lambda f=f: S.constant_lr(1.0, factor=f))
      for f in (1.5, -0.1, float("nan"))],
    *[(lambda o, kw=kw: L.CosineAnnealingWarmRestarts(o, **kw),
       lambda kw=kw: S.cosine_annealing_warm_restarts(1.0, **kw))
      for kw in [dict(T_0=0), dict(T_0=2.5), dict(T_0=-1), dict(T_0=2, T_mult=0),
                 dict(T_0=2, T_mult=1.5), dict(T_0=2, eta_min="0.1"), dict(T_0=2, eta_min=None),
                 dict(T_0=3, T_mult=4, eta_min=0.1), dict(T_0=1, T_mult=10)]],
    *[(lambda o, kw=kw: L.CyclicLR(o, 0.1, 1.0, **kw), lambda kw=kw: S.cyclic_lr(0.1, 1.0, **kw))
      for kw in [dict(mode="sawtooth"), dict(scale_fn=lambda x: 1.0, scale_mode="foo")]],
    *[(lambda o, kw=kw: L.OneCycleLR(o, 1.0, **kw), lambda kw=kw: S.one_cycle_lr(1.0, **kw))
      for kw in [dict(), dict(total_steps=0), dict(total_steps=2.5), dict(epochs=0,
                 steps_per_epoch=3), dict(epochs=3, steps_per_epoch=0), dict(epochs=2.0,
                 steps_per_epoch=3), dict(total_steps=10, pct_start=1.5), dict(total_steps=10,
                 pct_start=-0.1), dict(total_steps=10, pct_start=1), dict(total_steps=10,
                 anneal_strategy="exp")]],
    *[(lambda o, kw=kw: L.ReduceLROnPlateau(o, **kw), lambda kw=kw: S.reduce_on_plateau(1.0, **kw))
      for kw in [dict(factor=1.0), dict(factor=1.5), dict(mode="median"),
                 dict(threshold_mode="pct"), dict(min_lr=[0.1]), dict(min_lr=(0.1,)),
                 dict(factor=-0.5, patience=-1, cooldown=-1, min_lr=-1.0, eps=-1.0)]],
    # non-integer counts torch takes (test_*_non_integer_* compare their lrs)
    (lambda o: L.StepLR(o, 2.5), lambda: S.step_lr(1.0, 2.5)),
    (lambda o: L.StepLR(o, math.inf), lambda: S.step_lr(1.0, math.inf)),
    *[(lambda o, n=n: L.PolynomialLR(o, n), lambda n=n: S.polynomial_lr(1.0, n))
      for n in (2.5, 0.5, math.inf, -math.inf)],
    *[(lambda o, n=n: L.LinearLR(o, total_iters=n), lambda n=n: S.linear(1.0, total_iters=n))
      for n in (2.5, math.inf, -math.inf)],
    (lambda o: L.ConstantLR(o, total_iters=3.0), lambda: S.constant_lr(1.0, total_iters=3.0)),
    (lambda o: L.MultiStepLR(o, [2.0, 4]), lambda: S.multi_step_lr(1.0, [2.0, 4])),
    *[(lambda o, kw=kw: L.ReduceLROnPlateau(o, **kw), lambda kw=kw: S.reduce_on_plateau(1.0, **kw))
      for kw in [dict(patience=2.5, cooldown=1.5), dict(patience=math.inf, cooldown=math.inf),
                 dict(patience=-math.inf, cooldown=-math.inf)]],
    (lambda o: L.SequentialLR(o, [], []), lambda: S.sequential([], [])),
    (lambda o: L.SequentialLR(o, [_step_lr(o), _step_lr(o)], []),
     lambda: S.sequential([S.constant(1.0)] * 2, [])),
    (lambda o: L.ChainedScheduler([]), lambda: S.chained(1.0)),
]  # fmt: skip


def _outcome(build, *args) -> str:
    try:
        build(*args)
    except Exception as e:  # noqa: BLE001 -- the outcome compared is any error
        return f"{type(e).__name__}: {e}"
    return "accepted"


@pytest.mark.parametrize("torch_build, build", SCHEDULER_ARGUMENTS)
def test_validation_errors_match_torch(torch_build, build):
    assert _outcome(build) == _outcome(torch_build, _sgd())


def test_lambda_arguments_must_be_callable():
    with pytest.raises(TypeError, match="lr_lambda should be a function"):
        S.multiplicative_lr(1.0, 0.9, total_steps=3)
    with pytest.raises(TypeError, match="lr_lambda should be a function"):
        S.lambda_lr(1.0, 0.9)


# --- compositions: random members -----------------------------------------------------------


@st.composite
def members(draw, chainable, min_T_max=1):
    """(torch scheduler factory, loopkit schedule factory) for one random member. With
    ``chainable`` only schedulers whose torch step multiplies the lr by a step-dependent factor
    (cosine with eta_min = 0, before T_max), as ChainedScheduler composes them."""
    kinds = ["linear", "constant", "step", "multistep", "exponential", "polynomial", "cosine"]
    kinds += ["multiplicative"] if chainable else ["lambda"]
    kind = draw(st.sampled_from(kinds))
    if kind == "linear":
        a, b, n = draw(st.floats(0.01, 1.0)), draw(st.floats(0.0, 1.0)), draw(st.integers(1, 8))
        return (lambda o: L.LinearLR(o, a, b, n)), (lambda lr: S.linear(lr, a, b, n))
    if kind == "constant":
        f, n = draw(st.floats(0.01, 1.0)), draw(st.integers(1, 8))
        return (lambda o: L.ConstantLR(o, f, n)), (lambda lr: S.constant_lr(lr, f, n))
    if kind == "step":
        n, g = draw(st.integers(1, 5)), draw(st.floats(0.1, 1.0))
        return (lambda o: L.StepLR(o, n, g)), (lambda lr: S.step_lr(lr, n, g))
    if kind == "multistep":
        ms, g = draw(st.lists(st.integers(0, 20), max_size=4)), draw(st.floats(0.1, 1.0))
        return (lambda o: L.MultiStepLR(o, ms, g)), (lambda lr: S.multi_step_lr(lr, ms, g))
    if kind == "exponential":
        g = draw(st.floats(0.5, 1.1))
        return (lambda o: L.ExponentialLR(o, g)), (lambda lr: S.exponential_lr(lr, g))
    if kind == "polynomial":
        n, p = draw(st.integers(1, 10)), draw(st.floats(0.0, 3.0))
        return (lambda o: L.PolynomialLR(o, n, p)), (lambda lr: S.polynomial_lr(lr, n, p))
    if kind == "cosine":
        n = draw(st.integers(min_T_max, min_T_max + 20))
        frac = 0.0 if chainable else draw(st.floats(0.0, 1.0))

        def ours(lr):
            return S.cosine_annealing(lr, n, frac * lr)

        return (lambda o: L.CosineAnnealingLR(o, n, frac * o.defaults["lr"])), ours
    if kind == "multiplicative":
        fs = draw(st.lists(st.floats(0.5, 1.5), min_size=1, max_size=4))

        def fn(j):
            return fs[j % len(fs)]

        return (lambda o: L.MultiplicativeLR(o, fn)), (lambda lr: S.multiplicative_lr(lr, fn, 80))
    a = draw(st.floats(0.5, 1.0))
    return (lambda o: L.LambdaLR(o, lambda t: a**t)), (lambda lr: S.lambda_lr(lr, lambda t: a**t))


@given(data=st.data(), lr=LR, n=st.integers(1, 4), steps=st.integers(0, 60))
def test_sequential_matches_sequential_lr(data, lr, n, steps):
    pairs = [data.draw(members(chainable=False)) for _ in range(n)]
    milestones = sorted(data.draw(st.lists(st.integers(-2, 40), min_size=n - 1, max_size=n - 1)))

    def make(o):
        return L.SequentialLR(o, [make_torch(o) for make_torch, _ in pairs], milestones)

    want = torch_trajectory(make, lr, steps)
    ours = S.sequential([make_ours(lr) for _, make_ours in pairs], milestones)
    # LinearLR with end_factor 0 updates the lr recursively and leaves rounding noise of order
    # 1e-17 * lr where the exact lr is 0 (as in test_optim.py): compare relative to lr there.
    assert_matches(ours, want, abs_tol=1e-12 * lr)


@given(data=st.data(), lr=LR, n=st.integers(1, 4), steps=st.integers(0, 60))
def test_chained_matches_chained_scheduler(data, lr, n, steps):
    pairs = [data.draw(members(chainable=True, min_T_max=max(steps, 1))) for _ in range(n)]
    want = torch_trajectory(lambda o: L.ChainedScheduler([m(o) for m, _ in pairs]), lr, steps)
    ours = S.chained(lr, *[make_ours(1.0) for _, make_ours in pairs])
    # as in test_sequential_matches_sequential_lr: a LinearLR member with end_factor 0 leaves
    # noise of order 1e-17 * lr around the exact 0
    assert_matches(ours, want, abs_tol=1e-12 * lr)


def test_chained_constant_then_exponential():
    ours = S.chained(2.0, S.constant_lr(1.0, 0.1, 2), S.exponential_lr(1.0, 0.9))
    want = [2.0 * 0.1, 2.0 * 0.1 * 0.9, 2.0 * 0.9**2, 2.0 * 0.9**3]
    assert [float(ours(t)) for t in range(4)] == pytest.approx(want, rel=1e-15, abs=0)


@given(
    lr=LR,
    warmup=st.integers(0, 20),
    length=st.integers(1, 40),
    eta_frac=st.floats(0.0, 1.0),
    start_factor=st.floats(0.01, 1.0),
    extra=st.integers(0, 10),
)
def test_warmup_cosine(lr, warmup, length, eta_frac, start_factor, extra):
    total, eta_min = warmup + length, eta_frac * lr
    steps = total + extra

    def make(o):
        warm = L.LinearLR(o, start_factor, 1.0, warmup)
        cos = L.CosineAnnealingLR(o, T_max=total - warmup, eta_min=eta_min)
        return L.SequentialLR(o, [warm, cos], milestones=[warmup])

    want = torch_trajectory(make, lr, steps)
    ours = S.warmup_cosine(lr, warmup, total, eta_min, start_factor)
    assert_matches(ours, want)


# --- reduce on plateau ----------------------------------------------------------------------

METRIC = st.floats(-5.0, 5.0) | st.sampled_from([0.0, 1.0, math.inf, -math.inf, math.nan])


@given(
    lr=LR,
    mode=st.sampled_from(["min", "max"]),
    factor=st.floats(0.0, 0.99),
    patience=st.integers(0, 4),
    threshold=st.floats(0.0, 0.5),
    threshold_mode=st.sampled_from(["rel", "abs"]),
    cooldown=st.integers(0, 3),
    min_frac=st.floats(0.0, 0.5) | st.just(0.0),
    eps=st.sampled_from([0.0, 1e-8, 1e-3]),
    metrics=st.lists(METRIC | st.floats(-1e3, 1e3), max_size=40),
    tensor_metrics=st.booleans(),
)
def test_reduce_on_plateau(
    lr,
    mode,
    factor,
    patience,
    threshold,
    threshold_mode,
    cooldown,
    min_frac,
    eps,
    metrics,
    tensor_metrics,
):
    kwargs = dict(
        mode=mode,
        factor=factor,
        patience=patience,
        threshold=threshold,
        threshold_mode=threshold_mode,
        cooldown=cooldown,
        min_lr=min_frac * lr,
        eps=eps,
    )
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=lr)
    sched = L.ReduceLROnPlateau(opt, **kwargs)
    plateau = S.reduce_on_plateau(lr, **kwargs)
    state = plateau.init()
    assert float(state.lr) == lr and state.lr.dtype == torch.float64
    for m in metrics:
        metric = torch.tensor(m, dtype=torch.float32) if tensor_metrics else m
        opt.step()
        sched.step(metric)
        state = plateau.update(state, metric)
        assert float(state.lr) == sched.get_last_lr()[0] == opt.param_groups[0]["lr"]
        assert int(state.num_bad_epochs) == sched.num_bad_epochs
        assert int(state.cooldown_counter) == sched.cooldown_counter
        assert int(state.last_epoch) == sched.last_epoch
        assert float(state.best) == sched.best or (math.isnan(sched.best) and state.best.isnan())


@pytest.mark.parametrize("min_lr", [[0.3, 0.05], (0.3, 0.05), 0.3])
def test_reduce_on_plateau_takes_a_min_lr_per_group(min_lr):
    """As torch: a list or tuple of floors, one per param group, kept in ``Plateau.min_lr``;
    ``state.lr`` is the first group's lr."""
    groups = [{"params": [torch.zeros(1, requires_grad=True)], "lr": lr} for lr in (1.0, 0.5)]
    opt = torch.optim.SGD(groups, lr=1.0)
    kwargs = dict(factor=0.5, patience=0, min_lr=min_lr)
    sched = L.ReduceLROnPlateau(opt, **kwargs)
    plateau = S.reduce_on_plateau(1.0, **kwargs)
    per_group = sched.default_min_lr is None  # torch's record of a list or tuple
    assert plateau.min_lr == (tuple(sched.min_lrs) if per_group else sched.default_min_lr)
    state = plateau.init()
    for m in [1.0, 2.0, 2.0, 2.0, 2.0]:
        opt.step()
        sched.step(m)
        state = plateau.update(state, m)
        assert float(state.lr) == sched.get_last_lr()[0]


# --- compiling --------------------------------------------------------------------------------

COMPILED = {
    "constant": S.constant(0.3),
    "linear": S.linear(1.0, 0.2, 0.5, 3),
    "lambda_lr": S.lambda_lr(1.0, lambda t: 0.9**t),
    "multiplicative_lr": S.multiplicative_lr(1.0, lambda j: 0.9, 3),
    "step_lr": S.step_lr(1.0, 2, 0.5),
    "multi_step_lr": S.multi_step_lr(1.0, [1, 3, 3], 0.5),
    "constant_lr": S.constant_lr(1.0, 0.5, 2),
    "exponential_lr": S.exponential_lr(1.0, 0.9),
    "polynomial_lr": S.polynomial_lr(1.0, 3, 2.0),
    "cosine_annealing": S.cosine_annealing(1.0, 2, 0.1),
    "warm_restarts": S.cosine_annealing_warm_restarts(1.0, 1, 2, 0.1),
    "warm_restarts_mult_1": S.cosine_annealing_warm_restarts(1.0, 2),
    "warm_restarts_fractional": (lambda w: lambda c: w(c / 4.0))(
        S.cosine_annealing_warm_restarts(1.0, 1, 2, 0.1)
    ),
    "cyclic_lr": S.cyclic_lr(0.1, 1.0, 2, mode="triangular2"),
    "cyclic_momentum": S.cyclic_momentum(0.8, 0.9, 2, 1, mode="exp_range", gamma=0.9),
    "one_cycle_lr": S.one_cycle_lr(1.0, 4, three_phase=True),
    "one_cycle_momentum": S.one_cycle_momentum(total_steps=4, anneal_strategy="linear"),
    "sequential": S.sequential([S.linear(1.0, 0.1, 1.0, 2), S.exponential_lr(1.0, 0.9)], [2]),
    "chained": S.chained(1.0, S.constant_lr(1.0, 0.5, 1), S.step_lr(1.0, 2)),
    "warmup_cosine": S.warmup_cosine(1.0, 2, 5),
}


@pytest.mark.parametrize("name", sorted(COMPILED))
def test_schedule_compiles_once(name):
    from torch._dynamo.testing import CompileCounter

    schedule = COMPILED[name]
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(schedule, fullgraph=True, backend=counter)
    for t in range(6):
        got = compiled(torch.tensor(t))
        assert got.dtype == torch.float64
        assert float(got) == float(schedule(torch.tensor(t)))
    assert counter.frame_count == 1


def test_reduce_on_plateau_update_compiles_once():
    from torch._dynamo.testing import CompileCounter

    plateau = S.reduce_on_plateau(1.0, patience=1, cooldown=1)
    torch._dynamo.reset()
    counter = CompileCounter()
    update = torch.compile(plateau.update, fullgraph=True, backend=counter)
    state, eager = plateau.init(), plateau.init()
    for m in [3.0, 2.0, 2.5, 2.5, 2.5, 1.0, 4.0, 4.0]:
        state = update(state, torch.tensor(m))
        eager = plateau.update(eager, m)
        assert all(bool(a == b) for a, b in zip(state, eager, strict=True))
    assert float(state.lr) == pytest.approx(0.01)
    assert counter.frame_count == 1


def test_python_int_counts_and_device():
    for name, schedule in COMPILED.items():
        got = schedule(3)
        assert got.dtype == torch.float64 and got.shape == () and got.device.type == "cpu", name
        assert float(got) == float(schedule(torch.tensor(3))), name


# --- fractional counts and non-integer arguments --------------------------------------------


@given(
    lr=LR,
    T_0=st.integers(1, 12),
    T_mult=st.integers(1, 4),
    eta_frac=st.floats(0.0, 1.0),
    iters=st.integers(2, 9),
    epochs=st.integers(1, 40),
    as_tensor=st.booleans(),
)
def test_cosine_annealing_warm_restarts_fractional_counts(
    lr, T_0, T_mult, eta_frac, iters, epochs, as_tensor
):
    """torch's per-batch idiom ``scheduler.step(epoch + i / iters)``: the same fractional count
    gives the same lr. At ``i = 0`` (a whole epoch) the count is the step count."""
    eta_min = eta_frac * lr
    ours = S.cosine_annealing_warm_restarts(lr, T_0, T_mult, eta_min)
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=lr)
    sched = L.CosineAnnealingWarmRestarts(opt, T_0, T_mult, eta_min)
    for epoch in range(epochs):
        for i in range(iters):
            count = epoch + i / iters
            opt.step()
            sched.step(count)
            got = ours(torch.tensor(count, dtype=torch.float64) if as_tensor else count)
            assert got.dtype == torch.float64 and got.shape == ()
            if i == 0:
                # torch's step(epoch) finds the period with a float log, which rounds below
                # some restarts (e.g. T_0=1, T_mult=3, epoch 121); step() counts exactly
                assert float(got) == float(ours(torch.tensor(epoch))), f"epoch={epoch}"
            else:
                assert float(got) == pytest.approx(sched.get_last_lr()[0], rel=1e-12), count


def test_cosine_annealing_warm_restarts_fractional_count_is_not_truncated():
    warm = S.cosine_annealing_warm_restarts(0.1, T_0=2, T_mult=2)
    in_steps = S.cosine_annealing_warm_restarts(0.1, T_0=2 * 4, T_mult=2)  # 4 steps per epoch
    for c in range(40):
        got = float(warm(torch.tensor(c, dtype=torch.float64) / 4))
        assert got == pytest.approx(float(in_steps(c)), rel=1e-12), c


HALVES = st.integers(-8, 80).map(lambda n: n / 2)  # whole and half steps, as torch takes them


@given(
    lr=LR,
    step_size=st.integers(1, 40).map(lambda n: n / 4) | st.integers(1, 9).map(float),
    gamma=GAMMA,
    steps=st.integers(0, 60),
)
def test_step_lr_with_a_non_integer_step_size(lr, step_size, gamma, steps):
    """torch decays where ``t % step_size == 0``: at the multiples of 5 for 2.5."""
    want = torch_trajectory(lambda o: L.StepLR(o, step_size, gamma), lr, steps)
    assert_matches(S.step_lr(lr, step_size, gamma), want)


@pytest.mark.parametrize("step_size", [2**31 + 1, 10**12, float(2**40)])
def test_step_lr_with_a_whole_step_size_past_2_31(step_size):
    """A whole step size is taken however large (only fractional ones whose first exact
    multiple is past 2**31 are refused)."""
    want = torch_trajectory(lambda o: L.StepLR(o, step_size, 0.5), 0.1, 5)
    assert_matches(S.step_lr(0.1, step_size, 0.5), want)
    assert float(S.step_lr(0.1, step_size, 0.5)(torch.tensor(int(step_size)))) == 0.05


@given(lr=LR, total_iters=HALVES, power=st.floats(0.0, 4.0), extra=st.integers(0, 10))
def test_polynomial_lr_with_a_non_integer_total_iters(lr, total_iters, power, extra):
    steps = max(math.ceil(total_iters), 0) + extra
    want = torch_trajectory(lambda o: L.PolynomialLR(o, total_iters, power), lr, steps)
    assert_matches(S.polynomial_lr(lr, total_iters, power), want)


@given(
    lr=LR,
    factor=st.floats(1e-6, 1.0),
    total_iters=st.integers(-2, 20).map(float),
    milestones=st.lists(st.integers(-3, 30).map(float), max_size=6),
    steps=st.integers(0, 40),
)
def test_whole_float_counts_are_integers(lr, factor, total_iters, milestones, steps):
    """``3.0`` is ``3`` to torch (it compares the int step with it): the same lrs here."""
    want = torch_trajectory(lambda o: L.ConstantLR(o, factor, total_iters), lr, steps)
    assert_matches(S.constant_lr(lr, factor, total_iters), want)
    want = torch_trajectory(lambda o: L.MultiStepLR(o, milestones, 0.5), lr, steps)
    assert_matches(S.multi_step_lr(lr, milestones, 0.5), want)
    bounds = sorted(milestones[:2])
    pairs = [(L.ConstantLR, S.constant_lr), (L.ExponentialLR, S.exponential_lr)]
    pairs = (pairs * 2)[: len(bounds) + 1]
    want = torch_trajectory(
        lambda o: L.SequentialLR(o, [make(o, 0.5) for make, _ in pairs], bounds), lr, steps
    )
    assert_matches(S.sequential([ours(lr, 0.5) for _, ours in pairs], bounds), want)


WHOLE_OR_NOT = st.floats(-1.5, 4.5) | st.integers(-1, 4) | st.just(math.inf)


@given(
    lr=LR,
    patience=WHOLE_OR_NOT,
    cooldown=WHOLE_OR_NOT,
    threshold_mode=st.sampled_from(["rel", "abs"]),
    metrics=st.lists(METRIC | st.floats(-1e3, 1e3), max_size=40),
)
def test_reduce_on_plateau_with_non_integer_patience_and_cooldown(
    lr, patience, cooldown, threshold_mode, metrics
):
    kwargs = dict(factor=0.5, patience=patience, cooldown=cooldown, threshold_mode=threshold_mode)
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=lr)
    sched = L.ReduceLROnPlateau(opt, **kwargs)
    plateau = S.reduce_on_plateau(lr, **kwargs)
    state = plateau.init()
    for m in metrics:
        opt.step()
        sched.step(m)
        state = plateau.update(state, m)
        assert float(state.lr) == sched.get_last_lr()[0]
        assert int(state.num_bad_epochs) == sched.num_bad_epochs
        assert bool(state.cooldown_counter > 0) == sched.in_cooldown


def _torch_lrs(make, steps):
    return [round(lr, 12) for lr in torch_trajectory(make, 0.1, steps)]


def _lrs(schedule, steps):
    return [round(float(schedule(t)), 12) for t in range(steps + 1)]


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_sequential_departs_from_torch_where_its_docstring_says():
    """The three torch composites that :func:`sequential` documents as giving other lrs: here
    each member keeps its own lrs. If torch changes, the docstring must too."""
    inner = S.sequential([S.constant_lr(0.1, 0.5, 2), S.exponential_lr(0.1, 0.9)], [3])
    ours = S.sequential([inner, S.step_lr(0.1, 2, 0.5)], [10])
    assert _lrs(ours, 9) == _lrs(inner, 9)
    assert _torch_lrs(
        lambda o: L.SequentialLR(
            o,
            [L.SequentialLR(o, [L.ConstantLR(o, 0.5, 2), L.ExponentialLR(o, 0.9)], [3]),
             L.StepLR(o, 2, 0.5)],
            [10],
        ),
        9,
    ) != _lrs(ours, 9)  # fmt: skip

    chain = S.chained(0.1, S.constant_lr(1.0, 0.5, 3), S.exponential_lr(1.0, 0.9))
    ours = S.sequential([chain, S.step_lr(0.1, 2, 0.5)], [5])
    assert _lrs(ours, 4) == _torch_lrs(
        lambda o: L.ChainedScheduler([L.ConstantLR(o, 0.5, 3), L.ExponentialLR(o, 0.9)]), 4
    )
    assert _torch_lrs(
        lambda o: L.SequentialLR(
            o,
            [L.ChainedScheduler([L.ConstantLR(o, 0.5, 3), L.ExponentialLR(o, 0.9)]),
             L.StepLR(o, 2, 0.5)],
            [5],
        ),
        4,
    ) != _lrs(ours, 4)  # fmt: skip

    warm = S.linear(0.1, 0.1, 1.0, 5)
    ours = S.sequential([warm, S.one_cycle_lr(0.5, total_steps=30)], [5])
    assert _lrs(ours, 4) == _lrs(warm, 4)
    assert _torch_lrs(
        lambda o: L.SequentialLR(
            o,
            [L.LinearLR(o, 0.1, 1.0, 5),
             L.OneCycleLR(o, 0.5, total_steps=30, cycle_momentum=False)],
            [5],
        ),
        4,
    ) != _lrs(ours, 4)  # fmt: skip
