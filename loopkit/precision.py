"""Mixed precision: autocast inside the step, fp32 master params, and a functional loss scaler.

``train_step(..., precision="bf16")`` runs ``loss_fn`` under ``torch.autocast`` with
bfloat16: matmuls and convolutions compute in bf16, while the params in the state, their
gradients and the optimizer's moments stay float32 (the "master" copy), as with
``torch.autocast`` in an imperative loop. bf16 has float32's exponent range, so no loss
scaling is needed.

``precision="fp16"`` autocasts to float16, whose small range underflows small gradients.
Scale the loss as ``torch.amp.GradScaler`` does, functionally: wrap the optimizer in
:func:`dynamic_loss_scale`. Its state (the scale and the count of steps since the last
overflow) lives in the optimizer state, so it is checkpointed and resumed with the rest,
and a compiled step never recompiles as the scale changes::

    opt = lk.precision.dynamic_loss_scale(optim.adamw(lr=1e-3))
    step = lk.train_step(model, loss_fn, opt, precision="fp16", compile=True)

The step multiplies the loss by the current scale before differentiating; the scaler
unscales the gradients, skips the update (params and inner optimizer state unchanged)
when any gradient is inf or NaN, and grows or backs off the scale exactly as GradScaler
does (``tests/test_precision.py`` checks its decisions against GradScaler's).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from loopkit.optim.base import Transform
from loopkit.optim.leafwise import leafwise
from loopkit.tree import PyTree, tree_leaves, tree_map

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}


class LossScaleState(NamedTuple):
    scale: torch.Tensor  # float32 scalar: the loss is multiplied by it
    growth_tracker: torch.Tensor  # int32 scalar: consecutive steps without inf/NaN
    inner: Any  # the wrapped optimizer's state


def dynamic_loss_scale(
    inner: Transform,
    init_scale: float = 2.0**16,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
    growth_interval: int = 2000,
) -> Transform:
    """``inner`` behind a dynamic loss scale, deciding as ``torch.amp.GradScaler`` with the
    same arguments (and defaults).

    ``update(grads, state, params)`` takes the gradients of ``loss * state.scale`` (the
    train step with ``precision="fp16"`` computes them). It divides them by the scale
    (multiplying by its float32 reciprocal, as GradScaler's ``unscale_``) and, if any of
    the scaled gradients is inf or NaN, returns zero updates and ``inner``'s state
    unchanged and multiplies the scale by ``backoff_factor``; otherwise it applies
    ``inner`` and, after ``growth_interval`` such steps in a row, multiplies the scale by
    ``growth_factor`` (unless that overflows float32). To clip gradients, clip the
    unscaled ones inside: ``dynamic_loss_scale(chain(clip_by_global_norm(1.0), opt))``.

    A skipped step keeps all of ``inner``'s state, the step counts of its schedules
    included: an lr schedule counts the updates applied, as in a loop that calls
    ``scheduler.step()`` only when ``scaler.step`` did not skip (Hugging Face's Trainer
    does so), not as in one that steps the scheduler every iteration.
    """
    if not init_scale > 0:
        raise ValueError(f"init_scale must be positive, got {init_scale}")
    if not growth_factor > 1.0:
        raise ValueError(f"The growth factor must be > 1.0, got {growth_factor}")
    if not 0.0 < backoff_factor < 1.0:
        raise ValueError(f"The backoff factor must be < 1.0, got {backoff_factor}")
    if not isinstance(growth_interval, int) or growth_interval < 1:
        raise ValueError(f"growth_interval must be a positive integer, got {growth_interval}")

    def init(params: PyTree) -> LossScaleState:
        leaves = tree_leaves(params)
        device = leaves[0].device if leaves else None
        return LossScaleState(
            torch.full((), init_scale, dtype=torch.float32, device=device),
            torch.zeros((), dtype=torch.int32, device=device),
            inner.init(params),
        )

    def update(grads: PyTree, state: LossScaleState, params: PyTree | None = None):
        inv_scale = state.scale.double().reciprocal().float()
        leaves = tree_leaves(grads)
        if leaves:
            found_inf = torch.stack([(~torch.isfinite(g)).any() for g in leaves]).any()
        else:
            found_inf = torch.zeros((), dtype=torch.bool, device=state.scale.device)
        unscaled = leafwise(lambda g: g * inv_scale.to(g.dtype), grads)
        updates, inner_state = inner.update(unscaled, state.inner, params)
        updates = tree_map(lambda u: torch.where(found_inf, torch.zeros_like(u), u), updates)
        inner_state = tree_map(
            lambda old, new: torch.where(found_inf, old, new), state.inner, inner_state
        )
        # torch's _amp_update_scale_: back off on inf/NaN, grow after growth_interval
        # clean steps (keeping the old scale if the grown one is not finite).
        tracker = state.growth_tracker + 1
        grow = tracker == growth_interval
        grown = state.scale * growth_factor
        grown = torch.where(torch.isfinite(grown), grown, state.scale)
        scale = torch.where(
            found_inf, state.scale * backoff_factor, torch.where(grow, grown, state.scale)
        )
        tracker = torch.where(found_inf | grow, torch.zeros_like(tracker), tracker)
        return updates, LossScaleState(scale, tracker, inner_state)

    return Transform(init, update)


def autocast_dtype(precision: str | None) -> torch.dtype | None:
    """``None``/``"fp32"`` -> None; ``"bf16"``/``"fp16"`` -> the autocast dtype."""
    if precision in (None, "fp32"):
        return None
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be None, 'fp32', 'bf16' or 'fp16', got {precision!r}")
    return PRECISIONS[precision]
