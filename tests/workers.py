"""Programs the tests run in subprocesses and kill with SIGKILL.

``python -m tests.workers save DIR``: checkpoints a ~6 MB state after every step of a
trivial step function, keep_last=2, printing ``committed <step>`` after each commit.

``python -m tests.workers fit DIR [--resume]``: a small real training run (BatchNorm,
Dropout, shuffled batches, validation, early stopping, a JSONL log) checkpointing every 2
steps, printing ``step <n>`` after each step and saving its final state to DIR/final.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

import loopkit as lk
from loopkit import optim


class Announce(lk.hooks.Checkpoint):
    def save(self, loop, epoch=None):
        path = super().save(loop, epoch)
        print(f"committed {loop.step}", flush=True)
        return path


def save_forever(directory: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(400, 400), nn.Linear(400, 400), nn.Linear(400, 400))
    state = lk.TrainState.create(model, optim.adam())

    def step(state, batch):  # every leaf of params moves, so each checkpoint differs
        params = {k: v + 1 for k, v in state.params.items()}
        return state.replace(params=params, step=state.step + 1), {}

    print("ready", flush=True)
    data = lk.data.Reiterable(lambda: iter([None] * 1000), length=1000)
    lk.fit(step, state, data, epochs=1000,
           hooks=[Announce(directory, every=None, every_steps=1, keep_last=2)])  # fmt: skip


def run(directory: Path, resume: bool) -> lk.TrainState:
    from tests.helpers import loss_fn

    torch.manual_seed(0)
    x = torch.randn(60, 5)
    y = (x[:, 0] + 0.3 * torch.randn(60) > 0).long()
    model = nn.Sequential(
        nn.Linear(5, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 2)
    )
    opt = optim.adamw(lr=optim.schedules.cosine_annealing(3e-2, T_max=40), weight_decay=0.01)
    step = lk.train_step(model, loss_fn, opt)

    class Say(lk.Hook):
        def on_step_end(self, loop):
            print(f"step {loop.step}", flush=True)

    hooks = [
        lk.hooks.Validate(lk.eval_step(model, loss_fn), [(x[48:], y[48:])]),
        lk.hooks.EarlyStopping("val/loss", patience=3),
        lk.hooks.JSONLLogger(directory),
        lk.hooks.Checkpoint(directory / "ckpt", every_steps=2, keep_last=2),
        Say(),
    ]
    data = lk.data.Batches(x[:48], y[:48], batch_size=10, shuffle=True, seed=1)
    state = lk.fit(step, lk.TrainState.create(model, opt, seed=0), data, epochs=8,
                   hooks=hooks, resume="latest" if resume else None)  # fmt: skip
    lk.checkpoint.save(directory / "final", state)
    print("done", flush=True)
    return state


if __name__ == "__main__":
    mode, where = sys.argv[1], Path(sys.argv[2])
    if mode == "save":
        save_forever(where)
    else:
        run(where, resume="--resume" in sys.argv)
