"""Exact resume: a run interrupted anywhere and resumed equals one never interrupted."""

import json
import random
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import loopkit as lk
from loopkit import checkpoint, optim
from tests.helpers import loss_fn
from tests.test_fit import assert_states_equal

ROOT = Path(__file__).resolve().parent.parent


class Crash(Exception):
    pass


def crashing(step, after):
    """``step`` that raises on its ``after + 1``-th call: a crash between two steps."""
    calls = [0]

    def wrapped(state, batch):
        calls[0] += 1
        if calls[0] > after:
            raise Crash
        return step(state, batch)

    return wrapped


class History(lk.Hook):
    def on_fit_end(self, loop):
        self.history = [dict(h) for h in loop.history]


def setup(cfg, directory):
    """Model, step and a fresh hook list for one run of configuration ``cfg``."""
    g = torch.Generator().manual_seed(cfg["seed"])
    x = torch.randn(cfg["n"], 5, generator=g)
    y = (x[:, 0] + torch.randn(cfg["n"], generator=g) > 0).long()  # noisy: plateaus happen
    torch.manual_seed(cfg["seed"])
    layers = [nn.Linear(5, 12)]
    layers += [nn.BatchNorm1d(12)] if cfg["batchnorm"] else []
    layers += [nn.Tanh(), nn.Dropout(0.3), nn.Linear(12, 2)]
    model = nn.Sequential(*layers)
    opt = optim.adamw(lr=optim.schedules.cosine_annealing(5e-2, T_max=50), weight_decay=0.05)
    plateau = optim.schedules.reduce_on_plateau(1.0, factor=0.5, patience=1)
    lr_opt = optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(lr=0.1, momentum=0.9))
    opt = lr_opt if cfg["plateau"] else opt
    n_val = max(4, cfg["n"] // 4)
    val = lk.data.Batches(x[:n_val], y[:n_val], batch_size=3)
    train = lk.data.Batches(x[n_val:], y[n_val:], batch_size=cfg["batch"], shuffle=True,
                            seed=cfg["seed"], drop_last=cfg["drop_last"])  # fmt: skip
    history = History()
    hooks = [
        lk.hooks.Validate(lk.eval_step(model, loss_fn), val, every_steps=cfg["val_steps"]),
        *([lk.hooks.ReduceLROnPlateau(plateau)] if cfg["plateau"] else []),
        lk.hooks.EarlyStopping("val/loss", patience=cfg["patience"]),
        lk.hooks.JSONLLogger(directory),
        lk.hooks.CSVLogger(directory),
        lk.hooks.Checkpoint(
            directory / "ckpt", every=cfg["every"], every_steps=cfg["every_steps"], keep_last=2
        ),  # fmt: skip
        history,
    ]
    state = lk.TrainState.create(model, opt, seed=cfg["seed"])
    return lk.train_step(model, loss_fn, opt), state, train, hooks, history


def run(cfg, directory, crash_after=None, resume=None):
    step, state, train, hooks, history = setup(cfg, directory)
    if crash_after is not None:
        step = crashing(step, crash_after)
    limits = {"epochs": cfg["epochs"], "max_steps": cfg["max_steps"]}
    final = lk.fit(step, state, train, hooks=hooks, resume=resume, **limits)
    return final, history.history


def files(directory):
    return (directory / "metrics.jsonl").read_text(), (directory / "metrics.csv").read_text()


configs = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**16),
        "n": st.integers(30, 64),
        "batch": st.integers(3, 8),
        "drop_last": st.booleans(),
        "batchnorm": st.booleans(),
        "plateau": st.booleans(),
        "epochs": st.integers(1, 5),
        "max_steps": st.none() | st.integers(5, 40),
        "val_steps": st.none() | st.integers(1, 5),
        "patience": st.integers(2, 4),
        "every": st.none() | st.integers(1, 2),
        "every_steps": st.none() | st.integers(1, 3),
    }
)


@settings(max_examples=settings.default.max_examples // 2)  # 25, or 100 thorough
@given(cfg=configs, crash=st.floats(0, 1), crashes=st.integers(1, 2))
def test_an_interrupted_run_resumes_bitwise_identically(tmp_path_factory, cfg, crash, crashes):
    """Crash between two steps (mid-epoch, at an epoch end, right after a checkpoint: the
    crash point is random), once or twice, then resume from the latest checkpoint: the
    final state, the history and the log files equal an uninterrupted run's, bit for bit.
    Dropout, shuffling, BatchNorm, validation, early stopping and plateau lr changes are
    all in play; their state comes back from the checkpoint."""
    if cfg["batchnorm"] and cfg["batch"] < 4:
        cfg["batch"] = 4  # a size-1 last batch would make BatchNorm raise in both runs
    if cfg["batchnorm"]:
        cfg["drop_last"] = True
    straight_dir = tmp_path_factory.mktemp("straight")
    straight, straight_history = run(cfg, straight_dir)
    total = int(straight.step)

    directory = tmp_path_factory.mktemp("resumed")
    done = 0
    for _ in range(crashes):
        crash_after = int(crash * total)
        try:
            run(cfg, directory, crash_after=crash_after, resume="latest" if done else None)
        except Crash:
            pass
        done += 1
        crash = (crash + 1) / 2  # a later crash the second time
    resumed, resumed_history = run(cfg, directory, resume="latest")

    assert_states_equal(resumed, straight)
    assert resumed_history == straight_history
    assert files(directory) == files(straight_dir)


def test_resume_equals_straight_with_a_dataloader_and_an_epoch_sampler(tmp_path):
    x, y = torch.randn(30, 5), torch.randint(0, 2, (30,))
    dataset = torch.utils.data.TensorDataset(x, y)

    def once(directory, crash_after=None, resume=None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 2))
        opt = optim.adam(lr=1e-2)
        step = lk.train_step(model, loss_fn, opt)
        step = step if crash_after is None else crashing(step, crash_after)
        sampler = lk.data.EpochSampler(len(dataset), seed=3)
        loader = torch.utils.data.DataLoader(dataset, batch_size=4, sampler=sampler)
        hook = lk.hooks.Checkpoint(directory, every_steps=3)
        return lk.fit(step, lk.TrainState.create(model, opt, seed=0), loader, epochs=3,
                      hooks=[hook], resume=resume)  # fmt: skip

    straight = once(tmp_path / "a")
    with pytest.raises(Crash):
        once(tmp_path / "b", crash_after=13)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an EpochSampler needs no warning
        resumed = once(tmp_path / "b", resume="latest")
    assert_states_equal(resumed, straight)


def test_resume_warns_about_data_it_cannot_replay(tmp_path):
    """Data whose replay loopkit cannot vouch for is warned of, with advice that works:
    a bare iterable, a sampler of unknown kind, persistent workers, and an IterableDataset
    without set_epoch (a DataLoader takes no sampler for one, and shuffle=True is not it)."""
    torch.manual_seed(0)
    model = nn.Linear(5, 2)
    opt = optim.sgd(lr=0.1)
    dataset = torch.utils.data.TensorDataset(torch.randn(8, 5), torch.randint(0, 2, (8,)))
    step = lk.train_step(model, loss_fn, opt)
    hooks = [lk.hooks.Checkpoint(tmp_path)]

    def resume(data):
        lk.fit(step, lk.TrainState.create(model, opt), data, hooks=hooks, resume="latest")

    class Mine:
        def __iter__(self):
            return iter([(torch.randn(4, 5), torch.randint(0, 2, (4,)))])

    with pytest.warns(UserWarning, match="cannot tell whether a Mine replays"):
        resume(Mine())

    class Reversed(torch.utils.data.Sampler):
        def __iter__(self):
            return iter(range(7, -1, -1))

        def __len__(self):
            return 8

    with pytest.warns(UserWarning, match=r"its sampler \(Reversed\).*set_epoch"):
        resume(torch.utils.data.DataLoader(dataset, batch_size=4, sampler=Reversed()))
    persistent = torch.utils.data.DataLoader(
        dataset, batch_size=4, num_workers=1, persistent_workers=True
    )
    with pytest.warns(UserWarning, match="persistent_workers=True.*persistent_workers=False"):
        resume(persistent)
    with pytest.warns(UserWarning) as caught:
        resume(torch.utils.data.DataLoader(Stream(with_set_epoch=False), batch_size=4))
    (message,) = [str(w.message) for w in caught]
    assert "IterableDataset Stream" in message and "set_epoch(epoch)" in message
    assert "global RNG" not in message and "shuffle=True" not in message
    assert "takes no sampler" in message


def test_resume_latest_without_checkpoints_starts_afresh_and_a_stopped_run_stays_stopped(
    tmp_path,
):
    torch.manual_seed(0)
    model = nn.Linear(5, 2)
    opt = optim.sgd(lr=0.1)
    data = [(torch.randn(4, 5), torch.randint(0, 2, (4,)))] * 3
    step = lk.train_step(model, loss_fn, opt)

    class StopAt4(lk.Hook):
        def on_step_end(self, loop):
            loop.should_stop = loop.step == 4

    def once(resume):
        hooks = [StopAt4(), lk.hooks.Checkpoint(tmp_path)]
        return lk.fit(step, lk.TrainState.create(model, opt), data, epochs=5, hooks=hooks,
                      resume=resume)  # fmt: skip

    assert int(once("latest").step) == 4
    assert int(once(True).step) == 4  # resumed: the stop is part of the saved run


def test_resume_errors(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(5, 2)
    opt = optim.sgd(lr=0.1)
    state = lk.TrainState.create(model, opt)
    data = [(torch.randn(4, 5), torch.randint(0, 2, (4,)))]
    step = lk.train_step(model, loss_fn, opt)
    with pytest.raises(ValueError, match='resume="latest".*Checkpoint hook.*none'):
        lk.fit(step, state, data, resume="latest")
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        lk.fit(step, state, data, resume=tmp_path / "nope")
    checkpoint.save(tmp_path / "plain", state)
    with pytest.raises(checkpoint.CheckpointError, match="no training position"):
        lk.fit(step, state, data, resume=tmp_path / "plain")
    lk.fit(step, state, data, hooks=[lk.hooks.Checkpoint(tmp_path / "run")])
    other = lk.TrainState.create(nn.Linear(5, 3), opt)
    with pytest.raises(checkpoint.CheckpointError, match=r"weight.*\[2, 5\].*\[3, 5\]"):
        lk.fit(step, other, data, resume=tmp_path / "run")


def sigkill_run(directory, kill_at):
    """Start the worker's training run and SIGKILL it once it has printed ``step kill_at``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.workers", "fit", str(directory)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    for line in proc.stdout:
        if line.strip() == f"step {kill_at}":
            proc.send_signal(signal.SIGKILL)
            break
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"


def finish(directory, resume):
    args = [sys.executable, "-m", "tests.workers", "fit", str(directory)]
    subprocess.run(args + (["--resume"] if resume else []), cwd=ROOT, check=True,
                   capture_output=True)  # fmt: skip


def test_a_sigkilled_run_resumes_bitwise_identically(tmp_path):
    """The worker trains (BatchNorm, Dropout, shuffling, validation, early stopping, a JSONL
    log, a checkpoint every 2 steps); it is SIGKILLed after a random step, then the same
    command with --resume finishes it. Final state and log equal an unkilled run's."""
    finish(tmp_path / "straight", resume=False)
    straight_log = (tmp_path / "straight" / "metrics.jsonl").read_text()
    total = len(straight_log.splitlines())
    assert total >= 3
    trials = 3 if settings.default.max_examples > 50 else 1
    for trial, kill_at in enumerate(random.Random(0).sample(range(1, 5 * total), trials)):
        directory = tmp_path / f"killed{trial}"
        sigkill_run(directory, kill_at)
        finish(directory, resume=True)
        a = checkpoint.read(tmp_path / "straight" / "final")["state"]
        b = checkpoint.read(directory / "final")["state"]
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
        assert (directory / "metrics.jsonl").read_text() == straight_log
        records = [json.loads(r) for r in straight_log.splitlines()]
        assert all("val/loss" in r for r in records)


def test_a_hook_state_a_checkpoint_cannot_hold_is_refused_before_writing(tmp_path):
    import numpy as np

    class Odd(lk.Hook):
        def state_dict(self):
            return {"best": np.float32(1.0)}

    model = nn.Linear(5, 2)
    opt = optim.sgd(lr=0.1)
    data = [(torch.randn(4, 5), torch.randint(0, 2, (4,)))]
    with pytest.raises(TypeError, match=r"Odd.state_dict\(\)\['best'\] holds a float32"):
        lk.fit(lk.train_step(model, loss_fn, opt), lk.TrainState.create(model, opt), data,
               hooks=[Odd(), lk.hooks.Checkpoint(tmp_path)])  # fmt: skip
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TypeError, match='resume must be "latest"'):
        lk.fit(lk.train_step(model, loss_fn, opt), lk.TrainState.create(model, opt), data,
               resume=3)  # fmt: skip


@pytest.mark.parametrize("stop", ["max_steps", "hook"])
def test_a_crash_after_the_last_step_checkpoint_still_closes_the_epoch(tmp_path, stop):
    """The run ends mid-epoch (max_steps, or a hook's stop) right after a step checkpoint,
    and is killed before the epoch closes: the resumed run closes it, so the history and
    the log equal the uninterrupted run's."""

    class StopAt6(lk.Hook):
        def on_step_end(self, loop):
            loop.should_stop = loop.should_stop or loop.step == 6

    class CrashAtEpochEnd(lk.Hook):
        def on_epoch_end(self, loop):
            if loop.step == 6:
                raise Crash

    def once(directory, crash=False, resume=None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 2))
        opt = optim.adam(lr=1e-2)
        x, y = torch.randn(40, 5), torch.randint(0, 2, (40,))
        history = History()
        hooks = [*([CrashAtEpochEnd()] if crash else []), *([StopAt6()] if stop == "hook" else []),
                 lk.hooks.JSONLLogger(directory), history,
                 lk.hooks.Checkpoint(directory / "ckpt", every_steps=2)]  # fmt: skip
        limits = {"max_steps": 6} if stop == "max_steps" else {"epochs": 3}
        state = lk.fit(lk.train_step(model, loss_fn, opt), lk.TrainState.create(model, opt),
                       lk.data.Batches(x, y, batch_size=8, shuffle=True), hooks=hooks,
                       resume=resume, **limits)  # fmt: skip
        return state, history.history

    straight, straight_history = once(tmp_path / "a")
    with pytest.raises(Crash):
        once(tmp_path / "b", crash=True)
    resumed, resumed_history = once(tmp_path / "b", resume="latest")
    assert_states_equal(resumed, straight)
    assert resumed_history == straight_history and len(straight_history) == 2
    assert (tmp_path / "b" / "metrics.jsonl").read_text() == (
        tmp_path / "a" / "metrics.jsonl"
    ).read_text()


def test_resume_puts_back_a_checkpoint_a_killed_replacement_moved_aside(tmp_path):
    """checkpoint.save over an existing name moves the old one aside before renaming the
    new one in; a kill between the two leaves it hidden. Resuming puts it back."""
    import os

    torch.manual_seed(0)
    model = nn.Linear(5, 2)
    opt = optim.sgd(lr=0.1)
    data = [(torch.randn(4, 5), torch.randint(0, 2, (4,)))] * 2
    step = lk.train_step(model, loss_fn, opt)
    lk.fit(step, lk.TrainState.create(model, opt), data, hooks=[lk.hooks.Checkpoint(tmp_path)])
    only = lk.checkpoint.latest(tmp_path)
    os.rename(only, tmp_path / f".{only.name}.old-1-0123abcd")
    assert lk.checkpoint.checkpoints(tmp_path) == []
    state = lk.fit(step, lk.TrainState.create(model, opt), data, epochs=1,
                   hooks=[lk.hooks.Checkpoint(tmp_path)], resume="latest")  # fmt: skip
    assert int(state.step) == 2 and lk.checkpoint.checkpoints(tmp_path) == [only]


def small_run(directory, hooks=(), crash_after=None, resume=None, dtype=torch.float32, lr=0.1,
              epochs=3, every_steps=None, every=1):  # fmt: skip
    """A tiny model trained ``epochs`` epochs of 5 batches with a Checkpoint hook."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=g).to(dtype)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)
    opt = optim.sgd(lr=lr)
    step = lk.train_step(model, loss_fn, opt)
    step = step if crash_after is None else crashing(step, crash_after)
    history = History()
    ckpt = lk.hooks.Checkpoint(directory / "ckpt", every=every, every_steps=every_steps)
    state = lk.fit(step, lk.TrainState.create(model, opt), lk.data.Batches(x, y, batch_size=8),
                   epochs=epochs, hooks=[*hooks, ckpt, history], resume=resume)  # fmt: skip
    return state, history.history


def test_bf16_metric_sums_resume_bitwise(tmp_path):
    """The partial sums a mid-epoch checkpoint holds are float64 and carry on exactly."""
    straight, history = small_run(tmp_path / "a", dtype=torch.bfloat16, every_steps=2)
    with pytest.raises(Crash):
        small_run(tmp_path / "b", dtype=torch.bfloat16, every_steps=2, crash_after=7)
    resumed, resumed_history = small_run(tmp_path / "b", dtype=torch.bfloat16, every_steps=2,
                                         resume="latest")  # fmt: skip
    assert_states_equal(straight, resumed)
    assert resumed_history == history


def test_appending_loggers_keep_earlier_runs_records_on_resume(tmp_path):
    """A resumed run with append=True drops only its own records after the checkpoint, not
    an earlier run's of the same epochs."""

    def loggers(directory):
        return [lk.hooks.JSONLLogger(directory, append=True),
                lk.hooks.CSVLogger(directory, append=True)]  # fmt: skip

    for d in ("straight", "resumed"):
        small_run(tmp_path / d / "first", loggers(tmp_path / d), lr=0.2)
    small_run(tmp_path / "straight" / "second", loggers(tmp_path / "straight"))
    with pytest.raises(Crash):  # in epoch 1: resumes from the end of epoch 0
        small_run(tmp_path / "resumed" / "second", loggers(tmp_path / "resumed"), crash_after=7)
    small_run(tmp_path / "resumed" / "second", loggers(tmp_path / "resumed"), resume="latest")
    assert files(tmp_path / "resumed") == files(tmp_path / "straight")
    epochs = [json.loads(r)["epoch"] for r in files(tmp_path / "resumed")[0].splitlines()]
    assert epochs == [0, 1, 2, 0, 1, 2]


def test_tensorboard_events_after_resuming_an_open_epoch_are_not_duplicated(tmp_path):
    """The last checkpoint is a step save at an epoch's last batch (the epoch left open);
    the crash comes after that epoch's events: the resumed run writes them once."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    class CrashAtEpochEnd(lk.Hook):
        def on_epoch_end(self, loop):
            if loop.epoch == 1:
                raise Crash

    def scalars(directory):
        events = EventAccumulator(str(directory / "tb"))
        events.Reload()
        return [(e.step, e.value) for e in events.Scalars("train/loss")]

    def tb(directory):
        return lk.hooks.TensorBoardLogger(directory / "tb")

    small_run(tmp_path / "a", [tb(tmp_path / "a")], every_steps=5, every=None)
    with pytest.raises(Crash):
        small_run(tmp_path / "b", [tb(tmp_path / "b"), CrashAtEpochEnd()], every_steps=5,
                  every=None)  # fmt: skip
    small_run(tmp_path / "b", [tb(tmp_path / "b")], every_steps=5, every=None, resume="latest")
    assert scalars(tmp_path / "b") == scalars(tmp_path / "a")
    assert [s for s, _ in scalars(tmp_path / "a")] == [5, 10, 15]


def test_a_checkpoint_a_crash_kept_from_pruning_is_pruned_on_resume(tmp_path, monkeypatch):
    remove, calls = checkpoint.remove, [0]

    def dying_remove(path):
        calls[0] += 1
        if calls[0] == 3:
            raise Crash
        remove(path)

    def run(resume=None):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(40, 4, generator=g)
        model = nn.Linear(4, 2)
        opt = optim.sgd(lr=0.1)
        hook = lk.hooks.Checkpoint(tmp_path, every_steps=2, keep_last=2)
        lk.fit(lk.train_step(model, loss_fn, opt), lk.TrainState.create(model, opt),
               lk.data.Batches(x, (x[:, 0] > 0).long(), batch_size=8), epochs=4, hooks=[hook],
               resume=resume)  # fmt: skip
        return hook

    monkeypatch.setattr(checkpoint, "remove", dying_remove)
    with pytest.raises(Crash):
        run()
    monkeypatch.setattr(checkpoint, "remove", remove)
    assert len(checkpoint.checkpoints(tmp_path)) == 3  # one too many
    hook = run(resume="latest")
    assert checkpoint.checkpoints(tmp_path) == hook.saved and len(hook.saved) == 2


class Augmented(torch.utils.data.Dataset):
    """Random augmentation as torchvision and albumentations do it: each example draws from
    torch's, Python's and NumPy's global generators (in a worker: the worker's, which the
    DataLoader seeds from its base seed)."""

    def __init__(self, n=30):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 5, generator=g)
        self.y = (self.x[:, 0] > 0).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        import numpy as np

        noise = 0.1 * torch.randn(5) + random.random() + float(np.random.rand())
        return self.x[i] + noise, self.y[i]


LOADERS = {
    "epoch sampler": lambda ds: dict(sampler=lk.data.EpochSampler(len(ds), seed=3)),
    "shuffle": lambda ds: dict(shuffle=True),
    "shuffle, generator": lambda ds: dict(shuffle=True, generator=torch.Generator().manual_seed(5)),
    "sampler's generator": lambda ds: dict(
        sampler=torch.utils.data.RandomSampler(ds, generator=torch.Generator().manual_seed(6))
    ),
    "epoch sampler, workers": lambda ds: dict(
        sampler=lk.data.EpochSampler(len(ds), seed=3), num_workers=2
    ),
    "shuffle, workers": lambda ds: dict(shuffle=True, num_workers=2),
}


@pytest.mark.parametrize("crash_after", [13, 17])  # mid-epoch; just after an epoch's end
@pytest.mark.parametrize("loader", list(LOADERS))
def test_random_augmentation_and_shuffling_resume_exactly(tmp_path, loader, crash_after):
    """A DataLoader whose order or examples come from the global generators or its own
    generator (shuffle=True, random augmentation, in the main process or in workers): the
    checkpoint holds those generators, so the resumed run sees the very batches the
    uninterrupted one saw, without a warning."""
    import numpy as np

    def once(directory, crash_after=None, resume=None):
        torch.manual_seed(0)  # the top of a training script
        random.seed(0)
        np.random.seed(0)
        dataset = Augmented()
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 2))
        opt = optim.sgd(lr=0.1)
        step = lk.train_step(model, loss_fn, opt)
        step = step if crash_after is None else crashing(step, crash_after)
        data = torch.utils.data.DataLoader(dataset, batch_size=4, **LOADERS[loader](dataset))
        hook = lk.hooks.Checkpoint(directory, every_steps=3)
        return lk.fit(step, lk.TrainState.create(model, opt, seed=0), data, epochs=3,
                      hooks=[hook], resume=resume)  # fmt: skip

    straight = once(tmp_path / "a")
    with pytest.raises(Crash):
        once(tmp_path / "b", crash_after=crash_after)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed = once(tmp_path / "b", resume="latest")
    assert_states_equal(resumed, straight)


class Stream(torch.utils.data.IterableDataset):
    """A streaming dataset that orders each pass by its epoch (webdataset, HF streaming)."""

    def __init__(self, with_set_epoch=True):
        self.x = torch.randn(24, 5, generator=torch.Generator().manual_seed(0))
        self.epoch, self.calls = 0, []
        if with_set_epoch:
            self.set_epoch = self._set_epoch

    def _set_epoch(self, epoch):
        self.epoch = epoch
        self.calls.append(epoch)

    def __iter__(self):
        order = torch.randperm(24, generator=torch.Generator().manual_seed(self.epoch))
        return iter([(self.x[i], (self.x[i, 0] > 0).long()) for i in order])


def test_an_iterable_dataset_gets_its_epoch_and_resumes_exactly(tmp_path):
    """fit calls set_epoch on a DataLoader's dataset (as on its sampler) before each pass,
    so a streaming dataset orders each epoch differently and replays it when resumed."""

    def once(directory, crash_after=None, resume=None):
        torch.manual_seed(0)
        model = nn.Linear(5, 2)
        opt = optim.sgd(lr=0.1)
        step = lk.train_step(model, loss_fn, opt)
        step = step if crash_after is None else crashing(step, crash_after)
        dataset = Stream()
        data = torch.utils.data.DataLoader(dataset, batch_size=4)
        hook = lk.hooks.Checkpoint(directory, every_steps=4)
        state = lk.fit(step, lk.TrainState.create(model, opt), data, epochs=3, hooks=[hook],
                       resume=resume)  # fmt: skip
        return state, dataset.calls

    straight, calls = once(tmp_path / "a")
    assert calls == [0, 1, 2]
    with pytest.raises(Crash):
        once(tmp_path / "b", crash_after=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a dataset with set_epoch needs no warning
        resumed, calls = once(tmp_path / "b", resume="latest")
    assert calls == [1, 2]
    assert_states_equal(resumed, straight)


def test_resuming_an_older_checkpoint_moves_the_newer_ones_aside(tmp_path):
    """Rolling back to an earlier checkpoint (here with another lr) abandons the checkpoints
    the run wrote after it: they are moved into a subdirectory (nothing is deleted), with a
    warning, so that after a crash resume="latest" continues the new branch, not the old."""
    import shutil

    first, _ = small_run(tmp_path / "a", epochs=3, every_steps=2)
    names = [p.name for p in checkpoint.checkpoints(tmp_path / "a" / "ckpt")]
    newer = names[names.index("step-000000004") + 1 :]
    back = tmp_path / "a" / "ckpt" / "step-000000004"
    shutil.copytree(tmp_path / "a", tmp_path / "ref")
    with pytest.warns(UserWarning, match="moved"):
        branch, _ = small_run(
            tmp_path / "ref", lr=0.2, resume=tmp_path / "ref" / back.relative_to(tmp_path / "a")
        )
    message = rf"older than {len(newer)} checkpoint.*newest step-000000015.*moved them to"
    with pytest.warns(UserWarning, match=message):
        with pytest.raises(Crash):
            small_run(tmp_path / "a", lr=0.2, resume=back, crash_after=5)
    resumed, _ = small_run(tmp_path / "a", lr=0.2, resume="latest")
    assert_states_equal(resumed, branch)
    (aside,) = [p for p in (tmp_path / "a" / "ckpt").iterdir() if p.name.startswith("rolled")]
    assert sorted(p.name for p in aside.iterdir()) == newer
    assert_states_equal(checkpoint.load(aside / newer[-1], like=first), first)


def test_loop_state_dict_gathers_every_rank_only_when_asked(monkeypatch):
    """``Loop.state_dict()`` stays a local call (a hook may call it on rank 0 alone); the
    Checkpoint hook, on every rank, asks for every rank's data random state."""
    model = nn.Linear(2, 2)
    loop = lk.Loop(lk.TrainState.create(model, optim.sgd(lr=0.1)), [], 1, 1, None)
    loop._data_parallel = True
    gathered = []
    monkeypatch.setattr(
        lk.distributed, "all_gather_object", lambda obj: gathered.append(obj) or [obj, obj]
    )
    assert len(loop.state_dict()["random"]) == 1 and not gathered
    assert len(loop.state_dict(every_rank=True)["random"]) == 2 and len(gathered) == 1


def test_resuming_from_another_directory_deletes_nothing_there(tmp_path):
    """A checkpoint from directory A lists what A's hook kept and meant to delete; resumed
    into a Checkpoint hook writing to B, those names are B's checkpoints, not its own."""
    model = nn.Linear(2, 2)
    opt = optim.sgd(lr=0.1)
    step = lk.train_step(model, loss_fn, opt)
    data = [(torch.randn(4, 2), torch.randint(0, 2, (4,)))] * 5
    state = lk.TrainState.create(model, opt)
    lk.fit(step, state, data, epochs=2, hooks=[lk.hooks.Checkpoint(tmp_path / "B")])
    lk.fit(step, state, data, epochs=2, hooks=[lk.hooks.Checkpoint(tmp_path / "A", keep_last=1)])
    before = sorted(p.name for p in (tmp_path / "B").iterdir())
    assert before == ["step-000000005", "step-000000010"]
    (older,) = [p for p in (tmp_path / "A").iterdir() if p.name.startswith("step-")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lk.fit(step, state, data, epochs=3, resume=older,
               hooks=[lk.hooks.Checkpoint(tmp_path / "B", keep_last=1)])  # fmt: skip
    after = sorted(p.name for p in (tmp_path / "B").iterdir())
    assert after == ["step-000000005", "step-000000010", "step-000000015"]


def test_resuming_from_a_named_directory_without_checkpoints_is_an_error(tmp_path):
    model = nn.Linear(2, 2)
    opt = optim.sgd(lr=0.1)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"epoch": 0}\n')
    hooks = [lk.hooks.JSONLLogger(tmp_path / "run"), lk.hooks.Checkpoint(tmp_path / "run" / "ckpt")]
    with pytest.raises(FileNotFoundError, match="holds no committed checkpoint"):
        lk.fit(lk.train_step(model, loss_fn, opt), lk.TrainState.create(model, opt),
               [(torch.randn(4, 2), torch.randint(0, 2, (4,)))], resume=tmp_path / "run",
               hooks=hooks)  # fmt: skip
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == '{"epoch": 0}\n'  # kept
