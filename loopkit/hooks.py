"""Hooks for :func:`loopkit.fit`: validation, checkpoints and a progress bar.

Hooks run in list order at each event, so list :class:`Validate` before the hooks that
read its ``val/...`` metrics (checkpointing, printing).
"""

from __future__ import annotations

import csv
import json
import math
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
            loss = to_python(loop.metrics["loss"])  # a list for an ensemble (one per member)
            shown = " ".join(f"{v:.4f}" for v in loss) if isinstance(loss, list) else f"{loss:.4f}"
            self.bar.set_postfix(loss=shown, refresh=False)

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


class EarlyStopping(Hook):
    """Stop when ``monitor`` (a key of ``loop.logs``, e.g. ``"val/loss"``) has not improved
    for ``patience`` consecutive checks. A check happens at each epoch end where the metric
    is logged (list this hook after the :class:`Validate` that logs it). Improvement means
    ``value < best - min_delta`` (``mode="min"``) or ``value > best + min_delta``
    (``"max"``); a NaN or infinite value never improves."""

    def __init__(self, monitor: str = "val/loss", *, mode: str = "min", patience: int = 5,
                 min_delta: float = 0.0):  # fmt: skip
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be a positive integer, got {patience!r}")
        if min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta}")
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta
        self.best: float | None = None
        self.wait = 0

    def improved(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def on_epoch_end(self, loop: Loop) -> None:
        if self.monitor not in loop.logs:
            return
        value = float(loop.logs[self.monitor])
        if self.improved(value):
            self.best, self.wait = value, 0
        else:
            self.wait += 1
            if self.wait >= self.patience:
                loop.should_stop = True


class _FileLogger(Hook):
    """Appends one record per epoch (``epoch``, ``step`` and ``loop.logs``) to a file in
    ``directory``, flushed at once so a crash loses nothing already written."""

    def __init__(self, directory: str | os.PathLike, filename: str):
        self.path = Path(directory) / filename

    def on_fit_start(self, loop: Loop) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def on_epoch_end(self, loop: Loop) -> None:
        record = {"epoch": loop.epoch, "step": loop.step}
        record.update({k: to_python(v) for k, v in loop.logs.items()})
        self.write(record)

    def write(self, record: dict) -> None:
        raise NotImplementedError


class JSONLLogger(_FileLogger):
    """``directory/metrics.jsonl``: one JSON object per epoch."""

    def __init__(self, directory: str | os.PathLike, filename: str = "metrics.jsonl"):
        super().__init__(directory, filename)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class CSVLogger(_FileLogger):
    """``directory/metrics.csv``: one row per epoch. When a later epoch logs a new column
    (validation every few epochs), the file is rewritten with the wider header."""

    def __init__(self, directory: str | os.PathLike, filename: str = "metrics.csv"):
        super().__init__(directory, filename)

    def write(self, record: dict) -> None:
        rows = []
        if self.path.exists():
            with open(self.path, newline="") as f:
                rows = list(csv.DictReader(f))
        columns = list(dict.fromkeys([*(rows[0].keys() if rows else []), *record]))
        if rows and list(rows[0].keys()) == columns:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, columns).writerow(record)
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows([*rows, record])
        os.replace(tmp, self.path)
