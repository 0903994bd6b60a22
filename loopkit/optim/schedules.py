"""Learning-rate schedules: pure functions ``step -> lr`` written with tensor ops.

A schedule takes the number of optimizer updates already made (``0`` for the first update,
the same count ``torch.optim.lr_scheduler`` has seen when ``scheduler.step()`` is called once
per ``optimizer.step()``) and returns the learning rate as a float64 tensor. Because the step
count is a tensor and the formula has no Python branching on it, a compiled training step
traces the schedule once and never recompiles as the lr changes.

Each schedule named after a ``torch.optim.lr_scheduler`` class gives the lr that scheduler's
``get_last_lr()`` reports after ``t`` calls of ``scheduler.step()``, with the base lr as the
first argument instead of an optimizer; :func:`sequential` and :func:`chained` compose them like
``SequentialLR`` and ``ChainedScheduler``. ``ReduceLROnPlateau`` depends on metrics, not on the
step, so :func:`reduce_on_plateau` is a small ``init``/``update`` state machine instead.

An optimizer calls its schedule with its own count of updates (an int64 tensor). A loop that
calls ``scheduler.step()`` once per epoch instead is ``lr=lambda c: schedule(c //
steps_per_epoch)``. :func:`cosine_annealing_warm_restarts` also takes a fractional count (a
float, or a floating tensor, taken as float64), as torch's ``scheduler.step(epoch + i /
iters)`` does (its docstring says how). The other schedules are defined at whole counts: at a
fractional one, those written as a formula of ``t`` evaluate it there, and those that count
steps or read a table take its whole part.
"""

from __future__ import annotations

import fractions
import itertools
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch

Schedule = Callable[[torch.Tensor], torch.Tensor]


def _f64(count: torch.Tensor | float) -> torch.Tensor:
    # a Python float goes straight to float64 (torch.as_tensor would round it to float32)
    return torch.as_tensor(count, dtype=torch.float64)


def _i64(count: torch.Tensor | int) -> torch.Tensor:
    return torch.as_tensor(count).to(torch.int64)


def _like(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """``value`` (a schedule's or a user function's output) as float64 on ``like``'s device."""
    return torch.as_tensor(value, dtype=torch.float64, device=like.device)


def _take(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` for a 0-dim index tensor, as a tensor op (plain indexing would turn the
    index into a Python int, a data-dependent value that torch.compile cannot trace)."""
    table = table.to(index.device)
    return torch.index_select(table, 0, index.reshape(1)).reshape(())


def _integer(name: str, value: object, minimum: int | None = None, why: str = "") -> int:
    """``value`` as an int: an integer, or a float with a whole value (torch compares its int
    step count with such an argument, so ``3.0`` acts as ``3``). ``why`` says, for an argument
    torch takes as any number, what torch would do with a fractional one."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not isinstance(value, numbers.Integral) and not float(value).is_integer():
        raise ValueError(f"{name} must be a whole number of steps, got {value!r}{why}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def _last_step(name: str, total_iters: object) -> int:
    """The last step at which LinearLR or PolynomialLR changes the lr: ``floor(total_iters)``
    (torch holds the lr once its step count is past ``total_iters``), 0 when it never does."""
    if isinstance(total_iters, bool) or not isinstance(total_iters, numbers.Real):
        raise ValueError(f"{name} must be a number, got {total_iters!r}")
    if math.isnan(total_iters):
        raise ValueError(f"{name} must be a number, got {total_iters}")
    # an infinite total_iters: the lr never changes in torch either (its step's factor is 1)
    return 0 if math.isinf(total_iters) else max(math.floor(total_iters), 0)


def _callable(name: str, fn: object) -> None:
    if not callable(fn):
        raise TypeError(f"{name} should be a function, but got {type(fn).__name__}")


def constant(value: float) -> Schedule:
    """``lr_t = value`` for every t."""
    value = float(value)

    def schedule(count: torch.Tensor | int) -> torch.Tensor:
        return torch.full_like(_f64(count), value)

    return schedule


def linear(
    lr: float, start_factor: float = 1.0 / 3, end_factor: float = 1.0, total_iters: float = 5
) -> Schedule:
    """``torch.optim.lr_scheduler.LinearLR``:
    ``lr_t = lr * (s + (e - s) * min(t, floor(T)) / T)`` with s, e the start and end factors
    and ``T = total_iters``: torch stops changing the lr after step ``T``, so with
    ``T <= 0`` the lr is ``lr * s`` forever, and with a fractional ``T`` it holds its value
    at ``floor(T)``."""
    if start_factor > 1.0 or start_factor <= 0:
        raise ValueError(
            "Starting multiplicative factor expected to be greater than 0 and less or equal to 1."
        )
    if end_factor > 1.0 or end_factor < 0:
        raise ValueError("Ending multiplicative factor expected to be between 0 and 1.")
    lr, s, e = float(lr), float(start_factor), float(end_factor)
    last = _last_step("total_iters", total_iters)
    if last == 0:
        return constant(lr * s)

    def schedule(count: torch.Tensor | int) -> torch.Tensor:
        t = torch.clamp(_f64(count), max=last)
        return lr * (s + (e - s) * t / total_iters)

    return schedule


def linear_warmup(lr: float, warmup_steps: float, start_factor: float = 0.1) -> Schedule:
    """Warm up linearly from ``start_factor * lr`` to ``lr`` over ``warmup_steps`` updates,
    then hold: ``LinearLR(start_factor, 1.0, total_iters=warmup_steps)``."""
    return linear(lr, start_factor=start_factor, end_factor=1.0, total_iters=warmup_steps)


# --- torch.optim.lr_scheduler, one function per class ---------------------------------------------


def lambda_lr(lr: float, lr_lambda: Callable[[torch.Tensor], torch.Tensor | float]) -> Schedule:
    """``torch.optim.lr_scheduler.LambdaLR``: ``lr_t = lr * lr_lambda(t)``.

    Torch calls ``lr_lambda`` with the int step; here it receives ``t`` as a float64 0-dim
    tensor, so it must be written with tensor-friendly operations (arithmetic, ``**``, ``%``,
    ``torch.where``, ``torch.clamp``, ``torch.cos``...), not ``math`` functions or ``if`` on
    ``t``. A function like ``lambda t: 0.95 ** t`` works unchanged for both."""
    _callable("lr_lambda", lr_lambda)
    lr = float(lr)

    def schedule(count: torch.Tensor | int) -> torch.Tensor:
        t = _f64(count)
        return lr * _like(lr_lambda(t), t)

    return schedule


def multiplicative_lr(lr: float, lr_lambda: Callable[[int], float], total_steps: int) -> Schedule:
    """``torch.optim.lr_scheduler.MultiplicativeLR``:
    ``lr_t = lr * prod_{j=1..t} lr_lambda(j)``.

    ``lr_lambda`` is any Python function of the int step: it is called once for each of
    ``j = 1..total_steps`` when the schedule is built, and the running products (multiplied in
    torch's order, so equal to its values bit for bit) are kept in a table indexed by the
    count. Counts past ``total_steps`` hold ``lr_{total_steps}``."""
    _callable("lr_lambda", lr_lambda)
    total_steps = _integer("total_steps", total_steps, minimum=0)
    values = [float(lr)]
    for j in range(1, total_steps + 1):
        values.append(float(values[-1] * lr_lambda(j)))
    table = torch.tensor(values, dtype=torch.float64)

    def schedule(count: torch.Tensor | int) -> torch.Tensor:
        c = _i64(count)
        return _take(table, torch.clamp(c, 0, total_steps))

    return schedule


def step_lr(lr: float, step_size: float, gamma: float = 0.1) -> Schedule:
    """``torch.optim.lr_scheduler.StepLR``: ``lr_t = lr * gamma ** floor(t / step_size)``.

    A fractional ``step_size`` decays, as torch's (``t % step_size == 0``), only at the steps
    that are exact multiples of it: every ``n`` steps for ``step_size = n / 2**k`` in lowest
    terms (every 5 steps for 2.5, every step for 0.5). A ``step_size`` whose first such step is
    past ``2**31``, as for any decimal not exact in binary (0.1, 2.7), is rejected: torch
    would never decay."""
    # torch does not check step_size, but a step_size of 0 fails with ZeroDivisionError on the
    # first step() and a negative one decays on multiples of |step_size|.
    if isinstance(step_size, bool) or not isinstance(step_size, numbers.Real):
        raise ValueError(f"step_size must be a number, got {step_size!r}")
    if not step_size > 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")
    if math.isinf(step_size):  # no step is a multiple
        return constant(lr)
    period = fractions.Fraction(step_size).numerator  # the first step that is a multiple
    if period > 2**31 and not float(step_size).is_integer():
        raise ValueError(
            f"step_size={step_size!r}: torch's StepLR decays only at the steps that are exact "
            f"multiples of its float value, and the first is step {period}, so it would never "
            "decay; use a whole number of steps (or a binary fraction such as 2.5)"
        )
    lr, gamma = float(lr), float(gamma)

    def schedule(count: torch.Tensor | int) -> torch.Tensor:
        decays = torch.div(_i64(count), period, rounding_mode="floor").to(torch.float64)
        return lr * gamma**decays

    return schedule


def multi_step_lr(lr: float, milestones: Iterable[int], gamma: float = 0.1) -> Schedule:
    """``torch.optim.lr_scheduler.MultiStepLR``: ``lr_t = lr * gamma ** n_t`` with ``n_t`` the
    number of milestones ``<= t``.

    As in torch, milestones need not be sorted and a milestone listed k times decays by
    ``gamma ** k``; negative milestones are never reached by torch's counter and are ignored.
    A whole float (``3.0``) is that step; a fractional milestone is rejected, as torch's
    counter would never reach it either."""
    why = ": torch's MultiStepLR decays when its integer step count equals a milestone, so it "
    why += "would never decay there; round it"
    milestones = [_integer("each milestone", m, why=why) for m in milestones]
    lr, gamma = float(lr), float(gamma)
    reached = sorted(m for m in milestones if m >= 0)
    if not reached:
        return constant(lr)
    table = torch.tensor(reached, dtype=torch.int64)

    def schedule(count: torch.Tensor | int) -> torch.Tensor:
        c = _i64(count)
        decays = (table.to(c.device) <= c).sum().to(torch.float64)
        return lr * gamma**decays

    return schedule


def constant_lr(lr: float, factor: float = 1.0 / 3, total_iters: int = 5) -> Schedule:
    """``torch.optim.lr_scheduler.ConstantLR``: ``lr_t = lr * factor`` for ``t < total_iters``,
    then ``lr``.

    With ``total_iters <= 0`` torch never undoes the factor (it applies it at step 0 and the
    undo test ``t == total_iters`` is then never reached), so the lr is ``lr * factor`` forever.
    With ``factor = 0`` torch raises ZeroDivisionError at ``t = total_iters``; here the lr
    returns to ``lr`` there, as torch's closed form says. A whole float ``total_iters``
    (``3.0``) is that step; a fractional one is rejected, as torch would never undo the
    factor."""
    if factor > 1.0 or factor < 0:
        raise ValueError("Constant multiplicative factor expected to be between 0 and 1.")
    why = ": torch's ConstantLR undoes the factor when its integer step count equals "
    why += "total_iters, so it would keep lr * factor forever; round it"
    total_iters = _integer("total_iters", total_iters, why=why)
    lr, factor = float(lr), float(factor)
    if total_iters <= 0:
        return constant(lr * factor)

    def schedule(count: torch.Tensor | int) -> torch.Tensor:
        t = _f64(count)
        return torch.where(t < total_iters, lr * factor, torch.full_like(t, lr))

    return schedule


def exponential_lr(lr: float, gamma: float) -> Schedule:
    """``torch.optim.lr_scheduler.ExponentialLR``: ``lr_t = lr * gamma ** t``."""
    lr, gamma = float(lr), float(gamma)

    def schedule(count: torch.Tensor | int) -> torch.Tensor:
        return lr * gamma ** _f64(count)

    return schedule


def polynomial_lr(lr: float, total_iters: float = 5, power: float = 1.0) -> Schedule:
    """``torch.optim.lr_scheduler.PolynomialLR``:
    ``lr_t = lr * (1 - min(t, floor(T)) / T) ** power`` with ``T = total_iters``: torch
    stops changing the lr after step ``T``, so with a fractional ``T`` it holds its value at
    ``floor(T)``, and with ``T < 1`` it never decays: ``lr_t = lr``."""
    lr, power = float(lr), float(power)
    last = _last_step("total_iters", total_iters)
    if last == 0:
        return constant(lr)

    def schedule(count: torch.Tensor | int) -> torch.Tensor:
        t = torch.clamp(_f64(count), max=last)
        return lr * (1.0 - t / total_iters) ** power

    return schedule


# --- cosine and cyclic schedules ------------------------------------------------------------


def cosine_annealing(lr: float, T_max: float, eta_min: float = 0.0) -> Schedule:
    """``torch.optim.lr_scheduler.CosineAnnealingLR``:
    ``lr_t = eta_min + (lr - eta_min) * (1 + cos(pi * t / T_max)) / 2``.

    Past ``T_max`` the lr rises and falls again with period ``2 * T_max``, following torch's
    recursive update rather than the exact cosine: torch restarts each rise from ``eta_min`` at
    ``t = T_max + 1 (mod 2 T_max)`` with an additive step ``d = (lr - eta_min) * (1 -
    cos(pi / T_max)) / 2`` and scales it by ``(1 + cos(pi t / T_max)) / (1 + cos(pi s /
    T_max))`` (``s`` the period's first step). Both are small differences of numbers near 1,
    so torch's later periods are off the exact cosine by up to ``~1e-17 * T_max**2`` relative;
    this schedule uses the same form and gives torch's numbers. With ``eta_min > 0`` torch's
    step-by-step rounding of ``eta_min + d`` adds a drift no closed form reproduces: measured
    against torch, this schedule agrees within 2e-13 relative for ``T_max <= 300`` and 5e-12
    at ``T_max = 1000``.

    ``T_max`` may be fractional, as in torch. Its periods then start at no step, so torch's
    recursion telescopes to the cosine itself, but its step-by-step rounding drifts from
    it as the cosine nears its troughs (to 1e-9 relative within 100 steps with ``eta_min
    > 0``). This schedule therefore replays torch's recursion, in torch's float arithmetic,
    for the first 10000 steps (a table made when the schedule is built: the same numbers
    as torch), and is the cosine after them. Where ``(2k + 1) * T_max`` is an integer torch
    may divide by zero at that step (ZeroDivisionError); the table ends there and the
    cosine continues."""
    # torch fails with ZeroDivisionError on a T_max of 0 and runs an inside-out cosine below
    if isinstance(T_max, bool) or not isinstance(T_max, numbers.Real) or not T_max > 0:
        raise ValueError(f"T_max must be a number > 0, got {T_max!r}")
    lr, eta_min = float(lr), float(eta_min)
    restarts = float(T_max).is_integer()  # torch's recursion restarts from eta_min
    amplitude = lr - eta_min
    # the lr torch sets at the first step of each later period, less eta_min, rounded as torch
    rise = (eta_min + amplitude * (1 - math.cos(math.pi / T_max)) / 2) - eta_min

    replayed = None
    if not restarts:
        replayed = torch.tensor(_cosine_recursion(lr, T_max, eta_min), dtype=torch.float64)

    def schedule(count: torch.Tensor | int) -> torch.Tensor:
        t = _f64(count)
        c_t = 1 + torch.cos(math.pi * t / T_max)
        first = eta_min + amplitude * c_t / 2
        if replayed is not None:
            i = torch.clamp(_i64(count), max=len(replayed) - 1)
            return torch.where(t < len(replayed), _take(replayed, i), first)
        start = t - torch.remainder(t - T_max - 1, 2 * T_max)
        c_start = 1 + torch.cos(math.pi * start / T_max)
        later = eta_min + rise * (c_t / c_start)
        return torch.where(t <= T_max, first, later)

    return schedule


def _cosine_recursion(lr: float, T_max: float, eta_min: float, steps: int = 10_000) -> list:
    """CosineAnnealingLR's lr after 0, 1, ... scheduler steps, computed as its ``get_lr``
    computes them (Python floats, step by step), up to ``steps`` of them or the first
    division by zero."""
    out = [lr]
    for t in range(1, steps):
        prev = out[-1]
        if (t - 1 - T_max) % (2 * T_max) == 0:
            out.append(prev + (lr - eta_min) * (1 - math.cos(math.pi / T_max)) / 2)
            continue
        trough = 1 + math.cos(math.pi * (t - 1) / T_max)
        if trough == 0:
            break
        out.append((1 + math.cos(math.pi * t / T_max)) / trough * (prev - eta_min) + eta_min)
    return out


def cosine_annealing_warm_restarts(
    lr: float, T_0: int, T_mult: int = 1, eta_min: float = 0.0
) -> Schedule:
    """``torch.optim.lr_scheduler.CosineAnnealingWarmRestarts``:
    ``lr_t = eta_min + (lr - eta_min) * (1 + cos(pi * T_cur / T_i)) / 2`` where period ``i``
    lasts ``T_i = T_0 * T_mult**i`` steps and ``T_cur`` counts the steps since it began.

    A fractional count ``t`` (a float, or a floating tensor) gives the lr of torch's
    ``scheduler.step(t)``, as in its per-batch idiom ``scheduler.step(epoch + i / iters)``,
    here ``lr=lambda c: schedule(c.double() / iters)`` (``c / iters`` would round the count
    to float32). With ``T_0`` in steps instead, ``cosine_annealing_warm_restarts(lr, T_0 *
    iters, T_mult)`` gives the same lrs, within rounding, at the plain step count. At a whole
    ``t`` torch's ``step(t)`` finds the period with a float log, which rounds below some
    restarts (``T_0=1, T_mult=3, t=121``) and then gives ``eta_min`` there; this schedule
    gives the restart's ``lr``, as ``t`` calls of ``step()`` do."""
    if T_0 <= 0 or not isinstance(T_0, int):
        raise ValueError(f"Expected positive integer T_0, but got {T_0}")
    if T_mult < 1 or not isinstance(T_mult, int):
        raise ValueError(f"Expected integer T_mult >= 1, but got {T_mult}")
    if not isinstance(eta_min, (float, int)):
        raise ValueError(
            f"Expected float or int eta_min, but got {eta_min} of type {type(eta_min)}"
        )
    lr, eta_min = float(lr), float(eta_min)
    # The periods that start at a count below 2**62 (int64 counts never reach past that):
    # their starts fit in int64; their lengths need not, and are kept as float64, as torch
    # divides by them. With T_mult > 1 there are at most 62 periods.
    starts, lengths = [0], [T_0]
    while T_mult > 1 and starts[-1] + lengths[-1] < 2**62:
        starts.append(starts[-1] + lengths[-1])
        lengths.append(lengths[-1] * T_mult)
    starts_t = torch.tensor(starts, dtype=torch.int64)
    lengths_t = torch.tensor([float(n) for n in lengths], dtype=torch.float64)

    def position(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T_cur, T_i) after ``c`` steps (an int64 count, or a float64 one: torch's
        ``epoch - start`` or ``epoch % T_0``)."""
        if T_mult == 1:
            T_i = torch.full_like(c, float(T_0), dtype=torch.float64)
            period = float(T_0) if c.is_floating_point() else min(T_0, 2**62)
            return torch.remainder(c, period), T_i
        i = (starts_t.to(c.device) <= c).sum() - 1
        return c - _take(starts_t, i), _take(lengths_t, i)

    def schedule(count: torch.Tensor | float) -> torch.Tensor:
        fractional = torch.as_tensor(count).is_floating_point()
        T_cur, T_i = position(_f64(count) if fractional else _i64(count))
        phase = math.pi * T_cur.to(torch.float64) / T_i
        return eta_min + (lr - eta_min) * (1 + torch.cos(phase)) / 2

    return schedule


def _cycle(
    step_size_up: float,
    step_size_down: float | None,
    mode: str,
    gamma: float,
    scale_fn: Callable[[torch.Tensor], torch.Tensor | float] | None,
    scale_mode: str,
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """CyclicLR's ``t -> (h_t, s)``: the position in the cycle (0 at its ends, 1 at the peak)
    and the amplitude scale."""
    if mode not in ["triangular", "triangular2", "exp_range"] and scale_fn is None:
        raise ValueError("mode is invalid and scale_fn is None")
    # torch does not check these, but fails with ZeroDivisionError on a zero step_size_up
    if not step_size_up > 0:
        raise ValueError(f"step_size_up must be > 0, got {step_size_up}")
    up = float(step_size_up)
    down = up if step_size_down is None else float(step_size_down)
    if not down >= 0:
        raise ValueError(f"step_size_down must be >= 0, got {step_size_down}")
    total = up + down
    ratio = up / total
    gamma = float(gamma)

    if scale_fn is None:
        scale_mode = "iterations" if mode == "exp_range" else "cycle"

        def scale_fn(x: torch.Tensor) -> torch.Tensor | float:
            if mode == "triangular":
                return 1.0
            if mode == "triangular2":
                return 1 / (2.0 ** (x - 1))
            return gamma**x

    def height(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cycle = torch.floor(1 + t / total)
        x = 1.0 + t / total - cycle
        scale_factor = torch.where(x <= ratio, x / ratio, (x - 1) / (ratio - 1))
        # as torch, any scale_mode other than "cycle" means "iterations"
        return scale_factor, _like(scale_fn(cycle if scale_mode == "cycle" else t), t)

    return height


def cyclic_lr(
    base_lr: float,
    max_lr: float,
    step_size_up: float = 2000,
    step_size_down: float | None = None,
    mode: str = "triangular",
    gamma: float = 1.0,
    scale_fn: Callable[[torch.Tensor], torch.Tensor | float] | None = None,
    scale_mode: str = "cycle",
) -> Schedule:
    """``torch.optim.lr_scheduler.CyclicLR`` (its lr; see :func:`cyclic_momentum`):
    ``lr_t = base_lr + (max_lr - base_lr) * h_t * s``, with ``h_t`` rising linearly from 0 to 1
    over ``step_size_up`` steps and falling back over ``step_size_down`` (default: the same),
    and ``s`` = 1 (``triangular``), ``1 / 2**(cycle - 1)`` (``triangular2``, cycle counted from
    1), ``gamma**t`` (``exp_range``) or ``scale_fn(cycle or t)``.

    Like torch's scheduler, this ignores the optimizer's lr: ``lr_0 = base_lr``. A custom
    ``scale_fn`` receives a float64 tensor (torch passes an int) and must use tensor ops."""
    height = _cycle(step_size_up, step_size_down, mode, gamma, scale_fn, scale_mode)
    base_lr, max_lr = float(base_lr), float(max_lr)

    def schedule(count: torch.Tensor | int) -> torch.Tensor:
        h, s = height(_f64(count))
        return base_lr + (max_lr - base_lr) * h * s

    return schedule


def cyclic_momentum(
    base_momentum: float = 0.8,
    max_momentum: float = 0.9,
    step_size_up: float = 2000,
    step_size_down: float | None = None,
    mode: str = "triangular",
    gamma: float = 1.0,
    scale_fn: Callable[[torch.Tensor], torch.Tensor | float] | None = None,
    scale_mode: str = "cycle",
) -> Schedule:
    """The momentum (SGD's ``momentum``, Adam's ``betas[0]``) that
    ``torch.optim.lr_scheduler.CyclicLR(cycle_momentum=True)`` sets, cycled inversely to the lr:
    ``m_t = max_momentum - (max_momentum - base_momentum) * h_t * s``, with ``h_t`` and ``s``
    as in :func:`cyclic_lr` for the same cycle arguments."""
    height = _cycle(step_size_up, step_size_down, mode, gamma, scale_fn, scale_mode)
    base_momentum, max_momentum = float(base_momentum), float(max_momentum)

    def schedule(count: torch.Tensor | int) -> torch.Tensor:
        h, s = height(_f64(count))
        return max_momentum - (max_momentum - base_momentum) * h * s

    return schedule


def _one_cycle(
    anchors: tuple[float, ...],
    total_steps: int | None,
    epochs: int | None,
    steps_per_epoch: int | None,
    pct_start: float,
    anneal_strategy: str,
    three_phase: bool,
) -> Schedule:
    """OneCycleLR's piecewise annealing between ``anchors`` (one more than the phases)."""
    if total_steps is not None:
        if total_steps <= 0 or not isinstance(total_steps, int):
            raise ValueError(f"Expected positive integer total_steps, but got {total_steps}")
        total = total_steps
    elif epochs is not None and steps_per_epoch is not None:
        total = _positive("epochs", epochs) * _positive("steps_per_epoch", steps_per_epoch)
    else:
        raise ValueError("You must define either total_steps OR (epochs AND steps_per_epoch)")
    if pct_start < 0 or pct_start > 1 or not isinstance(pct_start, float):
        raise ValueError(f"Expected float between 0 and 1 pct_start, but got {pct_start}")
    if anneal_strategy not in ("cos", "linear"):
        raise ValueError(
            f"anneal_strategy must be one of 'cos' or 'linear', instead got {anneal_strategy}"
        )
    pct_start = float(pct_start)
    # each phase ends at this step (torch's arithmetic, so the same floats)
    if three_phase:
        ends = [float(pct_start * total) - 1, float(2 * pct_start * total) - 2, total - 1]
    else:
        ends = [float(pct_start * total) - 1, total - 1]
    starts = [0.0, *ends[:-1]]
    for i, (start, end) in enumerate(zip(starts, ends, strict=True)):
        # torch picks the first phase whose end is >= the step (the last phase for any step
        # past the others): the first step that reaches phase i is past every earlier end
        first_step = max(0, math.floor(max(ends[:i], default=-1.0)) + 1)
        reached = first_step <= total and (i == len(ends) - 1 or first_step <= end)
        if reached and end == start:
            raise ValueError(
                f"OneCycleLR phase {i} is empty (it starts and ends at step {end}) with "
                f"total_steps={total}, pct_start={pct_start}: torch divides by its length "
                "(ZeroDivisionError); choose another pct_start or total_steps"
            )

    def anneal(start: float, end: float, pct: torch.Tensor) -> torch.Tensor:
        if anneal_strategy == "cos":
            return end + (start - end) / 2.0 * (torch.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def schedule(count: torch.Tensor | int) -> torch.Tensor:
        # torch raises past total_steps; the schedule holds its value at total_steps there
        step = torch.clamp(_f64(count), max=total)
        value = None
        for i in reversed(range(len(ends))):
            pct = (step - starts[i]) / (ends[i] - starts[i])
            phase = anneal(anchors[i], anchors[i + 1], pct)
            value = phase if value is None else torch.where(step <= ends[i], phase, value)
        return value

    return schedule


def _positive(name: str, value: object) -> int:
    """OneCycleLR's check of ``epochs`` and ``steps_per_epoch``."""
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"Expected positive integer {name}, but got {value}")
    return value


def one_cycle_lr(
    max_lr: float,
    total_steps: int | None = None,
    epochs: int | None = None,
    steps_per_epoch: int | None = None,
    pct_start: float = 0.3,
    anneal_strategy: str = "cos",
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    three_phase: bool = False,
) -> Schedule:
    """``torch.optim.lr_scheduler.OneCycleLR`` (its lr; see :func:`one_cycle_momentum`).

    With ``initial = max_lr / div_factor`` and ``min = initial / final_div_factor``, the lr
    anneals (``cos``: ``end + (start - end) * (1 + cos(pi * pct)) / 2``, or ``linear``) from
    ``initial`` to ``max_lr`` over steps ``0..pct_start * total - 1``, then to ``min`` at
    ``total - 1``; with ``three_phase``, back to ``initial`` by ``2 * pct_start * total - 2``
    and only then to ``min``. ``total = total_steps`` or ``epochs * steps_per_epoch``.

    Like torch's scheduler, this ignores the optimizer's lr (``max_lr`` is the peak). Torch
    allows ``total`` scheduler steps and raises after; counts past ``total`` hold the value at
    ``total``."""
    max_lr = float(max_lr)
    initial = max_lr / div_factor
    low = initial / final_div_factor
    anchors = (initial, max_lr, initial, low) if three_phase else (initial, max_lr, low)
    return _one_cycle(
        anchors, total_steps, epochs, steps_per_epoch, pct_start, anneal_strategy, three_phase
    )


def one_cycle_momentum(
    base_momentum: float = 0.85,
    max_momentum: float = 0.95,
    total_steps: int | None = None,
    epochs: int | None = None,
    steps_per_epoch: int | None = None,
    pct_start: float = 0.3,
    anneal_strategy: str = "cos",
    three_phase: bool = False,
) -> Schedule:
    """The momentum (SGD's ``momentum``, Adam's ``betas[0]``) that
    ``torch.optim.lr_scheduler.OneCycleLR(cycle_momentum=True)`` sets: it anneals inversely to
    the lr of :func:`one_cycle_lr` with the same phase arguments, from ``max_momentum`` to
    ``base_momentum`` (at the lr's peak) and back to ``max_momentum`` (where it stays in the
    third phase of ``three_phase``)."""
    low, high = float(base_momentum), float(max_momentum)
    anchors = (high, low, high, high) if three_phase else (high, low, high)
    return _one_cycle(
        anchors, total_steps, epochs, steps_per_epoch, pct_start, anneal_strategy, three_phase
    )


# --- compositions ---------------------------------------------------------------------------


def sequential(schedules: Sequence[Schedule], milestones: Sequence[int]) -> Schedule:
    """``torch.optim.lr_scheduler.SequentialLR``: ``lr_t = schedules[i](t - m_i)`` where ``i``
    is the number of milestones ``<= t`` and ``m_i`` the milestone that started schedule ``i``
    (``m_0 = 0``): each schedule starts from its own count 0 at its milestone.

    Torch starts a scheduler at its milestone with ``_update_lr(0)`` (its closed form at step 0
    where it has one), which equals its first lr for every scheduler here, except: a
    ``ConstantLR`` with ``total_iters <= 0`` restarts at ``lr`` (not ``lr * factor``), a
    ``MultiStepLR`` restarts with its negative milestones counted as passed, and a
    ``MultiplicativeLR`` multiplies the previous scheduler's lr by ``lr_lambda(0)``.
    Milestones must be non-decreasing (torch bisects them without checking); a schedule whose
    milestone is ``<= 0`` starts at count 0, as torch starts it when the SequentialLR is
    built. A whole float milestone (``3.0``) is that step; a fractional one is rejected.

    Three compositions give other lrs in torch, through quirks of its composite schedulers;
    here each member follows its own schedule:

    - a ``SequentialLR`` nested as a member of another switches members one step early
      (torch's ``recursive_undo`` rewinds its members but not its own ``last_epoch``, which
      it compares with its milestones);
    - a ``ChainedScheduler`` member applies its members' first step at its start (an
      ``ExponentialLR`` in it multiplies by ``gamma`` at step 0): its members get
      ``_initial_step`` without being marked initial;
    - ``OneCycleLR`` and ``CyclicLR`` members overwrite the param group's ``initial_lr``
      (with ``max_lr / div_factor``, ``base_lr``), from which torch's other members then
      compute their lrs, while here each keeps its own ``lr``.

    Torch does not restart a ``SequentialLR`` or ``ChainedScheduler`` at a milestone
    (NotImplementedError), so a composite after the first member has no torch reference."""
    schedules = list(schedules)
    why = ": torch's SequentialLR restarts a scheduler when its integer step count equals the "
    why += "milestone, so it would never restart the next one; round it"
    milestones = [_integer("each milestone", m, why=why) for m in milestones]
    if not schedules:
        raise ValueError("SequentialLR expects at least one scheduler, but got no scheduler.")
    if len(milestones) != len(schedules) - 1:
        raise ValueError(
            "Sequential Schedulers expects number of schedulers provided to be one more "
            f"than the number of milestone points, but got number of schedulers {len(schedules)} "
            f"and the number of milestones to be equal to {len(milestones)}"
        )
    if any(b < a for a, b in itertools.pairwise(milestones)):
        raise ValueError(f"milestones must be non-decreasing, got {milestones}")
    for s in schedules:
        _callable("each schedule", s)
    if len(schedules) == 1:
        only = schedules[0]
        return lambda count: _like(only(count), _i64(count))
    bounds = torch.tensor(milestones, dtype=torch.int64)
    starts = [0] + [max(m, 0) for m in milestones]

    def schedule(count: torch.Tensor | int) -> torch.Tensor:
        c = _i64(count)
        i = (bounds.to(c.device) <= c).sum()
        values = [
            _like(s(torch.clamp(c - start, min=0)), c)
            for s, start in zip(schedules, starts, strict=True)
        ]
        return _take(torch.stack(values), i)

    return schedule


def chained(lr: float, *factors: Schedule) -> Schedule:
    """``torch.optim.lr_scheduler.ChainedScheduler``: ``lr_t = lr * prod_k f_k(t)`` where each
    factor ``f_k`` is a schedule built with ``lr=1.0``, e.g. ``chained(0.1,
    constant_lr(1.0, factor=0.5, total_iters=2), exponential_lr(1.0, gamma=0.9))``.

    Torch steps each scheduler in turn on the shared lr, so the product is its lr whenever each
    scheduler's update multiplies the current lr by a factor that depends only on the step:
    ``ConstantLR``, ``LinearLR``, ``StepLR``, ``MultiStepLR``, ``ExponentialLR``,
    ``PolynomialLR``, ``MultiplicativeLR``, and ``CosineAnnealingLR`` with ``eta_min=0`` up
    to ``T_max``. Schedulers that set the lr from the base lr (``LambdaLR``, ``CyclicLR``,
    ``OneCycleLR``, ``CosineAnnealingWarmRestarts``, cosine annealing past ``T_max`` or with
    ``eta_min > 0``) do not compose as a product there."""
    if not factors:
        raise ValueError(
            "ChainedScheduler expects at least one scheduler to be chained, but got no scheduler."
        )
    for f in factors:
        _callable("each factor", f)
    lr = float(lr)

    def schedule(count: torch.Tensor | int) -> torch.Tensor:
        c = _i64(count)
        value = torch.full((), lr, dtype=torch.float64, device=c.device)
        for f in factors:
            value = value * _like(f(count), c)
        return value

    return schedule


def warmup_cosine(
    lr: float,
    warmup_steps: int,
    total_steps: int,
    eta_min: float = 0.0,
    start_factor: float = 0.1,
) -> Schedule:
    """Linear warmup from ``start_factor * lr`` to ``lr`` over ``warmup_steps``, then cosine
    annealing to ``eta_min`` at ``total_steps``: torch's ``SequentialLR([LinearLR(start_factor,
    1.0, warmup_steps), CosineAnnealingLR(T_max=total_steps - warmup_steps, eta_min)],
    milestones=[warmup_steps])``."""
    warmup_steps = _integer("warmup_steps", warmup_steps, minimum=0)
    total_steps = _integer("total_steps", total_steps)
    if total_steps <= warmup_steps:
        raise ValueError(
            f"total_steps ({total_steps}) must be greater than warmup_steps ({warmup_steps})"
        )
    return sequential(
        [
            linear(lr, start_factor, 1.0, warmup_steps),
            cosine_annealing(lr, total_steps - warmup_steps, eta_min),
        ],
        [warmup_steps],
    )


# --- reduce on plateau ----------------------------------------------------------------------


class PlateauState(NamedTuple):
    lr: torch.Tensor  # float64: the lr to use now
    best: torch.Tensor  # float64: the best metric so far (+-inf before the first)
    num_bad_epochs: torch.Tensor  # int64
    cooldown_counter: torch.Tensor  # int64
    last_epoch: torch.Tensor  # int64: the number of updates (metrics) seen


class Plateau(NamedTuple):
    """``init(device=None) -> state``, ``update(state, metric, floor=None) -> state``; the
    lr is ``state.lr``. ``min_lr`` is the floor as given: a float, or a tuple of floats,
    one per param group; ``floor`` overrides it in one update (another group's floor, as
    torch's ``_reduce_lr`` uses ``min_lrs[i]`` for group ``i``)."""

    init: Callable[..., PlateauState]
    update: Callable[..., PlateauState]
    min_lr: float | tuple[float, ...] = 0.0


def _min_lr(min_lr: float | Sequence[float]) -> float | tuple[float, ...]:
    """ReduceLROnPlateau's ``min_lr``: a number, or a list or tuple of one per param group
    (as a tuple of floats)."""
    if isinstance(min_lr, (list, tuple)):
        if not min_lr:
            raise ValueError("expected one min_lr per param group, got an empty min_lr")
        return tuple(float(m) for m in min_lr)
    return float(min_lr)


def _updates(name: str, value: object, whole: Callable[[float], int]) -> int:
    """ReduceLROnPlateau's ``patience`` or ``cooldown`` as the whole count of updates it
    acts as (``whole`` rounds it); an infinite one as a count no run reaches."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ValueError(f"{name} must be a number of updates, got {value!r}")
    if math.isinf(value):
        return 2**62 if value > 0 else -1
    return whole(value)


def reduce_on_plateau(
    lr: float,
    mode: str = "min",
    factor: float = 0.1,
    patience: float = 10,
    threshold: float = 1e-4,
    threshold_mode: str = "rel",
    cooldown: float = 0,
    min_lr: float | Sequence[float] = 0,
    eps: float = 1e-8,
) -> Plateau:
    """``torch.optim.lr_scheduler.ReduceLROnPlateau`` as a pure state machine.

    ``update`` takes the metric (a number or a 0-dim tensor, e.g. the validation loss) and
    returns the next state, with tensor ops only (no host sync), so it can run inside a compiled
    step. A metric is better if it beats ``best`` by the threshold (``min``/``rel``:
    ``metric < best * (1 - threshold)``; ``abs``: ``metric < best - threshold``; ``max`` mirrors
    them). After more than ``patience`` updates without improvement (bad updates during a
    cooldown do not count), ``lr <- max(lr * factor, min_lr)`` unless that changes it by no more
    than ``eps``, and a cooldown of ``cooldown`` updates starts.

    ``min_lr`` may be a list or tuple with one floor per param group, as torch takes it
    (:attr:`Plateau.min_lr` keeps it); ``state.lr`` is the first group's lr, floored at
    ``min_lr[0]``.

    ``patience`` and ``cooldown`` may be any numbers, as in torch: a fractional patience
    acts as its floor (the count of bad updates is whole), a fractional cooldown as its
    ceiling (torch counts it down while it is above 0), and ``patience=math.inf`` never
    reduces."""
    if factor >= 1.0:
        raise ValueError("Factor should be < 1.0.")
    min_lr = _min_lr(min_lr)
    if mode not in {"min", "max"}:
        raise ValueError("mode " + mode + " is unknown!")
    if threshold_mode not in {"rel", "abs"}:
        raise ValueError("threshold mode " + threshold_mode + " is unknown!")
    lr, factor, threshold, eps = float(lr), float(factor), float(threshold), float(eps)
    own_min_lr = min_lr[0] if isinstance(min_lr, tuple) else min_lr
    patience = _updates("patience", patience, math.floor)
    cooldown = _updates("cooldown", cooldown, math.ceil)
    worst = math.inf if mode == "min" else -math.inf

    def is_better(metric: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
        if mode == "min":
            return metric < (
                best * (1.0 - threshold) if threshold_mode == "rel" else best - threshold
            )
        return metric > (best * (threshold + 1.0) if threshold_mode == "rel" else best + threshold)

    def init(device: torch.device | str | None = None) -> PlateauState:
        def scalar(value: float, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(value, dtype=dtype, device=device)

        # three separate zeros: a compiled update guards on which inputs alias each other
        counters = [scalar(0, torch.int64) for _ in range(3)]
        return PlateauState(scalar(lr, torch.float64), scalar(worst, torch.float64), *counters)

    def update(
        state: PlateauState, metric: torch.Tensor | float, floor: float | None = None
    ) -> PlateauState:
        # float64 as torch's float(metric): a Python float must not pass through float32
        current = torch.as_tensor(metric, dtype=torch.float64, device=state.best.device)
        better = is_better(current, state.best)
        best = torch.where(better, current, state.best)
        bad = torch.where(better, 0, state.num_bad_epochs + 1)
        in_cooldown = state.cooldown_counter > 0
        cooling = torch.where(in_cooldown, state.cooldown_counter - 1, state.cooldown_counter)
        bad = torch.where(in_cooldown, 0, bad)
        reduce = bad > patience
        reduced = torch.clamp(state.lr * factor, min=own_min_lr if floor is None else floor)
        new_lr = torch.where(reduce & (state.lr - reduced > eps), reduced, state.lr)
        cooling = torch.where(reduce, cooldown, cooling)
        bad = torch.where(reduce, 0, bad)
        return PlateauState(new_lr, best, bad, cooling, state.last_epoch + 1)

    return Plateau(init, update, min_lr)
