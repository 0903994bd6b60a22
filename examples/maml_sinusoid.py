"""MAML (Finn et al. 2017) on sinusoid regression, second order, with loopkit's pieces.

Each task is y = A sin(x + phase) with A in [0.1, 5], phase in [0, pi], x in [-5, 5]. The
inner loop adapts the params to a task's K support points with loopkit's functional SGD
(`optim.sgd(...).update`); the outer loss is the query loss after adaptation, and its
gradient flows through the inner updates (second order: torch.func.grad of a function that
itself calls torch.func.grad). The outer step is an ordinary `lk.train_step`: its loss_fn
reads the params from `net.params` and runs the inner loop.

    python examples/maml_sinusoid.py          # ~2-3 min on a laptop CPU
    python examples/maml_sinusoid.py --fast   # a few seconds
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import loopkit as lk
from loopkit import optim
from loopkit.cli import positive_int


def sample_tasks(n_tasks: int, k_shot: int, generator: torch.Generator):
    """(x_support, y_support, x_query, y_query), each [n_tasks, k_shot, 1]."""
    amp = torch.empty(n_tasks, 1, 1).uniform_(0.1, 5.0, generator=generator)
    phase = torch.empty(n_tasks, 1, 1).uniform_(0.0, math.pi, generator=generator)
    xs = torch.empty(n_tasks, k_shot, 1).uniform_(-5.0, 5.0, generator=generator)
    xq = torch.empty(n_tasks, k_shot, 1).uniform_(-5.0, 5.0, generator=generator)
    return xs, amp * torch.sin(xs + phase), xq, amp * torch.sin(xq + phase)


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )


def adapt(model: nn.Module, params: dict, x, y, inner: optim.Transform, steps: int) -> dict:
    """The inner loop: ``steps`` updates of ``inner`` on the task's support set. Pure, so
    the caller may differentiate through it."""

    def support_loss(p):
        return F.mse_loss(functional_call(model, p, (x,)), y)

    opt_state = inner.init(params)
    for _ in range(steps):
        updates, opt_state = inner.update(grad(support_loss)(params), opt_state, params)
        params = optim.apply_updates(params, updates)
    return params


def meta_loss(model, params, tasks, inner: optim.Transform, steps: int) -> torch.Tensor:
    """Mean over tasks of the query loss after adapting on the support set."""

    def one_task(xs, ys, xq, yq):
        fast = adapt(model, params, xs, ys, inner, steps)
        return F.mse_loss(functional_call(model, fast, (xq,)), yq)

    return vmap(one_task)(*tasks).mean()


def main(iterations: int = 1000, meta_batch: int = 25, k_shot: int = 10, inner_steps: int = 1,
         inner_lr: float = 0.01, fast: bool = False) -> dict:  # fmt: skip
    torch.manual_seed(0)
    model = make_model()
    inner = optim.sgd(lr=inner_lr)

    def loss_fn(net, tasks):  # the outer loss: net.params are the meta-parameters
        return meta_loss(net.module, net.params, tasks, inner, inner_steps)

    outer = optim.adam(lr=1e-3)
    state = lk.TrainState.create(model, outer, seed=0)
    step = lk.train_step(model, loss_fn, outer)
    data = torch.Generator().manual_seed(1)
    test_tasks = sample_tasks(100, k_shot, torch.Generator().manual_seed(2))

    def evaluate(params) -> tuple[float, float]:
        """Query loss on held-out tasks before and after inner adaptation."""
        xs, ys, xq, yq = test_tasks
        before = F.mse_loss(vmap(lambda x: functional_call(model, params, (x,)))(xq), yq)
        after = meta_loss(model, params, test_tasks, inner, inner_steps)
        return float(before), float(after)

    start = evaluate(state.params)
    for i in range(iterations):
        state, metrics = step(state, sample_tasks(meta_batch, k_shot, data))
        if (i + 1) % max(1, iterations // 5) == 0:
            print(f"iteration {i + 1}: meta-train loss {float(metrics['loss']):.3f}")
    end = evaluate(state.params)
    print(f"held-out tasks, query MSE after {inner_steps} inner step(s) on {k_shot} points: "
          f"{start[1]:.3f} at initialisation -> {end[1]:.3f} after meta-training "
          f"(without adaptation: {end[0]:.3f})")  # fmt: skip
    return {"before": start, "after": end, "state": state}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=positive_int, default=None)
    parser.add_argument("--fast", action="store_true", help="a few iterations (for CI)")
    args = parser.parse_args()
    iterations = args.iterations or (30 if args.fast else 1000)
    main(iterations=iterations, meta_batch=5 if args.fast else 25, fast=args.fast)
