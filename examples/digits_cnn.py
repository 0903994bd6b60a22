"""A small CNN on scikit-learn's bundled 8x8 digits, trained with the compiled step.

python examples/digits_cnn.py            # ~1 min on a laptop CPU
python examples/digits_cnn.py --fast     # eager, a few seconds
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
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2),                                   # 32 x 4 x 4
        nn.Flatten(), nn.Dropout(0.2), nn.Linear(32 * 16, 10),
    )  # fmt: skip


def loss_fn(net, batch):
    x, y = batch
    logits = net(x)
    return F.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean()}


def main(epochs: int = 10, compile: bool = True) -> dict:
    torch.manual_seed(0)
    (x_train, y_train), (x_val, y_val) = digits()
    x_train, x_val = x_train.view(-1, 1, 8, 8), x_val.view(-1, 1, 8, 8)  # [N, 1, 8, 8] images
    model = make_model()
    opt = optim.adamw(lr=optim.schedules.warmup_cosine(3e-3, 20, epochs * 22), weight_decay=1e-4)
    state = lk.TrainState.create(model, opt, seed=0)
    step = lk.train_step(model, loss_fn, opt, compile=compile)
    evaluate = lk.eval_step(model, loss_fn)
    train = lk.data.Batches(x_train, y_train, batch_size=64, shuffle=True, drop_last=True)
    val = lk.data.Batches(x_val, y_val, batch_size=512)
    state = lk.fit(step, state, train, epochs=epochs,
                   hooks=[lk.hooks.Validate(evaluate, val), lk.hooks.ProgressBar()])  # fmt: skip
    acc = lk.evaluate(evaluate, state, val)["acc"]
    print(f"CNN validation accuracy after {epochs} epochs: {acc:.4f}")
    return {"accuracy": acc, "state": state}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=positive_int, default=None)
    parser.add_argument("--fast", action="store_true", help="1 epoch, eager (for CI)")
    args = parser.parse_args()
    main(epochs=args.epochs or (1 if args.fast else 10), compile=not args.fast)
