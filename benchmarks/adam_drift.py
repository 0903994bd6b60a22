"""How far AdamW implementations drift from torch.optim's default over many steps.

    PYTHONPATH=. .venv/bin/python benchmarks/adam_drift.py [--steps 50 200] [--lr 0.01 0.05]

Trains one small MLP (8-32-32-4, Tanh, batches of 16) on the same seeded batches with
torch.optim.AdamW's single-tensor default, torch's foreach and fused implementations, and
loopkit's eager step with the chain (``fused=False``) and with the fused kernel (the
default), and prints each one's largest absolute difference from the default's params
over a few seeds. Every implementation rounds differently, and training amplifies a
rounding difference, so the question is not whether they drift but whether the fused
kernel drifts more than the chain does.
"""

import argparse
import copy

import torch
import torch.nn.functional as F
from torch import nn

import loopkit as lk
from loopkit import optim


def loss_fn(net, batch):
    return F.cross_entropy(net(batch[0]), batch[1])


def final_params(seed: int, steps: int, lr: float) -> dict[str, dict]:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)
    )
    g = torch.Generator().manual_seed(seed)
    data = [
        (torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g))
        for _ in range(steps)
    ]
    out = {}
    for name, kw in (("single", {"foreach": False}), ("foreach", {"foreach": True}),
                     ("fused", {"fused": True})):  # fmt: skip
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.01, **kw)
        for batch in data:
            opt.zero_grad()
            loss_fn(m, batch).backward()
            opt.step()
        out[f"torch {name}"] = {k: v.detach() for k, v in m.named_parameters()}
    for name, fused in (("chain", False), ("fused", None)):
        tx = optim.adamw(lr=lr, weight_decay=0.01, fused=fused)
        step = lk.train_step(model, loss_fn, tx)
        state = lk.TrainState.create(model, tx)
        for batch in data:
            state, _ = step(state, batch)
        out[f"loopkit {name}"] = state.params
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--lr", type=float, nargs="+", default=[0.01, 0.05])
    parser.add_argument("--seeds", type=int, default=4)
    args = parser.parse_args()
    for steps in args.steps:
        for lr in args.lr:
            worst: dict[str, float] = {}
            for seed in range(args.seeds):
                runs = final_params(seed, steps, lr)
                ref = runs.pop("torch single")
                for name, params in runs.items():
                    d = max((params[k] - ref[k]).abs().max().item() for k in ref)
                    worst[name] = max(worst.get(name, 0.0), d)
            cells = ", ".join(f"{k} {v:.1e}" for k, v in worst.items())
            print(f"{steps} steps, lr {lr}: largest |difference| from torch's default: {cells}")
