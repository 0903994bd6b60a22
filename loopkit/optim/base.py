"""The transform protocol: optax-style ``init``/``update`` pairs over pytrees of tensors.

A :class:`Transform` turns gradients into updates::

    opt_state = tx.init(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = apply_updates(params, updates)          # params + updates, leaf by leaf

Both functions are pure: they return new tensors and never modify their arguments, so a
whole training step that calls them can be traced by ``torch.func`` and ``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from loopkit.optim.leafwise import leafwise
from loopkit.tree import PyTree, check_same_keys, tree_map

OptState = Any
InitFn = Callable[[PyTree], OptState]
UpdateFn = Callable[[PyTree, OptState, PyTree | None], tuple[PyTree, OptState]]


class Transform(NamedTuple):
    """A gradient transformation: ``init(params) -> state``,
    ``update(updates, state, params) -> (updates, state)``."""

    init: InitFn
    update: UpdateFn


def identity() -> Transform:
    """The transform that returns its input unchanged and keeps no state."""
    return Transform(lambda params: (), lambda updates, state, params=None: (updates, state))


def chain(*transforms: Transform) -> Transform:
    """Apply ``transforms`` in order; the state is the tuple of their states."""

    def init(params: PyTree) -> tuple:
        return tuple(t.init(params) for t in transforms)

    def update(updates: PyTree, state: tuple, params: PyTree | None = None):
        if len(state) != len(transforms):
            raise ValueError(
                f"chain of {len(transforms)} transforms got a state of length {len(state)}: "
                "pass the state returned by this chain's init()"
            )
        new_state = []
        for t, s in zip(transforms, state, strict=True):
            updates, s = t.update(updates, s, params)
            new_state.append(s)
        return updates, tuple(new_state)

    return Transform(init, update)


def apply_updates(params: PyTree, updates: PyTree) -> PyTree:
    """``params + updates`` leaf by leaf, keeping each param's dtype."""
    check_same_keys(updates, params, "updates", "params")
    return leafwise(lambda p, u: (p + u).to(p.dtype), params, updates)


def zeros_like_tree(params: PyTree) -> PyTree:
    """A pytree of zeros shaped like ``params`` (the usual moment initialiser)."""
    return tree_map(lambda p: torch.zeros_like(p, memory_format=torch.preserve_format), params)
