"""The eager step with other optimizers than the comparison's AdamW, against the imperative
loop with the same torch.optim optimizer, on the benchmark MLP.

    PYTHONPATH=. .venv/bin/python benchmarks/eager_optimizers.py [--rounds 15]

Interleaved rounds of 50 steps in one process; the fastest round per variant, and the
ratio of loopkit's steps/s to the imperative loop's.
"""

import argparse
import functools
import time

import torch

import loopkit as lk
from loopkit import bench, optim

OPTIMIZERS = {
    "adamw": (optim.adamw, torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 1e-2}),
    "sgd": (optim.sgd, torch.optim.SGD, {"lr": 1e-2}),
    "sgd momentum": (optim.sgd, torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9}),
    "rmsprop": (optim.rmsprop, torch.optim.RMSprop, {"lr": 1e-3}),
    "adagrad": (optim.adagrad, torch.optim.Adagrad, {"lr": 1e-2}),
    # the kernels' gain, measured in the same run: the chains they replace
    "adamw (chain)": (
        functools.partial(optim.adamw, fused=False), torch.optim.AdamW,
        {"lr": 1e-3, "weight_decay": 1e-2},
    ),
    "sgd momentum (chain)": (
        functools.partial(optim.sgd, fused=False), torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9},
    ),
    "adagrad (chain)": (functools.partial(optim.adagrad, fused=False), torch.optim.Adagrad,
                        {"lr": 1e-2}),
    "rmsprop (chain)": (functools.partial(optim.rmsprop, foreach=False), torch.optim.RMSprop,
                        {"lr": 1e-3}),
    "rmsprop centered momentum": (optim.rmsprop, torch.optim.RMSprop,
                                  {"lr": 1e-3, "momentum": 0.9, "centered": True}),
}  # fmt: skip


def fastest_ms(name: str, rounds: int, steps: int = 50) -> tuple[float, float]:
    ours, theirs, kwargs = OPTIMIZERS[name]
    case = bench.CASES[0]
    batch = case.batch(torch.device("cpu"))
    torch.manual_seed(0)
    model = case.build()
    tx = ours(**kwargs)
    step = lk.train_step(model, bench.loss_fn, tx)
    holder = [lk.TrainState.create(model, tx)]
    reference = case.build()
    reference.load_state_dict(model.state_dict())
    opt = theirs(reference.parameters(), **kwargs)

    def imperative() -> None:
        opt.zero_grad()
        bench.loss_fn(reference, batch).backward()
        opt.step()

    def loopkit() -> None:
        holder[0], _ = step(holder[0], batch)

    best = {"imperative": float("inf"), "loopkit": float("inf")}
    for f in (imperative, loopkit):
        for _ in range(10):
            f()
    for _ in range(rounds):
        for label, f in (("imperative", imperative), ("loopkit", loopkit)):
            start = time.perf_counter()
            for _ in range(steps):
                f()
            best[label] = min(best[label], (time.perf_counter() - start) / steps * 1e3)
    return best["imperative"], best["loopkit"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--only", nargs="*", choices=sorted(OPTIMIZERS), default=list(OPTIMIZERS))
    args = parser.parse_args()
    print("| optimizer | imperative ms/step | loopkit eager ms/step | loopkit vs imperative |")
    print("|---|---|---|---|")
    for name in args.only:
        imp, lk_ms = fastest_ms(name, args.rounds)
        print(f"| {name} | {imp:.2f} | {lk_ms:.2f} | {imp / lk_ms:.2f}x |")
