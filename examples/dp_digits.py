"""DP-SGD on scikit-learn's digits: an MLP trained with per-example clipping and Gaussian
noise (lk.dp_train_step), next to the same MLP trained without privacy.

    python examples/dp_digits.py            # ~1 min on a laptop CPU
    python examples/dp_digits.py --fast     # a few seconds

The noise multiplier and clipping norm fix the privacy cost per step; turning them into an
(epsilon, delta) guarantee needs an accountant (e.g. Opacus's RDP accountant) and Poisson
sampling of the batches, which this example does not do.
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
from loopkit.cli import non_negative_float, positive_float, positive_int

sys.path.insert(0, str(Path(__file__).parent))
from digits_mlp import digits  # noqa: E402  (the same split of scikit-learn's digits)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10))


def loss_fn(net, batch):
    x, y = batch
    logits = net(x)
    return F.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean()}


def main(epochs: int = 20, noise_multiplier: float = 1.0, max_grad_norm: float = 1.0) -> dict:
    (x_train, y_train), (x_val, y_val) = digits()
    train = lk.data.Batches(x_train, y_train, batch_size=64, shuffle=True, drop_last=True)
    val = lk.data.Batches(x_val, y_val, batch_size=512)
    model = make_model()
    evaluate = lk.eval_step(model, loss_fn)
    results = {}
    opt = optim.sgd(lr=0.5, momentum=0.5)
    steps = {
        "DP-SGD": lk.dp_train_step(
            model, loss_fn, opt, max_grad_norm=max_grad_norm, noise_multiplier=noise_multiplier
        ),
        "non-private SGD": lk.train_step(model, loss_fn, opt),
    }
    for name, step in steps.items():
        state = lk.fit(step, lk.TrainState.create(model, opt, seed=0), train, epochs=epochs)
        results[name] = lk.evaluate(evaluate, state, val)["acc"]
        print(f"{name}: validation accuracy {results[name]:.4f} after {int(state.step)} steps")
    print(f"(noise multiplier {noise_multiplier}, per-example clipping norm {max_grad_norm}, "
          "batch 64)")  # fmt: skip
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=positive_int, default=None)
    parser.add_argument("--noise-multiplier", type=non_negative_float, default=1.0)
    parser.add_argument("--max-grad-norm", type=positive_float, default=1.0)
    parser.add_argument("--fast", action="store_true", help="2 epochs (for CI)")
    args = parser.parse_args()
    main(args.epochs or (2 if args.fast else 20), args.noise_multiplier, args.max_grad_norm)
