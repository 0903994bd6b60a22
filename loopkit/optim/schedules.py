"""Learning-rate schedules: pure functions ``step -> lr`` written with tensor ops.

A schedule takes the number of optimizer updates already made (``0`` for the first update,
the same count ``torch.optim.lr_scheduler`` has seen when ``scheduler.step()`` is called once
per ``optimizer.step()``) and returns the learning rate as a float64 tensor. Because the step
count is a tensor and the formula has no Python branching on it, a compiled training step
traces the schedule once and never recompiles as the lr changes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Schedule = Callable[[torch.Tensor], torch.Tensor]


def _f64(count: torch.Tensor | int) -> torch.Tensor:
    return torch.as_tensor(count).to(torch.float64)


def constant(value: float) -> Schedule:
    """``lr_t = value`` for every t."""
    value = float(value)

    def schedule(count: torch.Tensor | int) -> torch.Tensor:
        return torch.full_like(_f64(count), value)

    return schedule


def linear(
    lr: float, start_factor: float = 1.0 / 3, end_factor: float = 1.0, total_iters: int = 5
) -> Schedule:
    """``torch.optim.lr_scheduler.LinearLR``:
    ``lr_t = lr * (s + (e - s) * min(t, T) / T)`` with s, e the start and end factors."""
    if not 0.0 < start_factor <= 1.0:
        raise ValueError(
            f"start_factor must be in (0, 1] as in torch's LinearLR, got {start_factor}"
        )
    if not 0.0 <= end_factor <= 1.0:
        raise ValueError(f"end_factor must be in [0, 1] as in torch's LinearLR, got {end_factor}")
    if total_iters < 0:
        raise ValueError(f"total_iters must be a non-negative integer, got {total_iters}")
    lr, s, e = float(lr), float(start_factor), float(end_factor)
    if total_iters == 0:  # torch's LinearLR then holds start_factor * lr forever
        return constant(lr * s)

    def schedule(count: torch.Tensor | int) -> torch.Tensor:
        t = torch.clamp(_f64(count), max=total_iters)
        return lr * (s + (e - s) * t / total_iters)

    return schedule


def linear_warmup(lr: float, warmup_steps: int, start_factor: float = 0.1) -> Schedule:
    """Warm up linearly from ``start_factor * lr`` to ``lr`` over ``warmup_steps`` updates,
    then hold: ``LinearLR(start_factor, 1.0, total_iters=warmup_steps)``."""
    return linear(lr, start_factor=start_factor, end_factor=1.0, total_iters=warmup_steps)


def as_schedule(lr: float | Schedule) -> Schedule:
    """A number (or one-element tensor) becomes :func:`constant`; a callable is taken to be a
    schedule already (it may return a tensor or a number)."""
    return lr if callable(lr) else constant(float(lr))
