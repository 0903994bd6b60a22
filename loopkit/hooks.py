"""Hooks for :func:`loopkit.fit`: validation, checkpoints and a progress bar.

Hooks run in list order at each event, so list :class:`Validate` before the hooks that
read its ``val/...`` metrics (checkpointing, printing).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sized
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from loopkit import checkpoint, distributed, optim
from loopkit.driver import Hook, Loop, evaluate, plain_data, to_python
from loopkit.state import TrainState


def _every(every: int | None, name: str) -> int | None:
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {every!r}")
    return every


def _due_epoch(loop: Loop, every: int | None) -> bool:
    """At an epoch end: every ``every`` epochs, and always in the final epoch."""
    return (every is not None and (loop.epoch + 1) % every == 0) or loop.final_epoch


def _due_step(loop: Loop, every_steps: int | None) -> bool:
    """At a step end: every ``every_steps`` steps, unless that step was undone."""
    return every_steps is not None and not loop.step_skipped and loop.step % every_steps == 0


def _monitored(hook: Hook, who: str, key: str, loop: Loop, complete: bool = True) -> bool:
    """Whether ``key`` is in ``loop.logs``. Where it is missing from ``complete`` logs (an
    epoch's end, when every hook has logged), warn once per hook and fit, naming the keys
    there are, if others of its source are there (``val/los`` next to ``val/loss``: a typo),
    if it has no source (``val_loss``), or if nothing logs its source: no :class:`Validate`
    of that prefix, and no finished epoch of the fit logged it (``val/loss`` without a
    Validate hook, which would never be fed). A source with nothing logged this epoch (a
    validation every few epochs) is no reason to warn."""
    if key in loop.logs:
        return True
    if complete and not getattr(hook, "_warned_missing", False) and distributed.is_main():
        source = key.rpartition("/")[0]
        # a key without a source ("val_loss") is never logged by Validate: warn too
        typo = not source or any(k.rpartition("/")[0] == source for k in loop.logs)
        if typo:
            why = f"which is not in the logs: they hold {sorted(loop.logs)}"
        elif _unlogged(source, loop):
            why = (
                f"which nothing logs: no Validate hook has prefix {source!r} and no epoch so "
                f"far logged a {source + '/'!r} key (the logs hold {sorted(loop.logs)}). Add a "
                f"Validate(evaluate_step, data, prefix={source!r}) hook, or monitor a key "
                "that is logged (a step metric's is 'train/<name>')"
            )
        else:
            return False
        hook._warned_missing = True
        warnings.warn(f"{who} monitors {key!r}, {why}", stacklevel=3)
    return False


def _unlogged(source: str, loop: Loop) -> bool:
    """Whether no hook is there to log keys of ``source`` (``"val"`` in ``"val/loss"``): it
    is not ``train`` (the step's metrics), no :class:`Validate` (also one in :class:`Every`)
    has it as prefix, and no finished epoch of the fit logged one."""
    if source == "train" or not loop.history:  # a custom hook's first epoch may be yet to log
        return False
    logged = any(k.rpartition("/")[0] == source for epoch in loop.history for k in epoch)
    return not _validators(source, loop) and not logged


def _validators(source: str, loop: Loop) -> list[Validate]:
    """The :class:`Validate` hooks (also ones in :class:`Every`) whose prefix is ``source``."""
    hooks = (getattr(h, "hook", h) for h in loop.hooks)
    return [h for h in hooks if isinstance(h, Validate) and h.prefix == source]


def _fresh(key: str, loop: Loop) -> bool:
    """Whether the log ``key`` may hold a value of this step at an ``on_validation_end``:
    not where the Validate hooks of its prefix did not run at this step (the event is
    another prefix's, and the value an earlier state's). Keys no Validate logs may be."""
    validators = _validators(key.rpartition("/")[0], loop)
    return not validators or any(v.last_step == loop.step for v in validators)


def _number(who: str, key: str, value: Any) -> float:
    """The monitored log ``key``'s ``value`` as a float: a per-member list (an ensemble's
    metric) or anything else that is not one number is an error naming the fix."""
    value = to_python(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, list):
        raise TypeError(
            f"{who} needs one number, but {key!r} is {value}, one per ensemble member. "
            "Monitor one number: log a reduction of it from a hook listed before, e.g. "
            f"loop.logs['{key}_mean'] = statistics.mean(loop.logs['{key}']) in its "
            "on_validation_end (on_epoch_end for a train/ metric), and monitor "
            f"'{key}_mean'"
        )
    raise TypeError(f"{who} needs a number, but {key!r} is {value!r} ({type(value).__name__})")


class Validate(Hook):
    """Every ``every`` epochs (and in the final epoch) and/or every ``every_steps`` steps,
    run ``evaluate_step`` over ``data``, put the example-weighted means in ``loop.logs`` as
    ``"{prefix}/{name}"`` and fire ``on_validation_end``. Under torch.distributed the means
    are over the examples of all ranks (each may validate its own shard), the same on every
    rank (``across_ranks=False``: each rank's own). A step that both ``every_steps`` and the
    epoch's end call for is validated once."""

    def __init__(
        self,
        evaluate_step: Callable[[TrainState, Any], dict],
        data: Iterable,
        *,
        every: int | None = 1,
        every_steps: int | None = None,
        prefix: str = "val",
        across_ranks: bool = True,
    ):
        self.evaluate_step, self.data, self.prefix = evaluate_step, data, prefix
        self.across_ranks = across_ranks
        self.every = _every(every, "every")
        self.every_steps = _every(every_steps, "every_steps")
        self.last_step: int | None = None  # the step whose state it last validated

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = state["last_step"]

    def state_key(self) -> str:
        return self.prefix

    def on_fit_start(self, loop: Loop) -> None:
        if isinstance(self.data, Sized) and len(self.data) == 0:  # found now, not an epoch on
            raise ValueError(f"Validate(prefix={self.prefix!r}) got validation data with no batch")
        if loop.resumed_from is None:  # a fresh run: nothing of an earlier fit carries over
            self.last_step = None

    def on_step_end(self, loop: Loop) -> None:
        if _due_step(loop, self.every_steps):
            self.run(loop)

    def on_epoch_end(self, loop: Loop) -> None:
        # its numbers for this step are already in this epoch's logs
        if _due_epoch(loop, self.every) and self.last_step != loop.step:
            self.run(loop)

    def run(self, loop: Loop) -> None:
        results = evaluate(
            self.evaluate_step, loop.state, self.data, across_ranks=self.across_ranks
        )
        loop.logs.update({f"{self.prefix}/{k}": v for k, v in results.items()})
        self.last_step = loop.step
        loop.emit("on_validation_end")


class Checkpoint(Hook):
    """Save the state, the data position and every hook's state to
    ``directory/step-<step>`` (see :mod:`loopkit.checkpoint`): every ``every`` epochs,
    every ``every_steps`` steps, and at the end of the final epoch (also when a hook
    stopped training). It saves once every hook has seen the event, so its place in the
    hook list does not matter. ``fit(..., resume="latest")`` resumes from here.

    Retention (both policies at once, like orbax's latest + best): ``keep_last=N`` keeps the
    N newest; ``keep_best="val/loss"`` keeps the ``best_n`` with the lowest value of that
    log (``mode="max"``: highest). Only a value logged at the checkpoint's own step counts:
    a checkpoint saved when it was not logged, NaN, or last validated at an earlier step
    (a step save between validations) never counts as best. With either policy the newest
    checkpoint is always kept, and an old one is deleted only after the new one is
    committed; one whose deletion a crash interrupted is deleted by the run that resumes.
    Only checkpoints this hook (or the run it resumed) wrote are ever deleted; ``saved``
    and ``best`` say which it keeps. A fresh (not resumed) ``fit`` starts with no records.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        every: int | None = 1,
        every_steps: int | None = None,
        keep_last: int | None = None,
        keep_best: str | None = None,
        mode: str = "min",
        best_n: int = 1,
    ):
        if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
            raise ValueError(f"keep_last must be a positive integer or None, got {keep_last!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if not isinstance(best_n, int) or best_n < 1:
            raise ValueError(f"best_n must be a positive integer, got {best_n!r}")
        self.directory, self.keep_last, self.keep_best = Path(directory), keep_last, keep_best
        self.mode, self.best_n = mode, best_n
        self.every = _every(every, "every")
        self.every_steps = _every(every_steps, "every_steps")
        self.records: list[dict[str, Any]] = []  # {"name", "step", "value"}, oldest first
        self.pending: list[str] = []  # dropped by the policy, deleted once the new one is saved
        self.validated: dict[str, int] = {}  # log key -> step of the validation that logged it

    @property
    def saved(self) -> list[Path]:
        """The checkpoints this hook keeps, oldest first."""
        return [self.directory / r["name"] for r in self.records]

    @property
    def best(self) -> Path | None:
        """The best checkpoint by ``keep_best`` (None without one)."""
        ranked = self._ranked()
        return self.directory / ranked[0]["name"] if ranked else None

    def checkpoint_directory(self) -> Path:
        return self.directory

    def state_dict(self) -> dict[str, Any]:
        return {
            "records": [dict(r) for r in self.records],
            "pending": list(self.pending),
            "validated": dict(self.validated),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.records = [dict(r) for r in state["records"]]
        self.pending = list(state.get("pending", []))
        self.validated = dict(state.get("validated", {}))

    def path_for(self, step: int) -> Path:
        """Where a checkpoint of ``step`` goes: ``step-<step>``, or ``step-<step>-<k>`` when
        that step was saved before (the epoch's end right after a step save, or a resumed
        run redoing a step), so a committed checkpoint is never replaced in place."""
        base = self.directory / f"step-{step:09d}"
        taken = {r["name"] for r in self.records}
        path, k = base, 0
        while path.name in taken or (distributed.is_main() and path.exists()):
            k += 1
            path = base.with_name(f"{base.name}-{k}")
        return path

    def on_fit_start(self, loop: Loop) -> None:
        self._warned_missing = False
        if loop.resumed_from is None:
            self.records, self.pending, self.validated = [], [], {}
            self._warn_of_earlier_checkpoints()
        elif loop.resumed_from.parent.resolve() != self.directory.resolve():
            # resumed from another directory: the names it kept or meant to delete are
            # that directory's, not this one's
            self.records, self.pending = [], []
            self._warn_of_earlier_checkpoints()
        if distributed.is_main():
            checkpoint.clean_temporaries(self.directory)
        self._remove_pending()

    def _warn_of_earlier_checkpoints(self) -> None:
        """A fresh run writes beside the checkpoints an earlier run left in its directory,
        which this hook never deletes, and a later ``resume="latest"`` may pick theirs."""
        earlier = checkpoint.checkpoints(self.directory) if self.directory.is_dir() else []
        if earlier and distributed.is_main():
            warnings.warn(
                f"{self.directory} already holds {len(earlier)} checkpoint(s) of an earlier "
                f"run (newest {earlier[-1].name}); this run starts afresh beside them, and "
                "fit(..., resume='latest') would resume from whichever is newest. Use a new "
                "directory, delete them, or pass resume='latest' to continue that run.",
                stacklevel=4,
            )

    def on_epoch_start(self, loop: Loop) -> None:
        if loop.batch == 0:  # the epoch's logs start empty (not when resuming mid-epoch)
            self.validated = {}

    def on_validation_end(self, loop: Loop) -> None:
        self.validated.update({key: loop.step for key in loop.logs if _fresh(key, loop)})

    # Both decide once every hook has seen the event, so that the logs, a stop request and
    # the best value they read are final wherever this hook sits in the list.
    def on_step_end(self, loop: Loop) -> None:
        if self.every_steps is not None:
            loop.after_event(lambda: self._save_step(loop))

    def on_epoch_end(self, loop: Loop) -> None:
        epoch = loop.epoch
        loop.after_event(lambda: self._save_epoch(loop, epoch))

    def _save_step(self, loop: Loop) -> None:
        if _due_step(loop, self.every_steps):
            self.save(loop)

    def _save_epoch(self, loop: Loop, epoch: int) -> None:
        final = (loop.epochs is not None and epoch + 1 >= loop.epochs) or loop.steps_done
        due = self.every is not None and (epoch + 1) % self.every == 0
        if due or final or loop.should_stop:
            self.save(loop, epoch)

    def save(self, loop: Loop, epoch: int | None = None) -> Path:
        """Write a checkpoint of ``loop`` now, then delete what the retention policy (and a
        newer save of the same step) leaves out. Under data parallelism every rank calls it
        at once (it gathers each rank's data random state; rank 0 writes)."""
        epoch = loop.epoch if epoch is None else epoch
        path = self.path_for(loop.step)
        record = {"name": path.name, "step": loop.step, "value": self._value(loop)}
        records = [r for r in self.records if r["step"] != loop.step] + [record]
        keep = self._retained(records)
        # the checkpoint lists what it drops, so a run resuming from it finishes the job if
        # this one dies before deleting them
        self.pending += [r["name"] for r in self.records if r["name"] not in keep]
        self.records = [r for r in records if r["name"] in keep]
        meta = {"epoch": epoch, "step": loop.step, "logs": dict(loop.logs)}
        extra = {"loop": loop.state_dict(every_rank=True)}  # called on every rank
        if distributed.is_main():  # one writer; the state is the same on every rank
            checkpoint.save(path, loop.state, plain_data(meta, "metadata"), extra=extra)
        self._remove_pending()  # only once the new one is committed
        distributed.barrier()
        return path

    def _value(self, loop: Loop) -> float | None:
        """The ``keep_best`` value to rank a checkpoint of this step by: None unless it was
        logged at this step, and finite."""
        if self.keep_best is None:
            return None
        if not _monitored(self, "Checkpoint(keep_best=...)", self.keep_best, loop):
            return None
        if self.validated.get(self.keep_best, loop.step) != loop.step:
            return None  # validated at an earlier step: another state's value
        value = _number("Checkpoint(keep_best=...)", self.keep_best, loop.logs[self.keep_best])
        return value if math.isfinite(value) else None

    def _remove_pending(self) -> None:
        if distributed.is_main():
            for name in self.pending:
                checkpoint.remove(self.directory / name)
        self.pending = []

    def _ranked(self, records: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        scored = [
            r for r in (self.records if records is None else records) if r["value"] is not None
        ]
        sign = 1.0 if self.mode == "min" else -1.0
        return sorted(scored, key=lambda r: (sign * r["value"], r["step"]))

    def _retained(self, records: list[dict[str, Any]]) -> set[str]:
        if self.keep_last is None and self.keep_best is None:
            return {r["name"] for r in records}
        keep = {records[-1]["name"]}
        if self.keep_last is not None:
            keep |= {r["name"] for r in records[-self.keep_last :]}
        if self.keep_best is not None:
            keep |= {r["name"] for r in self._ranked(records)[: self.best_n]}
        return keep


def _format(value: float | list, spec: str) -> str:
    """A number, or the members' numbers of an ensemble (a list), formatted with ``spec``."""
    if isinstance(value, list):
        return " ".join(format(v, spec) for v in value)
    return format(value, spec)


class ProgressBar(Hook):
    """A tqdm bar per epoch showing steps/s, the loss and the lr (read from the device every
    ``refresh`` steps, so it costs one sync per ``refresh`` steps), and a summary line of
    ``loop.logs`` at each epoch's end. The bar is hidden when the output is not a terminal;
    the lines are not."""

    def __init__(self, *, refresh: int = 10, file: Any = None):
        self.refresh = _every(refresh, "refresh")
        self.file = file
        self.bar: Any = None

    def on_epoch_start(self, loop: Loop) -> None:
        total = "" if loop.epochs is None else f"/{loop.epochs}"
        self.bar = tqdm(
            total=loop.steps_per_epoch,
            initial=loop.batch,
            desc=f"epoch {loop.epoch + 1}{total}",
            unit="step",
            leave=False,
            disable=None if distributed.is_main() else True,  # None: off when not a TTY
            file=self.file or sys.stderr,
            dynamic_ncols=True,
        )

    def on_step_end(self, loop: Loop) -> None:
        self.bar.update(1)
        if loop.step % self.refresh or self.bar.disable:
            return
        shown = {}
        if "loss" in loop.metrics:
            shown["loss"] = _format(to_python(loop.metrics["loss"]), ".4f")
        lrs = optim.learning_rates(loop.state.opt_state)
        if lrs:
            shown["lr"] = _format(to_python(lrs[0]), ".3g")
        self.bar.set_postfix(shown, refresh=False)

    def close(self) -> None:  # (an epoch that an exception ended leaves its bar open)
        if self.bar is not None:
            self.bar.close()

    def on_epoch_end(self, loop: Loop) -> None:
        self.bar.close()
        if not distributed.is_main():
            return
        total = "" if loop.epochs is None else f"/{loop.epochs}"
        parts = [f"epoch {loop.epoch + 1}{total}", f"step {loop.step}"]
        for k, v in loop.logs.items():
            parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
        tqdm.write("  ".join(parts), file=self.file or sys.stdout)


class Every(Hook):
    """``hook`` with its step and epoch events thinned out: ``on_step_end`` every ``steps``
    steps (skipping undone steps), ``on_epoch_end`` every ``epochs`` epochs and in the final
    one. ``None`` passes that event every time; the other events, and the hook's state,
    pass through unchanged. ``Every(MyLogger(), steps=100)``."""

    def __init__(self, hook: Any, *, steps: int | None = None, epochs: int | None = None):
        self.hook = hook
        self.steps, self.epochs = _every(steps, "steps"), _every(epochs, "epochs")

    def _pass(self, event: str, loop: Loop) -> None:
        getattr(self.hook, event, lambda loop: None)(loop)

    def on_fit_start(self, loop: Loop) -> None:
        self._pass("on_fit_start", loop)

    def on_epoch_start(self, loop: Loop) -> None:
        self._pass("on_epoch_start", loop)

    def on_step_end(self, loop: Loop) -> None:
        if self.steps is None or _due_step(loop, self.steps):
            self._pass("on_step_end", loop)

    def on_epoch_end(self, loop: Loop) -> None:
        if self.epochs is None or _due_epoch(loop, self.epochs):
            self._pass("on_epoch_end", loop)

    def on_validation_end(self, loop: Loop) -> None:
        self._pass("on_validation_end", loop)

    def on_fit_end(self, loop: Loop) -> None:
        self._pass("on_fit_end", loop)

    def close(self) -> None:
        getattr(self.hook, "close", lambda: None)()

    def state_dict(self) -> Any:
        return getattr(self.hook, "state_dict", lambda: None)()

    def load_state_dict(self, state: Any) -> None:
        self.hook.load_state_dict(state)

    def checkpoint_directory(self) -> Path | None:
        return getattr(self.hook, "checkpoint_directory", lambda: None)()

    def state_key(self) -> str | None:
        return getattr(self.hook, "state_key", lambda: None)()


class LearningRateMonitor(Hook):
    """Put the learning rate of the last step in ``loop.logs`` at each epoch end: ``"lr"``,
    or ``"lr/0"``, ``"lr/1"``, ... with several parameter groups (list loggers after it).
    On an ensemble state each is a list, one lr per member, as its metrics are."""

    def on_epoch_end(self, loop: Loop) -> None:
        lrs = [to_python(lr) for lr in optim.learning_rates(loop.state.opt_state)]
        if len(lrs) == 1:
            loop.logs["lr"] = lrs[0]
        else:
            loop.logs.update({f"lr/{i}": lr for i, lr in enumerate(lrs)})


class Timer(Hook):
    """Put the epoch's wall time and throughput in ``loop.logs``: ``time/epoch_s`` and
    ``time/steps_per_s`` (the steps this run took in the epoch, over that time). The driver
    has already waited for the device when ``on_epoch_end`` runs; list the Timer first so
    validation is not counted."""

    def __init__(self) -> None:
        self.start = 0.0
        self.steps = 0

    def on_epoch_start(self, loop: Loop) -> None:
        self.start, self.steps = time.perf_counter(), 0

    def on_step_end(self, loop: Loop) -> None:
        self.steps += 1

    def on_epoch_end(self, loop: Loop) -> None:
        elapsed = time.perf_counter() - self.start
        loop.logs["time/epoch_s"] = elapsed
        if self.steps and elapsed > 0:
            loop.logs["time/steps_per_s"] = self.steps / elapsed


class NaNGuard(Hook):
    """Check each step's ``monitor`` metric (the loss) for NaN or infinity. On a non-finite
    value, with ``action=``:

    - ``"stop"``: undo that step (the state is the one before it) and stop training;
    - ``"skip"``: undo that step and go on with the next batch;
    - ``"raise"``: raise ``FloatingPointError``.

    Each case names the step, epoch and batch. Reading the metric costs one host sync per
    step. List it first, so later hooks see the undone step."""

    def __init__(self, monitor: str = "loss", *, action: str = "stop"):
        if action not in ("stop", "skip", "raise"):
            raise ValueError(f"action must be 'stop', 'skip' or 'raise', got {action!r}")
        self.monitor, self.action = monitor, action
        self.skipped: list[int] = []

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": list(self.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = list(state["skipped"])

    def on_fit_start(self, loop: Loop) -> None:
        if loop.donates and self.action != "raise":
            raise ValueError(
                f"NaNGuard(action={self.action!r}) undoes the step with a non-finite "
                f"{self.monitor}, which a donated step (donate=True, implied by "
                "mode='reduce-overhead') cannot: it writes the new state into the old one's "
                "tensors. Use action='raise', or build the step without donate."
            )
        if loop.resumed_from is None:
            self.skipped = []

    def on_step_end(self, loop: Loop) -> None:
        if self.monitor not in loop.metrics:
            raise KeyError(
                f"NaNGuard watches the metric {self.monitor!r}, which the step does not return "
                f"(it returns {sorted(loop.metrics)}): pass NaNGuard(monitor=...)"
            )
        if bool(torch.isfinite(torch.as_tensor(loop.metrics[self.monitor])).all()):
            return
        where = f"step {loop.step} (epoch {loop.epoch}, batch {loop.batch - 1})"
        message = f"{self.monitor} is {to_python(loop.metrics[self.monitor])} at {where}"
        if self.action == "raise":
            raise FloatingPointError(
                f"{message}. Lower the lr, clip gradients (clip_norm=...), or check the batch."
            )
        loop.skip_step()
        self.skipped.append(loop.step + 1)
        done = "skipped that step"
        if self.action == "stop":
            loop.should_stop = True
            done = "stopped training, keeping the state before it"
        if distributed.is_main():
            warnings.warn(f"{message}: {done}", stacklevel=2)


class _Monitor(Hook):
    """A hook that checks the log ``monitor`` once per new value: after each validation
    that logs it (not after another prefix's validation), and at an epoch end where it is
    logged but no validation checked it (``train/...`` metrics) — never twice at one step,
    wherever the hook is listed (a validation at the epoch's end, two Validate hooks). A
    monitor missing at an epoch's end is warned of as :func:`_monitored` says."""

    monitor: str
    checked: int | None = None  # the step of this epoch's last check

    def check(self, loop: Loop) -> None:
        raise NotImplementedError

    def state_key(self) -> str:
        return self.monitor

    def on_fit_start(self, loop: Loop) -> None:
        self._warned_missing = False

    def on_epoch_start(self, loop: Loop) -> None:
        if loop.batch == 0:  # not when resuming mid-epoch
            self.checked = None

    def on_validation_end(self, loop: Loop) -> None:
        fresh = self.checked != loop.step and _fresh(self.monitor, loop)
        if fresh and _monitored(self, type(self).__name__, self.monitor, loop, complete=False):
            self.check(loop)
            self.checked = loop.step

    def on_epoch_end(self, loop: Loop) -> None:
        if _monitored(self, type(self).__name__, self.monitor, loop) and self.checked is None:
            self.check(loop)
            self.checked = loop.step


class ReduceLROnPlateau(_Monitor):
    """Feed ``monitor`` (a key of ``loop.logs``) to a plateau schedule
    (:func:`loopkit.optim.schedules.reduce_on_plateau`) after each validation that logs it,
    and at each epoch end where it is logged but no validation fed it (``"train/loss"``:
    the epoch's mean, as torch's loop calling ``scheduler.step(epoch_loss)`` once per
    epoch). When the plateau reduces, reduce every lr in the optimizer state as torch's
    ``ReduceLROnPlateau`` does after ``scheduler.step(metric)``: each parameter group's lr
    becomes ``max(lr * factor, min_lr)`` unless that changes it by no more than ``eps``
    (the plateau's own ``factor``, ``min_lr`` and ``eps``; a ``min_lr`` per group must have
    one per group). ``loop.logs["lr"]`` is the plateau's lr. On an ensemble's per-member
    metric each member has its own plateau. A ``monitor`` that nothing logs (the default
    ``"val/loss"`` without a :class:`Validate`) or that is misspelt is warned of once.

    The optimizer must take a number lr or an injected one
    (:func:`loopkit.optim.inject_hyperparams`): a schedule would recompute its own lr at
    the next step, so the step after a validation checks that the lrs are still those set,
    and raises otherwise. A fresh (not resumed) ``fit`` starts the plateau afresh.
    """

    def __init__(self, plateau: Any, monitor: str = "val/loss"):
        self.plateau, self.monitor = plateau, monitor
        self.state: Any = None
        self.expected: list[torch.Tensor] | None = None  # the lrs set at the last check

    def state_dict(self) -> dict[str, Any] | None:
        if self.state is None:
            return None
        return {"plateau": self.state._asdict(), "checked": self.checked}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "plateau" not in state:  # a checkpoint from before the hook saved "checked"
            state = {"plateau": state, "checked": None}
        self.state = type(self.plateau.init(torch.device("cpu")))(**state["plateau"])
        self.checked = state["checked"]

    def on_fit_start(self, loop: Loop) -> None:
        super().on_fit_start(loop)
        if loop.resumed_from is None or self.state is None:
            self.state, self.checked = self.plateau.init(loop.state.step.device), None
        self.expected = None

    def check(self, loop: Loop) -> None:
        before, metric = self.state, loop.logs[self.monitor]
        self.state = self.plateau.update(before, metric)

        floors = iter(self._floors(len(optim.learning_rates(loop.state.opt_state))))

        def reduce(lr: torch.Tensor) -> torch.Tensor:
            # this group's lr through the same update: torch's _reduce_lr for one group
            probe = before._replace(lr=lr.to(before.lr.device, torch.float64))
            floor = next(floors)  # only a per-group floor is passed: a custom update may
            extra = {} if floor is None else {"floor": floor}  # take (state, metric) only
            return self.plateau.update(probe, metric, **extra).lr

        opt_state = optim.set_learning_rate(loop.state.opt_state, reduce)
        loop.state = loop.state.replace(opt_state=opt_state)
        self.expected = [lr.clone() for lr in optim.learning_rates(opt_state)]
        loop.logs["lr"] = to_python(self.state.lr)

    def _floors(self, groups: int) -> list[float | None]:
        """Each parameter group's ``min_lr``: the plateau's per-group tuple, which must
        have one per group (as torch requires), or its one floor for all (None)."""
        floors = getattr(self.plateau, "min_lr", None)
        if not isinstance(floors, tuple):
            return [None] * groups
        if len(floors) != groups:
            raise ValueError(f"expected {groups} min_lrs, got {len(floors)}")
        return list(floors)

    def on_step_end(self, loop: Loop) -> None:
        if self.expected is None or loop.step_skipped:
            return
        expected, self.expected = self.expected, None
        now = optim.learning_rates(loop.state.opt_state)
        if not all(torch.equal(a, b.to(a.device)) for a, b in zip(now, expected, strict=True)):
            raise ValueError(
                "ReduceLROnPlateau set the learning rates to "
                f"{[to_python(lr) for lr in expected]}, but the next step used "
                f"{[to_python(lr) for lr in now]}: the optimizer's lr is a schedule (or a "
                "tensor), which it reads anew every step. Build it with a number lr "
                "(optim.sgd(lr=0.1)) or an injected one (optim.inject_hyperparams(optim.sgd)"
                "(lr=0.1))"
            )


class EarlyStopping(_Monitor):
    """Stop when ``monitor`` (a key of ``loop.logs``, e.g. ``"val/loss"``) has not improved
    for ``patience`` consecutive checks. A check happens after each validation that logs
    the metric, and at each epoch end where it is logged but no validation checked it
    (``train/...`` metrics); at most one per step.
    Improvement means ``value < best - min_delta`` (``mode="min"``) or
    ``value > best + min_delta`` (``"max"``); a NaN or infinite value never improves.
    A ``monitor`` that is misspelt or that nothing logs is warned of once; one that is not
    one number (an ensemble's per-member list) is an error. A fresh (not resumed) ``fit``
    starts counting afresh."""

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

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait, "checked": self.checked}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.wait, self.checked = state["best"], state["wait"], state["checked"]
        if isinstance(self.checked, bool):  # checkpoints before the step was kept
            self.checked = -1 if self.checked else None  # -1: checked at an earlier step

    def on_fit_start(self, loop: Loop) -> None:
        super().on_fit_start(loop)
        if loop.resumed_from is None:
            self.best, self.wait, self.checked = None, 0, None

    def improved(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def check(self, loop: Loop) -> None:
        value = _number("EarlyStopping", self.monitor, loop.logs[self.monitor])
        if self.improved(value):
            self.best, self.wait = value, 0
        else:
            self.wait += 1
            if self.wait >= self.patience:
                loop.should_stop = True


def _records_before(records: list[dict], epoch: int) -> list[dict]:
    return [r for r in records if int(r["epoch"]) < epoch]


def _unwrapped(hook: Any) -> Any:
    """The hook an :class:`Every` wraps (through any number of them), or ``hook``."""
    while isinstance(hook, Every):
        hook = hook.hook
    return hook


class _FileLogger(Hook):
    """Writes one record per epoch (``epoch``, ``step`` and ``loop.logs``) to a file in
    ``directory``, flushed at once so a crash loses nothing already written. A new run
    starts a new file (``append=True`` keeps what is there, as Keras' CSVLogger). When
    ``fit`` resumes, the records of the epochs the resumed run will redo are dropped (only
    the run's own: the records an ``append=True`` run found in the file stay), so the file
    ends up as an uninterrupted run's. A last line a crash cut short (no newline) is not a
    record: an ``append=True`` or resumed run drops it before writing. ``every=N`` writes
    every N epochs (and the final one). ``filename`` defaults to the subclass's
    ``default_filename``."""

    default_filename: str

    def __init__(
        self,
        directory: str | os.PathLike,
        filename: str | None = None,
        *,
        append: bool = False,
        every: int = 1,
    ):
        self.path = Path(directory) / (filename or self.default_filename)
        self.append, self.every = append, _every(every, "every")
        self.kept = 0  # records in the file before this run's first one (earlier runs')

    def state_dict(self) -> dict[str, Any]:
        return {"kept": self.kept}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kept = state["kept"]

    def on_fit_start(self, loop: Loop) -> None:
        others = [h for h in map(_unwrapped, loop.hooks) if h is not self]
        if any(isinstance(h, _FileLogger) and h.path.resolve() == self.path.resolve()
               for h in others):  # fmt: skip
            raise ValueError(
                f"two loggers write {self.path}: each record would be written twice. Give "
                "each its own directory or filename"
            )
        if not distributed.is_main():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if loop.resumed_from is not None:
            if self.path.exists():
                self._drop_cut_line()
                records = self.read()
                own = _records_before(records[self.kept :], loop.epoch)
                self.rewrite(records[: self.kept] + own)
        elif self.append and self.path.exists():
            self._drop_cut_line()
            self.kept = len(self.read())
        else:
            self.path.unlink(missing_ok=True)
            self.kept = 0

    def on_epoch_end(self, loop: Loop) -> None:
        if not (distributed.is_main() and _due_epoch(loop, self.every)):
            return
        record = {"epoch": loop.epoch, "step": loop.step}
        record.update({k: to_python(v) for k, v in loop.logs.items()})
        self.write(record)

    def read(self) -> list[dict]:
        raise NotImplementedError

    def rewrite(self, records: list[dict]) -> None:
        raise NotImplementedError

    def write(self, record: dict) -> None:
        raise NotImplementedError

    def _drop_cut_line(self) -> None:
        """Cut off a last line that a crash left without its newline (each record is written
        with its own), so this run's first record starts a line of its own."""
        with open(self.path, "rb+") as f:
            text = f.read()
            if text and not text.endswith(b"\n"):
                f.truncate(text.rfind(b"\n") + 1)

    def _replace(self, text: str) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


class JSONLLogger(_FileLogger):
    """``directory/metrics.jsonl``: one JSON object per epoch."""

    default_filename = "metrics.jsonl"

    def read(self) -> list[dict]:
        lines = self.path.read_text().splitlines()
        # a line cut short by a crash is not a record
        return [json.loads(line) for line in lines if line.endswith("}")]

    def rewrite(self, records: list[dict]) -> None:
        self._replace("".join(json.dumps(r) + "\n" for r in records))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class CSVLogger(_FileLogger):
    """``directory/metrics.csv``: one row per epoch. When a later epoch logs a new column
    (validation every few epochs), the file is rewritten with the wider header."""

    default_filename = "metrics.csv"

    def read(self) -> list[dict]:
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def rewrite(self, records: list[dict]) -> None:
        columns = list(dict.fromkeys(k for r in records for k in r))
        text = io.StringIO()
        writer = csv.DictWriter(text, columns)
        writer.writeheader()
        writer.writerows(records)
        self._replace(text.getvalue())

    def write(self, record: dict) -> None:
        rows = self.read() if self.path.exists() else []
        columns = list(dict.fromkeys([*(rows[0].keys() if rows else []), *record]))
        if rows and list(rows[0].keys()) == columns:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, columns).writerow(record)
        else:
            self.rewrite([*rows, record])


def _scalars(key: str, value: Any) -> list[tuple[str, float]]:
    """TensorBoard's scalars of one log: a number (a bool as 0/1) under ``key``, a list
    (an ensemble's per-member values) as ``key/0``, ``key/1``, ...; anything else none."""
    if isinstance(value, bool | int | float):
        return [(key, float(value))]
    if isinstance(value, list):
        return [pair for i, v in enumerate(value) for pair in _scalars(f"{key}/{i}", v)]
    return []


class TensorBoardLogger(Hook):
    """Write ``loop.logs`` as TensorBoard scalars at each epoch end (x axis: the step), with
    ``torch.utils.tensorboard`` (install the ``tensorboard`` extra). A resumed run purges
    the events its interrupted predecessor wrote after the checkpoint."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.writer: Any = None

    def on_fit_start(self, loop: Loop) -> None:
        if not distributed.is_main():
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError(
                "TensorBoardLogger needs the tensorboard package: "
                "pip install 'loopkit[tensorboard]'"
            ) from e
        # events are written at epoch ends: those of steps up to the checkpoint's stay,
        # unless it left its epoch open, whose end (maybe at this very step) is redone
        purge = loop.step + (0 if loop.batch > 0 else 1) if loop.resuming else None
        self.writer = SummaryWriter(str(self.directory), purge_step=purge)

    def on_epoch_end(self, loop: Loop) -> None:
        if self.writer is None:
            return
        for k, v in loop.logs.items():
            for tag, x in _scalars(k, to_python(v)):
                self.writer.add_scalar(tag, x, global_step=loop.step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
