"""The eager AdamW update per leaf vs batched with torch's multi-tensor kernels, on one
device: the measurement behind ``loopkit.optim.leafwise.FOREACH_DEVICES``.

    PYTHONPATH=. .venv/bin/python benchmarks/update_batching.py [--device cuda]

For the benchmark MLP and transformer, interleaved rounds in one process: the update plus
``apply_updates`` with batching forced on, then forced off; the fastest and median round.
"""

import argparse
import time

import torch

import loopkit as lk
import loopkit.optim.leafwise as leafwise
from loopkit import bench, optim


def update_us(case: bench.Case, device: torch.device, rounds: int = 40, reps: int = 10) -> dict:
    torch.manual_seed(0)
    opt = optim.adamw(lr=1e-3, weight_decay=1e-2)
    state = lk.TrainState.create(case.build().to(device), opt)
    params = state.params
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    opt_state = [state.opt_state]

    def update() -> None:
        updates, opt_state[0] = opt.update(grads, opt_state[0], params)
        optim.apply_updates(params, updates)

    batched = leafwise.FOREACH_DEVICES | {device.type}
    per_leaf = leafwise.FOREACH_DEVICES - {device.type}
    times: dict[str, list[float]] = {"batched": [], "per leaf": []}
    for _ in range(rounds + 3):
        for label, devices in (("batched", batched), ("per leaf", per_leaf)):
            leafwise.FOREACH_DEVICES = devices
            bench._sync(device)
            start = time.perf_counter()
            for _ in range(reps):
                update()
            bench._sync(device)
            times[label].append((time.perf_counter() - start) / reps * 1e6)
    return {k: (min(v[3:]), sorted(v[3:])[len(v[3:]) // 2]) for k, v in times.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    device = torch.device(parser.parse_args().device)
    default = leafwise.FOREACH_DEVICES
    try:
        for case in (bench.CASES[0], bench.CASES[2]):
            rows = update_us(case, device).items()
            print(case.label, ", ".join(f"{k}: {a:.0f} µs (median {b:.0f})" for k, (a, b) in rows))
    finally:
        leafwise.FOREACH_DEVICES = default
