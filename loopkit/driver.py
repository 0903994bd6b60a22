"""The epoch driver: ``fit`` iterates batches, calls the step and lets hooks do the rest.

Hook order is list order, at every event. Each event calls the method of that name on every
hook that has it: ``on_fit_start``, ``on_epoch_start``, ``on_step_end``, ``on_epoch_end``,
``on_validation_end`` (fired by :class:`~loopkit.hooks.Validate`) and ``on_fit_end``, each
with the :class:`Loop`. A hook stops training by setting ``loop.should_stop = True``.

Step metrics stay on the device: the driver adds them up per epoch with tensor ops and
reduces them to floats once, at the end of the epoch (``loop.logs["train/<name>"]``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from loopkit.state import TrainState
from loopkit.tree import tree_leaves

Metrics = dict[str, torch.Tensor]


class Hook:
    """Base class for hooks: override the events you need; all default to doing nothing."""

    def on_fit_start(self, loop: Loop) -> None: ...
    def on_epoch_start(self, loop: Loop) -> None: ...
    def on_step_end(self, loop: Loop) -> None: ...
    def on_epoch_end(self, loop: Loop) -> None: ...
    def on_validation_end(self, loop: Loop) -> None: ...
    def on_fit_end(self, loop: Loop) -> None: ...


@dataclasses.dataclass
class Loop:
    """What hooks see: the current state and where training is.

    ``step`` is the number of steps taken (a host int mirroring ``state.step``), ``epoch``
    the current epoch (from 0), ``metrics`` the last step's metrics (on device), ``logs``
    the floats reduced so far this epoch (``train/...``, ``val/...``) and ``history`` one
    ``logs`` dict per finished epoch.
    """

    state: TrainState
    hooks: Sequence[Hook]
    epochs: int
    steps_per_epoch: int | None
    step: int = 0
    epoch: int = 0
    metrics: Metrics = dataclasses.field(default_factory=dict)
    logs: dict[str, Any] = dataclasses.field(default_factory=dict)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    should_stop: bool = False

    @property
    def final_epoch(self) -> bool:
        """True in the last epoch: the last of ``epochs``, or one a hook asked to stop."""
        return self.epoch + 1 >= self.epochs or self.should_stop

    def emit(self, event: str) -> None:
        """Call ``event`` on every hook, in list order."""
        for hook in self.hooks:
            getattr(hook, event, lambda loop: None)(self)


def to_python(value: Any) -> Any:
    """A metric tensor as a float (scalar) or nested list; other values unchanged."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value


def batch_size(batch: Any) -> int:
    """The leading dimension of the batch's first tensor (1 if it has none)."""
    for leaf in tree_leaves(batch):
        if isinstance(leaf, torch.Tensor) and leaf.ndim > 0:
            return leaf.shape[0]
    return 1


def evaluate(
    evaluate_step: Callable[[TrainState, Any], Metrics], state: TrainState, data: Iterable
) -> dict[str, Any]:
    """Run ``evaluate_step`` over ``data`` and average each metric over examples (a batch of
    n examples weighs n, so an uneven last batch counts for what it holds). One host sync."""
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for batch in data:
        n = batch_size(batch)
        for k, v in evaluate_step(state, batch).items():
            sums[k] = sums[k] + v * n if k in sums else v * n
        count += n
    if count == 0:
        raise ValueError("evaluate got no batches: the validation data is empty")
    return {k: to_python(v / count) for k, v in sums.items()}


def _check_reiterable(data: Iterable, epochs: int) -> None:
    if epochs > 1 and iter(data) is data:
        raise TypeError(
            f"fit(epochs={epochs}) needs data it can iterate once per epoch, but got a one-shot "
            f"iterator ({type(data).__name__}). Pass a list, a DataLoader, a loopkit.data.Batches, "
            "or an object whose __iter__ starts a fresh pass."
        )


def fit(
    step: Callable[[TrainState, Any], tuple[TrainState, Metrics]],
    state: TrainState,
    data: Iterable,
    *,
    epochs: int = 1,
    hooks: Sequence[Hook] = (),
) -> TrainState:
    """Train for ``epochs`` passes over ``data`` with ``state, metrics = step(state, batch)``
    and return the final state. ``data`` is any re-iterable of batches; if it has
    ``set_epoch`` it is called before each pass (as for a ``DistributedSampler``)."""
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    _check_reiterable(data, epochs)
    try:
        steps_per_epoch = len(data)  # type: ignore[arg-type]
    except TypeError:
        steps_per_epoch = None
    loop = Loop(state, list(hooks), epochs, steps_per_epoch, step=int(state.step))
    loop.emit("on_fit_start")
    for epoch in range(epochs):
        if loop.should_stop:
            break
        loop.epoch, loop.logs = epoch, {}
        if hasattr(data, "set_epoch"):
            data.set_epoch(epoch)
        loop.emit("on_epoch_start")
        sums: dict[str, torch.Tensor] = {}
        taken = 0
        for batch in data:
            loop.state, loop.metrics = step(loop.state, batch)
            loop.step += 1
            taken += 1
            for k, v in loop.metrics.items():
                sums[k] = sums[k] + v if k in sums else v
            loop.emit("on_step_end")
            if loop.should_stop:
                break
        loop.logs.update({f"train/{k}": to_python(v / taken) for k, v in sums.items()})
        loop.emit("on_epoch_end")
        loop.history.append(dict(loop.logs, epoch=epoch, step=loop.step))
    loop.emit("on_fit_end")
    return loop.state
