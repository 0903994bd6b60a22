"""pytest-benchmark: one training step of the demo's MLP, three ways.

    .venv/bin/python -m pytest benchmarks/ --benchmark-columns=median,iqr,ops

Not part of `make test` (timings are measured, never asserted). The side-by-side
comparison in one process, with ratios, is the demo's last line (and issue 5's script).
"""

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import loopkit as lk
from loopkit import optim

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
import digits_mlp  # noqa: E402

LR, WD = 3e-3, 1e-4


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    (x, y), _ = digits_mlp.digits()
    batch = (x[:64], y[:64])
    return digits_mlp.make_model(), batch


def run_loopkit(benchmark, model, batch, compile):
    opt = optim.adamw(lr=LR, weight_decay=WD)
    step = lk.train_step(model, digits_mlp.loss_fn, opt, clip_norm=1.0, compile=compile)
    holder = [lk.TrainState.create(model, opt, seed=0)]

    def one():
        holder[0], _ = step(holder[0], batch)

    for _ in range(3):  # compile and warm up outside the timing
        one()
    benchmark(one)


def test_imperative_eager(benchmark, setup):
    model, (x, y) = setup
    model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)

    def one():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    benchmark(one)


def test_loopkit_eager(benchmark, setup):
    run_loopkit(benchmark, *setup, compile=False)


def test_loopkit_compiled(benchmark, setup):
    run_loopkit(benchmark, *setup, compile=True)
