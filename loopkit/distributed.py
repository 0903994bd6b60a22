"""Data parallelism on ``torch.distributed``: the step all-reduces its own gradients.

``torchrun`` starts one process per device; ``torch.distributed`` (gloo on CPU, NCCL on
GPU) moves the tensors. DDP's module wrapper does not apply to a ``torch.func`` step (it
hooks ``loss.backward()``, which the step never calls), so :func:`train_step` averages the
gradient pytree itself, right after ``grad_and_value`` and before clipping and the
optimizer, with functional collectives (``torch.distributed._functional_collectives``),
which ``torch.compile`` traces into the step's graph.

Every rank holds the same replicated state: :func:`loopkit.fit` broadcasts rank 0's state
at the start (and after resuming, which only rank 0 reads from disk), so each rank then
computes the same update from the same averaged gradient. Each rank's batch is its own
slice of the global batch (``loopkit.data.Batches(..., rank=, world_size=)`` or a
``DistributedSampler``); the averages are weighted by each rank's batch size, so N
data-parallel steps equal N single-process steps on the concatenated batches, uneven
last batches included.

BatchNorm: each rank normalises with its own batch's statistics (DDP's default, without
SyncBatchNorm); the new running statistics are then averaged across ranks inside the step,
so the buffers stay replicated (a buffer no rank changed is kept bitwise). Dropout: each
rank draws its masks from the state's generator folded with its rank (different masks per
rank, reproducible, resumable); the state's generator advances identically on every rank.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from loopkit.optim.base import Transform
from loopkit.state import TrainState
from loopkit.step import LossFn, TrainStep
from loopkit.step import train_step as _train_step
from loopkit.tree import flatten_with_names, leading_dim, tree_unflatten


class DistributedError(RuntimeError):
    """A data-parallel run set up inconsistently (no process group, ranks that disagree)."""


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 when torch.distributed is not initialised)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 when torch.distributed is not initialised)."""
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0, the one that writes files and prints (and in a single process)."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def require() -> None:
    if not is_initialized():
        raise DistributedError(
            "data parallelism needs torch.distributed initialised: launch the script with "
            "torchrun (e.g. torchrun --nproc-per-node=2 train.py) and call "
            "loopkit.distributed.init() (or torch.distributed.init_process_group) before "
            "the first step"
        )


def init(backend: str | None = None) -> None:
    """Initialise the default process group from torchrun's environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``...): NCCL when CUDA is available, else gloo; on CUDA
    each process takes the GPU ``LOCAL_RANK``. A no-op if already initialised."""
    if is_initialized():
        return
    if "RANK" not in os.environ:
        raise DistributedError(
            "loopkit.distributed.init() found no RANK in the environment: launch with torchrun"
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (picklable objects)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (picklable objects)."""
    if world_size() == 1:
        return [obj]
    every: list[Any] = [None] * world_size()
    dist.all_gather_object(every, obj)
    return every


def _signature(tree: Any) -> list[str]:
    leaves, _ = flatten_with_names(tree)
    return [
        f"{k}: {v.dtype}{list(v.shape)}" if isinstance(v, torch.Tensor) else f"{k}: {v!r}"
        for k, v in leaves.items()
    ]


def check_same_structure(tree: Any, what: str = "state") -> None:
    """Raise :class:`DistributedError` on every rank unless all ranks hold a ``tree`` with
    the same leaves (names, shapes, dtypes), naming the first differences."""
    if world_size() == 1:
        return
    every = all_gather_object(_signature(tree))
    problems = []
    for r, theirs in enumerate(every):
        if theirs != every[0]:
            only0 = [s for s in every[0] if s not in theirs][:5]
            only_r = [s for s in theirs if s not in every[0]][:5]
            problems.append(f"rank {r} vs rank 0: rank 0 has {only0}, rank {r} has {only_r}")
    if problems:
        raise DistributedError(
            f"the ranks disagree on the {what}'s structure:\n  " + "\n  ".join(problems) + "\n"
            "Every rank must build the same model and optimizer."
        )


def broadcast(state: TrainState, src: int = 0) -> TrainState:
    """A copy of rank ``src``'s ``state`` on every rank (after checking that all ranks
    hold states of the same structure). Returns ``state`` itself in a single process."""
    if world_size() == 1:
        return state
    check_same_structure(state)
    leaves, spec = flatten_with_names(state)
    out = []
    for value in leaves.values():
        if isinstance(value, torch.Tensor):
            value = value.clone()
            device = value.device
            # gloo moves CPU tensors; NCCL needs them on this process's GPU
            if dist.get_backend() == "nccl" and device.type == "cpu":
                moved = value.cuda()
                dist.broadcast(moved, src=src)
                value = moved.to(device)
            else:
                dist.broadcast(value, src=src)
        out.append(value)
    return tree_unflatten(out, spec)


def _mean_across_ranks(group: Any) -> Callable:
    """The step's sync: each rank's gradients, metrics and new float buffers, weighted by
    its batch size, summed across ranks and divided by the total (a rank with an empty
    batch adds nothing). A buffer that no rank's
    forward changed (a causal mask of -inf, a constant) is kept exactly as it was; an
    integer or bool metric comes back as a mean in the sync's dtype.

    Everything goes in one coalesced all-reduce, in one dtype (gloo's takes one dtype per
    call, and one call keeps every rank's collectives in the same order whatever graph
    each compiled): float64 if anything is float64, else float32 (bf16/fp16 gradients are
    summed in float32)."""
    import torch.distributed._functional_collectives as funcol

    def sync(grads: dict, metrics: dict, before: dict, buffers: dict, batch: Any):
        n = leading_dim(batch)
        floats = {k: v for k, v in buffers.items() if v.is_floating_point()}
        metrics = {k: torch.as_tensor(v) for k, v in metrics.items()}
        device = next(iter(grads.values())).device
        wide = _sync_dtype([*grads.values(), *metrics.values(), *floats.values()])
        metrics = {k: v if v.is_floating_point() else v.to(wide) for k, v in metrics.items()}
        parts = [("grads", grads), ("metrics", metrics), ("buffers", floats)]
        # An empty shard adds zeros, not its NaN means of nothing times 0.
        tensors = [v.to(wide) * n if n else torch.zeros_like(v, dtype=wide)
                   for _, tree in parts for v in tree.values()]  # fmt: skip
        tensors += [_unchanged(v, before[k]).to(wide) for k, v in floats.items()]
        # a fill: torch.tensor(n) would be a blocking host-to-device copy on accelerators
        tensors.append(torch.full((), float(n), dtype=wide, device=device))
        reduced = iter(funcol.all_reduce_coalesced(tensors, "sum", group))
        summed = [{k: next(reduced) for k in tree} for _, tree in parts]
        unchanged = {k: next(reduced) for k in floats}
        total, ranks = next(reduced), dist.get_world_size(group)
        grads, metrics, new = (
            {k: (v / total).to(tree[k].dtype) for k, v in sums.items()}
            for sums, (_, tree) in zip(summed, parts, strict=True)
        )
        moved = {k: torch.where(unchanged[k] == ranks, before[k], v) for k, v in new.items()}
        return grads, metrics, {**buffers, **moved}

    return sync


def _sync_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    """float64 if a floating-point tensor is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _unchanged(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """1 where the forward left a buffer bitwise as it was (NaNs included), else 0."""
    return ((new == old) | (new.isnan() & old.isnan())).all()


def train_step(
    model: torch.nn.Module,
    loss_fn: LossFn,
    optimizer: Transform,
    *,
    clip_norm: float | None = None,
    compile: bool = False,
    group: Any = None,
    **compile_kwargs: Any,
) -> TrainStep:
    """:func:`loopkit.train_step` for data parallelism: after ``grad_and_value``, the
    gradients, the metrics and the float buffers are averaged across the ranks of
    ``group`` (default: all), each rank weighted by its batch size; clipping and the
    optimizer then see the global gradient. Works eager and compiled. ``torch.distributed``
    must be initialised when the step is first called."""
    group = group if group is not None else dist.group.WORLD
    return _train_step(
        model,
        loss_fn,
        optimizer,
        clip_norm=clip_norm,
        compile=compile,
        sync=_mean_across_ranks(group),
        prepare=_Prepare(),
        **compile_kwargs,
    )


class _Prepare:
    """Called before each data-parallel step: checks the process group; on the first call,
    that every rank holds the same state (a step on different states would silently train
    different models); returns the rank to fold the random draws with."""

    def __init__(self) -> None:
        self.checked = False

    def __call__(self, state: TrainState) -> int:
        require()
        if not self.checked:
            check_replicated(state)
            self.checked = True
        return rank()


def _digest(t: torch.Tensor) -> str:
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


def check_replicated(state: TrainState) -> None:
    """Raise :class:`DistributedError` on every rank unless all ranks hold the same
    ``state`` (same structure, bitwise equal tensors, compared through checksums)."""
    if world_size() == 1:
        return
    check_same_structure(state)
    leaves, _ = flatten_with_names(state)
    sums = {k: _digest(v) for k, v in leaves.items() if isinstance(v, torch.Tensor)}
    every = all_gather_object(sums)
    differ = [k for k in sums if any(other[k] != sums[k] for other in every)]
    if differ:
        raise DistributedError(
            f"the ranks hold different states ({', '.join(differ[:5])} differ): a "
            "data-parallel step needs the same state everywhere. loopkit.fit broadcasts "
            "rank 0's state for a step built by loopkit.distributed.train_step; in your own "
            "loop, call state = loopkit.distributed.broadcast(state) first."
        )
