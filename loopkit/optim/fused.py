"""torch's fused Adam, SGD and Adagrad kernels for eager updates, and RMSprop's own ops
batched.

Written as a chain of transforms, an eager AdamW update is a dozen elementwise ops per
param, each allocating its result; ``torch.optim.AdamW`` runs about eight per param in
place, and with ``fused=True`` one kernel for all params. On this machine's CPU the update
of the benchmark MLP took 0.71 ms as the chain, 0.50 ms in torch.optim's default and
0.23 ms with the fused kernel (``benchmarks/update_batching.py``). SGD with momentum is
the same story on a smaller scale, and Adagrad (``benchmarks/eager_optimizers.py``).

:func:`adam_step`, :func:`sgd_step` and :func:`adagrad_step` run those kernels
functionally: the new params and optimizer state are copies of the old ones, updated in
place by ``torch._fused_adam_`` / ``torch._fused_adamw_`` / ``torch._fused_sgd_`` /
``torch._fused_adagrad_``; the inputs are not modified. The kernels compute the equations
of :func:`~loopkit.optim.transforms.scale_by_adam`, :func:`~loopkit.optim.transforms.trace`
and :func:`~loopkit.optim.transforms.scale_by_adagrad` in one pass per element (Adam: ``m = b1 m +
(1 - b1) g`` rather than ``lerp``), so their results agree with the chain's, and with
``torch.optim``'s default, to rounding; with ``torch.optim``'s ``fused=True`` given the
same lr they agree bitwise. torch has no RMSprop kernel: :func:`rmsprop_step` runs
``torch.optim.RMSprop``'s own in-place ops on the copies, each one ``torch._foreach_*`` call
for all params, bitwise torch's default.

It returns None where the kernel does not apply, and the caller runs the chain:

- under ``torch.compile`` (inductor fuses the chain's ops itself), a ``torch.func``
  transform or forward-mode AD, or where anything requires grad: the kernel has no
  derivative;
- on devices other than the CPU and CUDA (torch itself only fuses when asked), and for
  Adagrad and RMSprop off the CPU;
- for float16 and bfloat16 params, which the kernel computes in float32, unless asked
  (``any_dtype``; RMSprop's ops compute in the param's dtype, as torch's, and take
  them); for float64 params off the CPU too, because the CUDA kernel reads the lr as a
  float32 (the CPU kernel reads a double);
- for tensors that are not plain dense tensors of one layout (grads and moments must have
  their param's dtype, shape, device and strides), or params on both the CPU and an
  accelerator (the lr and step count would be copied to the host every step);
- Adam and Adagrad on the CPU from update 2**24 on, where the kernel's float32 step count
  (torch.optim keeps it so) would round; on CUDA reading the count would cost a sync, so
  there the kernel runs on, as ``torch.optim.Adam(fused=True)`` does;
- SGD with momentum and dampening off the CPU (see :func:`sgd_step`), and SGD on float16 or
  bfloat16 CPU params even when asked: torch 2.13's CPU kernel leaves most of those params
  unchanged (``torch.optim.SGD(fused=True)`` too).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from loopkit.optim.leafwise import _eager
from loopkit.optim.transforms import (
    ScaleByAdagradState,
    ScaleByAdamState,
    ScaleByRmsState,
    TraceState,
)
from loopkit.tree import PyTree, tree_flatten, tree_unflatten

FUSED_DEVICES = frozenset({"cpu", "cuda"}) & frozenset(_get_fused_kernels_supported_devices())
LOW_PRECISION = frozenset({torch.float16, torch.bfloat16})
EXACT_STEPS = 2**24  # float32 holds every integer up to here


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense in a standard layout: the kernel walks memory in order."""
    if t.is_contiguous():
        return True
    if t.dim() == 4:
        return t.is_contiguous(memory_format=torch.channels_last)
    return t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)


def _plain(t: object) -> bool:
    """A plain dense tensor outside autograd, with no lazy zero/negation/conjugation bit."""
    return (
        type(t) is torch.Tensor
        and not t.requires_grad
        and t.layout == torch.strided
        and not (t._is_zerotensor() or t.is_neg() or t.is_conj())
        and _dense(t)
    )


def _fusable_param(p: object, any_dtype: bool) -> bool:
    if not _plain(p) or p.device.type not in FUSED_DEVICES:
        return False
    if p.dtype == torch.float32:
        return True
    if p.dtype == torch.float64:
        return any_dtype or p.device.type == "cpu"
    return any_dtype and p.dtype in LOW_PRECISION


def _like(t: object, p: torch.Tensor) -> bool:
    """``t`` can stand beside the plain dense ``p`` in the kernel: a plain tensor of the
    same dtype, device, shape and strides (so as dense, in the same memory order)."""
    return (
        type(t) is torch.Tensor
        and t.layout == torch.strided
        and not t.is_nested
        and t.dtype == p.dtype
        and t.stride() == p.stride()
        and t.shape == p.shape
        and t.device == p.device
        and not (t.requires_grad or t._is_zerotensor() or t.is_neg() or t.is_conj())
    )


def _flatten(tree: PyTree) -> tuple[list, Any]:
    """``tree_flatten``, with a flat dict of tensors (params, grads, moments) taken apart
    directly."""
    if type(tree) is dict and all(isinstance(v, torch.Tensor) for v in tree.values()):
        return list(tree.values()), tuple(tree)
    return tree_flatten(tree)


def _unflatten(leaves: list, spec: Any) -> PyTree:
    if type(spec) is tuple:
        return dict(zip(spec, leaves, strict=True))
    return tree_unflatten(leaves, spec)


def _copies(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Fresh copies of ``ts`` (one multi-tensor copy per call on accelerators)."""
    out = [torch.empty_like(t) for t in ts]
    torch._foreach_copy_(out, ts)
    return out


def _lr_on(lr: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The lr as the kernel takes it: a CPU tensor is read as a double on the host; on an
    accelerator the kernel reads a float32 on the params' device."""
    if lr.device.type == "cpu":
        return lr
    return lr.to(device=device, dtype=torch.float32)


def _prepared(
    params: PyTree, trees: list, any_dtype: bool, devices: frozenset = FUSED_DEVICES
) -> tuple | None:
    """``(leaves, spec, others)``: ``params`` and each tree of ``trees`` flattened, where the
    kernels apply to them (see the module docstring) on ``devices``, else None."""
    if not _eager():
        return None
    leaves, spec = _flatten(params)
    if not all(_fusable_param(p, any_dtype) and p.device.type in devices for p in leaves):
        return None
    if len({p.device.type == "cpu" for p in leaves}) > 1:
        return None
    others = []
    for tree in trees:
        other, other_spec = _flatten(tree)
        if other_spec != spec or not all(map(_like, other, leaves)):
            return None
        others.append(other)
    return leaves, spec, others


def _low_precision_on_cpu(params: PyTree) -> bool:
    return any(
        isinstance(p, torch.Tensor) and p.is_cpu and p.dtype in LOW_PRECISION
        for p in _flatten(params)[0]
    )


def _exact_count(count: torch.Tensor) -> torch.Tensor | None:
    """``count + 1``, the step the kernel is given, or None on the CPU from 2**24 on: the
    kernel reads it as a float32 (torch.optim keeps it so), which would round. On an
    accelerator reading it would cost a sync, so the kernel runs on, as torch's does."""
    count = count + 1
    if count.device.type == "cpu" and int(count) >= EXACT_STEPS:
        return None
    return count


def _steps(count: torch.Tensor, device: torch.device, params: list) -> list[torch.Tensor]:
    """The per-param step tensors of torch's fused kernels: ``count`` as a float32 on
    ``device``, shared (the kernels only read them)."""
    return [count.to(device=device, dtype=torch.float32)] * len(params)


def _groups(leaves: list[torch.Tensor]) -> dict[tuple, list[int]]:
    """Indices of the leaves by (device, dtype): one kernel call each, as torch groups."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(leaves):
        groups.setdefault((p.device, p.dtype), []).append(i)
    return groups


def _run(prepared: tuple, call: Callable[..., None]) -> list[PyTree]:
    """``call(device, params, grads, *states)`` once per (device, dtype) group of the
    ``prepared`` leaves (``others`` being the grads, then the states), on fresh copies of
    the params and states; returns the new params and states as trees like ``params``."""
    leaves, spec, (grads, *states) = prepared
    updated = [[None] * len(leaves) for _ in range(1 + len(states))]
    for (device, _), idx in _groups(leaves).items():
        new = [_copies([ts[i] for i in idx]) for ts in (leaves, *states)]
        call(device, new[0], [grads[i] for i in idx], *new[1:])
        for out, values in zip(updated, new, strict=True):
            for i, t in zip(idx, values, strict=True):
                out[i] = t
    return [_unflatten(ts, spec) for ts in updated]


def adam_step(
    params: PyTree,
    grads: PyTree,
    state: ScaleByAdamState,
    lr: torch.Tensor,
    *,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled: bool,
    any_dtype: bool = False,
) -> tuple[PyTree, ScaleByAdamState] | None:
    """One Adam (``decoupled=False``: L2 decay ``g += weight_decay * p``) or AdamW
    (``p *= 1 - lr * weight_decay``) update with torch's fused kernel: ``(new_params, new
    state)``, the state being :func:`~loopkit.optim.transforms.scale_by_adam`'s after the
    update; nothing given is modified. None where the kernel does not apply (see the module
    docstring; ``any_dtype`` also fuses float16/bfloat16 params, and float64 ones off the
    CPU)."""
    if lr.requires_grad or state.count.requires_grad:
        return None
    trees = [grads, state.exp_avg, state.exp_avg_sq, *([state.max_exp_avg_sq] if amsgrad else [])]
    prepared = _prepared(params, trees, any_dtype)
    if prepared is None:
        return None
    count = _exact_count(state.count)
    if count is None:
        return None
    kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_

    def call(device, params, grads, exp_avg, exp_avg_sq, highest=()):
        kernel(
            params, grads, exp_avg, exp_avg_sq, list(highest), _steps(count, device, params),
            lr=_lr_on(lr, device), beta1=b1, beta2=b2, weight_decay=weight_decay, eps=eps,
            amsgrad=amsgrad, maximize=maximize,
        )  # fmt: skip

    new_params, exp_avg, exp_avg_sq, *highest = _run(prepared, call)
    return new_params, ScaleByAdamState(count, exp_avg, exp_avg_sq, highest[0] if amsgrad else ())


def sgd_step(
    params: PyTree,
    grads: PyTree,
    state: TraceState | None,
    lr: torch.Tensor,
    *,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    any_dtype: bool = False,
) -> tuple[PyTree, TraceState | None] | None:
    """One SGD update with torch's fused kernel: ``(new_params, new state)``, the state being
    :func:`~loopkit.optim.transforms.trace`'s after the update (None without momentum);
    nothing given is modified. None where the kernel does not apply (see the module
    docstring).

    The kernel starts the momentum buffer from the gradient when told it is the first step
    (``b = g``, torch's rule). On the CPU that is read from ``state.initialized``. On an
    accelerator reading it would cost a sync: with ``dampening == 0`` the kernel is told it
    is not the first step, which from the zero buffer of a new state gives ``0 * momentum +
    g = g`` all the same; with dampening the chain runs."""
    if lr.requires_grad:
        return None
    if any_dtype and _low_precision_on_cpu(params):
        return None  # torch 2.13's CPU SGD kernel drops most of their update
    trees = [grads] if state is None else [grads, state.momentum_buffer]
    prepared = _prepared(params, trees, any_dtype)
    if prepared is None:
        return None
    first = False
    if state is not None:
        if state.initialized.device.type == "cpu":
            first = not bool(state.initialized)
        elif dampening != 0:
            return None

    def call(device, params, grads, buffers=()):
        torch._fused_sgd_(
            params, grads, list(buffers), weight_decay=weight_decay, momentum=momentum,
            lr=_lr_on(lr, device), dampening=dampening, nesterov=nesterov, maximize=maximize,
            is_first_step=first,
        )  # fmt: skip

    new_params, *buffers = _run(prepared, call)
    if state is None:
        return new_params, None
    return new_params, TraceState(state.count + 1, state.initialized | True, buffers[0])


def adagrad_step(
    params: PyTree,
    grads: PyTree,
    state: ScaleByAdagradState,
    lr: torch.Tensor,
    *,
    lr_decay: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
    any_dtype: bool = False,
) -> tuple[PyTree, ScaleByAdagradState] | None:
    """One Adagrad update (L2 decay ``g += weight_decay * p``) with torch's fused kernel:
    ``(new_params, new state)``, the state being
    :func:`~loopkit.optim.transforms.scale_by_adagrad`'s after the update; nothing given is
    modified. CPU params only: torch 2.13 has no CUDA kernel for it, and a later torch's
    has not been checked against torch.optim here. None where the kernel does not apply
    (see the module docstring)."""
    if lr.requires_grad or state.count.requires_grad:
        return None
    prepared = _prepared(params, [grads, state.sum], any_dtype, devices=frozenset({"cpu"}))
    if prepared is None:
        return None
    count = _exact_count(state.count)
    if count is None:
        return None

    def call(device, params, grads, sums):
        torch._fused_adagrad_(
            params, grads, sums, _steps(count, device, params), lr=_lr_on(lr, device),
            lr_decay=lr_decay, weight_decay=weight_decay, eps=eps, maximize=maximize,
        )  # fmt: skip

    new_params, sums = _run(prepared, call)
    return new_params, ScaleByAdagradState(count, sums)


def rmsprop_step(
    params: PyTree,
    grads: PyTree,
    state: ScaleByRmsState | tuple,
    lr: torch.Tensor,
    *,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
) -> tuple[PyTree, ScaleByRmsState | tuple] | None:
    """One RMSprop update as ``torch.optim.RMSprop`` runs it by default on the CPU: its
    single-tensor ops in the same order (so bitwise its result), each batched over the
    params as one ``torch._foreach_*`` call, on fresh copies of the params and state.
    torch has no fused RMSprop kernel; the chain of transforms makes about seven allocating
    passes per param and pays Python for each. ``state`` is
    :func:`~loopkit.optim.transforms.scale_by_rms`'s, or with ``momentum`` the pair of it
    and :func:`~loopkit.optim.transforms.trace`'s. CPU params only: on an accelerator
    reading the lr as a number would cost a sync. None where it does not apply (the module
    docstring's rules, float16 and bfloat16 included as torch computes them)."""
    rms, buffer = (state, None) if momentum == 0 else (state[0], state[1])
    if not isinstance(rms, ScaleByRmsState) or (momentum and not isinstance(buffer, TraceState)):
        return None
    if lr.requires_grad or lr.device.type != "cpu":
        return None
    trees = [grads, rms.square_avg, *([rms.grad_avg] if centered else [])]
    trees += [buffer.momentum_buffer] if buffer is not None else []
    prepared = _prepared(params, trees, any_dtype=True, devices=frozenset({"cpu"}))
    if prepared is None:
        return None
    lr_value = float(lr)  # a CPU float64: exact, as torch's float lr

    def call(device, params, grads, square_avg, *rest):
        if maximize:
            grads = torch._foreach_neg(grads)
        if weight_decay != 0:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
        _scale_(square_avg, alpha)
        torch._foreach_addcmul_(square_avg, grads, grads, value=1 - alpha)
        if centered:
            grad_avg = rest[0]
            torch._foreach_lerp_(grad_avg, grads, 1 - alpha)
            avg = torch._foreach_addcmul(square_avg, grad_avg, grad_avg, value=-1)
            torch._foreach_sqrt_(avg)
        else:
            avg = torch._foreach_sqrt(square_avg)
        torch._foreach_add_(avg, eps)
        if buffer is None:
            torch._foreach_addcdiv_(params, grads, avg, value=-lr_value)
            return
        buf = rest[-1]  # zeros in a new state, as torch's: b_1 = x_1, the chain's first b
        _scale_(buf, momentum)
        torch._foreach_addcdiv_(buf, grads, avg)
        torch._foreach_add_(params, buf, alpha=-lr_value)

    new_params, square_avg, *rest = _run(prepared, call)
    new_rms = ScaleByRmsState(square_avg, rest[0] if centered else ())
    if buffer is None:
        return new_params, new_rms
    trace_state = TraceState(buffer.count + 1, buffer.initialized | True, rest[-1])
    return new_params, (new_rms, trace_state)


def _scale_(ts: list[torch.Tensor], factor: float) -> None:
    """``t.mul_(factor)`` for each of ``ts``: one ``_foreach_mul_``, except in float16 and
    bfloat16, where torch 2.13's CPU ``_foreach_mul_`` by a number rounds differently from
    ``mul_`` (torch.optim's single-tensor op)."""
    if ts and ts[0].dtype in LOW_PRECISION:
        for t in ts:
            t.mul_(factor)
    else:
        torch._foreach_mul_(ts, factor)
