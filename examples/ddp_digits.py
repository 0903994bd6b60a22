"""Data-parallel training of the digits MLP on torch.distributed, launched with torchrun.

    torchrun --standalone --nproc-per-node=2 examples/ddp_digits.py          # 2 processes
    torchrun --standalone --nproc-per-node=2 examples/ddp_digits.py --fast   # smoke size

Every process runs this same script. Each trains on its own shard of every global batch;
the step averages the gradients across processes (gloo on CPU, NCCL on GPU); rank 0 writes
the checkpoints and the log and prints. Run the same command again to resume from the
latest checkpoint. On several machines, start it on each with the same rendezvous:

    torchrun --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d \\
             --rdzv-endpoint=HOST:29500 --rdzv-id=digits examples/ddp_digits.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import loopkit as lk
from loopkit import optim
from loopkit.cli import positive_int

sys.path.insert(0, str(Path(__file__).parent))
from digits_mlp import digits, loss_fn, make_model  # noqa: E402


def main(epochs: int, batch_size: int, out: str, compile: bool) -> None:
    lk.distributed.init()  # reads torchrun's RANK, WORLD_SIZE, MASTER_ADDR, ...
    rank, world = lk.distributed.rank(), lk.distributed.world_size()
    device = (
        torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() else None
    )
    torch.manual_seed(0)
    (x, y), (xv, yv) = digits()
    if device is not None:
        x, y, xv, yv = (t.to(device) for t in (x, y, xv, yv))
    model = make_model().to(device or "cpu")
    opt = optim.adamw(lr=3e-3, weight_decay=1e-4)
    state = lk.TrainState.create(model, opt, seed=0)
    step = lk.distributed.train_step(model, loss_fn, opt, clip_norm=1.0, compile=compile)
    # batch_size per process: the global batch is batch_size * world
    train = lk.data.Batches(x, y, batch_size=batch_size, shuffle=True, drop_last=True,
                            rank=rank, world_size=world)  # fmt: skip
    val = lk.data.Batches(xv, yv, batch_size=256, rank=rank, world_size=world)
    state = lk.fit(step, state, train, epochs=epochs, hooks=[
        lk.hooks.Validate(lk.eval_step(model, loss_fn), val),  # averaged over all shards
        lk.hooks.Checkpoint(out, keep_last=2),
        lk.hooks.JSONLLogger(out),
        lk.hooks.ProgressBar(),
    ], resume="latest")  # fmt: skip
    if lk.distributed.is_main():
        final = lk.evaluate(
            lk.eval_step(model, loss_fn), state, lk.data.Batches(xv, yv, batch_size=512)
        )
        print(f"{world} processes, {int(state.step)} steps of {batch_size * world} examples; "
              f"validation accuracy {final['acc']:.4f}")  # fmt: skip
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=positive_int, default=None)
    parser.add_argument("--batch-size", type=positive_int, default=32, help="per process")
    parser.add_argument("--out", default="runs/ddp_digits")
    parser.add_argument("--compile", action="store_true", help="compile the step")
    parser.add_argument("--fast", action="store_true", help="2 epochs (for CI)")
    args = parser.parse_args()
    epochs = args.epochs or (2 if args.fast else 10)
    main(epochs, args.batch_size, args.out, args.compile)
