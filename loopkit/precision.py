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
from loopkit.optim.wrappers import AccumulateState, accumulation_window
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

    ``update(grads, state, params)`` takes the gradients of ``loss * state.scale`` (a train
    step computes them whenever its optimizer state is this scaler's). It divides them by
    the scale (multiplying by its float32 reciprocal, as GradScaler's ``unscale_``, in
    float32 for bfloat16 gradients) and, if any of the scaled gradients is inf or NaN,
    returns zero updates and ``inner``'s state unchanged and multiplies the scale by
    ``backoff_factor``; otherwise it applies ``inner`` and, after ``growth_interval`` such
    steps in a row, multiplies the scale by ``growth_factor`` (unless that overflows
    float32). Scale products round once from float64, as torch's. To clip gradients, clip
    the unscaled ones inside: ``dynamic_loss_scale(chain(clip_by_global_norm(1.0), opt))``.

    With :func:`~loopkit.optim.accumulate` directly inside,
    ``dynamic_loss_scale(accumulate(opt, k), ...)``, it follows torch's AMP recipe for
    gradient accumulation (each micro-batch's loss scaled, ``scaler.step`` and
    ``scaler.update`` once per ``k``): the scale stays fixed within a window, an inf or NaN
    in any micro-batch skips the whole window (its gradients dropped, ``opt``'s state
    kept), and the scale backs off or counts towards growth once per window.

    A skipped step keeps all of ``inner``'s state, the step counts of its schedules
    included: an lr schedule counts the updates applied, as in a loop that calls
    ``scheduler.step()`` only when ``scaler.step`` did not skip (Hugging Face's Trainer
    does so), not as in one that steps the scheduler every iteration.

    Float16 params are refused, as GradScaler refuses to unscale float16 gradients (a
    float16 reciprocal of a large scale is 0): keep float32 params and autocast with
    ``precision="fp16"``.
    """
    if not init_scale > 0:
        raise ValueError(f"init_scale must be positive, got {init_scale}")
    if not growth_factor > 1.0:
        raise ValueError(f"The growth factor must be > 1.0, got {growth_factor}")
    if not 0.0 < backoff_factor < 1.0:
        raise ValueError(
            f"The backoff factor must be between 0 and 1, got {backoff_factor}: torch's "
            "GradScaler only checks that it is < 1.0, but at or below 0 the scale becomes 0 "
            "or negative and the gradients inf or of the wrong sign"
        )
    if not isinstance(growth_interval, int) or growth_interval < 1:
        raise ValueError(f"growth_interval must be a positive integer, got {growth_interval}")
    window = accumulation_window(inner)

    def init(params: PyTree) -> LossScaleState:
        leaves = tree_leaves(params)
        if any(leaf.dtype == torch.float16 for leaf in leaves):
            raise ValueError(
                "Attempting to unscale FP16 gradients: the loss scaler needs float32 params "
                "(the master copy); keep the model in float32 and autocast it with "
                "train_step(..., precision='fp16')"
            )
        device = leaves[0].device if leaves else None
        inner_state = inner.init(params)
        if window is None and _holds_accumulation(inner_state):
            raise ValueError(
                "accumulate(...) inside dynamic_loss_scale must be its direct inner "
                "transform, as in dynamic_loss_scale(accumulate(chain(clip_by_global_norm(c), "
                "opt), k)): deeper, the scale would move and an overflow skip on every "
                "micro-batch instead of once per window (torch's AMP accumulation recipe)"
            )
        return LossScaleState(
            torch.full((), init_scale, dtype=torch.float32, device=device),
            torch.zeros((), dtype=torch.int32, device=device),
            inner_state,
        )

    def next_scale(state: LossScaleState, found_inf: torch.Tensor):
        """torch's ``_amp_update_scale_``: back off on inf/NaN, grow after
        ``growth_interval`` clean steps (keeping the old scale if the grown one is not
        finite); products in float64, rounded to float32 once."""
        tracker = state.growth_tracker + 1
        grow = tracker == growth_interval
        wide = state.scale.double()
        grown = (wide * growth_factor).float()
        grown = torch.where(torch.isfinite(grown), grown, state.scale)
        backed_off = (wide * backoff_factor).float()
        scale = torch.where(found_inf, backed_off, torch.where(grow, grown, state.scale))
        tracker = torch.where(found_inf | grow, torch.zeros_like(tracker), tracker)
        return scale, tracker

    def update(grads: PyTree, state: LossScaleState, params: PyTree | None = None):
        inv_scale = state.scale.double().reciprocal().float()
        found_inf = _non_finite(grads, state.scale)
        unscaled = leafwise(lambda g: _unscale(g, inv_scale), grads)
        updates, inner_state = inner.update(unscaled, state.inner, params)
        if window is None:
            skip = found_inf
            inner_state = tree_map(
                lambda old, new: torch.where(skip, old, new), state.inner, inner_state
            )
        else:  # an inf or NaN stays in the window's gradient sum until the window ends
            found_inf = found_inf | _non_finite(state.inner.grad_sum, state.scale)
            ends = (state.inner.count + 1) % window == 0
            skip = found_inf & ends
            kept = tree_map(
                lambda old, new: torch.where(skip, old, new), state.inner.inner, inner_state.inner
            )
            inner_state = inner_state._replace(inner=kept)
        updates = tree_map(lambda u: torch.where(skip, torch.zeros_like(u), u), updates)
        scale, tracker = next_scale(state, found_inf)
        if window is not None:  # GradScaler.update runs once per window
            scale = torch.where(ends, scale, state.scale)
            tracker = torch.where(ends, tracker, state.growth_tracker)
        return updates, LossScaleState(scale, tracker, inner_state)

    return Transform(init, update)


def _holds_accumulation(state: Any) -> bool:
    """Whether an :func:`~loopkit.optim.accumulate` state is anywhere in ``state``."""
    if isinstance(state, AccumulateState):
        return True
    if isinstance(state, dict):
        return any(_holds_accumulation(v) for v in state.values())
    if isinstance(state, tuple | list):
        return any(_holds_accumulation(v) for v in state)
    return False


def _non_finite(tree: PyTree, like: torch.Tensor) -> torch.Tensor:
    """Whether any entry of ``tree``'s tensors is inf or NaN (a bool scalar on ``like``'s
    device)."""
    leaves = tree_leaves(tree)
    if not leaves:
        return torch.zeros((), dtype=torch.bool, device=like.device)
    return torch.stack([(~torch.isfinite(g)).any() for g in leaves]).any()


def _unscale(g: Any, inv_scale: torch.Tensor) -> Any:
    """``g * inv_scale`` as GradScaler's ``unscale_`` computes it: in float32 for float16
    and bfloat16 gradients (rounded once), in the gradient's own dtype otherwise."""
    if g.dtype in (torch.float16, torch.bfloat16):
        return (g.to(torch.float32) * inv_scale).to(g.dtype)
    return g * inv_scale.to(g.dtype)


def autocast_dtype(precision: str | None) -> torch.dtype | None:
    """``None``/``"fp32"`` -> None; ``"bf16"``/``"fp16"`` -> the autocast dtype."""
    if precision in (None, "fp32"):
        return None
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be None, 'fp32', 'bf16' or 'fp16', got {precision!r}")
    return PRECISIONS[precision]
