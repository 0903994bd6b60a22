"""torch's fused Adam kernel for eager updates.

Written as a chain of transforms, an eager AdamW update is a dozen elementwise ops per param,
each allocating its result; ``torch.optim.AdamW`` runs about eight per param in place, and
with ``fused=True`` one kernel for all params. On this machine's CPU the update of the
benchmark MLP takes 0.68 ms as the chain, 0.46 ms in torch.optim's default and 0.15 ms with
the fused kernel (``benchmarks/update_batching.py``).

:func:`adam_step` runs that kernel functionally: the new params and moments are copies of
the old ones, updated in place by ``torch._fused_adam_`` / ``torch._fused_adamw_``; the
inputs are not modified. The kernel computes the equation of
:func:`~loopkit.optim.transforms.scale_by_adam` in one pass per element (``m = b1 m +
(1 - b1) g`` rather than ``lerp``), so its results agree with the chain's, and with
``torch.optim``'s default, to rounding; with ``torch.optim.Adam(fused=True)`` they agree
bitwise.

:func:`adam_step` returns None where the kernel does not apply, and the caller runs the
chain. It applies eagerly (not under ``torch.compile``, where
inductor fuses the chain's ops itself, nor under a ``torch.func`` transform or autograd,
which the kernel has no derivative for), on the devices torch has it for, and on plain,
contiguous tensors outside autograd whose grads and moments match their param's dtype,
shape and device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from loopkit.optim.leafwise import _eager
from loopkit.optim.transforms import ScaleByAdamState
from loopkit.tree import PyTree, tree_flatten, tree_unflatten

FUSED_DEVICES = frozenset(_get_fused_kernels_supported_devices())
# The kernel's own dtypes. It computes float16 and bfloat16 params in float32, which is
# more than rounding away from the per-op chain: those are fused only when asked for.
FULL_PRECISION = frozenset({torch.float32, torch.float64})
KERNEL_DTYPES = FULL_PRECISION | {torch.float16, torch.bfloat16}


def _plain(t: object, like: torch.Tensor | None = None) -> bool:
    """A contiguous strided tensor outside autograd (of ``like``'s dtype, shape and device)."""
    if type(t) is not torch.Tensor or t.requires_grad or t.layout != torch.strided:
        return False
    if not t.is_contiguous():  # the CPU kernel walks memory in order, whatever the strides
        return False
    return like is None or (
        t.dtype == like.dtype and t.shape == like.shape and t.device == like.device
    )


def _flatten(tree: PyTree) -> tuple[list, Any]:
    """``tree_flatten``, with a flat dict of tensors (params, grads, moments) taken apart
    directly."""
    if type(tree) is dict and all(isinstance(v, torch.Tensor) for v in tree.values()):
        return list(tree.values()), tuple(tree)
    return tree_flatten(tree)


def _unflatten(leaves: list, spec: Any) -> PyTree:
    return (
        dict(zip(spec, leaves, strict=True))
        if type(spec) is tuple
        else tree_unflatten(leaves, spec)
    )


def _copies(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Fresh copies of ``ts`` (one multi-tensor copy per call on accelerators)."""
    out = [torch.empty_like(t) for t in ts]
    torch._foreach_copy_(out, ts)
    return out


def _lr_on(lr: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The lr as the kernel takes it: a CPU tensor is read as a double on the host (no sync);
    on an accelerator the kernel reads a float32 on the params' device."""
    if lr.device.type == "cpu":
        return lr
    return lr.to(device=device, dtype=torch.float32)


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
    dtypes: frozenset = FULL_PRECISION,
) -> tuple[PyTree, ScaleByAdamState] | None:
    """One Adam (``decoupled=False``: L2 decay ``g += weight_decay * p``) or AdamW
    (``p *= 1 - lr * weight_decay``) update with torch's fused kernel: ``(new_params, new
    state)``, the state being :func:`~loopkit.optim.transforms.scale_by_adam`'s after the
    update. Nothing given is modified.

    None where the kernel does not apply: under ``torch.compile``, a ``torch.func``
    transform or forward AD; for params that are not plain contiguous tensors of ``dtypes``
    on a fused-kernel device, or grads and moments not of the params' structure and of each
    param's dtype, shape and device; where anything requires grad."""
    if not _eager() or lr.requires_grad or state.count.requires_grad:
        return None
    leaves, spec = _flatten(params)
    for p in leaves:
        if not _plain(p) or p.dtype not in dtypes or p.device.type not in FUSED_DEVICES:
            return None
    trees = [grads, state.exp_avg, state.exp_avg_sq, *([state.max_exp_avg_sq] if amsgrad else [])]
    others = []
    for tree in trees:
        other, other_spec = _flatten(tree)
        if other_spec != spec or not all(map(_plain, other, leaves)):
            return None
        others.append(other)
    count = state.count + 1
    kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(leaves):
        groups.setdefault((p.device, p.dtype), []).append(i)
    updated = [[None] * len(leaves) for _ in range(len(trees))]  # params, moments (no grads)
    for (device, _), idx in groups.items():
        new = [_copies([ts[i] for i in idx]) for ts in (leaves, *others[1:])]
        step = count.to(device=device, dtype=torch.float32)  # as torch.optim keeps it
        kernel(
            new[0], [others[0][i] for i in idx], new[1], new[2], new[3] if amsgrad else [],
            [step] * len(idx), lr=_lr_on(lr, device), beta1=b1, beta2=b2,
            weight_decay=weight_decay, eps=eps, amsgrad=amsgrad, maximize=maximize,
        )  # fmt: skip
        for out, values in zip(updated, new, strict=True):
            for i, t in zip(idx, values, strict=True):
                out[i] = t
    new_params, exp_avg, exp_avg_sq, *highest = (_unflatten(ts, spec) for ts in updated)
    return new_params, ScaleByAdamState(count, exp_avg, exp_avg_sq, highest[0] if amsgrad else ())
