"""Data parallelism: two gloo processes under torchrun against single-process training."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import loopkit as lk
from loopkit import optim
from tests.helpers import loss_fn

ROOT = Path(__file__).resolve().parent.parent
CHECKS = [
    "equals single process (eager)",
    "resumes exactly",
    "augmentation resumes exactly",
    "dropout differs across ranks",
    "errors",
    "buffers stay replicated",
    "other dtypes and non-finite buffers",
    "evaluate agrees across ranks",
    "an empty shard adds nothing",
    "equals single process (compiled)",
]


@pytest.mark.compile
def test_two_processes_under_torchrun(tmp_path):
    """The worker (tests/dp_worker.py) checks, on each of 2 ranks: N data-parallel steps
    (eager and compiled) equal N single-process steps on the concatenated batches, uneven
    tail included, ≤1e-6; a data-parallel fit with BatchNorm, Dropout and checkpoints
    crashed and resumed is bitwise identical to an uninterrupted one, and writes its log
    once; so is one over a shuffling DataLoader with per-rank random augmentation;
    Dropout masks differ across ranks from one replicated generator; a world-size mismatch
    on resume and ranks with different models give clear errors; a rank with an empty
    batch adds nothing (its loss was NaN)."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    opt = optim.sgd(lr=0.1)
    single = tmp_path / "single"
    batches = [(torch.randn(4, 5), torch.randint(0, 3, (4,)))]
    state = lk.TrainState.create(model, opt)
    lk.fit(lk.train_step(model, loss_fn, opt), state, batches, hooks=[lk.hooks.Checkpoint(single)])
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "-m", "tests.dp_worker", str(out), str(single), "--compile"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    for rank in range(2):
        assert (out / f"rank{rank}.txt").read_text().splitlines() == CHECKS


def test_a_data_parallel_step_without_a_process_group_says_how_to_start_one():
    model = nn.Linear(5, 3)
    opt = optim.sgd(lr=0.1)
    step = lk.distributed.train_step(model, loss_fn, opt)
    with pytest.raises(lk.distributed.DistributedError, match="torchrun"):
        step(lk.TrainState.create(model, opt), (torch.randn(4, 5), torch.randint(0, 3, (4,))))


def test_sharded_batches_concatenate_to_the_global_batches():
    x = torch.arange(23)
    for drop_last in (False, True):
        whole = list(lk.data.Batches(x, batch_size=6, shuffle=True, seed=2, drop_last=drop_last))
        shards = [
            list(
                lk.data.Batches(
                    x, batch_size=3, shuffle=True, seed=2, drop_last=drop_last, rank=r, world_size=2
                )
            )  # fmt: skip
            for r in range(2)
        ]
        assert len(shards[0]) == len(shards[1]) == len(whole) == (3 if drop_last else 4)
        for a, b, w in zip(*shards, whole, strict=True):
            assert torch.equal(torch.cat([a, b]), w)
    # a tail smaller than the number of ranks is dropped
    assert [len(b) for b in lk.data.Batches(torch.arange(13), batch_size=3, rank=3,
                                            world_size=4)] == [3]  # fmt: skip
    with pytest.raises(ValueError, match="rank"):
        lk.data.Batches(x, batch_size=3, rank=2, world_size=2)


def test_the_torchrun_example_runs_and_resumes(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    command = [*torchrun, "examples/ddp_digits.py", "--fast", "--out", str(tmp_path)]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "2 processes, 44 steps of 64 examples; validation accuracy" in first.stdout
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2  # rank 0 only
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "2 processes, 44 steps" in again.stdout  # resumed a finished run: nothing to do
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
