"""Pytree helpers: thin wrappers over ``torch.utils._pytree``.

loopkit's state, params, grads and optimizer states are pytrees of tensors (dicts, tuples,
NamedTuples, registered dataclasses). These helpers are the few operations the library needs
on them; everything else is torch's own pytree machinery.

The commonest tree by far is a plain ``dict`` of tensors (params, grads, each optimizer
moment): :func:`tree_map` and :func:`check_same_keys` handle it with a dict comprehension,
which gives the same result as torch's generic code at a fraction of the Python cost (an
eager step calls them dozens of times, and Dynamo traces every line of them).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree

PyTree = Any

tree_leaves = pytree.tree_leaves
tree_flatten = pytree.tree_flatten
tree_unflatten = pytree.tree_unflatten
tree_structure = pytree.tree_structure


def _tensor_dict(tree: PyTree) -> bool:
    return type(tree) is dict and all(isinstance(v, torch.Tensor) for v in tree.values())


def tree_map(fn: Any, tree: PyTree, *rests: PyTree, is_leaf: Any = None) -> PyTree:
    """``fn`` applied leaf by leaf, as ``torch.utils._pytree.tree_map``: ``fn(leaf, *(the
    matching subtree of each of rests))``; dicts are matched by key."""
    if (
        is_leaf is None
        and _tensor_dict(tree)
        and all(type(r) is dict and r.keys() == tree.keys() for r in rests)
    ):
        return {k: fn(v, *(r[k] for r in rests)) for k, v in tree.items()}
    return pytree.tree_map(fn, tree, *rests, is_leaf=is_leaf)


def flatten_with_names(tree: PyTree) -> tuple[dict[str, Any], pytree.TreeSpec]:
    """``{path: leaf}`` with readable paths such as ``.opt_state[0].mu['fc.weight']``."""
    leaves_with_path, spec = pytree.tree_flatten_with_path(tree)
    return {pytree.keystr(path): leaf for path, leaf in leaves_with_path}, spec


def check_same_keys(tree: PyTree, like: PyTree, what: str, like_what: str) -> None:
    """Raise a ValueError naming the differing paths if ``tree`` and ``like`` differ in structure.

    Used where a user hands us two pytrees that must line up (grads and params, updates and
    params); it runs in Python at trace time, so it costs nothing inside a compiled step.
    """
    if _tensor_dict(tree) and _tensor_dict(like) and tree.keys() == like.keys():
        return
    check_no_none(tree, what)
    if pytree.tree_structure(tree) == pytree.tree_structure(like):
        return
    got, _ = flatten_with_names(tree)
    want, _ = flatten_with_names(like)
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    if not missing and not extra:
        return  # same paths in another dict order: tree_map lines standard dicts up by key

    def listing(paths: list[str]) -> str:
        return ", ".join(paths[:10]) + (f" (+{len(paths) - 10} more)" if len(paths) > 10 else "")

    raise ValueError(
        f"{what} does not match {like_what}: missing {listing(missing) or 'nothing'}; "
        f"unexpected {listing(extra) or 'nothing'}. "
        f"Build {what} from the same {like_what} (e.g. grads of state.params)."
    )


def check_no_none(tree: PyTree, what: str) -> None:
    """Raise a ValueError naming the None leaves of ``tree`` (grads or updates), if any: what
    ``torch.autograd.grad(..., allow_unused=True)`` gives for a param the loss does not use.
    torch's pytree takes None for a leaf, so without this it fails inside a transform."""
    if _tensor_dict(tree) or all(leaf is not None for leaf in tree_leaves(tree)):
        return
    nones = [path for path, leaf in flatten_with_names(tree)[0].items() if leaf is None]
    raise ValueError(
        f"{', '.join(f'{what}{path}' for path in nones[:10])} "
        f"{'is' if len(nones) == 1 else 'are'} None, as "
        "torch.autograd.grad(..., allow_unused=True) gives for a param the loss does not "
        "use; torch.optim skips a param whose .grad is None, loopkit's optimizers take a "
        "tensor for every param. Give it a zero gradient (torch.zeros_like(param): the "
        "same as skipping it unless weight decay or momentum moves it), or keep the param "
        "out of this optimizer (optim.freeze, or requires_grad=False for TrainState.create)."
    )


def describe(tree: PyTree) -> str:
    """One-line summary of a pytree's tensors, e.g. ``(float32[32, 64], int64[32])``."""

    def fmt(x: Any) -> str:
        if isinstance(x, torch.Tensor):
            return f"{str(x.dtype).removeprefix('torch.')}{list(x.shape)}"
        return type(x).__name__

    return str(pytree.tree_map(fmt, tree)).replace("'", "")


def leading_dim(tree: Any) -> int:
    """The leading dimension of the first tensor in ``tree`` that has one (1 if none does):
    the number of examples in a batch."""
    for leaf in tree_leaves(tree):
        if isinstance(leaf, torch.Tensor) and leaf.ndim > 0:
            return leaf.shape[0]
    return 1
