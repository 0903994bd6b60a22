"""The epoch driver: ``fit`` iterates batches, calls the step and lets hooks do the rest.

Events, in the order they happen: ``on_fit_start``; per epoch ``on_epoch_start``, then
``on_step_end`` after each step, then ``on_epoch_end``; ``on_validation_end`` whenever a
:class:`~loopkit.hooks.Validate` has put fresh ``val/...`` numbers in the logs; and
``on_fit_end``. Each event calls the method of that name on every hook that has it, in list
order, with the :class:`Loop`. A hook stops training by setting ``loop.should_stop = True``
(the epoch is then closed as usual: its logs, validation and checkpoint still happen).

Step metrics stay on the device: the driver adds them up per epoch with tensor ops (in
float64, float32 on MPS, whatever the metric's dtype, so bf16/fp16 metrics do not lose
their sum) and reduces them to floats once, at the end of the epoch
(``loop.logs["train/<name>"]``: the mean, rounded to the metric's dtype), so ``fit``
itself never waits for the device inside an epoch.

Under ``torch.distributed`` with a data-parallel step
(:func:`loopkit.distributed.train_step`), every rank runs ``fit`` with the same hooks:
``fit`` broadcasts rank 0's state at the start, only rank 0 reads a checkpoint to resume
from, and the hooks that write files or print do so on rank 0 only.

Resuming: a checkpoint written by :class:`~loopkit.hooks.Checkpoint` holds the state, the
data position (epoch, batches taken in it), the random state the data draws from
(:func:`loopkit.data.random_state`, at the start of the open pass and at the checkpoint),
the epoch's partial metric sums, the logs and history, and every hook's ``state_dict()``.
``fit(..., resume=...)`` restores all of it and replays the data from that position, so a
resumed run is bitwise identical to one never interrupted.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from loopkit import checkpoint, distributed
from loopkit import data as data_lib
from loopkit.checkpoint import step_of
from loopkit.state import TrainState
from loopkit.tree import leading_dim

Metrics = dict[str, torch.Tensor]


class Hook:
    """Base class for hooks: override the events you need; all default to doing nothing.

    A hook with state that must survive a resume (counters, best values) returns it from
    ``state_dict()`` (tensors, numbers, strings, lists, dicts) and takes it back in
    ``load_state_dict()``."""

    def on_fit_start(self, loop: Loop) -> None: ...
    def on_epoch_start(self, loop: Loop) -> None: ...
    def on_step_end(self, loop: Loop) -> None: ...
    def on_epoch_end(self, loop: Loop) -> None: ...
    def on_validation_end(self, loop: Loop) -> None: ...
    def on_fit_end(self, loop: Loop) -> None: ...

    def close(self) -> None:
        """Release what the hook holds open (a progress bar, a writer). ``fit`` calls it once
        as it returns or raises: after ``on_fit_end``, or in place of it when an exception
        (in a step, a hook, the data) ends the fit."""

    def state_dict(self) -> Any:
        return None

    def load_state_dict(self, state: Any) -> None: ...

    def state_key(self) -> str | None:
        """What tells this hook's state apart from that of another hook of its class in a
        checkpoint (a monitor, a prefix), or None to go by its place among them: a resumed
        run with a hook added before another of its class then gives each its own state."""
        return None

    def checkpoint_directory(self) -> Path | None:
        """Where this hook writes checkpoints (``fit(resume="latest")`` looks there)."""
        return None


@dataclasses.dataclass
class Loop:
    """What hooks see: the current state and where training is.

    ``step`` is the number of steps taken (a host int mirroring ``state.step``), ``epoch``
    the current epoch (from 0) and ``batch`` the batches drawn in it so far; ``metrics``
    are the last step's metrics (on device), ``logs`` the floats reduced so far this epoch
    (``train/...``, ``val/...``) and ``history`` one ``logs`` dict per finished epoch.
    ``resuming`` is True when ``fit`` was asked to resume, and ``resumed_from`` the
    checkpoint it resumed from (None when there was none yet). ``donates`` is True when the
    step writes its new state into the old one's tensors (``donate=True``, implied by
    ``mode="reduce-overhead"``): such a step cannot be undone (:meth:`skip_step`).
    """

    state: TrainState
    hooks: Sequence[Hook]
    epochs: int | None
    steps_per_epoch: int | None
    max_steps: int | None = None
    step: int = 0
    epoch: int = 0
    batch: int = 0
    metrics: Metrics = dataclasses.field(default_factory=dict)
    logs: dict[str, Any] = dataclasses.field(default_factory=dict)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    should_stop: bool = False
    resuming: bool = False
    resumed_from: Path | None = None
    donates: bool = False
    sums: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    sum_dtypes: dict[str, torch.dtype] = dataclasses.field(default_factory=dict)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)  # steps per metric
    taken: int = 0
    _data: Any = None
    _data_parallel: bool = False
    _pass_random: dict[str, Any] | None = None  # the random state the open pass started from
    _resumed_random: dict[str, Any] | None = None  # a checkpoint's, until its pass reopens
    _after: list[Callable[[], None]] = dataclasses.field(default_factory=list)
    _previous: TrainState | None = None
    _skipped: bool = False

    @property
    def step_skipped(self) -> bool:
        """True from the moment a hook undid the current step (:meth:`skip_step`)."""
        return self._skipped

    @property
    def steps_done(self) -> bool:
        return self.max_steps is not None and self.step >= self.max_steps

    @property
    def final_epoch(self) -> bool:
        """True in the last epoch: the last of ``epochs``, the one reaching ``max_steps``,
        or one a hook asked to stop."""
        last = self.epochs is not None and self.epoch + 1 >= self.epochs
        return last or self.steps_done or self.should_stop

    def emit(self, event: str) -> None:
        """Call ``event`` on every hook, in list order."""
        for hook in self.hooks:
            getattr(hook, event, lambda loop: None)(self)

    def skip_step(self) -> None:
        """Undo the step just taken (from ``on_step_end``): the state goes back to what it
        was before it and its metrics are left out of the epoch's means. The batch stays
        consumed."""
        if self._previous is None:
            raise RuntimeError("skip_step() can only be called from on_step_end")
        if self.donates:
            raise RuntimeError(_NO_UNDO)
        if not self._skipped:
            self.state, self.step, self._skipped = self._previous, self.step - 1, True

    def after_event(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once every hook has seen the current step or epoch end (a checkpoint
        then captures what all hooks did, wherever it sits in the list)."""
        self._after.append(fn)

    def _run_after(self) -> None:
        pending, self._after = self._after, []
        for fn in pending:
            fn()

    def _hook_keys(self, labelled: bool = True) -> list[str]:
        """Each hook's key in a checkpoint: its class name, with its ``state_key()`` in
        brackets where it has one (``labelled``; checkpoints before keys had labels used
        none), and ``#i`` for the i-th repeat of the same."""
        seen: dict[str, int] = {}
        keys = []
        for hook in self.hooks:
            name = type(hook).__name__
            label = getattr(hook, "state_key", lambda: None)() if labelled else None
            name = name if label is None else f"{name}[{label}]"
            keys.append(f"{name}#{seen.get(name, 0)}" if name in seen else name)
            seen[name] = seen.get(name, 0) + 1
        return keys

    def _random_states(self, every_rank: bool) -> list[dict[str, Any]]:
        """The random state of the data now and at the start of the open pass (a pass
        resumed mid-way replays its start from it): this rank's, or with ``every_rank``
        under data parallelism every rank's, since each draws its own augmentation."""
        mine = {
            "now": data_lib.random_state(self._data),
            "pass": self._pass_random if self.batch else None,
        }
        return distributed.all_gather_object(mine) if every_rank else [mine]

    def state_dict(self, every_rank: bool = False) -> dict[str, Any]:
        """Everything but the TrainState that a resumed run needs to carry on exactly.

        The data's random state is this process's; with ``every_rank=True`` under data
        parallelism it is every rank's, gathered: a collective, which every rank must call
        at once (:class:`~loopkit.hooks.Checkpoint` does). Without it, each rank of a
        resumed run takes this process's random state."""
        hooks = {}
        for key, hook in zip(self._hook_keys(), self.hooks, strict=True):
            if (s := getattr(hook, "state_dict", lambda: None)()) is not None:
                hooks[key] = _checkpointable(s, f"{key}.state_dict()")
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "taken": self.taken,
            "sums": dict(self.sums),
            "sum_dtypes": dict(self.sum_dtypes),
            "counts": dict(self.counts),
            "logs": plain_data(self.logs, "loop.logs"),
            "history": plain_data(self.history, "loop.history"),
            "stopped": self.should_stop,
            "world_size": distributed.world_size(),
            "random": self._random_states(every_rank and self._data_parallel),
            "hooks": hooks,
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.epoch, self.batch, self.taken = saved["epoch"], saved["batch"], saved["taken"]
        self.sums, self.logs, self.history = saved["sums"], saved["logs"], saved["history"]
        # checkpoints before float64 sums kept them in the metric's dtype
        self.sum_dtypes = saved.get("sum_dtypes", {k: v.dtype for k, v in self.sums.items()})
        # checkpoints before per-metric counts divided every sum by the steps taken
        self.counts = saved.get("counts", {k: self.taken for k in self.sums})
        self.should_stop = saved["stopped"]
        saved_hooks = saved["hooks"]
        labelled = any("[" in key for key in saved_hooks) or not saved_hooks
        for key, hook in zip(self._hook_keys(labelled), self.hooks, strict=True):
            if key in saved_hooks:
                hook.load_state_dict(saved_hooks[key])
        if randoms := saved.get("random"):  # checkpoints before it had none
            self._resumed_random = randoms[distributed.rank() if len(randoms) > 1 else 0]
            data_lib.set_random_state(self._data, self._resumed_random["now"])


def plain_data(value: Any, where: str) -> Any:
    """``value`` with tensors and numpy numbers turned into Python numbers, so it pickles
    into a ``weights_only`` checkpoint; anything else is an error naming ``where``."""
    if isinstance(value, dict):
        return {k: plain_data(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain_data(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, torch.Tensor) or hasattr(value, "item"):
        return to_python(torch.as_tensor(value))
    raise TypeError(
        f"{where} holds a {type(value).__name__}, which a checkpoint cannot store: log "
        "numbers, strings, lists or dicts"
    )


def _checkpointable(value: Any, where: str) -> Any:
    """``value`` unchanged if ``torch.load(weights_only=True)`` can load it back (tensors,
    numbers, strings, None and dicts/lists/tuples of them); otherwise a TypeError naming
    ``where``, raised before anything is written."""
    if isinstance(value, dict):
        for k, v in value.items():
            _checkpointable(k, f"{where} key")
            _checkpointable(v, f"{where}[{k!r}]")
    elif isinstance(value, list | tuple) and type(value) in (list, tuple):
        for i, v in enumerate(value):
            _checkpointable(v, f"{where}[{i}]")
    elif not (value is None or isinstance(value, bool | int | float | str | torch.Tensor)):
        raise TypeError(
            f"{where} holds a {type(value).__name__}, which a checkpoint cannot store (it "
            "loads with weights_only=True): return tensors, numbers, strings, lists or dicts"
        )
    return value


def to_python(value: Any) -> Any:
    """A metric tensor as a float (scalar) or nested list, a NumPy scalar or array as a
    Python number or list; other values unchanged."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return value.tolist()
    return value


def add_metrics(
    sums: dict[str, torch.Tensor],
    dtypes: dict[str, torch.dtype],
    metrics: Metrics,
    weight: int = 1,
    counts: dict[str, int] | None = None,
) -> None:
    """Add ``weight * value`` of each metric to ``sums``, on the metric's device in float64
    (float32 on MPS, which has no float64), so a long sum of bf16/fp16 values neither
    rounds away nor overflows; ``dtypes`` notes each metric's own dtype, ``counts`` the
    weight each metric has had (a metric some steps do not return is averaged over those
    that do). A sum in another dtype or on another device (one loaded from a checkpoint)
    is moved up to that."""
    for k, v in metrics.items():
        if counts is not None:
            counts[k] = counts.get(k, 0) + weight
        v = torch.as_tensor(v)
        dtypes.setdefault(k, v.dtype)
        wide = torch.float32 if v.device.type == "mps" else torch.float64
        total = sums.get(k)
        if total is None:
            total = torch.zeros(v.shape, dtype=wide, device=v.device)
        elif total.dtype != wide or total.device != v.device:
            total = total.to(v.device, wide)
        sums[k] = torch.add(total, v, alpha=weight)  # one kernel: v is promoted to `wide`


def means(
    sums: dict[str, torch.Tensor], dtypes: dict[str, torch.dtype], counts: dict[str, int]
) -> dict[str, Any]:
    """Each of ``sums`` over its count as Python numbers, rounded to its metric's dtype
    (a float metric's; an integer or bool metric's mean stays in the sum's dtype)."""
    out = {}
    for k, v in sums.items():
        mean = v / counts[k]
        dtype = dtypes.get(k, mean.dtype)
        out[k] = to_python(mean.to(dtype) if dtype.is_floating_point else mean)
    return out


def evaluate(
    evaluate_step: Callable[[TrainState, Any], Metrics],
    state: TrainState,
    data: Iterable,
    *,
    across_ranks: bool = False,
) -> dict[str, Any]:
    """Run ``evaluate_step`` over ``data`` and average each metric over examples (a batch of
    n examples weighs n, so an uneven last batch counts for what it holds). One host sync.
    The sums are kept in float64 and each mean rounded to its metric's dtype (see
    :func:`add_metrics`).

    ``across_ranks=True`` under torch.distributed (every rank must call it): the averages
    are over the examples of all ranks, the same number on every rank."""
    sums: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    counts: dict[str, int] = {}
    count = 0
    for batch in data:
        n = leading_dim(batch)
        add_metrics(sums, dtypes, _checked_metrics(evaluate_step(state, batch)), n, counts)
        count += n
    if across_ranks and distributed.world_size() > 1:
        local = ({k: v.detach().cpu() for k, v in sums.items()}, dtypes, counts, count)
        sums, counts, count = {}, {}, 0
        # in rank order, and with every rank's dtypes (a rank without batches has none):
        # the same sums and roundings, so the same numbers, on every rank
        for rank_sums, rank_dtypes, rank_counts, rank_count in distributed.all_gather_object(local):
            for k, v in rank_sums.items():
                sums[k] = sums[k] + v if k in sums else v
                counts[k] = counts.get(k, 0) + rank_counts[k]
            dtypes = {**rank_dtypes, **dtypes}
            count += rank_count
    if count == 0:
        raise ValueError("evaluate got no batches: the validation data is empty")
    return means(sums, dtypes, counts)


def _checked_metrics(metrics: Any) -> Metrics:
    if not isinstance(metrics, Mapping):
        raise TypeError(
            f"evaluate's step must return a dict of metrics, got a {type(metrics).__name__} "
            "(an eval step, lk.eval_step(model, loss_fn), returns one)"
        )
    return metrics


def _check_reiterable(data: Iterable, epochs: int | None) -> None:
    # only an iterator is asked for iter(): a DataLoader's would draw its seeds and start
    # its workers, changing the random state of the run
    if (epochs is None or epochs > 1) and isinstance(data, Iterator) and iter(data) is data:
        raise TypeError(
            f"fit(epochs={epochs}) needs data it can iterate once per epoch, but got a one-shot "
            f"iterator ({type(data).__name__}). Pass a list, a DataLoader, a loopkit.data.Batches, "
            "a loopkit.data.Reiterable(make), or an object whose __iter__ starts a fresh pass."
        )


def _check_count(value: Any, name: str, least: int) -> int | None:
    """``value`` as an int (any integral number: ``numpy.int64`` too), or None."""
    if value is None:
        return None
    try:
        count = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        count = None
    if count is None or count < least:
        raise ValueError(f"{name} must be an integer >= {least} or None, got {value!r}")
    return count


def _check_data(data: Any, epochs: int | None, steps_per_epoch: int | None) -> None:
    if data is None or not isinstance(data, Iterable):
        raise TypeError(
            f"fit needs data: an iterable of batches (a list, a DataLoader, "
            f"loopkit.data.Batches, ...), got {type(data).__name__}"
        )
    if (epochs is None or epochs > 0) and _epoch_length(data, steps_per_epoch) == 0:
        raise ValueError(_no_batches("the data has length 0"))
    _check_reiterable(data, epochs)


def _no_batches(what: str) -> str:
    return (
        f"fit got data with no batches ({what}): it would train nothing, or never reach "
        "max_steps. Give every pass at least one batch; a Reiterable must make a fresh "
        "iterator on each call (Reiterable(lambda: iter(batches)), not a lambda returning "
        "one generator object, which is exhausted after the first pass)"
    )


_EVENTS = ("on_fit_start", "on_epoch_start", "on_step_end", "on_epoch_end", "on_fit_end")


def _check_hooks(hooks: Any) -> list[Hook]:
    """``hooks`` as a list, each an object with at least one of the events' methods."""
    if (
        any(hasattr(hooks, e) for e in _EVENTS)
        or not isinstance(hooks, Iterable)
        or isinstance(hooks, str | Mapping)
    ):
        raise TypeError(
            f"hooks must be a list of hooks, got a {type(hooks).__name__}: pass hooks=[hook]"
        )
    hooks = list(hooks)
    for i, hook in enumerate(hooks):
        if isinstance(hook, type):
            raise TypeError(
                f"hooks[{i}] is the class {hook.__name__}, not a hook: pass an instance, "
                f"{hook.__name__}(...)"
            )
        if not any(hasattr(hook, e) for e in (*_EVENTS, "on_validation_end")):
            raise TypeError(
                f"hooks[{i}] is a {type(hook).__name__} ({hook!r:.60}), not a hook: a hook is "
                "a loopkit.Hook (or an object with on_fit_start, on_step_end, ... methods)"
            )
    return hooks


def _epoch_length(data: Iterable, steps_per_epoch: int | None) -> int | None:
    try:
        length = len(data)  # type: ignore[arg-type]
    except TypeError:
        return steps_per_epoch
    return length if steps_per_epoch is None else min(length, steps_per_epoch)


def _checkpoint_directories(hooks: Sequence[Hook]) -> set[Path]:
    return {
        d for h in hooks if (d := getattr(h, "checkpoint_directory", lambda: None)()) is not None
    }


def _resume_candidates(resume: str | os.PathLike, hooks: Sequence[Hook]) -> Path:
    """The directory (or checkpoint) ``resume`` names."""
    if resume != "latest":
        if not isinstance(resume, str | os.PathLike) or not os.fspath(resume):
            raise TypeError(
                f'resume must be "latest", a checkpoint directory or a checkpoint path, got '
                f"{resume!r} (None or False: start afresh)"
            )
        return Path(resume)
    directories = _checkpoint_directories(hooks)
    if len(directories) != 1:
        found = "none" if not directories else ", ".join(map(str, sorted(directories)))
        raise ValueError(
            'fit(resume="latest") looks in the directory of the Checkpoint hook, but the hooks '
            f"have {found}: pass resume=<checkpoint directory or checkpoint path> instead"
        )
    return directories.pop()


def _load_resume(resume: str | os.PathLike, hooks: Sequence[Hook]):
    """``(path, contents)`` of the checkpoint to resume from, or None to start afresh."""
    where = _resume_candidates(resume, hooks)
    if (where / checkpoint.STATE_FILE).exists() or (where / checkpoint.MARKER).exists():
        return where, checkpoint.read(where)  # one named checkpoint: no fallback
    if resume != "latest" and not where.is_dir():
        raise FileNotFoundError(f"fit(resume={str(resume)!r}): no such checkpoint or directory")
    checkpoint.clean_temporaries(where)  # puts back a checkpoint a killed save moved aside
    found = checkpoint.read_latest(where)
    if found is None and resume != "latest":  # named: its absence is not a fresh start
        raise FileNotFoundError(
            f"fit(resume={str(resume)!r}): the directory holds no committed checkpoint. Name "
            "the Checkpoint hook's directory (or a checkpoint in it), or pass "
            "resume='latest' to resume from that hook's directory if it has one"
        )
    return found


def _read_resume(loop: Loop, resume: str | os.PathLike) -> tuple[Path, dict] | None:
    """Find and read the checkpoint to resume from, restore its state into ``loop.state``
    and return ``(path, loop state dict)``; None to start afresh."""
    found = _load_resume(resume, loop.hooks)
    if found is None:
        return None
    path, contents = found
    if "loop" not in contents["extra"]:
        raise checkpoint.CheckpointError(
            f"{path} holds a state but no training position (it was not written by "
            "hooks.Checkpoint): load it with loopkit.checkpoint.load and call fit without resume"
        )
    written_by = contents["extra"]["loop"].get("world_size", 1)
    if written_by != distributed.world_size():
        raise distributed.DistributedError(
            f"checkpoint {path} was written by a run of {written_by} process(es), this run "
            f"has {distributed.world_size()}: the data position and each rank's shard of the "
            "data depend on it. Resume with the same number of processes, or load only the "
            "state (loopkit.checkpoint.load(path, like=state)) and start a new fit without "
            "resume."
        )
    loop.state = checkpoint.restore(contents["state"], loop.state, f"checkpoint {path}")
    return path, contents["extra"]["loop"]


def _set_aside_newer(resumed: Path, step: int, hooks: Sequence[Hook]) -> None:
    """Resuming from a named checkpoint older than others in a Checkpoint hook's directory
    rolls the run back: those newer ones belong to the run that went on from it. They are
    moved into a subdirectory (nothing is deleted), or ``resume="latest"`` would later pick
    them over this run's own. Newer: listed after ``resumed`` in its own directory, of a
    later step elsewhere."""
    for directory in sorted(_checkpoint_directories(hooks)):
        found = checkpoint.checkpoints(directory)
        same = [i for i, p in enumerate(found) if p.resolve() == resumed.resolve()]
        newer = found[same[0] + 1 :] if same else [p for p in found if step_of(p) > step]
        if not newer:
            continue
        aside, k = directory / f"rolled-back-to-step-{step:09d}", 0
        while aside.exists():
            k += 1
            aside = directory / f"rolled-back-to-step-{step:09d}-{k}"
        aside.mkdir()
        for p in newer:
            os.rename(p, aside / p.name)
        warnings.warn(
            f"resumed from {resumed}, older than {len(newer)} checkpoint(s) in {directory} "
            f"(newest {newer[-1].name}) written by the run that went on from it: moved them "
            f"to {aside}, so that resume='latest' continues this run, not that one. Move them "
            "back to return to it.",
            stacklevel=4,
        )


def _resume(loop: Loop, resume: str | os.PathLike, data_parallel: bool) -> None:
    """Restore the state and position to resume from. Under data parallelism only rank 0
    reads the checkpoint (no shared filesystem needed); it sends the position and hook
    states to the others, and ``fit`` then broadcasts its state."""
    if not data_parallel:
        found = _read_resume(loop, resume)
    else:
        try:
            found = _read_resume(loop, resume) if distributed.is_main() else None
            error = None
        except Exception as e:  # every rank must learn that rank 0 failed, or they hang
            found, error = None, e
        shared = distributed.broadcast_object(
            (found, None if error is None else f"{type(error).__name__}: {error}")
        )
        if error is not None:
            raise error
        found, message = shared
        if message is not None:
            raise distributed.DistributedError(f"rank 0 could not resume: {message}")
    if found is not None:
        path, saved = found
        loop.load_state_dict(saved)
        loop.resumed_from = path
        named = resume != "latest" and Path(resume) == path  # a checkpoint, not a directory
        if named and distributed.is_main():  # once all of it loaded
            _set_aside_newer(path, int(loop.state.step), loop.hooks)


_NO_UNDO = (
    "a donated step (donate=True, implied by mode='reduce-overhead') cannot be undone: it "
    "wrote the new state into the old state's tensors. Build the step without donate to "
    "undo steps (NaNGuard's 'skip' and 'stop')."
)


def _donates(step: Any) -> bool:
    """Whether ``step`` (or a function it wraps) writes its new state into the old one's
    tensors (:func:`loopkit.compile` with ``donate=True``)."""
    while step is not None:
        if getattr(step, "donate", False) is True:
            return True
        step = getattr(step, "__wrapped__", None) or getattr(step, "func", None)  # (partial)
    return False


def _is_data_parallel(step: Any) -> bool:
    """Whether ``step`` (or a function it wraps, ``functools.wraps``-style) was built by
    :func:`loopkit.distributed.train_step`."""
    while step is not None:
        if getattr(step, "data_parallel", False):
            return True
        step = getattr(step, "__wrapped__", None)
    return False


def _sharded(data: Iterable) -> bool:
    """Whether ``data`` serves one rank's share: ``Batches(..., world_size>1)`` or a
    ``DataLoader`` over a ``DistributedSampler`` of several replicas."""
    if isinstance(data, data_lib.Batches):
        return data.world_size > 1
    sampler = data_lib._sampler(data) if isinstance(data, torch.utils.data.DataLoader) else None
    return getattr(sampler, "num_replicas", 1) > 1


def _check_ranks_agree(data: Iterable, steps_per_epoch, epochs, max_steps) -> None:
    """Every rank must take as many steps per epoch, or the collectives inside the step
    would pair up wrongly (or wait forever)."""
    mine = (_epoch_length(data, steps_per_epoch), epochs, max_steps)
    every = distributed.all_gather_object(mine)
    if any(theirs != every[0] for theirs in every):
        shown = ", ".join(f"rank {r}: {e}" for r, e in enumerate(every))
        raise distributed.DistributedError(
            "the ranks disagree on (batches per epoch, epochs, max_steps): "
            f"{shown}. Give every rank an equal share of the data, e.g. "
            "loopkit.data.Batches(..., rank=r, world_size=w), and the same limits."
        )


def fit(
    step: Callable[[TrainState, Any], tuple[TrainState, Metrics]],
    state: TrainState,
    data: Iterable,
    *,
    epochs: int | None = None,
    max_steps: int | None = None,
    steps_per_epoch: int | None = None,
    hooks: Sequence[Hook] = (),
    resume: str | os.PathLike | bool | None = None,
    data_parallel: bool | None = None,
) -> TrainState:
    """Train with ``state, metrics = step(state, batch)`` and return the final state.

    ``data`` is any re-iterable of batches; before each pass its epoch is set
    (:func:`loopkit.data.set_epoch`). Training runs for ``epochs`` passes (1 if neither
    limit is given) and/or until ``state.step`` reaches ``max_steps``; ``steps_per_epoch``
    caps each pass (and defines the epoch for endless data).

    ``resume`` is ``"latest"`` (or True: the newest good checkpoint of the
    :class:`~loopkit.hooks.Checkpoint` hook; start afresh if there is none), a checkpoint
    directory (its newest good checkpoint; a damaged newer one is reported and skipped), or
    one checkpoint. ``state`` must then be built with the same model and optimizer as the
    run that wrote it. Both limits count from the start of the original run; a run that a
    hook stopped stays stopped. A run that ended on ``max_steps`` closed its last epoch, so
    raising ``max_steps`` later continues with the next epoch.

    ``data_parallel`` (default: whether ``step`` was built by
    :func:`loopkit.distributed.train_step`, also through ``functools.wraps`` wrappers) makes
    ``fit`` check that the ranks take as many steps, resume on rank 0 and broadcast rank 0's
    state at the start.
    """
    epochs = _check_count(epochs, "epochs", 0)
    max_steps = _check_count(max_steps, "max_steps", 0)
    steps_per_epoch = _check_count(steps_per_epoch, "steps_per_epoch", 1)
    if epochs is None and max_steps is None:
        epochs = 1
    if not isinstance(state, TrainState):
        raise TypeError(
            f"fit needs a TrainState, got a {type(state).__name__}: "
            "lk.TrainState.create(model, optimizer)"
        )
    _check_data(data, epochs, steps_per_epoch)
    hooks = _check_hooks(hooks)
    loop = Loop(state, hooks, epochs, _epoch_length(data, steps_per_epoch), max_steps)
    loop._data, loop.donates = data, _donates(step)
    resume = "latest" if resume is True else resume
    loop.resuming = resume is not None and resume is not False
    if data_parallel is None:
        data_parallel = _is_data_parallel(step)
        if not data_parallel and distributed.world_size() > 1 and _sharded(data):
            warnings.warn(
                f"fit's data is sharded across {distributed.world_size()} ranks but the step "
                "does not sync them (it was not built by loopkit.distributed.train_step): "
                "each rank trains its own model on its shard. Build the step with "
                "loopkit.distributed.train_step, or pass data_parallel=False if that is meant.",
                stacklevel=2,
            )
    data_parallel = data_parallel and distributed.world_size() > 1
    loop._data_parallel = data_parallel
    if data_parallel:
        _check_ranks_agree(data, steps_per_epoch, epochs, max_steps)
    if loop.resuming:
        if distributed.is_main() and (reason := data_lib.why_not_resumable(data)) is not None:
            warnings.warn(f"fit(resume=...) may not resume exactly: {reason}", stacklevel=2)
        _resume(loop, resume, data_parallel)
    if data_parallel:  # every rank continues from rank 0's state
        loop.state = distributed.broadcast(loop.state)
    loop.step = int(loop.state.step)
    try:
        loop.emit("on_fit_start")
        # an epoch the checkpoint left open is always closed, even if no step is left to take
        while loop.batch > 0 or (
            not (loop.should_stop or loop.steps_done) and (epochs is None or loop.epoch < epochs)
        ):
            _run_epoch(step, loop, data, steps_per_epoch)
        loop.emit("on_fit_end")
    except BaseException:
        _close(loop.hooks, failing=True)
        raise
    _close(loop.hooks, failing=False)
    return loop.state


def _close(hooks: Sequence[Any], failing: bool) -> None:
    """Every hook's ``close()`` (one that takes no argument: a hook's own ``close`` of
    another signature is not this event). Each is called even if one before it raised; the
    first error is raised after all, or, while an exception ends the fit, warned of, so
    that the fit's own error is what the caller sees."""
    first = None
    for hook in hooks:
        close = getattr(hook, "close", None)
        if not (callable(close) and _takes_no_arguments(close)):
            continue
        try:
            close()
        except Exception as e:
            if failing:
                warnings.warn(f"{type(hook).__name__}.close() failed: {e!r}", stacklevel=3)
            else:
                first = first or e
    if first is not None:
        raise first


def _takes_no_arguments(fn: Callable) -> bool:
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in parameters)  # fmt: skip


def _pass(loop: Loop, data: Iterable) -> Iterator:
    """The open pass of ``data`` from batch ``loop.batch`` on. The random state it starts
    from is kept for a checkpoint. A pass a checkpoint left open starts again from the saved
    one, so a ``DataLoader`` draws the same order and worker seeds; the batches it took are
    skipped, then the random state is set to the checkpoint's, so the next batch draws what
    it drew in the run never interrupted."""
    resumed, loop._resumed_random = loop._resumed_random, None
    if resumed is None or resumed["pass"] is None or loop.batch == 0:
        loop._pass_random = data_lib.random_state(data)
        return data_lib.iter_from(data, loop.batch)
    loop._pass_random = resumed["pass"]
    data_lib.set_random_state(data, resumed["pass"])
    return data_lib.iter_from(
        data, loop.batch, then=lambda: data_lib.set_random_state(data, resumed["now"])
    )


def _checked_output(out: Any) -> tuple[TrainState, Any]:
    """A step's ``(state, metrics)``, or a TypeError naming what came back instead."""
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], TrainState):
        if isinstance(out[1], Mapping):
            return out
    got = (
        f"a {len(out)}-tuple ({', '.join(type(x).__name__ for x in out)})"
        if isinstance(out, tuple)
        else f"a {type(out).__name__}"
    )
    raise TypeError(
        f"fit's step must return (state, metrics): a TrainState and a dict of metrics, as "
        f"lk.train_step's steps do, but it returned {got}. An eval step (lk.eval_step) "
        "goes in a Validate hook, not in fit's step."
    )


def _run_epoch(step: Callable, loop: Loop, data: Iterable, steps_per_epoch: int | None) -> None:
    data_lib.set_epoch(data, loop.epoch)
    if loop.batch == 0:
        loop.logs, loop.sums, loop.sum_dtypes, loop.counts, loop.taken = {}, {}, {}, {}, 0
    loop.emit("on_epoch_start")
    more = steps_per_epoch is None or loop.batch < steps_per_epoch
    more = more and not (loop.should_stop or loop.steps_done)
    start = loop.batch
    for batch in _pass(loop, data) if more else ():
        loop._previous, loop._skipped = loop.state, False
        loop.state, loop.metrics = _checked_output(step(loop.state, batch))
        loop.step += 1
        loop.batch += 1
        loop.emit("on_step_end")
        if not loop._skipped:
            loop.taken += 1
            add_metrics(loop.sums, loop.sum_dtypes, loop.metrics, counts=loop.counts)
        loop._previous = None
        loop._run_after()
        if loop.should_stop or loop.steps_done or loop.batch == steps_per_epoch:
            break
    if more and start == 0 and loop.batch == 0:
        raise ValueError(_no_batches(f"its pass for epoch {loop.epoch} yielded none"))
    if loop.taken:
        train = means(loop.sums, loop.sum_dtypes, loop.counts)
        loop.logs.update({f"train/{k}": v for k, v in train.items()})
    loop.emit("on_epoch_end")
    loop.history.append(dict(loop.logs, epoch=loop.epoch, step=loop.step))
    loop.epoch, loop.batch, loop.taken = loop.epoch + 1, 0, 0
    loop.sums, loop.sum_dtypes, loop.counts = {}, {}, {}
    loop._run_after()
