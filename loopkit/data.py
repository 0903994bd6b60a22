"""Re-iterable, resumable data: batches whose order is a function of (seed, epoch).

:func:`loopkit.fit` resumes a run by calling :func:`set_epoch` with the saved epoch and
skipping the batches already taken in it, so the data must replay the same batches for the
same epoch. :class:`Batches` (in-memory tensors), :class:`EpochSampler` (for a
``DataLoader``) and :class:`Reiterable` (wrapping a generator function) do. A checkpoint
also holds the random state a pass draws from (:func:`random_state`: the global generators
and a ``DataLoader``'s), so a ``DataLoader`` with ``shuffle=True`` or random augmentation
replays too. :func:`why_not_resumable` names the data that may not.
"""

from __future__ import annotations

import inspect
import itertools
import operator
import random
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler


def _count(name: str, value: Any) -> int:
    """``value`` as an int (NumPy and 0-dim tensor integers too); TypeError otherwise."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None


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
        for t in tensors:  # tensors, or arrays that index like them (NumPy)
            if not hasattr(t, "shape") or isinstance(t, dict):
                raise TypeError(
                    f"Batches takes tensors (or arrays) with a leading example dimension, got "
                    f"a {type(t).__name__}: pass each as an argument, Batches(x, y, "
                    "batch_size=...)"
                )
            if len(t.shape) == 0:
                raise ValueError("Batches got a 0-dim tensor: each needs a leading example dim")
        n = tensors[0].shape[0]
        if any(t.shape[0] != n for t in tensors):
            shapes = [tuple(t.shape) for t in tensors]
            raise ValueError(f"all tensors must have the same first dimension, got {shapes}")
        batch_size, rank, world_size = (
            _count(name, v) for name, v in (("batch_size", batch_size), ("rank", rank),
                                            ("world_size", world_size))
        )  # fmt: skip
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        if not (world_size >= 1 and 0 <= rank < world_size):
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
    """Data made by a generator function: each pass calls ``make(epoch)`` if it takes a
    positional argument, else ``make()`` (keyword-only parameters, as those a
    ``functools.partial`` leaves, do not count), for a fresh iterator. Resuming is exact
    when the batches ``make`` yields depend only on ``epoch``."""

    def __init__(self, make: Callable[..., Iterable], length: int | None = None):
        self.make, self.length, self.epoch = make, length, 0
        self.takes_epoch = _takes_positional(make)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("this Reiterable has no length (pass length=...)")
        return self.length

    def __iter__(self) -> Iterator:
        return iter(self.make(self.epoch) if self.takes_epoch else self.make())


def _takes_positional(fn: Callable) -> bool:
    """Whether ``fn`` can take one positional argument (a callable with no signature that
    Python can read is called with none)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                  inspect.Parameter.VAR_POSITIONAL)  # fmt: skip
    return any(p.kind in positional for p in parameters)


def _sampler(loader: DataLoader) -> Any:
    batch_sampler = loader.batch_sampler
    return getattr(batch_sampler, "sampler", None) if batch_sampler is not None else loader.sampler


def _distinct(objects: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for obj in objects:
        if obj is not None and all(obj is not seen for seen in out):
            out.append(obj)
    return out


def _epoch_takers(loader: DataLoader) -> list[Any]:
    """The parts of ``loader`` with a ``set_epoch``: its batch sampler, its sampler
    (``DistributedSampler``, :class:`EpochSampler`) and its dataset (a streaming
    ``IterableDataset``, as in webdataset or Hugging Face ``datasets``)."""
    parts = [loader.batch_sampler, _sampler(loader), loader.dataset]
    return [p for p in _distinct(parts) if hasattr(p, "set_epoch")]


def set_epoch(data: Iterable, epoch: int) -> None:
    """Tell ``data`` which epoch it serves: ``data.set_epoch(epoch)`` if it has one; for a
    ``DataLoader``, the ``set_epoch`` of its batch sampler, sampler and dataset, each that
    has one."""
    if hasattr(data, "set_epoch"):
        data.set_epoch(epoch)
    elif isinstance(data, DataLoader):
        for part in _epoch_takers(data):
            part.set_epoch(epoch)


def _generators(data: Iterable) -> dict[str, torch.Generator]:
    """The generators of a ``DataLoader`` (its worker seeds, and the order of
    ``shuffle=True``) and of its sampler, when it has its own."""
    if not isinstance(data, DataLoader):
        return {}
    found = {"loader": data.generator, "sampler": getattr(_sampler(data), "generator", None)}
    found = {k: g for k, g in found.items() if isinstance(g, torch.Generator)}
    if "sampler" in found and found["sampler"] is found.get("loader"):
        del found["sampler"]
    return found


def random_state(data: Iterable) -> dict[str, Any]:
    """What a pass of ``data`` may draw random numbers from, as tensors, numbers and tuples
    (a checkpoint holds them): torch's global CPU generator, Python's ``random`` and NumPy's
    global generator (random augmentation in the main process; a ``DataLoader`` also draws
    its workers' seeds and ``shuffle=True``'s order from torch's), and the generators of a
    ``DataLoader`` and of its sampler. :func:`set_random_state` puts them back."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    np = sys.modules.get("numpy")
    if np is not None:
        name, keys, *rest = np.random.get_state()
        state["numpy"] = (name, torch.from_numpy(keys.astype(np.int64)), *rest)
    if generators := _generators(data):
        state["generators"] = {k: g.get_state() for k, g in generators.items()}
    return state


def set_random_state(data: Iterable, state: dict[str, Any]) -> None:
    """Set the generators :func:`random_state` read to the states it returned."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        import numpy as np

        name, keys, *rest = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    for key, generator in _generators(data).items():
        if key in state.get("generators", {}):
            generator.set_state(state["generators"][key])


def iter_from(data: Iterable, start: int, then: Callable[[], None] | None = None) -> Iterator:
    """An iterator over ``data``'s current pass from batch ``start`` on: ``data.iter_from``
    where it exists, otherwise the first ``start`` batches are drawn and dropped, here and
    now. ``then()`` (if given) is called after that, before the first batch is drawn."""
    if start and hasattr(data, "iter_from"):
        rest = data.iter_from(start)
    else:
        rest = iter(data)
        for _ in itertools.islice(rest, start):
            pass
    if then is not None:
        then()
    return rest


_TORCH_SAMPLERS = "torch.utils.data"


def _why_loader_may_not_resume(loader: DataLoader) -> str | None:
    if loader.num_workers > 0 and loader.persistent_workers:
        return (
            "its workers persist across passes (persistent_workers=True): a checkpoint cannot "
            "hold their random generators, which carry on from pass to pass, so random "
            "augmentation in them differs after a resume (and a dataset's set_epoch does not "
            "reach them). With persistent_workers=False each pass seeds its workers from "
            "generators the checkpoint holds"
        )
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset):
        if hasattr(dataset, "set_epoch"):
            return None
        return (
            f"loopkit cannot tell whether the IterableDataset {type(dataset).__name__} "
            "yields the same examples when a pass is replayed. A resume is exact when each "
            "pass depends only on its epoch: give the dataset a set_epoch(epoch) method "
            "(fit calls it before each pass; a DataLoader takes no sampler for an "
            "IterableDataset), and draw any other randomness from torch's global generator, "
            "which the checkpoint holds"
        )
    order = loader.batch_sampler
    if order is None or type(order).__module__.startswith(_TORCH_SAMPLERS):
        order = loader.sampler  # torch's BatchSampler only batches its sampler's order
    if hasattr(order, "set_epoch") or type(order).__module__.startswith(_TORCH_SAMPLERS):
        return None  # torch's samplers draw from the global generator or their own
    return (
        f"loopkit cannot tell whether its sampler ({type(order).__name__}) replays the same "
        "order: a resume is exact for a sampler that draws only from torch's global "
        "generator or from a generator given to the DataLoader or held as its .generator "
        "(the checkpoint holds those), or that has set_epoch(epoch), which fit calls before "
        "each pass, such as loopkit.data.EpochSampler(n, seed=...)"
    )


def why_not_resumable(data: Iterable) -> str | None:
    """None for data that replays the same batches for the same epoch once ``fit`` has put
    back the random state a checkpoint holds (:func:`random_state`): sequences, anything
    with ``set_epoch``, and a ``DataLoader`` whose sampler is one of torch's (shuffled or
    not) or has ``set_epoch``, over any map-style dataset (random augmentation included)
    or an ``IterableDataset`` with ``set_epoch``, unless its workers persist; otherwise
    why a resumed run may see other batches."""
    if isinstance(data, Sequence) or hasattr(data, "set_epoch"):
        return None
    if isinstance(data, DataLoader):
        return _why_loader_may_not_resume(data)
    return (
        f"loopkit cannot tell whether a {type(data).__name__} replays the same batches: wrap "
        "it in loopkit.data.Reiterable(make) with make(epoch) deterministic, or give it a "
        "set_epoch(epoch) method"
    )
