"""The eager AdamW (or RMSprop) update, four ways, on one device: the measurement behind
``loopkit.optim.leafwise.FOREACH_DEVICES`` and ``loopkit.optim.fused``.

    PYTHONPATH=. .venv/bin/python benchmarks/update_batching.py [--device cuda]
    PYTHONPATH=. .venv/bin/python benchmarks/update_batching.py --optimizer rmsprop

For the benchmark MLP and transformer, interleaved rounds in one process, the fastest and
the median round of:

- ``per leaf``: the chain's update plus ``apply_updates``, each op once per param;
- ``batched``: the same with torch's multi-tensor kernels forced on (``leafwise``);
- ``fused``: ``apply_gradients``, which runs torch's fused AdamW kernel on copies (for
  RMSprop: torch.optim's own ops, batched, on copies);
- ``torch.optim``: ``torch.optim.AdamW(...).step()`` with its default implementation, in
  place (the imperative loop's update).
"""

import argparse
import time
from collections.abc import Callable

import torch

import loopkit as lk
import loopkit.optim.leafwise as leafwise
from loopkit import bench, optim

OPTIMIZERS = {  # loopkit's and torch.optim's, with the same hyperparameters
    "adamw": (optim.adamw, torch.optim.AdamW, dict(lr=bench.LR, weight_decay=bench.WEIGHT_DECAY)),
    "rmsprop": (optim.rmsprop, torch.optim.RMSprop, dict(lr=bench.LR)),
}


def update_us(
    case: bench.Case, device: torch.device, rounds: int = 40, reps: int = 10, name: str = "adamw"
) -> dict:
    ours, theirs, kwargs = OPTIMIZERS[name]
    torch.manual_seed(0)
    model = case.build().to(device)
    opt = ours(**kwargs)
    state = lk.TrainState.create(model, opt)
    params = state.params
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    opt_state = [state.opt_state]

    def chain() -> None:
        updates, opt_state[0] = opt.update(grads, opt_state[0], params)
        optim.apply_updates(params, updates)

    def fused() -> None:
        optim.apply_gradients(opt, grads, opt_state[0], params)

    for p, g in zip(model.parameters(), grads.values(), strict=True):
        p.grad = g.clone()
    imperative = theirs(model.parameters(), **kwargs)

    default = leafwise.FOREACH_DEVICES
    variants: dict[str, tuple[Callable[[], None], frozenset]] = {
        "per leaf": (chain, default - {device.type}),
        "batched": (chain, default | {device.type}),
        "fused": (fused, default),
        "torch.optim": (imperative.step, default),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    try:
        for _ in range(rounds + 3):
            for label, (update, devices) in variants.items():
                leafwise.FOREACH_DEVICES = devices
                bench._sync(device)
                start = time.perf_counter()
                for _ in range(reps):
                    update()
                bench._sync(device)
                times[label].append((time.perf_counter() - start) / reps * 1e6)
    finally:
        leafwise.FOREACH_DEVICES = default
    return {k: (min(v[3:]), sorted(v[3:])[len(v[3:]) // 2]) for k, v in times.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adamw")
    args = parser.parse_args()
    device = torch.device(args.device)
    for case in (bench.CASES[0], bench.CASES[2]):
        rows = update_us(case, device, name=args.optimizer).items()
        print(case.label, ", ".join(f"{k}: {a:.0f} µs (median {b:.0f})" for k, (a, b) in rows))
