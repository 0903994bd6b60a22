"""One per-leaf formula, evaluated on all the leaves of a dict at once.

The optimizers are written leaf by leaf: ``tree_map(lambda m, g: lerp(m, g, 1 - b1), ...)``.
Run eagerly, that launches each op once per param. On a GPU a small op costs about as much
to launch as to run, so AdamW on the benchmark transformer (28 params) launched ~350 ops
where ``torch.optim.AdamW``'s default (foreach) implementation launches ~10, and loopkit's
eager step ran at half the imperative loop's speed on an H200.

:func:`leafwise` is ``tree_map`` for those formulas. It calls ``fn`` once per group of
keys whose leaves share their device and dtype (in every tree), with :class:`Leaves`
standing for the group's tensors. An op on ``Leaves`` is one multi-tensor
``torch._foreach_*`` call where torch has one (arithmetic with another ``Leaves``, a number
or a 0-dim tensor of the leaves' dtype; ``sqrt``, ``lerp``, ``addcmul``, ``maximum``,
``clamp``, ...), and otherwise the same op applied leaf by leaf. Formulas may use tensor
operators, comparisons, methods and torch functions of their leaves; a formula that needs
a leaf's attributes (``x.shape``) or Python values (``x.numel()``) gets an error that says
to use ``tree_map``. The values are those of the per-leaf code:

- on the CPU, torch's foreach ops are loops of the single-tensor op: bitwise the values of
  ``tree_map`` (the order in which autograd sums a shared scalar's gradient may differ);
- on CUDA they are the multi-tensor kernels ``torch.optim`` uses by default there, which
  compute the same formulas in the same precision (rounding may differ in the last bit).

Batching is for the devices where ``torch.optim`` defaults to its foreach implementation
(:data:`FOREACH_DEVICES`: CUDA and other accelerators). On the CPU, where torch's foreach
ops are loops of the single-tensor ops, the per-leaf code runs: batched it was slower here
(AdamW update of the benchmark MLP: 1.06 vs 0.92 ms; ``benchmarks/update_batching.py``).

``leafwise`` also falls back to ``tree_map`` where batching would change what the code
means: inside ``torch.compile`` (inductor fuses the per-leaf code itself, and the
traced graph stays the one the compile tests pin down), under a ``torch.func`` transform
(vmap'd ensembles, MAML's differentiated updates) or forward-mode AD, for leaves that
require grad, for trees other than dicts of plain tensors, and for a single leaf.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from numbers import Number
from typing import Any

import torch
from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices

from loopkit.tree import PyTree, tree_map

# Device types whose leaves leafwise batches (torch.optim's foreach default: accelerators).
FOREACH_DEVICES = frozenset(_get_foreach_kernels_supported_devices())


class Leaves:
    """The tensors of one group of leaves, standing in for one leaf in a per-leaf formula.
    Supports the tensor operations the formulas use; see the module docstring."""

    __slots__ = ("ts", "plain")

    def __init__(self, ts: list[torch.Tensor], plain: bool | None = None):
        self.ts = ts
        # Outside autograd (see _plain): known for the inputs and foreach results, whose
        # operands were; looked up for results computed leaf by leaf.
        self.plain = not any(t.requires_grad for t in ts) if plain is None else plain

    @property
    def dtype(self) -> torch.dtype:
        return self.ts[0].dtype  # one per group: leafwise groups every tree's leaves by dtype

    @property
    def device(self) -> torch.device:
        return self.ts[0].device

    def __add__(self, other):
        return _binary(torch._foreach_add, operator.add, self, other, tensor_scalar=True)

    def __radd__(self, other):
        return _reflected(torch._foreach_add, operator.add, self, other)

    def __mul__(self, other):
        return _binary(torch._foreach_mul, operator.mul, self, other, tensor_scalar=True)

    def __rmul__(self, other):
        return _reflected(torch._foreach_mul, operator.mul, self, other)

    def __sub__(self, other):
        return _binary(torch._foreach_sub, operator.sub, self, other, tensor_scalar=False)

    def __truediv__(self, other):
        return _binary(torch._foreach_div, operator.truediv, self, other, tensor_scalar=True)

    def __rsub__(self, other):
        return _each(operator.sub, (other, self))

    def __rtruediv__(self, other):
        return _each(operator.truediv, (other, self))

    def __pow__(self, other):
        return _each(operator.pow, (self, other))

    def __rpow__(self, other):
        return _each(operator.pow, (other, self))

    def __abs__(self):
        return self.abs()

    def __pos__(self):
        return self

    # Comparisons give a mask per leaf (as on tensors), never one Python bool.
    def __eq__(self, other):  # type: ignore[override]
        return _each(operator.eq, (self, other))

    def __ne__(self, other):  # type: ignore[override]
        return _each(operator.ne, (self, other))

    def __lt__(self, other):
        return _each(operator.lt, (self, other))

    def __le__(self, other):
        return _each(operator.le, (self, other))

    def __gt__(self, other):
        return _each(operator.gt, (self, other))

    def __ge__(self, other):
        return _each(operator.ge, (self, other))

    __hash__ = None  # type: ignore[assignment]

    def __bool__(self):
        raise TypeError(
            "a formula run by loopkit.optim.leafwise cannot branch on its leaves' values "
            "(write it with loopkit.tree.tree_map instead, or use torch.where)"
        )

    def mul(self, other):
        return self * other

    def div(self, other):
        return self / other

    def __neg__(self):
        return _unary(torch._foreach_neg, operator.neg, self)

    def sqrt(self):
        return _unary(torch._foreach_sqrt, torch.sqrt, self)

    def abs(self):
        return _unary(torch._foreach_abs, torch.abs, self)

    def sign(self):
        return _unary(torch._foreach_sign, torch.sign, self)

    def addcmul(self, tensor1, tensor2, *, value=1):
        """``self + value * tensor1 * tensor2``."""
        if _plain(self, tensor1, tensor2) and _number(value):
            return _batched(torch._foreach_addcmul(self.ts, tensor1.ts, tensor2.ts, value=value))
        return _each(torch.Tensor.addcmul, (self, tensor1, tensor2), {"value": value})

    def clamp(self, min=None, max=None):  # noqa: A002 -- Tensor.clamp's names
        if self.plain and all(b is None or _number(b) for b in (min, max)):
            ts = self.ts
            if min is not None:
                ts = torch._foreach_clamp_min(ts, min)
            if max is not None:
                ts = torch._foreach_clamp_max(ts, max)
            return _batched(ts)
        return _each(torch.Tensor.clamp, (self, min, max))

    def to(self, *args, **kwargs):
        # The formulas call .to(dtype) to match a dtype they already have: a no-op, as on
        # a tensor. Anything else converts leaf by leaf.
        if len(args) == 1 and not kwargs and all(t.dtype == args[0] for t in self.ts):
            return self
        return _each(torch.Tensor.to, (self, *args), kwargs)

    def __getattr__(self, name: str):
        method = getattr(torch.Tensor, name, None)
        if name.startswith("__") or not callable(method):
            raise AttributeError(
                f"{name!r}: a formula run by loopkit.optim.leafwise may use tensor methods "
                "and torch functions of its leaves, not their attributes (write it with "
                "loopkit.tree.tree_map instead)"
            )
        return lambda *args, **kwargs: _each(method, (self, *args), kwargs)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        batched = _TORCH_FUNCTIONS.get(func)
        if batched is not None and not kwargs:
            out = batched(*args)
            if out is not NotImplemented:
                return out
        return _each(func, args, kwargs)


def _number(x: Any) -> bool:
    return isinstance(x, Number) and not isinstance(x, bool)


def _plain(*xs: Any) -> bool:
    """All ``xs`` are ``Leaves`` of tensors outside autograd (foreach ops then give exactly
    the per-leaf values; with autograd the per-leaf ops keep their usual graph)."""
    for x in xs:  # a loop, not all(...): this runs for every op of every eager update
        if not (isinstance(x, Leaves) and x.plain):
            return False
    return True


def _unary(foreach: Callable, op: Callable, x: Leaves) -> Leaves:
    return _batched(foreach(x.ts)) if x.plain else _each(op, (x,))


def _batched(ts: list[torch.Tensor]) -> Leaves:
    """The result of a multi-tensor op on plain operands (itself plain)."""
    return Leaves(ts, plain=True)


def _tensor_scalar(x: Any, like: Leaves) -> bool:
    return (
        isinstance(x, torch.Tensor)
        and x.dim() == 0
        and not x.requires_grad
        and x.device == like.device
        and x.dtype == like.dtype  # the formulas cast their scalars to the leaves' dtype
    )


def _binary(foreach: Callable, op: Callable, a: Leaves, b: Any, *, tensor_scalar: bool):
    if _plain(a):
        if _plain(b):
            return _batched(foreach(a.ts, b.ts))
        if _number(b) or (tensor_scalar and _tensor_scalar(b, a)):
            return _batched(foreach(a.ts, b))
    return _each(op, (a, b))


def _reflected(foreach: Callable, op: Callable, a: Leaves, b: Any) -> Leaves:
    """``b op a`` for a commutative ``op``. Batched as ``a op b`` only where the two orders
    agree bitwise: a number, or a 0-dim tensor of the leaves' dtype (torch's CPU mul of a
    bf16 tensor and a float32 0-dim tensor rounds the scalar in one order, not the other)."""
    if _plain(a) and (_number(b) or _tensor_scalar(b, a)):
        return _batched(foreach(a.ts, b))
    return _each(op, (b, a))


def _each(fn: Callable, args: tuple, kwargs: dict | None = None) -> Leaves:
    """``fn`` leaf by leaf: each ``Leaves`` argument replaced by its i-th tensor."""
    kwargs = kwargs or {}
    n = next(len(a.ts) for a in (*args, *kwargs.values()) if isinstance(a, Leaves))

    def pick(x: Any, i: int) -> Any:
        return x.ts[i] if isinstance(x, Leaves) else x

    out = [
        fn(*(pick(a, i) for a in args), **{k: pick(v, i) for k, v in kwargs.items()})
        for i in range(n)
    ]
    if not all(isinstance(t, torch.Tensor) for t in out):
        raise TypeError(
            f"{getattr(fn, '__name__', fn)} gives a {type(out[0]).__name__} per leaf, not a "
            "tensor: a formula run by loopkit.optim.leafwise computes tensors from tensors "
            "(write one that needs Python values with loopkit.tree.tree_map instead)"
        )
    return Leaves(out)


def _lerp(start, end, weight):
    if _plain(start, end) and _number(weight):
        return _batched(torch._foreach_lerp(start.ts, end.ts, weight))
    return NotImplemented


def _maximum(a, b):
    if _plain(a, b):
        return _batched(torch._foreach_maximum(a.ts, b.ts))
    return NotImplemented


def _mul(a, b):
    if isinstance(a, Leaves):
        return a * b
    return b.__rmul__(a)  # a tensor times Leaves: Tensor.mul hands it here


def _add(a, b):
    if isinstance(a, Leaves):
        return a + b
    return b.__radd__(a)


_TORCH_FUNCTIONS: dict[Callable, Callable] = {
    torch.lerp: _lerp,
    torch.maximum: _maximum,
    torch.sqrt: lambda x: x.sqrt() if isinstance(x, Leaves) else NotImplemented,
    torch.neg: lambda x: -x if isinstance(x, Leaves) else NotImplemented,
    torch.Tensor.mul: _mul,  # also what `tensor * leaves` arrives as
    torch.Tensor.add: _add,
}


def _eager() -> bool:
    """Outside torch.compile, torch.func transforms and forward-mode AD (whose rule for
    ``_foreach_norm`` is broken in torch 2.13)."""
    return not (
        torch.compiler.is_compiling()
        or torch._C._functorch.peek_interpreter_stack() is not None
        or torch.autograd.forward_ad._current_level >= 0
    )


def batches(tensors: Iterable[Any]) -> bool:
    """Whether multi-tensor kernels may replace per-tensor ops on ``tensors`` (see the module
    docstring): eager code, plain tensors outside autograd."""
    if not _eager():
        return False
    for t in tensors:  # a loop, not all(...): this runs for every formula of every update
        if type(t) is not torch.Tensor or t.requires_grad:
            return False
    return True


def _batchable(tree: PyTree, rests: tuple) -> bool:
    if type(tree) is not dict or len(tree) < 2:
        return False
    first = next(iter(tree.values()))
    if not isinstance(first, torch.Tensor) or first.device.type not in FOREACH_DEVICES:
        return False
    for r in rests:
        if type(r) is not dict or r.keys() != tree.keys():
            return False
    return batches([v for t in (tree, *rests) for v in t.values()])


def leafwise(fn: Callable, tree: PyTree, *rests: PyTree) -> PyTree:
    """``tree_map(fn, tree, *rests)``, with ``fn`` run once per group of keys on
    :class:`Leaves` (multi-tensor kernels) where that applies (see the module docstring).
    A group's leaves share their device and, in each tree, their dtype. ``fn`` must be a
    per-leaf formula: tensor ops on its arguments, no Python decisions on their shapes or
    values."""
    if not _batchable(tree, rests):
        return tree_map(fn, tree, *rests)
    trees = (tree, *rests)
    groups: dict[tuple, list] = {}
    for k, v in tree.items():
        key = (v.device, v.dtype, *((t[k].device, t[k].dtype) for t in rests))
        groups.setdefault(key, []).append(k)
    out: dict = {}
    for keys in groups.values():
        result = fn(*(_batched([t[k] for k in keys]) for t in trees))
        if not isinstance(result, Leaves):
            raise TypeError(
                f"leafwise: the formula returned {type(result).__name__}, not a value per leaf"
            )
        out.update(zip(keys, result.ts, strict=True))
    return {k: out[k] for k in tree}
