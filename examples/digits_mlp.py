"""The loopkit demo: an MLP on scikit-learn's bundled digits, trained with the compiled
functional step, then timed against the ordinary imperative PyTorch loop.

    python examples/digits_mlp.py            # full run (~1 min on a laptop CPU)
    python examples/digits_mlp.py --fast     # the CI smoke version
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import loopkit as lk
from loopkit import optim
from loopkit.cli import positive_int


def digits(seed: int = 0):
    """(x_train, y_train), (x_val, y_val): 8x8 digit images as 64 floats in [0, 1]."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = len(x) // 5
    val, train = order[:n_val], order[n_val:]
    return (x[train], y[train]), (x[val], y[val])


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 256), nn.GELU(), nn.Dropout(0.1),
        nn.Linear(256, 256), nn.GELU(), nn.Dropout(0.1),
        nn.Linear(256, 10),
    )  # fmt: skip


def loss_fn(net, batch):
    x, y = batch
    logits = net(x)
    return F.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean()}


def steps_per_second(run, batches, rounds: int, per_round: int) -> list[float]:
    """Throughput of ``run(batch)`` in each of ``rounds`` rounds of ``per_round`` steps."""
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(per_round):
            run(batches[i % len(batches)])
        out.append(per_round / (time.perf_counter() - start))
    return out


def compare_with_imperative(step, state, model, batches, lr, weight_decay, rounds=7, per_round=50):
    """Median steps/s of the compiled loopkit step and of the imperative eager loop (same model,
    same AdamW, same clipping), measured in alternating rounds in this process."""
    holder = {"state": state}

    def loopkit_step(batch):
        holder["state"], _ = step(holder["state"], batch)

    ref = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(ref.parameters(), lr=lr, weight_decay=weight_decay)

    def imperative_step(batch):
        opt.zero_grad()
        loss, _ = loss_fn(ref, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()

    for run in (loopkit_step, imperative_step):  # warm up (the compile is already done)
        steps_per_second(run, batches, 1, 10)
    ours, theirs = [], []
    for _ in range(rounds):
        ours += steps_per_second(loopkit_step, batches, 1, per_round)
        theirs += steps_per_second(imperative_step, batches, 1, per_round)
    return statistics.median(ours), statistics.median(theirs)


def _new_run_directory(root: Path) -> Path:
    """``root/run-<n>`` for the first ``n`` not taken."""
    n = 1
    while (root / f"run-{n}").exists():
        n += 1
    return root / f"run-{n}"


def main(epochs: int = 15, batch_size: int = 64, out: str = "runs/digits", fast: bool = False):
    torch.manual_seed(0)
    (x_train, y_train), (x_val, y_val) = digits()
    model = make_model()
    lr, weight_decay = 3e-3, 1e-4
    opt = optim.adamw(
        lr=optim.schedules.linear_warmup(lr, warmup_steps=40), weight_decay=weight_decay
    )
    state = lk.TrainState.create(model, opt, seed=0)
    step = lk.train_step(model, loss_fn, opt, clip_norm=1.0, compile=True)
    evaluate = lk.eval_step(model, loss_fn)
    train = lk.data.Batches(x_train, y_train, batch_size=batch_size, shuffle=True, drop_last=True)
    val = lk.data.Batches(x_val, y_val, batch_size=512)

    out = _new_run_directory(Path(out))  # each run its own: never beside an earlier one's
    checkpoints = lk.hooks.Checkpoint(out, keep_last=2)
    start = time.perf_counter()
    state = lk.fit(step, state, train, epochs=epochs, hooks=[
        lk.hooks.Validate(evaluate, val),
        checkpoints,
        lk.hooks.JSONLLogger(out),
        lk.hooks.ProgressBar(),
    ])  # fmt: skip
    seconds = time.perf_counter() - start
    final = lk.evaluate(evaluate, state, val)
    written = checkpoints.saved[-1]
    print(
        f"trained {int(state.step)} steps in {seconds:.1f} s (including the compile); "
        f"validation accuracy {final['acc']:.4f}; checkpoint {written}; "
        f"curves: python -m loopkit plot {out}"
    )

    batches = list(train)
    rounds, per_round = (3, 20) if fast else (7, 50)
    ours, theirs = compare_with_imperative(
        step, state, model, batches, lr, weight_decay, rounds, per_round
    )
    print(
        f"speed: compiled loopkit step {ours:.0f} steps/s vs imperative eager loop "
        f"{theirs:.0f} steps/s (median of {rounds} alternating rounds): {ours / theirs:.2f}x"
    )
    return {"accuracy": final["acc"], "ratio": ours / theirs, "state": state, "checkpoint": written}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=positive_int, default=None)
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--out", default="runs/digits")
    parser.add_argument("--fast", action="store_true", help="few epochs, short timing (for CI)")
    args = parser.parse_args()
    epochs = args.epochs or (8 if args.fast else 15)
    main(epochs=epochs, batch_size=args.batch_size, out=args.out, fast=args.fast)
