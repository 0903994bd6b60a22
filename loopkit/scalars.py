"""Float64 scalars on their way into a compiled step.

Dynamo gives every float64 0-dim CPU tensor among a compiled function's inputs (the lr, an
injected hyperparameter, a 0-dim float64 param and its moments) a symbolic float. One that
no op consumes as a Python number is then "specialized" by the tensorify pass, and the
whole analysis restarts (a known torch behaviour, pytorch/pytorch#140346): about 3 of the
25 s of a small model's cold compile on CPU. A 1-D view of the same tensor gets no symbol.

So the compiled train and eval steps are called with each such tensor wrapped as
:class:`Lifted` (a 1-element view), and view it back as the 0-dim tensor first thing inside
the graph: the step's code and numbers are unchanged, and the in-place writes of
``donate=True`` land in the caller's own tensor (the view shares its storage). On CUDA the
lr lives on the GPU and nothing is lifted.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

Path = tuple[Any, ...]  # dict keys and tuple/list indices from the root of the arguments


class Lifted(NamedTuple):
    value: torch.Tensor  # a 1-element view of a float64 0-dim CPU tensor


def is_float64_scalar(x: Any) -> bool:
    return type(x) is torch.Tensor and x.dim() == 0 and x.dtype == torch.float64 and x.is_cpu


def scalar_paths(tree: Any, prefix: Path = ()) -> list[Path]:
    """Where ``tree`` holds float64 0-dim CPU tensors, through dicts, lists and tuples
    (NamedTuples included)."""
    if is_float64_scalar(tree):
        return [prefix]
    if type(tree) is dict:
        items: Any = tree.items()
    elif type(tree) is list or isinstance(tree, tuple):
        items = enumerate(tree)
    else:
        return []
    return [path for key, child in items for path in scalar_paths(child, (*prefix, key))]


class _Stale(Exception):
    """The arguments no longer have a scalar where a remembered path points."""


def _replaced(tree: Any, path: Path, leaf: Callable[[Any], Any]) -> Any:
    """A copy of ``tree`` with the leaf at ``path`` replaced by ``leaf(old)``; containers
    off the path are shared, not copied."""
    if not path:
        return leaf(tree)
    key, rest = path[0], path[1:]
    try:
        child = tree[key]
    except (KeyError, IndexError, TypeError) as e:
        raise _Stale from e
    new = _replaced(child, rest, leaf)
    if type(tree) is dict:
        return {**tree, key: new}
    if type(tree) is list:
        return [*tree[:key], new, *tree[key + 1 :]]
    items = (*tree[:key], new, *tree[key + 1 :])
    return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)


class Lifter:
    """``lifter(args)``: ``args`` with each float64 0-dim CPU tensor wrapped as
    :class:`Lifted`. It remembers where they were (a step's arguments keep one structure)
    and the last view of each, so a donated step, whose state is the same tensors every
    call, pays a few µs. Arguments of another structure, where a remembered path no longer
    leads to such a scalar, are searched again; a scalar that only appears at a new place
    later is passed as it is (correct, at the cost of Dynamo's restart when it compiles)."""

    def __init__(self) -> None:
        self._paths: list[Path] | None = None
        self._views: dict[Path, tuple[torch.Tensor, Lifted]] = {}

    def __call__(self, args: tuple) -> tuple:
        if self._paths is None:
            self._paths = scalar_paths(args)
        try:
            return self._apply(args)
        except _Stale:
            self._paths, self._views = scalar_paths(args), {}
            return self._apply(args)

    def _apply(self, args: tuple) -> tuple:
        for path in self._paths:

            def lift(t: Any, path: Path = path) -> Lifted:
                if not is_float64_scalar(t):
                    raise _Stale
                seen = self._views.get(path)
                if seen is None or seen[0] is not t:
                    seen = self._views[path] = (t, Lifted(t.view(1)))
                return seen[1]

            args = _replaced(args, path, lift)
        return args


def lower(tree: Any) -> Any:
    """The inverse of lifting, run inside the compiled step (at trace time)."""
    if isinstance(tree, Lifted):
        return tree.value.view(())
    if type(tree) is dict:
        return {k: lower(v) for k, v in tree.items()}
    if type(tree) is list or isinstance(tree, tuple):
        items = [lower(v) for v in tree]
        if type(tree) is list:
            return items
        return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)
    return tree


def lowering(fn: Callable) -> Callable:
    """``fn`` -- a train step's ``(params, buffers, opt_state, step, batch)`` or an eval
    step's ``(params, buffers, batch)`` pure function -- taking lifted arguments. The
    parameter names are kept: the compiled step's guard filter reads them."""
    if len(inspect.signature(fn).parameters) == 5:

        def train(params, buffers, opt_state, step, batch):
            return fn(*lower((params, buffers, opt_state, step, batch)))

        return train

    def evaluate(params, buffers, batch):
        return fn(*lower((params, buffers, batch)))

    return evaluate


def lifting(compiled: Callable) -> Callable:
    """``compiled`` (built from :func:`lowering`) called with lifted arguments."""
    lifter = Lifter()

    def call(*args: Any) -> Any:
        return compiled(*lifter(args))

    return call
