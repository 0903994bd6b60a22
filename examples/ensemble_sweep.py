"""An lr sweep as one ensemble: K MLPs on scikit-learn's digits, each with its own seed
and learning rate, trained at once by one vmapped (and compiled) step; plots the K loss
curves.

    python examples/ensemble_sweep.py            # 8 members, compiled (~1 min)
    python examples/ensemble_sweep.py --fast     # 4 members, eager, a few seconds
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import loopkit as lk
from loopkit import optim
from loopkit.cli import positive_int

sys.path.insert(0, str(Path(__file__).parent))
from digits_mlp import digits  # noqa: E402  (the same split of scikit-learn's digits)


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Dropout(0.1), nn.Linear(128, 10))


def loss_fn(net, batch):
    x, y = batch
    logits = net(x)
    return F.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean()}


class LossCurves(lk.Hook):
    """Keeps every step's per-member losses on the device; one sync at the end."""

    def __init__(self):
        self.losses: list[torch.Tensor] = []

    def on_step_end(self, loop: lk.Loop) -> None:
        self.losses.append(loop.metrics["loss"])

    def curves(self) -> torch.Tensor:  # [steps, K]
        return torch.stack(self.losses)


def main(members: int = 8, epochs: int = 10, compile: bool = True, plot: str | None = "sweep.png"):
    (x_train, y_train), (x_val, y_val) = digits()
    lrs = torch.logspace(-4, -1, members).tolist()
    opt = optim.adam(lr=1e-3)  # the lr here is a placeholder: each member gets its own below
    state = lk.ensemble.create(make_model, opt, seeds=range(members))
    state = lk.ensemble.set_hyperparams(state, lr=lrs)
    step = lk.ensemble_step(lk.train_step(make_model(), loss_fn, opt), compile=compile)
    evaluate = lk.ensemble_step(lk.eval_step(make_model(), loss_fn))
    train = lk.data.Batches(x_train, y_train, batch_size=64, shuffle=True, drop_last=True)
    val = lk.data.Batches(x_val, y_val, batch_size=512)
    curves = LossCurves()
    state = lk.fit(step, state, train, epochs=epochs, hooks=[curves])
    acc = lk.evaluate(evaluate, state, val)["acc"]
    for lr, a, last in zip(lrs, acc, curves.curves()[-10:].mean(0).tolist(), strict=True):
        print(f"lr {lr:.2e}: final train loss {last:.4f}, validation accuracy {a:.4f}")
    best = max(range(members), key=lambda k: acc[k])
    print(f"best lr {lrs[best]:.2e} (validation accuracy {acc[best]:.4f})")
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for k, lr in enumerate(lrs):
            ax.plot(curves.curves()[:, k].numpy(), label=f"lr={lr:.1e}", lw=1)
        ax.set(
            xlabel="step",
            ylabel="train loss",
            yscale="log",
            title=f"{members} members, one vmapped step",
        )
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
        print(f"loss curves: {plot}")
    return {"lrs": lrs, "accuracy": acc, "curves": curves.curves(), "state": state}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=positive_int, default=None)
    parser.add_argument("--epochs", type=positive_int, default=None)
    parser.add_argument("--plot", default="sweep.png", help="where to save the plot ('' for none)")
    parser.add_argument("--fast", action="store_true", help="small and eager (for CI)")
    args = parser.parse_args()
    main(
        members=args.members or (4 if args.fast else 8),
        epochs=args.epochs or (2 if args.fast else 10),
        compile=not args.fast,
        plot=args.plot or None,
    )
