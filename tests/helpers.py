"""Shared test helpers: random models and the imperative reference loop."""

from __future__ import annotations

import collections
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

ACTIVATIONS = {"tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU, "elu": nn.ELU, "relu": nn.ReLU}


@dataclass(frozen=True)
class MLPSpec:
    in_dim: int
    widths: tuple[int, ...]
    out_dim: int
    activation: str
    batchnorm: bool
    dropout: float


def build_mlp(spec: MLPSpec, seed: int, dtype=torch.float32) -> nn.Module:
    """A random MLP.

    Parameters whose true gradient is exactly zero are left out, because Adam turns the
    rounding noise there into O(lr) steps (noise / sqrt(noise^2)): with BatchNorm, the Linear
    before it has no bias, and every layer feeding a BatchNorm has at least 2 inputs
    (BatchNorm is invariant to the scale of a 1-input unit's weight). Batches with BatchNorm
    need at least 3 examples for the same reason (2 examples normalise to exactly +-1), and
    the tests use at least 8: BatchNorm over 3-5 examples is so ill-conditioned (a unit whose
    few values nearly coincide has a tiny variance) that 1-ulp differences in the params
    grow past 1e-5 in a single step, in torch's own loop as much as in ours. For the same
    reason no model has both BatchNorm and Dropout: when Dropout keeps few of a unit's
    examples, BatchNorm's mean-subtracting backward leaves the weight before it a gradient
    that is mostly rounding noise, which Adagrad's and Adam's sign-like first step turn
    into O(lr) differences. Each is tested on its own."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d = spec.in_dim
    for w in spec.widths:
        layers.append(nn.Linear(d, w, bias=not spec.batchnorm))
        if spec.batchnorm:
            layers.append(nn.BatchNorm1d(w))
        layers.append(ACTIVATIONS[spec.activation]())
        if spec.dropout:
            layers.append(nn.Dropout(spec.dropout))
        d = w
    layers.append(nn.Linear(d, spec.out_dim))
    return nn.Sequential(*layers).to(dtype)


@st.composite
def mlp_specs(draw, batchnorm=None, dropout=None) -> MLPSpec:
    batchnorm = draw(st.booleans()) if batchnorm is None else batchnorm
    least = 2 if batchnorm else 1
    return MLPSpec(
        in_dim=draw(st.integers(least, 12)),
        widths=tuple(draw(st.lists(st.integers(least, 24), min_size=0, max_size=3))),
        out_dim=draw(st.integers(2, 6)),
        activation=draw(st.sampled_from(sorted(ACTIVATIONS))),
        batchnorm=batchnorm,
        dropout=(0.0 if batchnorm else draw(st.sampled_from([0.0, 0.2, 0.5])))
        if dropout is None
        else dropout,
    )


def batch_sizes(min_size=1, max_size=4):
    """Batch sizes for a model: at least 8 examples with BatchNorm (see build_mlp)."""
    return st.lists(st.integers(8, 17), min_size=min_size, max_size=max_size)


def make_batches(spec: MLPSpec, sizes: list[int], seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n, spec.in_dim, generator=g, dtype=dtype),
            torch.randint(0, spec.out_dim, (n,), generator=g),
        )
        for n in sizes
    ]


def loss_fn(net, batch):
    x, y = batch
    logits = net(x)
    return F.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).to(logits.dtype).mean()}


# Hyperparameters drawn as torch.optim takes them: (loopkit factory name, kwargs).
@st.composite
def sgd_kwargs(draw) -> dict:
    nesterov = draw(st.booleans())
    momentum = draw(st.floats(0.05, 0.99)) if nesterov else draw(st.sampled_from([0.0, 0.5, 0.9]))
    return dict(
        lr=draw(st.floats(1e-4, 0.3)),
        momentum=momentum,
        dampening=0.0 if nesterov else draw(st.sampled_from([0.0, 0.1, 0.5])),
        weight_decay=draw(st.sampled_from([0.0, 1e-3, 0.1])),
        nesterov=nesterov,
        maximize=draw(st.booleans()),
    )


@st.composite
def adam_kwargs(draw, weight_decay=None) -> dict:
    return dict(
        lr=draw(st.floats(1e-4, 0.05)),
        betas=(draw(st.floats(0.0, 0.99)), draw(st.floats(0.5, 0.9999))),
        eps=draw(st.sampled_from([1e-8, 1e-6, 1e-3])),
        weight_decay=draw(st.sampled_from([0.0, 1e-2, 0.1]))
        if weight_decay is None
        else weight_decay,
        amsgrad=draw(st.booleans()),
        maximize=draw(st.booleans()),
    )


def betas():
    return st.tuples(st.floats(0.0, 0.99), st.floats(0.5, 0.9999))


def weight_decays():
    return st.sampled_from([0.0, 1e-2, 0.1])


@st.composite
def rmsprop_kwargs(draw) -> dict:
    return dict(
        lr=draw(st.floats(1e-4, 0.05)),
        alpha=draw(st.floats(0.5, 0.999)),
        eps=draw(st.sampled_from([1e-8, 1e-6, 1e-3])),
        weight_decay=draw(weight_decays()),
        momentum=draw(st.sampled_from([0.0, 0.5, 0.9])),
        centered=draw(st.booleans()),
        maximize=draw(st.booleans()),
    )


@st.composite
def adagrad_kwargs(draw) -> dict:
    # Adagrad's first step is sign(g) * lr, as Adam's is: the same lr range as Adam's.
    return dict(
        lr=draw(st.floats(1e-4, 0.05)),
        lr_decay=draw(st.sampled_from([0.0, 1e-3, 0.1])),
        weight_decay=draw(weight_decays()),
        initial_accumulator_value=draw(st.sampled_from([0.0, 0.1, 1.0])),
        eps=draw(st.sampled_from([1e-10, 1e-6])),
        maximize=draw(st.booleans()),
    )


@st.composite
def adamax_kwargs(draw) -> dict:
    return dict(
        lr=draw(st.floats(1e-4, 0.05)),
        betas=draw(betas()),
        eps=draw(st.sampled_from([1e-8, 1e-6, 1e-3])),
        weight_decay=draw(weight_decays()),
        maximize=draw(st.booleans()),
    )


@st.composite
def nadam_kwargs(draw) -> dict:
    return dict(
        lr=draw(st.floats(1e-4, 0.05)),
        betas=draw(betas()),
        eps=draw(st.sampled_from([1e-8, 1e-6, 1e-3])),
        weight_decay=draw(weight_decays()),
        momentum_decay=draw(st.sampled_from([0.0, 4e-3, 0.1])),
        decoupled_weight_decay=draw(st.booleans()),
        maximize=draw(st.booleans()),
    )


@st.composite
def radam_kwargs(draw) -> dict:
    return dict(
        lr=draw(st.floats(1e-4, 0.05)),
        betas=draw(betas()),
        eps=draw(st.sampled_from([1e-8, 1e-6, 1e-3])),
        weight_decay=draw(weight_decays()),
        decoupled_weight_decay=draw(st.booleans()),
        maximize=draw(st.booleans()),
    )


@st.composite
def adadelta_kwargs(draw) -> dict:
    return dict(
        lr=draw(st.floats(0.1, 2.0)),
        rho=draw(st.floats(0.5, 0.99)),
        eps=draw(st.sampled_from([1e-6, 1e-4])),
        weight_decay=draw(weight_decays()),
        maximize=draw(st.booleans()),
    )


@st.composite
def rprop_kwargs(draw) -> dict:
    return dict(
        lr=draw(st.floats(1e-4, 0.1)),
        etas=(draw(st.floats(0.1, 0.9)), draw(st.floats(1.05, 2.0))),
        step_sizes=(draw(st.sampled_from([1e-6, 1e-3])), draw(st.sampled_from([0.05, 50.0]))),
        maximize=draw(st.booleans()),
    )


@st.composite
def asgd_kwargs(draw) -> dict:
    return dict(
        lr=draw(st.floats(1e-4, 0.3)),
        lambd=draw(st.sampled_from([1e-4, 1e-2, 0.5])),
        alpha=draw(st.floats(0.5, 1.0)),
        t0=draw(st.sampled_from([0.0, 2.0, 1e6])),
        weight_decay=draw(weight_decays()),
        maximize=draw(st.booleans()),
    )


TORCH_OPTIMIZERS = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
    "adamax": torch.optim.Adamax,
    "nadam": torch.optim.NAdam,
    "radam": torch.optim.RAdam,
    "adadelta": torch.optim.Adadelta,
    "rprop": torch.optim.Rprop,
    "asgd": torch.optim.ASGD,
}
KWARGS = {
    "sgd": sgd_kwargs(),
    "adam": adam_kwargs(),
    "adamw": adam_kwargs(),
    "rmsprop": rmsprop_kwargs(),
    "adagrad": adagrad_kwargs(),
    "adamax": adamax_kwargs(),
    "nadam": nadam_kwargs(),
    "radam": radam_kwargs(),
    "adadelta": adadelta_kwargs(),
    "rprop": rprop_kwargs(),
    "asgd": asgd_kwargs(),
}


def run_steps(step, state, batches):
    """``step`` over ``batches`` from ``state``: the last state and the stacked losses."""
    losses = []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(metrics["loss"])
    return state, torch.stack(losses)


def imperative_run(model, batches, opt_name, kwargs, *, seed, clip_norm=None, scheduler=None):
    """The oracle: the ordinary PyTorch loop on a deep copy of ``model``. Seeding the
    global generator with the TrainState's seed gives Dropout the same masks."""
    model = copy.deepcopy(model)
    model.train()
    opt = TORCH_OPTIMIZERS[opt_name](model.parameters(), **kwargs)
    sched = scheduler(opt) if scheduler else None
    losses = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for batch in batches:
            opt.zero_grad()
            loss, _ = loss_fn(model, batch)
            loss.backward()
            if clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
            opt.step()
            if sched:
                sched.step()
            losses.append(loss.detach())
    return model, torch.stack(losses)


def assert_state_matches(state, model, rtol, atol, equal_nan=False):
    """Every param and buffer of the state equals the module's (``equal_nan``: a NaN
    matches a NaN, for runs that diverge as torch's own loop does)."""
    named = dict(model.named_parameters()) | dict(model.named_buffers())
    assert set(named) == set(state.params) | set(state.buffers)
    for name, want in named.items():
        got = state.params[name] if name in state.params else state.buffers[name]
        torch.testing.assert_close(
            got,
            want.detach(),
            rtol=rtol,
            atol=atol,
            equal_nan=equal_nan,
            msg=lambda m, name=name: f"{name}: {m}",
        )


@st.composite
def adafactor_kwargs(draw) -> dict:
    return dict(
        lr=draw(st.floats(1e-3, 0.1)),
        beta2_decay=draw(st.sampled_from([-0.8, -0.5, -1.0])),
        eps=(draw(st.sampled_from([None, 1e-30, 1e-6])), draw(st.sampled_from([1e-3, 1e-2]))),
        d=draw(st.sampled_from([1.0, 2.0])),
        weight_decay=draw(weight_decays()),
        maximize=draw(st.booleans()),
    )


TORCH_OPTIMIZERS["adafactor"] = torch.optim.Adafactor
KWARGS["adafactor"] = adafactor_kwargs()


class OpCounter(TorchDispatchMode):
    """``with OpCounter() as ops:``: ``ops.count``, the ATen ops the body dispatched, by
    name (``"add"``, ``"_foreach_mul"``, ``"_fused_adamw_"``...)."""

    def __enter__(self):
        self.count = collections.Counter()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))
