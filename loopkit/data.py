"""Re-iterable, resumable data: batches whose order is a function of (seed, epoch).

:func:`loopkit.fit` resumes a run by calling :func:`set_epoch` with the saved epoch and
skipping the batches already taken in it, so the data must replay the same batches for the
same epoch. :class:`Batches` (in-memory tensors), :class:`EpochSampler` (for a
``DataLoader``) and :class:`Reiterable` (wrapping a generator function) do;
:func:`why_not_resumable` names the data that may not.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler, SequentialSampler


def _permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
    return torch.randperm(n, generator=g)


class Batches:
    """Mini-batches of ``tensors`` (all sharing their first dimension), re-iterable.

    With ``shuffle=True`` the order of epoch ``e`` is a permutation drawn from a generator
    seeded by ``(seed, e)``: the same for every run with the same seed, independent of any
    global RNG. :func:`loopkit.fit` calls :meth:`set_epoch` before each epoch (the
    ``DistributedSampler`` convention); iterating without it replays epoch 0's order.
    Each batch is a tuple of tensors (a single tensor when one was given).

    Data parallel: with ``world_size=W`` the order is cut into global batches of
    ``batch_size * W`` examples and rank ``rank`` gets its contiguous share of each, so the
    ranks' batches, concatenated in rank order, are the batches of the same ``Batches``
    with ``batch_size * W`` and no sharding. A last global batch of fewer examples is split
    as evenly as possible; one with fewer examples than ranks is dropped.
    """

    def __init__(
        self,
        *tensors: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not tensors:
            raise ValueError("Batches needs at least one tensor")
        n = tensors[0].shape[0]
        if any(t.shape[0] != n for t in tensors):
            shapes = [tuple(t.shape) for t in tensors]
            raise ValueError(f"all tensors must have the same first dimension, got {shapes}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        if not (isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        if drop_last and n < batch_size * world_size:
            raise ValueError(
                f"drop_last=True with {n} examples < batch_size={batch_size} x world_size="
                f"{world_size}: no batch"
            )
        self.tensors, self.batch_size, self.shuffle = tensors, batch_size, shuffle
        self.seed, self.drop_last, self.epoch = seed, drop_last, 0
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n, size = self.tensors[0].shape[0], self.batch_size * self.world_size
        tail = n % size
        return n // size + (1 if tail >= self.world_size and not self.drop_last else 0)

    def order(self) -> torch.Tensor:
        """The example indices of the current epoch, in the order they are served."""
        n = self.tensors[0].shape[0]
        return _permutation(n, self.seed, self.epoch) if self.shuffle else torch.arange(n)

    def __iter__(self) -> Iterator:
        return self.iter_from(0)

    def iter_from(self, start: int) -> Iterator:
        """The current epoch's batches from batch ``start`` on (resuming mid-epoch)."""
        order, size = self.order(), self.batch_size * self.world_size
        for i in range(start, len(self)):
            idx = order[i * size : (i + 1) * size]
            if self.world_size > 1:
                idx = idx.tensor_split(self.world_size)[self.rank]
            batch = tuple(t[idx.to(t.device)] for t in self.tensors)
            yield batch[0] if len(batch) == 1 else batch


class EpochSampler(Sampler[int]):
    """A ``DataLoader`` sampler whose order in epoch ``e`` is a permutation drawn from
    ``(seed, e)`` (the identity without ``shuffle``), never from the global RNG, so
    :func:`loopkit.fit` can replay any epoch when it resumes::

        DataLoader(dataset, batch_size=64, sampler=EpochSampler(len(dataset), seed=0))
    """

    def __init__(self, n: int, *, shuffle: bool = True, seed: int = 0):
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        order = _permutation(self.n, self.seed, self.epoch) if self.shuffle else range(self.n)
        return iter(int(i) for i in order)


class Reiterable:
    """Data made by a generator function: each pass calls ``make(epoch)`` (or ``make()``
    if it takes no argument) for a fresh iterator. Resuming is exact when the batches
    ``make`` yields depend only on ``epoch``."""

    def __init__(self, make: Callable[..., Iterable], length: int | None = None):
        self.make, self.length, self.epoch = make, length, 0
        self.takes_epoch = bool(inspect.signature(make).parameters)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("this Reiterable has no length (pass length=...)")
        return self.length

    def __iter__(self) -> Iterator:
        return iter(self.make(self.epoch) if self.takes_epoch else self.make())


def _sampler(loader: DataLoader) -> Any:
    batch_sampler = loader.batch_sampler
    return getattr(batch_sampler, "sampler", None) if batch_sampler is not None else loader.sampler


def set_epoch(data: Iterable, epoch: int) -> None:
    """Tell ``data`` which epoch it serves: ``data.set_epoch(epoch)`` if it has one, else
    the ``set_epoch`` of a ``DataLoader``'s sampler (``DistributedSampler``,
    :class:`EpochSampler`)."""
    if hasattr(data, "set_epoch"):
        data.set_epoch(epoch)
    elif isinstance(data, DataLoader) and hasattr(_sampler(data), "set_epoch"):
        _sampler(data).set_epoch(epoch)


def iter_from(data: Iterable, start: int) -> Iterator:
    """An iterator over ``data``'s current pass from batch ``start`` on: ``data.iter_from``
    where it exists, otherwise the first ``start`` batches are drawn and dropped."""
    if start and hasattr(data, "iter_from"):
        return data.iter_from(start)
    return itertools.islice(iter(data), start, None)


def why_not_resumable(data: Iterable) -> str | None:
    """None for data that replays the same batches for the same epoch (sequences, anything
    with ``set_epoch``, a ``DataLoader`` with a sequential sampler or one with
    ``set_epoch``); otherwise why a resumed run may see other batches."""
    if isinstance(data, Sequence) or hasattr(data, "set_epoch"):
        return None
    if isinstance(data, DataLoader):
        sampler = _sampler(data)
        if isinstance(sampler, SequentialSampler) or hasattr(sampler, "set_epoch"):
            return None
        return (
            f"its sampler ({type(sampler).__name__}) draws its order from the global RNG, so a "
            "resumed run shuffles differently: pass sampler=loopkit.data.EpochSampler(n, "
            "seed=...) (or a DistributedSampler) instead of shuffle=True"
        )
    return (
        f"loopkit cannot tell whether a {type(data).__name__} replays the same batches: wrap "
        "it in loopkit.data.Reiterable(make) with make(epoch) deterministic, or give it a "
        "set_epoch(epoch) method"
    )
