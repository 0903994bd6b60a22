"""Run by tests/test_distributed.py under torchrun (2 processes, gloo):

    torchrun --standalone --nproc-per-node=2 -m tests.dp_worker OUT [OLD_CHECKPOINT_DIR]

Each rank checks data-parallel training against single-process training and writes the
name of each check that passed to OUT/rank<r>.txt. Any failure exits non-zero.
"""

from __future__ import annotations

import functools
import random
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import loopkit as lk
from loopkit import optim
from tests.helpers import loss_fn

OUT = Path(".")
RANK, WORLD = 0, 1


def passed(name: str) -> None:
    with open(OUT / f"rank{RANK}.txt", "a") as f:
        f.write(name + "\n")


def mlp(seed: int, width: int = 16, batchnorm=False, dropout=0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, width),
        *([nn.BatchNorm1d(width)] if batchnorm else []),
        nn.Tanh(),
        *([nn.Dropout(dropout)] if dropout else []),
        nn.Linear(width, 3),
    )


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(23, 5, generator=g)  # 23 = 3 global batches of 6 and a tail of 5 (3 + 2)
    return x, torch.randint(0, 3, (23,), generator=g)


def assert_close(a: dict, b: dict, rtol: float, atol: float) -> None:
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol)


def same_on_every_rank(tree) -> bool:
    leaves = [t.detach().cpu() for t in lk.tree.tree_leaves(tree) if isinstance(t, torch.Tensor)]
    every = lk.distributed.all_gather_object(leaves)
    return all(all(torch.equal(a, b) for a, b in zip(every[0], r, strict=True)) for r in every)


def equals_single_process(compile: bool) -> None:
    """N data-parallel steps equal N single-process steps on the concatenated batches."""
    x, y = data()
    opt = optim.adamw(lr=1e-2, weight_decay=0.1)
    epochs = 2
    model = mlp(0)
    single = lk.train_step(model, loss_fn, opt, clip_norm=0.5)
    reference = lk.fit(single, lk.TrainState.create(model, opt), lk.data.Batches(
        x, y, batch_size=3 * WORLD, shuffle=True, seed=1), epochs=epochs)  # fmt: skip

    model = mlp(RANK + 10)  # different on each rank: fit broadcasts rank 0's
    step = lk.distributed.train_step(model, loss_fn, opt, clip_norm=0.5, compile=compile)
    shard = lk.data.Batches(x, y, batch_size=3, shuffle=True, seed=1, rank=RANK, world_size=WORLD)
    state = lk.TrainState.create(mlp(0), opt) if RANK == 0 else lk.TrainState.create(model, opt)
    state = lk.fit(step, state, shard, epochs=epochs)
    assert int(state.step) == int(reference.step) == 8
    assert_close(state.params, reference.params, rtol=1e-6, atol=1e-7)
    assert same_on_every_rank(state)
    passed(f"equals single process ({'compiled' if compile else 'eager'})")


def run(directory: Path, crash_after: int | None = None, resume=None):
    """A data-parallel fit with BatchNorm, Dropout, shuffling, validation on each rank's
    shard, early stopping, a JSONL log and checkpoints every 3 steps."""
    x, y = data()
    model = mlp(0, batchnorm=True, dropout=0.3)
    opt = optim.sgd(lr=0.1, momentum=0.9)
    step = lk.distributed.train_step(model, loss_fn, opt)
    calls = [0]

    @functools.wraps(step)  # fit still sees the data-parallel step inside
    def crashing(state, batch):
        calls[0] += 1
        if crash_after is not None and calls[0] > crash_after:
            raise KeyboardInterrupt
        return step(state, batch)

    train = lk.data.Batches(x[:20], y[:20], batch_size=4, shuffle=True, seed=2, drop_last=True,
                            rank=RANK, world_size=WORLD)  # fmt: skip
    val = lk.data.Batches(x[20:], y[20:], batch_size=2, rank=RANK, world_size=WORLD)
    hooks = [
        lk.hooks.Validate(lk.eval_step(model, loss_fn), val),
        lk.hooks.EarlyStopping(patience=3),
        lk.hooks.JSONLLogger(directory),
        lk.hooks.ProgressBar(),
        lk.hooks.Checkpoint(directory / "ckpt", every_steps=3, keep_last=2),
    ]
    return lk.fit(crashing, lk.TrainState.create(model, opt, seed=0), train, epochs=4,
                  hooks=hooks, resume=resume)  # fmt: skip


def assert_resumes_exactly(run, name: str, crash_after: int):
    """``run(directory, crash_after=, resume=)`` crashed after ``crash_after`` steps and
    resumed ends bitwise equal to a run never interrupted, which it returns."""
    straight = run(OUT / f"{name}-straight")
    try:
        run(OUT / name, crash_after=crash_after)
        raise AssertionError("the run did not crash")
    except KeyboardInterrupt:
        pass
    dist.barrier()
    resumed = run(OUT / name, resume="latest")
    for a, b in zip(lk.tree.tree_leaves(resumed), lk.tree.tree_leaves(straight), strict=True):
        assert torch.equal(a, b)
    return straight


def resumes_exactly() -> None:
    straight = assert_resumes_exactly(run, "resumed", crash_after=4)
    assert same_on_every_rank(straight)
    log = (OUT / "resumed-straight" / "metrics.jsonl").read_text().splitlines()
    assert len(log) == 4 and (OUT / "resumed" / "metrics.jsonl").read_text().splitlines() == log
    passed("resumes exactly")


class Augmented(torch.utils.data.Dataset):
    """A dataset whose examples get noise from torch's and Python's global generators."""

    def __init__(self):
        self.x, self.y = data()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i] + 0.1 * torch.randn(5) + random.random(), self.y[i]


def augmented_run(directory: Path, crash_after: int | None = None, resume=None):
    """A fit over a shuffling DataLoader whose augmentation draws from generators seeded
    differently on each rank."""
    torch.manual_seed(100 + RANK)
    random.seed(RANK)
    model = mlp(0)
    opt = optim.sgd(lr=0.1)
    step = lk.distributed.train_step(model, loss_fn, opt)
    calls = [0]

    @functools.wraps(step)
    def crashing(state, batch):
        calls[0] += 1
        if crash_after is not None and calls[0] > crash_after:
            raise KeyboardInterrupt
        return step(state, batch)

    dataset = Augmented()
    sampler = torch.utils.data.DistributedSampler(dataset, WORLD, RANK, shuffle=True, seed=3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, sampler=sampler, drop_last=True)
    return lk.fit(crashing, lk.TrainState.create(model, opt, seed=0), loader, epochs=3,
                  hooks=[lk.hooks.Checkpoint(directory, every_steps=2)], resume=resume)  # fmt: skip


def augmentation_resumes_exactly() -> None:
    """Each rank's checkpointed random state brings back its own augmentation."""
    assert_resumes_exactly(augmented_run, "augmented", crash_after=5)
    passed("augmentation resumes exactly")


def dropout_differs_across_ranks() -> None:
    model = mlp(0, dropout=0.5)
    opt = optim.sgd(lr=0.1)
    state = lk.TrainState.create(model, opt, seed=0)
    step = lk.distributed.train_step(model, loss_fn, opt)
    new, _ = step(state, (torch.randn(4, 5), torch.randint(0, 3, (4,))))
    assert same_on_every_rank(new.rng)  # one replicated generator...
    with lk.rng_scope(state.rng, fold=RANK) as advanced:  # as the step scopes it
        mask = nn.Dropout(0.5)(torch.ones(64))
    every = lk.distributed.all_gather_object(mask)
    assert not torch.equal(every[0], every[1])  # ...each rank its own masks
    assert all(torch.equal(advanced[k], new.rng[k]) for k in new.rng)
    passed("dropout differs across ranks")


def errors(old: Path) -> None:
    model = mlp(0)
    opt = optim.sgd(lr=0.1)
    step = lk.distributed.train_step(model, loss_fn, opt)
    x, y = data()
    try:  # a checkpoint written by a single-process run
        lk.fit(step, lk.TrainState.create(model, opt), [(x[:4], y[:4])], resume=old)
        raise AssertionError("no error")
    except lk.distributed.DistributedError as e:
        assert "written by a run of 1 process(es), this run has 2" in str(e), e
        assert RANK == 0 or str(e).startswith("rank 0 could not resume"), e
    try:  # rank 1 builds another model
        other = lk.TrainState.create(mlp(0, width=16 if RANK == 0 else 8), opt)
        lk.distributed.broadcast(other)
        raise AssertionError("no error")
    except lk.distributed.DistributedError as e:
        assert "disagree on the state's structure" in str(e) and "[16, 5]" in str(e), e
    x, y = data()
    uneven = [(x[:4], y[:4])] * (2 + RANK)  # rank 1 has one batch more
    try:
        lk.fit(step, lk.TrainState.create(model, opt), uneven)
        raise AssertionError("no error")
    except lk.distributed.DistributedError as e:
        assert "disagree on (batches per epoch" in str(e) and "rank 1: (3," in str(e), e
    try:  # an own loop that forgot to broadcast
        mine = lk.TrainState.create(mlp(RANK), opt)
        lk.distributed.train_step(model, loss_fn, opt)(mine, (x[:4], y[:4]))
        raise AssertionError("no error")
    except lk.distributed.DistributedError as e:
        assert "ranks hold different states" in str(e) and "broadcast" in str(e), e
    passed("errors")


def buffers_stay_replicated() -> None:
    """BatchNorm statistics are averaged across ranks; a buffer no forward changes is left
    exactly as it was (its change, zero, is what is averaged)."""
    model = mlp(0, batchnorm=True)
    model.register_buffer("table", torch.randn(64, generator=torch.Generator().manual_seed(0)))
    opt = optim.sgd(lr=0.1)
    x, y = data()
    shard = lk.data.Batches(x, y, batch_size=3, shuffle=True, rank=RANK, world_size=WORLD)
    state = lk.fit(lk.distributed.train_step(model, loss_fn, opt),
                   lk.TrainState.create(model, opt), shard, epochs=5)  # fmt: skip
    assert torch.equal(state.buffers["table"], model.table)
    assert not torch.equal(state.buffers["1.running_mean"], model[1].running_mean)
    assert same_on_every_rank(state.buffers)
    passed("buffers stay replicated")


class Odd(nn.Module):
    """float64, with buffers averaging must not break: a -inf mask the forward only reads,
    a running minimum starting at +inf, a value overwritten the same on every rank."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(5, 3)
        self.register_buffer("mask", torch.full((3, 3), float("-inf")).triu(1))
        self.register_buffer("low", torch.tensor(float("inf")))
        self.register_buffer("scale", torch.tensor(1000.0))

    def forward(self, x):
        self.low = torch.minimum(self.low, x.min().detach())
        self.scale = self.lin.weight.detach().norm() * 1e-6
        return self.lin(x) @ torch.softmax(self.mask, dim=-1)


def counted_loss(net, batch):
    x, y = batch
    logits = net(x)
    right = logits.argmax(-1) == y
    return torch.nn.functional.cross_entropy(logits, y), {"right": right.sum(), "all": right.all()}


def other_dtypes_and_non_finite_buffers() -> None:
    """A float64 model, integer and bool metrics (several dtypes in one sync), and buffers
    holding infinities: the params and the overwritten buffer equal single-process
    training's, the mask is kept bitwise, the running minimum is finite and replicated."""
    x, y = data()
    x = x.double()
    opt = optim.sgd(lr=0.1, momentum=0.9)  # (Adam would amplify rounding where g ~ 0)
    model = Odd().double()
    single = lk.fit(lk.train_step(model, counted_loss, opt), lk.TrainState.create(model, opt),
                    lk.data.Batches(x, y, batch_size=3 * WORLD), epochs=1)  # fmt: skip
    shard = lk.data.Batches(x, y, batch_size=3, rank=RANK, world_size=WORLD)
    state = lk.fit(lk.distributed.train_step(model, counted_loss, opt),
                   lk.TrainState.create(model, opt), shard, epochs=1)  # fmt: skip
    assert_close(state.params, single.params, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(state.buffers["scale"], single.buffers["scale"], rtol=1e-12, atol=0)
    assert torch.equal(state.buffers["mask"], model.mask)
    assert torch.isfinite(state.buffers["low"]) and same_on_every_rank(state.buffers)
    _, metrics = lk.distributed.train_step(model, counted_loss, opt)(state, next(iter(shard)))
    assert metrics["right"].dtype == metrics["all"].dtype == torch.float64  # a float64 model
    passed("other dtypes and non-finite buffers")


def an_empty_shard_adds_nothing() -> None:
    """A rank with an empty batch contributes nothing: the step equals a single-process
    step on rank 0's examples, its loss and metrics included (they were NaN: the empty
    rank's mean of nothing, weighted by 0)."""
    x, y = data()
    opt = optim.sgd(lr=0.1, momentum=0.9)
    model = mlp(0)
    mine = (x[:4], y[:4]) if RANK == 0 else (x[:0], y[:0])
    want, want_metrics = lk.train_step(model, loss_fn, opt)(
        lk.TrainState.create(model, opt), (x[:4], y[:4])
    )
    state, metrics = lk.distributed.train_step(model, loss_fn, opt)(
        lk.TrainState.create(model, opt), mine
    )
    assert_close(state.params, want.params, rtol=1e-6, atol=1e-7)
    assert set(metrics) == set(want_metrics)
    assert_close(metrics, want_metrics, rtol=1e-6, atol=1e-7)
    passed("an empty shard adds nothing")


def evaluate_agrees_across_ranks() -> None:
    """A rank without validation batches reports the very numbers the others do."""
    model = mlp(0)
    x, y = data()
    shard = [(x[:5], y[:5])] if RANK == 0 else []
    state = lk.TrainState.create(model, optim.sgd(lr=0.1))
    got = lk.evaluate(lk.eval_step(model, loss_fn), state, shard, across_ranks=True)
    assert all(other == got for other in lk.distributed.all_gather_object(got))
    passed("evaluate agrees across ranks")


if __name__ == "__main__":
    lk.distributed.init()
    OUT, RANK, WORLD = Path(sys.argv[1]), dist.get_rank(), dist.get_world_size()
    equals_single_process(compile=False)
    resumes_exactly()
    augmentation_resumes_exactly()
    dropout_differs_across_ranks()
    errors(Path(sys.argv[2]))
    buffers_stay_replicated()
    other_dtypes_and_non_finite_buffers()
    evaluate_agrees_across_ranks()
    an_empty_shard_adds_nothing()
    if "--compile" in sys.argv:
        equals_single_process(compile=True)
    dist.barrier()
    dist.destroy_process_group()
