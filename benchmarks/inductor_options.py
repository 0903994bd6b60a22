"""The compiled loopkit step of each benchmark model with inductor's defaults and with other
inductor options, side by side: compile time, peak memory and step time.

    PYTHONPATH=. .venv/bin/python benchmarks/inductor_options.py \\
        '{"no horizontal fusion": {"cpp.max_horizontal_fusion_size": 1}}' [--models cnn]

The argument maps a label to the ``options`` given to ``torch.compile`` (through
``loopkit.train_step(..., compile=True, options=...)``). Steps are timed in interleaved
rounds in this process; the median and fastest round are printed.
"""

import argparse
import json
import time

import torch

import loopkit as lk
from loopkit import bench, optim

STEPS = {"mlp": 50, "cnn": 3, "transformer": 5}


def build(case: bench.Case, options: dict) -> tuple[bench.Runner, float]:
    batch = case.batch(torch.device("cpu"))
    torch.manual_seed(0)
    model = case.build()
    opt = optim.adamw(lr=bench.LR, weight_decay=bench.WEIGHT_DECAY)
    step = lk.train_step(model, bench.loss_fn, opt, compile=True, donate=True, options=options)
    holder = [lk.TrainState.create(model, opt)]

    def run() -> torch.Tensor:
        holder[0], metrics = step(holder[0], batch)
        return metrics["loss"]

    start = time.perf_counter()
    run()
    return bench.Runner(run, lambda: lk.tree.tree_leaves(holder[0])), time.perf_counter() - start


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("configs", help="JSON: label -> inductor options")
    parser.add_argument("--models", default="mlp,cnn,transformer")
    parser.add_argument("--rounds", type=int, default=11)
    args = parser.parse_args()
    configs = {"defaults": {}, **json.loads(args.configs)}
    cpu = torch.device("cpu")
    runners = {}
    for case in (c for c in bench.CASES if c.model in args.models.split(",")):
        for label, options in configs.items():
            runner, compile_s = build(case, options)
            runners[(case.model, label)] = runner
            peak = bench.peak_step_memory(runner, cpu) / 2**20
            print(f"{case.model} / {label}: first call {compile_s:.1f} s, peak {peak:.2f} MB")
    times: dict = {k: [] for k in runners}
    for _ in range(args.rounds):
        for key, runner in runners.items():
            n = STEPS[key[0]]
            start = time.perf_counter()
            for _ in range(n):
                runner.step()
            times[key].append((time.perf_counter() - start) / n * 1e3)
    for (model, label), ts in times.items():
        ts = sorted(ts)
        print(f"{model} / {label}: median {ts[len(ts) // 2]:.2f} ms, fastest {ts[0]:.2f} ms")
