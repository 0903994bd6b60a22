"""What calling the model through ``ModuleBinding`` instead of ``functional_call`` saves.

    PYTHONPATH=. .venv/bin/python benchmarks/binding_overhead.py

Per case, interleaved rounds in one process, fastest round: a forward under ``no_grad``
through ``functional_call`` and through a binding (and the binding's per-call check that
the module is unchanged), then the eager train step built with and without the binding,
next to the imperative eager loop.
"""

import time

import torch
from torch.func import functional_call

import loopkit as lk
from loopkit import bench, optim
from loopkit import step as step_module
from loopkit.binding import ModuleBinding


def fastest_us(fns: dict, rounds: int = 30, reps: int = 20) -> dict[str, float]:
    for f in fns.values():
        for _ in range(5):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            start = time.perf_counter()
            for _ in range(reps):
                f()
            times[k].append((time.perf_counter() - start) / reps * 1e6)
    return {k: min(v) for k, v in times.items()}


def measure(case: bench.Case) -> None:
    torch.manual_seed(0)
    model, batch = case.build(), case.batch(torch.device("cpu"))
    named = [*model.named_parameters(), *model.named_buffers()]
    tensors = {k: v.detach().clone() for k, v in named}
    binding, x = ModuleBinding(model), batch[0]
    with torch.no_grad():
        forward = fastest_us({
            "functional_call": lambda: functional_call(model, dict(tensors), (x,)),
            "binding": lambda: binding(dict(tensors), (x,), {}),
            "binding check": binding._intact,
        })  # fmt: skip
    opt = optim.adamw(lr=1e-3)
    steps = {"bound": lk.train_step(model, bench.loss_fn, opt)}
    original = step_module.ModuleBinding
    step_module.ModuleBinding = lambda module: None  # Net falls back to functional_call
    try:
        steps["functional_call"] = lk.train_step(model, bench.loss_fn, opt)
    finally:
        step_module.ModuleBinding = original
    states = {k: lk.TrainState.create(model, opt) for k in steps}

    def run(k: str) -> None:
        states[k], _ = steps[k](states[k], batch)

    imperative = bench.make_runner("imperative_eager", case, torch.device("cpu"), "inductor")
    train = fastest_us({
        "imperative eager": imperative.step,
        "loopkit eager, binding": lambda: run("bound"),
        "loopkit eager, functional_call": lambda: run("functional_call"),
    })  # fmt: skip
    base = train["imperative eager"]
    print(case.label)
    print("  forward: " + ", ".join(f"{k} {v:.0f} µs" for k, v in forward.items()))
    print(
        "  train step: " + ", ".join(f"{k} {v:.0f} µs ({base / v:.2f}x)" for k, v in train.items())
    )  # noqa: E501


if __name__ == "__main__":
    for case in (bench.CASES[0], bench.TINY[0]):
        measure(case)
