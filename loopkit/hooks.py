"""Hooks for :func:`loopkit.fit`: validation, checkpoints and a progress bar.

Hooks run in list order at each event, so list :class:`Validate` before the hooks that
read its ``val/...`` metrics (checkpointing, printing).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from loopkit import checkpoint, optim
from loopkit.driver import Hook, Loop, evaluate, to_python
from loopkit.state import TrainState


def _every(every: int, name: str) -> int:
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"{name} must be a positive integer, got {every!r}")
    return every


class Validate(Hook):
    """Every ``every`` epochs, run ``evaluate_step`` over ``data`` and put the
    example-weighted means in ``loop.logs`` as ``"{prefix}/{name}"``; then fire
    ``on_validation_end``."""

    def __init__(
        self,
        evaluate_step: Callable[[TrainState, Any], dict],
        data: Iterable,
        *,
        every: int = 1,
        prefix: str = "val",
    ):
        self.evaluate_step, self.data, self.prefix = evaluate_step, data, prefix
        self.every = _every(every, "every")

    def on_epoch_end(self, loop: Loop) -> None:
        if (loop.epoch + 1) % self.every and not loop.final_epoch:
            return
        results = evaluate(self.evaluate_step, loop.state, self.data)
        loop.logs.update({f"{self.prefix}/{k}": v for k, v in results.items()})
        loop.emit("on_validation_end")


class Checkpoint(Hook):
    """Every ``every`` epochs (and in the final epoch, also when a hook stopped training),
    save the state atomically to ``directory/step-<step>.ckpt`` with the epoch's logs as
    metadata. With ``keep_last=N`` only the newest N checkpoints this hook wrote are kept;
    an older one is deleted only after the new one is written, and files it did not write
    are never touched."""

    def __init__(
        self, directory: str | os.PathLike, *, every: int = 1, keep_last: int | None = None
    ):
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be a positive integer or None, got {keep_last}")
        self.directory, self.keep_last = Path(directory), keep_last
        self.every = _every(every, "every")
        self.saved: list[Path] = []

    def path_for(self, step: int) -> Path:
        return self.directory / f"step-{step:09d}{checkpoint.SUFFIX}"

    def on_epoch_end(self, loop: Loop) -> None:
        if (loop.epoch + 1) % self.every == 0 or loop.final_epoch:
            self.save(loop)

    def save(self, loop: Loop) -> Path:
        meta = {"epoch": loop.epoch, "step": loop.step, "logs": dict(loop.logs)}
        path = checkpoint.save(self.path_for(loop.step), loop.state, meta)
        self.saved = [p for p in self.saved if p != path] + [path]
        if self.keep_last is not None:
            stale, self.saved = self.saved[: -self.keep_last], self.saved[-self.keep_last :]
            for old in stale:
                old.unlink(missing_ok=True)
        return path


class ProgressBar(Hook):
    """A tqdm bar per epoch showing the loss (read from the device every ``refresh`` steps,
    so it costs one sync per ``refresh`` steps), and a summary line of ``loop.logs`` at each
    epoch's end. The bar is hidden when the output is not a terminal; the lines are not."""

    def __init__(self, *, refresh: int = 10, file: Any = None):
        self.refresh = _every(refresh, "refresh")
        self.file = file
        self.bar: Any = None

    def on_epoch_start(self, loop: Loop) -> None:
        self.bar = tqdm(
            total=loop.steps_per_epoch,
            desc=f"epoch {loop.epoch + 1}/{loop.epochs}",
            leave=False,
            disable=None,  # None: off when not a TTY
            file=self.file or sys.stderr,
            dynamic_ncols=True,
        )

    def on_step_end(self, loop: Loop) -> None:
        self.bar.update(1)
        if loop.step % self.refresh == 0 and "loss" in loop.metrics and not self.bar.disable:
            self.bar.set_postfix(loss=f"{to_python(loop.metrics['loss']):.4f}", refresh=False)

    def on_epoch_end(self, loop: Loop) -> None:
        self.bar.close()
        parts = [f"epoch {loop.epoch + 1}/{loop.epochs}", f"step {loop.step}"]
        for k, v in loop.logs.items():
            parts.append(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}")
        tqdm.write("  ".join(parts), file=self.file or sys.stdout)


class ReduceLROnPlateau(Hook):
    """Feed a validation metric to a plateau schedule
    (:func:`loopkit.optim.schedules.reduce_on_plateau`) after each validation, and scale the
    optimizer's learning rates by the change of its lr, as torch's ``ReduceLROnPlateau``
    does after ``scheduler.step(metric)``. List it after the :class:`Validate` it reads.

    The optimizer must take a number lr (a schedule would recompute its own); with several
    parameter groups each lr is scaled by the same ratio.
    """

    def __init__(self, plateau: Any, monitor: str = "val/loss"):
        self.plateau, self.monitor = plateau, monitor
        self.state: Any = None

    def on_fit_start(self, loop: Loop) -> None:
        if self.state is None:
            self.state = self.plateau.init(loop.state.step.device)

    def on_validation_end(self, loop: Loop) -> None:
        if self.monitor not in loop.logs:
            raise KeyError(
                f"ReduceLROnPlateau monitors {self.monitor!r}, which is not in the logs "
                f"({sorted(loop.logs)}): list it after the Validate hook that produces it"
            )
        old = self.state.lr
        self.state = self.plateau.update(self.state, loop.logs[self.monitor])
        new = self.state.lr

        def rescale(lr: torch.Tensor) -> torch.Tensor:
            # the plateau's own lr exactly; other groups' lrs by the same ratio
            old_, new_ = old.to(lr.device), new.to(lr.device)
            return torch.where(lr == old_, new_, lr * (new_ / old_))

        opt_state = optim.set_learning_rate(loop.state.opt_state, rescale)
        loop.state = loop.state.replace(opt_state=opt_state)
        loop.logs["lr"] = to_python(self.state.lr)
