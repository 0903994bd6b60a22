"""Driver overhead: ``fit`` with a progress bar, a JSONL logger and validation every epoch,
versus a bare Python loop doing the same work (the same compiled step over the same
batches, the same validation) with no hooks. Both run in alternating rounds in one process.

    .venv/bin/python benchmarks/driver_overhead.py [--rounds 7 --epochs 3]

Prints the median seconds per round of each and the overhead of fit in percent. On a
shared 2-core machine that difference is within the noise, so it also measures the
driver's own cost per step directly: ``fit`` with the same hooks around a step that does no
work (it returns the demo step's three metric tensors), minus a bare loop around it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import loopkit as lk
from loopkit import optim

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
import digits_mlp  # noqa: E402


def main(rounds: int, epochs: int) -> None:
    torch.manual_seed(0)
    (x, y), (xv, yv) = digits_mlp.digits()
    model = digits_mlp.make_model()
    opt = optim.adamw(lr=3e-3, weight_decay=1e-4)
    step = lk.train_step(model, digits_mlp.loss_fn, opt, clip_norm=1.0, compile=True)
    evaluate = lk.eval_step(model, digits_mlp.loss_fn)
    train = lk.data.Batches(x, y, batch_size=64, shuffle=True, drop_last=True)
    val = lk.data.Batches(xv, yv, batch_size=512)
    state0 = lk.TrainState.create(model, opt, seed=0)
    logdir = tempfile.mkdtemp()

    def bare() -> None:
        state = state0
        for epoch in range(epochs):
            train.set_epoch(epoch)
            total = 0.0
            for batch in train:
                state, metrics = step(state, batch)
                total = total + metrics["loss"]
            float(total)  # the one sync per epoch that fit also makes
            lk.evaluate(evaluate, state, val)

    def with_fit() -> None:
        hooks = [lk.hooks.Validate(evaluate, val), lk.hooks.JSONLLogger(logdir),
                 lk.hooks.ProgressBar()]  # fmt: skip
        lk.fit(step, state0, train, epochs=epochs, hooks=hooks)

    for run in (bare, with_fit):  # compile and warm up
        run()
    times: dict[str, list[float]] = {"bare loop": [], "fit + hooks": []}
    for _ in range(rounds):
        for name, run in (("bare loop", bare), ("fit + hooks", with_fit)):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in times.items()}
    steps = epochs * len(train)
    print(f"{steps} steps + {epochs} validations per round, median of {rounds} rounds:")
    for name, t in medians.items():
        spread = max(times[name]) - min(times[name])
        print(f"  {name:12s} {t * 1e3:8.1f} ms/round  (spread {spread * 1e3:.1f} ms)")
    ratio = medians["fit + hooks"] / medians["bare loop"]
    print(f"fit overhead: {100 * (ratio - 1):+.2f}%")

    metrics = step(state0, next(iter(train)))[1]

    def no_work(state, batch):
        return state, metrics

    def per_step(run) -> float:
        start = time.perf_counter()
        run()
        return (time.perf_counter() - start) / steps

    def bare_no_work() -> None:
        for epoch in range(epochs):
            train.set_epoch(epoch)
            for batch in train:
                no_work(state0, batch)

    def fit_no_work() -> None:
        hooks = [lk.hooks.Validate(lambda s, b: metrics, val), lk.hooks.JSONLLogger(logdir),
                 lk.hooks.ProgressBar()]  # fmt: skip
        lk.fit(no_work, state0, train, epochs=epochs, hooks=hooks)

    cost = [per_step(fit_no_work) - per_step(bare_no_work) for _ in range(rounds)]
    driver = statistics.median(cost)
    share = 100 * driver * steps / medians["bare loop"]
    print(
        f"driver cost: {driver * 1e6:.0f} us/step = {share:.2f}% of a round of the real step "
        "(per-epoch hook work spread over the epoch's steps; batching, which both loops do, "
        "not counted)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    main(args.rounds, args.epochs)
