"""Ensemble throughput: K MLPs trained by one vmapped compiled step versus K sequential
compiled runs (one compiled plain step called on each member's state in turn).

    python benchmarks/ensemble_speed.py            # K=8, medians of 7 interleaved rounds
    python benchmarks/ensemble_speed.py --members 4 --rounds 5

Both sides are compiled and warmed up before timing; rounds alternate between them so
that load from other processes hits both alike. Prints member-steps per second (K models
advanced by one step = K member-steps) for each, and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import loopkit as lk
from loopkit import optim


def make_model(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                         nn.Linear(width, 10))  # fmt: skip


def loss_fn(net, batch):
    x, y = batch
    return F.cross_entropy(net(x), y)


def timed(run, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        run()
    return time.perf_counter() - start


def main(members: int = 8, width: int = 32, batch_size: int = 64, rounds: int = 7,
         steps: int = 30) -> dict:  # fmt: skip
    torch.manual_seed(0)
    opt = optim.adamw(lr=1e-3, weight_decay=1e-2)
    lrs = torch.logspace(-4, -2, members).tolist()
    states = [
        lk.TrainState.create(make_model(width), optim.adamw(lr=lr, weight_decay=1e-2), seed=k)
        for k, lr in enumerate(lrs)
    ]
    batch = (torch.randn(batch_size, 64), torch.randint(0, 10, (batch_size,)))
    model = make_model(width)
    plain = lk.train_step(model, loss_fn, opt, compile=True)
    vmapped = lk.ensemble_step(lk.train_step(model, loss_fn, opt), compile=True)
    holder = {"ensemble": lk.ensemble.stack(states), "members": states}

    def ensemble_step():
        holder["ensemble"], _ = vmapped(holder["ensemble"], batch)

    def sequential_steps():
        holder["members"] = [plain(s, batch)[0] for s in holder["members"]]

    t0 = time.perf_counter()
    ensemble_step()
    sequential_steps()
    print(f"compiled both in {time.perf_counter() - t0:.1f} s; warming up")
    timed(ensemble_step, steps)
    timed(sequential_steps, steps)
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(members * steps / timed(ensemble_step, steps))
        theirs.append(members * steps / timed(sequential_steps, steps))
    print(
        "rounds (member-steps/s): ensemble",
        [round(v) for v in ours],
        "sequential",
        [round(v) for v in theirs],
    )
    ens, seq = statistics.median(ours), statistics.median(theirs)
    print(f"{members} MLPs (64-{width}-{width}-10, batch {batch_size}, AdamW, per-member lr): "
          f"vmapped compiled step {ens:.0f} member-steps/s, {members} sequential compiled "
          f"runs {seq:.0f} member-steps/s (medians of {rounds} interleaved rounds of {steps} "
          f"steps): {ens / seq:.2f}x")  # fmt: skip
    return {"ensemble": ens, "sequential": seq, "ratio": ens / seq}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch.set_num_threads (default: torch's; on a loaded machine 1 is steadier)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s)")
    main(args.members, args.width, args.batch_size, args.rounds, args.steps)
