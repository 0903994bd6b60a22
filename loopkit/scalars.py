"""Float64 scalars on their way into a compiled step.

Dynamo gives every float64 0-dim CPU tensor among a compiled function's inputs (the lr, an
injected hyperparameter, a 0-dim float64 param and its moments) a symbolic float. One that
no op consumes as a Python number is then "specialized" by the tensorify pass, and the
whole analysis restarts (a known torch behaviour, pytorch/pytorch#140346): about 3 of the
25 s of a small model's cold compile on CPU. A 1-D view of the same tensor gets no symbol.

So the compiled train and eval steps are called with each such tensor wrapped as
:class:`Lifted` (a 1-element view), and view it back as the 0-dim tensor first thing inside
the graph: the step's code and numbers are unchanged. A donated step returns the new values
of these few scalars, copied into the caller's tensors after the call (see :func:`lower`).
On CUDA the lr lives on the GPU and nothing is lifted.

Where they are (their paths) is an argument of the compiled function too: Dynamo traces
every line of Python it runs, and finding them by walking the whole state inside the
graph cost 0.3-0.6 s of each compile of the benchmark MLP's step (1.2-1.4 s for the
transformer's), where following the paths costs a few lines.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from loopkit.errors import StepError
from loopkit.tree import flatten_with_names

Path = tuple[Any, ...]  # dict keys and tuple/list indices from the root of the arguments


class Lifted(NamedTuple):
    value: torch.Tensor  # a 1-element view of a float64 0-dim CPU tensor


def is_float64_scalar(x: Any) -> bool:
    return (
        type(x) in (torch.Tensor, torch.nn.Parameter)
        and x.dim() == 0
        and x.dtype == torch.float64
        and x.is_cpu
    )


def _children(tree: Any) -> Any:
    """``(key, child)`` pairs of the containers lifting looks into -- dicts, lists, tuples
    and NamedTuples exactly, not their other subclasses -- or None for anything else."""
    kind = type(tree)
    if kind is dict:
        return tree.items()
    if kind is list or kind is tuple or (isinstance(tree, tuple) and hasattr(kind, "_fields")):
        return enumerate(tree)
    return None


def _rebuilt(tree: Any, items: list) -> Any:
    """A container of ``tree``'s kind (see :func:`_children`) holding ``items``."""
    kind = type(tree)
    if kind is list:
        return items
    return kind(*items) if kind is not tuple else tuple(items)


def scalar_paths(tree: Any, prefix: Path = ()) -> list[Path]:
    """Where ``tree`` holds float64 0-dim CPU tensors, through dicts, lists, tuples and
    NamedTuples."""
    if is_float64_scalar(tree):
        return [prefix]
    children = _children(tree)
    if children is None:
        return []
    return [path for key, child in children for path in scalar_paths(child, (*prefix, key))]


class _Stale(Exception):
    """The arguments no longer have a scalar where a remembered path points."""


def _replaced(tree: Any, path: Path, leaf: Callable[[Any], Any]) -> Any:
    """A copy of ``tree`` with the leaf at ``path`` replaced by ``leaf(old)``; containers
    off the path are shared, not copied."""
    if not path:
        return leaf(tree)
    if _children(tree) is None:
        raise _Stale
    key, rest = path[0], path[1:]
    try:
        child = tree[key]
    except (KeyError, IndexError, TypeError) as e:
        raise _Stale from e
    new = _replaced(child, rest, leaf)
    if type(tree) is dict:
        return {**tree, key: new}
    return _rebuilt(tree, [*tree[:key], new, *tree[key + 1 :]])


class Lifter:
    """``lifter(args)``: ``args`` with each float64 0-dim CPU tensor in dicts, lists,
    tuples and NamedTuples wrapped as :class:`Lifted`. It remembers where they were (a
    step's arguments keep one structure), so a call pays a few µs; arguments of another
    structure, where a remembered path no longer leads to such a tensor, are searched
    again. The view of a tensor is reused while it is the same tensor, with the same
    storage, not requiring grad (a view made before ``requires_grad_()`` would cut the
    graph).

    Not lifted, and so still costing Dynamo's restart: such tensors inside other
    containers, and one that only appears at a new place in arguments whose remembered
    places are all still valid. Under ``donate=True``, in-place writes to an unlifted one
    are lost by torch 2.13; see :func:`check_donatable`.

    ``lifter.lifted``: the tensors lifted by the last call, and ``lifter.paths`` where they
    were, in the same order (:func:`lower` follows it)."""

    def __init__(self) -> None:
        self._paths: list[Path] | None = None
        self._views: dict[Path, tuple[torch.Tensor, Lifted]] = {}
        self.lifted: list[torch.Tensor] = []

    def __call__(self, args: tuple) -> tuple:
        if self._paths is None:
            self._paths = scalar_paths(args)
        try:
            return self._apply(args)
        except _Stale:
            self._paths, self._views = scalar_paths(args), {}
            return self._apply(args)

    def _view(self, path: Path, t: Any) -> Lifted:
        if not is_float64_scalar(t):
            raise _Stale
        seen = self._views.get(path)
        if (
            seen is None
            or seen[0] is not t
            or t.requires_grad
            or seen[1].value.data_ptr() != t.data_ptr()
        ):
            seen = self._views[path] = (t, Lifted(t.view(1)))
        self.lifted.append(t)
        return seen[1]

    @property
    def paths(self) -> tuple[Path, ...]:
        return tuple(self._paths or ())

    def _apply(self, args: tuple) -> tuple:
        self.lifted = []
        for path in self._paths:
            args = _replaced(args, path, lambda t, path=path: self._view(path, t))
        return args


def lower(tree: Any, paths: tuple[Path, ...], written: list | None = None) -> Any:
    """The inverse of lifting, run inside the compiled step (at trace time): ``tree`` with
    the :class:`Lifted` at each of ``paths`` (a :class:`Lifter`'s) viewed back as its 0-dim
    tensor; containers off the paths are returned as they are.

    With ``written`` (a donated step), each lifted tensor of the state (see
    :func:`is_donated`) is also appended to ``written``, in the order of ``paths``: the
    donated step returns its new value instead of writing it, the graph returns that, and
    :func:`lifting` copies it into the caller's tensor outside the graph. (Written in place
    through the view, the value is lost when the tensor's ``.data`` has been replaced --
    AOTAutograd writes to the storage it had -- and after a graph break, where torch
    drops in-place writes to float64 0-dim CPU inputs.)"""

    def unwrap(lifted: Any, donated: bool) -> torch.Tensor:
        if type(lifted) is not Lifted:
            raise TypeError(f"expected a lifted scalar, got {type(lifted).__name__}")
        value = lifted.value.view(())
        if donated:
            written.append(value)
        return value

    for path in paths:
        donated = written is not None and is_donated(path)
        tree = _replaced(tree, path, lambda t, donated=donated: unwrap(t, donated))
    return tree


def is_donated(path: Path) -> bool:
    """Whether a donated train step writes back the lifted tensor at ``path``: one of its
    state, ``(params, buffers, opt_state, step)``, not of its batch (argument 4), which
    the step only reads and which may be a tensor that cannot be written (one requiring
    grad, or made in inference mode)."""
    return path[0] < 4


def check_donatable(args: tuple) -> None:
    """Raise if ``args`` hold a float64 0-dim CPU tensor that lifting does not reach (in a
    container other than a dict, list, tuple or NamedTuple): torch 2.13 loses the in-place
    write a donated step would make to it."""
    reached = scalar_paths(args)
    named, _ = flatten_with_names(args)
    hidden = [name for name, x in named.items() if is_float64_scalar(x)]
    if len(hidden) > len(reached):
        raise StepError(
            "donate=True cannot update the float64 0-dim CPU tensors of this state: some "
            f"(among {', '.join(hidden[:5])}) sit in containers other than dicts, lists, "
            "tuples and NamedTuples, and torch.compile drops in-place writes to them. Keep "
            "them in those containers, or compile without donate."
        )


def lowering(fn: Callable, train: bool, donate: bool = False) -> Callable:
    """``fn`` -- a train step's ``(params, buffers, opt_state, step, batch)`` or an eval
    step's ``(params, buffers, batch)`` pure function -- taking lifted arguments and, last,
    the paths they were lifted at (Dynamo guards on their values). The
    parameter names are those the compiled step's guard filter reads. With ``donate`` (a
    train step writing its new state into its inputs) it returns ``(fn's result, the new
    values of the lifted tensors)``: see :func:`lower`, and ``fn`` takes those tensors as
    ``returned`` (see :func:`loopkit.step._donating`)."""
    if train:

        def train_step(params, buffers, opt_state, step, batch, lifted_at):
            args = (params, buffers, opt_state, step, batch)
            if not donate:
                return fn(*lower(args, lifted_at))
            written: list = []
            return fn(*lower(args, lifted_at, written), returned=written)

        return train_step

    def evaluate(params, buffers, batch, lifted_at):
        return fn(*lower((params, buffers, batch), lifted_at))

    return evaluate


def lifting(compiled: Callable, donate: bool = False) -> Callable:
    """``compiled`` (built from :func:`lowering`) called with lifted arguments. With
    ``donate``, the new values of the lifted tensors are copied into them, and the
    arguments are checked with :func:`check_donatable` whenever the lifter has (re)searched
    them."""
    lifter = Lifter()
    checked: list = [None]  # the lifter's paths the last check was made for

    def call(*args: Any) -> Any:
        lifted = lifter(args)
        if not donate:
            return compiled(*lifted, lifter.paths)
        if checked[0] is not lifter._paths:
            check_donatable(args[:-1])
            checked[0] = lifter._paths
        targets = [t for t, p in zip(lifter.lifted, lifter.paths, strict=True) if is_donated(p)]
        out, written = compiled(*lifted, lifter.paths)
        for target, value in zip(targets, written, strict=True):
            target.copy_(value)
        return out

    return call
