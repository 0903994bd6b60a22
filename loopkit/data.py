"""Re-iterable batching of in-memory tensors, with a shuffle derived from (seed, epoch)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch


class Batches:
    """Mini-batches of ``tensors`` (all sharing their first dimension), re-iterable.

    With ``shuffle=True`` the order of epoch ``e`` is a permutation drawn from a generator
    seeded by ``(seed, e)``: the same for every run with the same seed, independent of any
    global RNG. :func:`loopkit.fit` calls :meth:`set_epoch` before each epoch (the
    ``DistributedSampler`` convention); iterating without it replays epoch 0's order.
    Each batch is a tuple of tensors (a single tensor when one was given).
    """

    def __init__(
        self,
        *tensors: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
    ):
        if not tensors:
            raise ValueError("Batches needs at least one tensor")
        n = tensors[0].shape[0]
        if any(t.shape[0] != n for t in tensors):
            shapes = [tuple(t.shape) for t in tensors]
            raise ValueError(f"all tensors must have the same first dimension, got {shapes}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        if drop_last and n < batch_size:
            raise ValueError(
                f"drop_last=True with {n} examples < batch_size={batch_size}: no batch"
            )
        self.tensors, self.batch_size, self.shuffle = tensors, batch_size, shuffle
        self.seed, self.drop_last, self.epoch = seed, drop_last, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = self.tensors[0].shape[0]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def order(self) -> torch.Tensor:
        """The example indices of the current epoch, in the order they are served."""
        n = self.tensors[0].shape[0]
        if not self.shuffle:
            return torch.arange(n)
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        return torch.randperm(n, generator=g)

    def __iter__(self) -> Iterator:
        order = self.order()
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            batch = tuple(t[idx.to(t.device)] for t in self.tensors)
            yield batch[0] if len(batch) == 1 else batch
