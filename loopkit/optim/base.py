"""The transform protocol: optax-style ``init``/``update`` pairs over pytrees of tensors.

A :class:`Transform` turns gradients into updates::

    opt_state = tx.init(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = apply_updates(params, updates)          # params + updates, leaf by leaf

or, in one call, ``params, opt_state = apply_gradients(tx, grads, opt_state, params)``:
the same, computed by a faster apply where one is registered for the update function (the
built-in Adam and AdamW: torch's fused kernel, eagerly; see :mod:`loopkit.optim.fused`).

All of these are pure: they return new tensors and never modify their arguments, so a
whole training step that calls them can be traced by ``torch.func`` and ``torch.compile``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from loopkit.optim.leafwise import leafwise
from loopkit.tree import PyTree, check_same_keys, tree_map

OptState = Any
InitFn = Callable[[PyTree], OptState]
UpdateFn = Callable[[PyTree, OptState, PyTree | None], tuple[PyTree, OptState]]
ApplyFn = Callable[[PyTree, OptState, PyTree], tuple[PyTree, OptState]]


class Transform(NamedTuple):
    """A gradient transformation: ``init(params) -> state``,
    ``update(updates, state, params) -> (updates, state)``.

    An ``update`` function may have a faster way to its applied result registered with
    :func:`with_apply`: ``apply(grads, state, params) -> (new_params, new_state)``, equal
    to ``update`` followed by :func:`apply_updates` to rounding, with the same state.
    :func:`apply_gradients` uses it. It belongs to that function object alone: a transform
    that replaces or wraps ``update`` (``functools.wraps`` included) does not inherit it."""

    init: InitFn
    update: UpdateFn


# update function -> its apply (weak keys: a transform's functions die with it)
_APPLIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def with_apply(update: UpdateFn, apply: ApplyFn) -> UpdateFn:
    """A new update function calling ``update``, with ``apply`` registered as its faster
    way to the applied result (see :class:`Transform`)."""

    def update_fn(updates, state, params=None):
        return update(updates, state, params)

    # Optimizers built inside a compiled step (inject_hyperparams rebuilds its factory's
    # each step) must leave the registry alone: Dynamo would guard on its weak keys, and a
    # key collected between tracing and guard building fails the compile.
    if not torch.compiler.is_compiling():
        _APPLIES[update_fn] = apply
    return update_fn


def _registered_apply(update: Any) -> ApplyFn | None:
    if torch.compiler.is_compiling():  # as in with_apply: no registry inside a trace
        return None
    try:
        return _APPLIES.get(update)
    except TypeError:  # not weakly referenceable, so never registered
        return None


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


def apply_gradients(
    tx: Transform, grads: PyTree, state: OptState, params: PyTree
) -> tuple[PyTree, OptState]:
    """One optimizer step: ``(new_params, new_state)``, where ``new_params`` is
    ``apply_updates(params, updates)`` for ``updates, new_state = tx.update(grads, state,
    params)``, computed by the apply registered for ``tx.update`` (:func:`with_apply`)
    where there is one. Inside ``torch.compile`` the update runs: what an apply makes
    faster eagerly (a fused kernel), inductor fuses itself."""
    apply = _registered_apply(tx.update)
    if apply is not None:
        return apply(grads, state, params)
    updates, state = tx.update(grads, state, params)
    return apply_updates(params, updates), state


def zeros_like_tree(params: PyTree) -> PyTree:
    """A pytree of zeros shaped like ``params`` (the usual moment initialiser)."""
    return tree_map(lambda p: torch.zeros_like(p, memory_format=torch.preserve_format), params)
