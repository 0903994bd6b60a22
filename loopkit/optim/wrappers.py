"""Transforms that wrap other transforms: masks, parameter groups, freezing, gradient
accumulation and parameter averaging (EMA / SWA).

Masks and labels name params by their key, so these wrappers take params that are flat
dicts ``{name: tensor}`` (as ``TrainState.params`` is). A mask or a labelling is either a
dict with an entry per name or a function ``(name, tensor) -> bool | label``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Mapping
from typing import Any, NamedTuple

import torch

from loopkit.optim.base import Transform, apply_updates
from loopkit.optim.leafwise import leafwise
from loopkit.tree import PyTree, tree_leaves, tree_map

Mask = Mapping[str, bool] | Callable[[str, torch.Tensor], bool]
Labels = Mapping[str, Hashable] | Callable[[str, torch.Tensor], Hashable]


def _resolve(spec: Mapping | Callable, tree: dict[str, torch.Tensor], what: str) -> dict:
    if not isinstance(tree, Mapping):
        raise TypeError(
            f"{what} needs params as a dict {{name: tensor}}, got {type(tree).__name__}"
        )
    if callable(spec):
        return {k: spec(k, v) for k, v in tree.items()}
    missing = [k for k in tree if k not in spec]
    if missing:
        raise ValueError(f"{what} has no entry for {missing[:10]}: give one for every param")
    return {k: spec[k] for k in tree}


def _where(cond: torch.Tensor, a: PyTree, b: PyTree) -> PyTree:
    return tree_map(lambda x, y: torch.where(cond, x, y), a, b)


def set_to_zero() -> Transform:
    """``g <- 0``: the updates of frozen params."""
    return Transform(
        lambda params: (), lambda g, state, params=None: (tree_map(torch.zeros_like, g), state)
    )


class MultiTransformState(NamedTuple):
    inner: dict


def multi_transform(transforms: Mapping[Hashable, Transform], labels: Labels) -> Transform:
    """Parameter groups: the params labelled ``k`` are updated by ``transforms[k]`` alone,
    with its own state and hyperparameters, as torch.optim's ``param_groups``."""

    def groups(tree: dict, params: dict) -> dict:
        label_of = _resolve(labels, params, "multi_transform's labels")
        unknown = sorted({str(v) for v in label_of.values() if v not in transforms})
        if unknown:
            raise ValueError(
                f"labels {unknown} have no transform; known: {sorted(map(str, transforms))}"
            )
        return {k: {n: tree[n] for n, lab in label_of.items() if lab == k} for k in transforms}

    def init(params):
        return MultiTransformState(
            {
                k: t.init(sub)
                for (k, t), sub in zip(
                    transforms.items(), groups(params, params).values(), strict=True
                )
            }
        )

    def update(g, state, params=None):
        reference = params if params is not None else g
        g_groups = groups(g, reference)
        p_groups = (
            groups(params, reference) if params is not None else {k: None for k in transforms}
        )
        out, new_inner = {}, {}
        for k, t in transforms.items():
            upd, new_inner[k] = t.update(g_groups[k], state.inner[k], p_groups[k])
            out.update(upd)
        return {n: out[n] for n in g}, MultiTransformState(new_inner)

    return Transform(init, update)


def masked(inner: Transform, mask: Mask) -> Transform:
    """Apply ``inner`` to the params where ``mask`` is True; the others' updates pass through
    unchanged (e.g. ``masked(add_decayed_weights(0.01), lambda name, p: p.ndim > 1)`` decays
    weight matrices but not biases or norm scales)."""
    return multi_transform({True: inner, False: _passthrough()}, mask)


def _passthrough() -> Transform:
    return Transform(lambda params: (), lambda g, state, params=None: (g, state))


def freeze(inner: Transform, frozen: Mask) -> Transform:
    """``inner`` for the params where ``frozen`` is False; zero updates (so no movement, no
    weight decay, no state) for the others."""

    def label(name: str, p: torch.Tensor) -> str:
        is_frozen = frozen(name, p) if callable(frozen) else frozen[name]
        return "frozen" if is_frozen else "trained"

    return multi_transform({"trained": inner, "frozen": set_to_zero()}, label)


class AccumulateState(NamedTuple):
    count: torch.Tensor
    grad_sum: PyTree
    inner: Any


# accumulate's update function -> its ``every`` (weak keys: it dies with its transform)
_WINDOWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def accumulation_window(tx: Transform) -> int | None:
    """``every`` for a transform made by :func:`accumulate` (itself, not one wrapping it),
    else None."""
    return _WINDOWS.get(tx.update)


def accumulate(inner: Transform, every: int) -> Transform:
    """Gradient accumulation: ``every`` micro-batch gradients make one update of ``inner``
    with their mean, equal to the imperative ``(loss / every).backward()`` loop, and, for
    micro-batches of equal size, to one step on the concatenated batch with a mean loss
    (with sizes that differ, the big batch's mean weighs each example alike, this one each
    micro-batch). In between, updates are zero and
    ``inner``'s state (its step count and lr schedule included) does not move. To clip the
    accumulated gradient, as torch users clip before ``optimizer.step()``, put the clipping
    inside: ``accumulate(chain(clip_by_global_norm(1.0), adamw()), k)`` (``train_step``'s
    ``clip_norm`` would clip each micro-batch)."""
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive integer, got {every!r}")

    def init(params):
        leaves = tree_leaves(params)
        device = leaves[0].device if leaves else None
        zeros = tree_map(torch.zeros_like, params)
        count = torch.zeros((), dtype=torch.int64, device=device)
        return AccumulateState(count, zeros, inner.init(params))

    def update(g, state, params=None):
        count = state.count + 1
        grad_sum = leafwise(lambda s, gi: s + gi / every, state.grad_sum, g)
        apply = count % every == 0
        updates, inner_state = inner.update(grad_sum, state.inner, params)
        out = tree_map(lambda u: torch.where(apply, u, torch.zeros_like(u)), updates)
        return out, AccumulateState(
            count,
            tree_map(lambda s: torch.where(apply, torch.zeros_like(s), s), grad_sum),
            _where(apply, inner_state, state.inner),
        )

    _WINDOWS[update] = every
    return Transform(init, update)


class AverageState(NamedTuple):
    count: torch.Tensor  # updates seen
    n_averaged: torch.Tensor
    params: PyTree  # the averaged params


def _averaging(
    average: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    start: int,
    every: int,
) -> Transform:
    """Keep ``average(avg, p, n_averaged)`` of the params after the updates where
    ``count >= start`` and ``(count - start) % every == 0``; the first one is a copy."""
    if start < 0 or every < 1:
        raise ValueError(f"start must be >= 0 and every >= 1, got start={start}, every={every}")

    def init(params):
        leaves = tree_leaves(params)
        device = leaves[0].device if leaves else None
        zero = torch.zeros((), dtype=torch.int64, device=device)
        # two tensors, not one: dynamo guards on aliasing and would recompile after step 1
        return AverageState(zero, zero.clone(), tree_map(torch.clone, params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("parameter averaging needs the params: update(grads, state, params)")
        new_params = apply_updates(params, updates)
        count = state.count + 1
        take = (count >= start) & ((count - start) % every == 0)
        first = state.n_averaged == 0

        def step(avg, p):
            mixed = torch.where(first, p, average(avg, p, state.n_averaged))
            return torch.where(take, mixed, avg)

        averaged = tree_map(step, state.params, new_params)
        return updates, AverageState(count, state.n_averaged + take.long(), averaged)

    return Transform(init, update)


def ema(decay: float = 0.999, *, start: int = 0, every: int = 1) -> Transform:
    """Exponential moving average of the params after each update, as
    ``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))`` updated after every
    ``optimizer.step()``: the first average is a copy, then ``a = lerp(a, p, 1 - decay)``.
    Put it last in a chain (inside :func:`accumulate`, so it sees real updates only); the
    updates pass through unchanged and the averaged params are read with
    :func:`averaged_params`. ``start``/``every``: average after update ``start``
    and then every ``every`` updates (count from 1)."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"Invalid decay value {decay}: it must be in [0, 1]")
    return _averaging(lambda avg, p, n: torch.lerp(avg, p, 1 - decay), start, every)


def _swa_average(avg: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    # AveragedModel's default average differs by device: CUDA/XPU use a foreach lerp whose
    # weight 1 / (n + 1) is rounded to the default dtype; other devices divide exactly.
    if avg.device.type in ("cuda", "xpu"):
        return torch.lerp(avg, p, (1 / (n + 1)).to(avg.dtype))
    return avg + (p - avg) / (n + 1)


def swa(*, start: int = 0, every: int = 1) -> Transform:
    """Stochastic weight averaging: the running mean of the params after update ``start``
    and every ``every`` updates, as ``AveragedModel(model)`` (its default average) updated
    at those steps: ``a = a + (p - a) / (n + 1)``."""
    return _averaging(_swa_average, start, every)


def averaged_params(opt_state: Any) -> PyTree:
    """The averaged params kept by the :func:`ema` or :func:`swa` in ``opt_state``."""
    found = [s for s in _states(opt_state) if isinstance(s, AverageState)]
    if len(found) != 1:
        raise ValueError(f"expected one ema/swa in the optimizer state, found {len(found)}")
    return found[0].params


def _states(state: Any):
    """Every transform state nested in ``state`` (chains are tuples, groups are dicts)."""
    yield state
    if isinstance(state, MultiTransformState):
        for s in state.inner.values():
            yield from _states(s)
    elif isinstance(state, tuple) and not isinstance(state, AverageState):
        for s in state:
            yield from _states(s)
