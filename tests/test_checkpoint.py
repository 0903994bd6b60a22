"""Checkpoints: atomic writes, commit markers, verification, and crashes while saving."""

import hashlib
import io
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from hypothesis import settings
from torch import nn

import loopkit as lk
from loopkit import checkpoint, optim
from tests.test_fit import assert_states_equal, problem

ROOT = Path(__file__).resolve().parent.parent


def a_state(seed=0, opt=None):
    model, _, _ = problem(seed=seed)
    return model, lk.TrainState.create(model, opt or optim.adam(), seed=seed)


def test_save_and_load_round_trip(tmp_path):
    _, state = a_state()
    path = checkpoint.save(tmp_path / "step-000000003", state, {"note": "x"}, extra={"a": [1]})
    assert sorted(os.listdir(path)) == [checkpoint.MARKER, checkpoint.STATE_FILE]
    assert_states_equal(checkpoint.load(path, like=a_state(seed=1)[1]), state)
    contents = checkpoint.read(path)
    assert contents["extra"] == {"a": [1]} and contents["metadata"]["note"] == "x"
    assert checkpoint.checkpoints(tmp_path) == [path] and checkpoint.latest(tmp_path) == path


def test_checkpoint_of_another_model_is_rejected(tmp_path):
    model, state = a_state()
    checkpoint.save(tmp_path / "a", state)
    other = nn.Sequential(
        nn.Linear(4, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 2)
    )
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"params\['0.weight'\]: checkpoint has torch.float32\[8, 4\], "
        r"state has torch.float32\[16, 4\]",
    ):
        checkpoint.load(tmp_path / "a", like=lk.TrainState.create(other, optim.adam()))
    with pytest.raises(checkpoint.CheckpointError, match=r"missing .*max_exp_avg_sq"):
        checkpoint.load(tmp_path / "a", like=lk.TrainState.create(model, optim.adam(amsgrad=True)))


def test_a_number_leaf_where_the_checkpoint_has_a_tensor_is_named(tmp_path):
    """A custom optimizer's state may hold Python numbers: a checkpoint with a tensor where
    the state has a number (or the reverse) once loaded the tensor silently (or failed with
    an AttributeError); it is a CheckpointError naming the leaf."""

    class Counted(NamedTuple):
        count: Any

    def make(count):
        return optim.Transform(lambda params: Counted(count), lambda g, s, p=None: (g, s))

    model, _ = a_state()
    with_tensor = lk.TrainState.create(model, make(torch.tensor(3)))
    with_number = lk.TrainState.create(model, make(3))
    checkpoint.save(tmp_path / "tensor", with_tensor)
    checkpoint.save(tmp_path / "number", with_number)
    with pytest.raises(checkpoint.CheckpointError, match=r"count: checkpoint has a tensor "
                       r"torch.int64\[\], state has a Python int"):  # fmt: skip
        checkpoint.load(tmp_path / "tensor", like=with_number)
    with pytest.raises(checkpoint.CheckpointError, match=r"count: checkpoint has a Python int"):
        checkpoint.load(tmp_path / "number", like=with_tensor)
    assert checkpoint.load(tmp_path / "number", like=with_number).opt_state.count == 3


def damage_truncate(path):
    f = path / checkpoint.STATE_FILE
    f.write_bytes(f.read_bytes()[:-100])


def damage_flip(path):  # one bit deep inside the tensor data: torch.load alone would not notice
    f = path / checkpoint.STATE_FILE
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))


def damage_marker(path):
    (path / checkpoint.MARKER).unlink()


def damage_contents(path):  # the format's tag and a valid checksum, but not its contents
    buffer = io.BytesIO()
    torch.save({"format": checkpoint.FORMAT, "state": [1, 2]}, buffer)
    data = buffer.getvalue()
    (path / checkpoint.STATE_FILE).write_bytes(data)
    marker = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (path / checkpoint.MARKER).write_text(json.dumps(marker))


@pytest.mark.parametrize(
    "damage, message",
    [
        (damage_truncate, "truncated or altered"),
        (damage_flip, "truncated or altered"),
        (damage_marker, "no COMMITTED marker"),
        (damage_contents, "but not its contents .*another program wrote it"),
    ],
)
def test_damaged_checkpoints_are_refused_and_skipped(tmp_path, damage, message):
    _, state = a_state()
    older = checkpoint.save(tmp_path / "step-000000001", state)
    newer = checkpoint.save(tmp_path / "step-000000002", state.replace(step=state.step + 1))
    damage(newer)
    with pytest.raises(checkpoint.CorruptCheckpointError, match=message):
        checkpoint.load(newer, like=state)
    uncommitted = damage is damage_marker  # never listed, so skipped without a word
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path, _ = checkpoint.read_latest(tmp_path)
    assert [str(w.message).startswith("skipped 1 damaged") for w in caught] == (
        [] if uncommitted else [True]
    )
    assert path == older and newer.exists()
    assert checkpoint.checkpoints(tmp_path) == ([older] if uncommitted else [older, newer])
    damage(older)
    if uncommitted:
        assert checkpoint.read_latest(tmp_path) is None
    else:
        with pytest.raises(checkpoint.CorruptCheckpointError, match="every checkpoint"):
            checkpoint.read_latest(tmp_path)


def test_a_directory_that_is_no_checkpoint_is_told_apart_from_an_interrupted_one(tmp_path):
    """A run directory (or any directory without state.pt and marker) is not a checkpoint,
    and the error says how to reach the checkpoints in it; a state file without its
    marker is an interrupted write."""
    _, state = a_state()
    run = tmp_path / "run"
    for step in (1, 2):
        checkpoint.save(run / f"step-00000000{step}", state)
    for read in (checkpoint.read, lambda path: checkpoint.load(path, like=state)):
        with pytest.raises(checkpoint.NotACheckpointError, match=r"directory of 2 checkpoints"):
            read(run)
    with pytest.raises(checkpoint.NotACheckpointError, match=r"latest\(directory\)"):
        checkpoint.read(tmp_path)  # holds the run directory, no checkpoint
    with pytest.raises(checkpoint.NotACheckpointError, match="is a file"):
        checkpoint.read(ROOT / "README.md")
    interrupted = run / "step-000000002"
    (interrupted / checkpoint.MARKER).unlink()
    with pytest.raises(checkpoint.CorruptCheckpointError, match="no COMMITTED marker"):
        checkpoint.read(interrupted)
    assert issubclass(checkpoint.NotACheckpointError, checkpoint.CheckpointError)
    assert not issubclass(checkpoint.NotACheckpointError, checkpoint.CorruptCheckpointError)


class Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_checkpoint_carrying_code_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "step-000000001"
    path.mkdir()
    import io

    buffer = io.BytesIO()
    torch.save({"format": checkpoint.FORMAT, "state": {}, "extra": Boom(), "metadata": "{}"},
               buffer)  # fmt: skip
    data = buffer.getvalue()
    (path / checkpoint.STATE_FILE).write_bytes(data)
    marker = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (path / checkpoint.MARKER).write_text(json.dumps(marker))  # a valid marker, even
    with pytest.raises(checkpoint.CorruptCheckpointError, match="never runs code"):
        checkpoint.read(path)
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(checkpoint.NotACheckpointError, match="not a loopkit checkpoint"):
        (tmp_path / "file.ckpt").write_bytes(pickle.dumps({}))
        checkpoint.read(tmp_path / "file.ckpt")


def test_failed_save_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    _, state = a_state()
    path = checkpoint.save(tmp_path / "a", state)
    before = (path / checkpoint.STATE_FILE).read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "_write_synced", boom)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(path, state.replace(step=state.step + 1))
    assert (path / checkpoint.STATE_FILE).read_bytes() == before
    assert os.listdir(tmp_path) == ["a"]


def test_replacing_a_checkpoint(tmp_path):
    _, state = a_state()
    path = checkpoint.save(tmp_path / "a", state)
    checkpoint.save(path, state.replace(step=state.step + 5))
    assert int(checkpoint.load(path, like=state).step) == 5
    assert os.listdir(tmp_path) == ["a"]


def test_clean_temporaries_puts_back_a_checkpoint_moved_aside(tmp_path):
    _, state = a_state()
    checkpoint.save(tmp_path / "step-000000004", state)
    os.rename(tmp_path / "step-000000004", tmp_path / ".step-000000004.old-1-0123abcd")
    (tmp_path / ".step-000000005.tmp-1-0123abcd").mkdir()
    checkpoint.save(tmp_path / "step-000000006", state)
    os.rename(tmp_path / "step-000000006", tmp_path / ".step-000000006.del-1-0123abcd")
    assert checkpoint.checkpoints(tmp_path) == []
    checkpoint.clean_temporaries(tmp_path)
    assert os.listdir(tmp_path) == ["step-000000004"]


@pytest.mark.parametrize("name", ["best", "final.v2", "step-000000004"])
def test_clean_temporaries_puts_back_a_checkpoint_of_any_name(tmp_path, name):
    """A save over ``name`` killed between its two renames leaves the old checkpoint in
    ``.<name>.old-*`` and the new one in ``.<name>.tmp-*``: the old one comes back under its
    name, whatever the name, and the temporary goes; a read of the missing name says how."""
    _, state = a_state()
    checkpoint.save(tmp_path / name, state)
    os.rename(tmp_path / name, tmp_path / f".{name}.old-1-0123abcd")
    checkpoint.save(tmp_path / "scratch", state)
    os.rename(tmp_path / "scratch", tmp_path / f".{name}.tmp-1-89abcdef")
    with pytest.raises(FileNotFoundError, match=r"interrupted.*clean_temporaries"):
        checkpoint.read(tmp_path / name)
    checkpoint.clean_temporaries(tmp_path)
    assert os.listdir(tmp_path) == [name]
    assert_states_equal(checkpoint.load(tmp_path / name, like=state), state)


def test_generator_states_of_other_devices_are_tolerated(tmp_path):
    """A checkpoint carries one generator state per device: moving between a GPU and a CPU
    machine keeps the states both sides have and leaves the others alone."""
    model, cpu_state = a_state(seed=1, opt=optim.sgd())
    gpu_like = cpu_state.replace(
        rng={**cpu_state.rng, "cuda:0": torch.zeros(16, dtype=torch.uint8)}
    )
    checkpoint.save(tmp_path / "gpu", gpu_like)
    restored = checkpoint.load(tmp_path / "gpu", like=lk.TrainState.create(model, optim.sgd()))
    assert set(restored.rng) == {"cpu"} and torch.equal(restored.rng["cpu"], cpu_state.rng["cpu"])
    checkpoint.save(tmp_path / "cpu", cpu_state)
    restored = checkpoint.load(tmp_path / "cpu", like=gpu_like)
    assert torch.equal(restored.rng["cuda:0"], gpu_like.rng["cuda:0"])


def test_metadata_cannot_overwrite_versions(tmp_path):
    _, state = a_state()
    path = checkpoint.save(tmp_path / "a", state, {"torch": "fake", "note": "mine"})
    meta = checkpoint.read(path)["metadata"]
    assert meta["torch"] == str(torch.__version__) and meta["note"] == "mine"
    with pytest.raises(TypeError, match="JSON-serialisable"):
        checkpoint.save(tmp_path / "b", state, {"tensor": torch.ones(1)})
    assert not (tmp_path / "b").exists()


def trials() -> int:
    return 30 if settings.default.max_examples > 50 else 8


def test_sigkill_while_saving_never_loses_the_latest_commit(tmp_path):
    """A process that checkpoints after every step (keep_last=2) is SIGKILLed at random
    moments, most of them in the middle of a write or a deletion. Afterwards every listed
    checkpoint reads back intact, and the newest is at least the last one reported
    committed: a kill never costs an already-committed checkpoint."""
    rng = random.Random(0)
    like = None
    for trial in range(trials()):
        directory = tmp_path / f"trial{trial}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.workers", "save", str(directory)],
            cwd=ROOT, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.3, 1.5))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        committed = [
            int(line.split()[1]) for line in out.splitlines() if line.startswith("committed")
        ]
        assert proc.returncode == -signal.SIGKILL, "the worker ended on its own (crashed?)"
        assert committed, "the worker was killed before its first commit: sleep longer"
        listed = checkpoint.checkpoints(directory)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no damaged checkpoint may be listed
            path, contents = checkpoint.read_latest(directory)
        assert checkpoint.step_of(path) >= committed[-1]
        for p in listed:
            contents = checkpoint.read(p)
            step = int(contents["state"][".step"])
            assert step == checkpoint.step_of(p)
            w = contents["state"][".params['0.weight']"]
            if like is None:
                like = w - step
            torch.testing.assert_close(w, like + step, rtol=0, atol=1e-3)
        checkpoint.clean_temporaries(directory)
        assert not any(p.name.startswith(".") for p in directory.iterdir())


def test_unreadable_parts_count_as_damage(tmp_path):
    _, state = a_state()
    older = checkpoint.save(tmp_path / "step-000000001", state)
    for part in (checkpoint.MARKER, checkpoint.STATE_FILE):
        newer = checkpoint.save(tmp_path / "step-000000002", state)
        (newer / part).unlink()
        (newer / part).mkdir()  # a directory where a file should be
        with pytest.warns(UserWarning, match="skipped 1 damaged"):
            assert checkpoint.read_latest(tmp_path)[0] == older
        checkpoint.remove(newer)


def test_versions_of_one_step_sort_after_it(tmp_path):
    _, state = a_state()
    for name in ("step-000000010-1", "step-000000009", "step-000000010", "step-000000010-2"):
        checkpoint.save(tmp_path / name, state)
    names = [p.name for p in checkpoint.checkpoints(tmp_path)]
    assert names == ["step-000000009", "step-000000010", "step-000000010-1", "step-000000010-2"]
    assert checkpoint.step_of(tmp_path / "step-000000010-2") == 10
