"""Per-sample gradients (``vmap(grad)`` over the batch) and a DP-SGD train step.

``per_sample_grads(model, loss_fn, params, buffers, batch)`` gives the gradient of
``loss_fn`` on each example on its own: ``loss_fn`` is called on a batch of one example
(each batch tensor's leading dimension kept, at size 1), so the loss_fn of a plain
``train_step`` works unchanged.

``dp_train_step`` is DP-SGD (Abadi et al. 2016, as Opacus implements it): each example's
gradient is clipped to L2 norm ``max_grad_norm`` (factor ``min(1, C / (norm + 1e-6))``),
the clipped gradients are summed, Gaussian noise of standard deviation
``noise_multiplier * max_grad_norm`` is added to each parameter's sum (drawn with
``torch.randn_like`` in parameter order, from the state's ``rng``, so a run is reproducible
and resumes exactly), and the result is divided by the batch size before the optimizer's
update. The privacy accounting (epsilon for given delta, sampling rate and steps) is not
part of loopkit; use an accountant such as Opacus's RDP accountant.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import grad_and_value, vmap

from loopkit.binding import ModuleBinding
from loopkit.errors import StepError
from loopkit.optim.base import Transform, apply_gradients
from loopkit.step import (
    _SPARSE,
    LossFn,
    Net,
    TrainStep,
    _dense_gradients,
    _maybe_compile,
    _split_loss,
)
from loopkit.tree import leading_dim, tree_flatten, tree_map, tree_unflatten

__all__ = ["clip_per_sample", "dp_train_step", "per_sample_grads"]

Grads = dict[str, torch.Tensor]


def _example_dims(batch: Any) -> Any:
    leaves, spec = tree_flatten(batch)
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.ndim == 0:
            raise ValueError(
                "per-sample gradients need every batch tensor to have a leading example "
                "dimension, got a 0-dim tensor"
            )
    return tree_unflatten([0 if isinstance(x, torch.Tensor) else None for x in leaves], spec)


def per_sample_grads(
    model: nn.Module,
    loss_fn: LossFn,
    params: Grads,
    buffers: Grads,
    batch: Any,
    *,
    randomness: str = "different",
) -> tuple[Grads, torch.Tensor, dict[str, torch.Tensor]]:
    """``(grads, losses, metrics)``: ``grads[name]`` has shape ``[B, *param.shape]``, row i
    the gradient of ``loss_fn(net, example_i)`` (the example as a batch of one); ``losses``
    and each metric have shape ``[B]``. Buffers are read, not updated: every example sees
    them as given, and what the forward writes into them (a counter, running statistics) is
    discarded. BatchNorm in training mode cannot see a batch of one (use GroupNorm or
    LayerNorm). Random ops (Dropout) follow ``vmap``'s ``randomness`` (by default a
    different mask per example). Every parameter of ``model`` must be in ``params`` (or,
    to leave it out of the gradients, in ``buffers``), and every key a parameter's or
    buffer's name: anything else is a ValueError, as ``functional_call(strict=True)``.
    Sparse embeddings give dense gradients, as in :func:`~loopkit.train_step`."""
    _check_no_batchnorm(model, in_use_only=True)
    _check_names(model, params, buffers)
    sparse = [m for m in model.modules() if isinstance(m, _SPARSE) and m.sparse]
    with _dense_gradients(sparse):
        return _per_sample_fn(model, loss_fn, randomness)(params, buffers, batch)


def _check_names(model: nn.Module, params: Grads, buffers: Grads) -> None:
    """ValueError for a key of ``params`` or ``buffers`` that names no parameter or buffer
    of ``model``, and for a parameter in neither (a tied one counts by any of its names):
    the module's own tensor would stand in for it, silently."""
    aliases: dict[int, list[str]] = {}
    for name, t in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(t), []).append(name)
    buffer_names = {name for name, _ in model.named_buffers(remove_duplicate=False)}
    known = buffer_names.union(*aliases.values())
    given = set(params) | set(buffers)
    unknown = sorted(given - known)
    if unknown:
        raise ValueError(
            f"{unknown} name no parameter or buffer of the model (its parameters: "
            f"{sorted(n for names in aliases.values() for n in names)})"
        )
    missing = [names[0] for names in aliases.values() if given.isdisjoint(names)]
    if missing:
        raise ValueError(
            f"the model's parameters {missing} are in neither params nor buffers; pass "
            "every parameter (dict(model.named_parameters()), or state.params), and those "
            "to leave out of the gradients in buffers"
        )


def _per_sample_fn(model: nn.Module, loss_fn: LossFn, randomness: str) -> Callable:
    """``fn(params, buffers, batch)``: :func:`per_sample_grads` without its checks, through
    one :class:`~loopkit.binding.ModuleBinding` of ``model`` for all its calls."""
    binding = ModuleBinding(model)

    def one(p: Grads, b: Grads, example: Any) -> tuple[torch.Tensor, tuple]:
        example = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, example)
        loss, metrics = _split_loss(loss_fn(Net(model, p, b, binding), example))
        return loss, metrics

    def fn(params: Grads, buffers: Grads, batch: Any):
        if leading_dim(batch) == 0:
            raise ValueError("per-sample gradients need at least one example: the batch is empty")
        # The buffers are an input of the transformed function (torch.func refuses in-place
        # writes to a tensor it captures), unbatched, and copies: their writes are discarded.
        copies = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in buffers.items()}
        try:
            grads, (losses, metrics) = vmap(
                grad_and_value(one, has_aux=True),
                in_dims=(None, None, _example_dims(batch)),
                randomness=randomness,
            )(params, copies, batch)
        except RuntimeError as e:
            if copies and any(cause in str(e) for cause in _BATCHED_WRITE):
                raise StepError(f"{e}\n{_BATCHED_WRITE_FIX}") from e
            raise
        return grads, losses, metrics

    return fn


# vmap's errors for an in-place write of a per-example value into an unbatched tensor
_BATCHED_WRITE = ("doesn't match the broadcast shape", "vmap: inplace arithmetic")
_BATCHED_WRITE_FIX = (
    "If the forward writes a value computed from the example into a buffer in place (a "
    "running mean, self.m.mul_(0.9).add_(...)): per-sample gradients give every example "
    "the same buffers, whose writes are discarded, so such a write cannot be made once per "
    "example. Assign the new value instead (self.m = 0.9 * self.m + ...), or skip the "
    "update while computing per-sample gradients."
)


def clip_per_sample(grads: Grads, max_norm: float) -> tuple[Grads, torch.Tensor]:
    """Clip each example's gradient (row i of every ``[B, ...]`` tensor, taken together) to
    L2 norm ``max_norm``, by the factor ``min(1, max_norm / (norm + 1e-6))`` (Opacus's).
    Returns the clipped grads and the per-example norms before clipping."""
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()
    factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    clipped = {k: g * factor.to(g.dtype).view(-1, *([1] * (g.ndim - 1))) for k, g in grads.items()}
    return clipped, norms


def _check_no_batchnorm(model: nn.Module, in_use_only: bool = False) -> None:
    """Raise if ``model`` has a BatchNorm (``in_use_only``: one that would normalise with
    the batch's statistics as the model is now, in training mode or without running
    statistics)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (
            not in_use_only or m.training or m.running_mean is None
        ):
            raise TypeError(
                f"module {name!r} is {type(m).__name__}: its statistics mix the examples of a "
                "batch, so per-example gradients (and DP-SGD's guarantee) do not exist. "
                "Replace it with GroupNorm or LayerNorm."
            )


def _example_mean(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The mean over the examples (dim 0) of a per-example metric; integer and bool metrics
    (a count of correct predictions) become fractions in ``dtype``."""
    return (values if values.is_floating_point() else values.to(dtype)).mean(0)


def dp_train_step(
    model: nn.Module,
    loss_fn: LossFn,
    optimizer: Transform,
    *,
    max_grad_norm: float,
    noise_multiplier: float,
    compile: bool = False,
    **compile_kwargs: Any,
) -> TrainStep:
    """A DP-SGD training step ``step(state, batch) -> (state, metrics)`` (see the module
    docstring for the update). Metrics: ``loss`` and ``loss_fn``'s metrics averaged over the
    examples, and ``clipped``, the fraction of examples whose gradient was clipped. The noise
    is drawn from the state's rng; in a compiled step it comes from inductor's kernels, so it
    is reproducible from the state but differs from the eager step's."""
    if not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm}")
    if not 0 <= noise_multiplier < math.inf:
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}")
    if noise_multiplier and max_grad_norm == math.inf:
        raise ValueError(
            "max_grad_norm=inf with noise_multiplier > 0 would add noise of infinite standard "
            "deviation: give a finite clipping norm (or noise_multiplier=0 for no noise)"
        )
    _check_no_batchnorm(model)
    # No noise is a standard deviation of 0 (not 0 * inf, a NaN, when nothing is clipped).
    clip = float(max_grad_norm)
    sigma = float(noise_multiplier) * clip if noise_multiplier else 0.0
    per_sample = _per_sample_fn(model, loss_fn, "different")

    def train(params, buffers, opt_state, step, batch):
        grads, losses, aux = per_sample(params, buffers, batch)
        clipped, norms = clip_per_sample(grads, clip)
        n = losses.shape[0]
        noisy = {k: (g.sum(0) + sigma * torch.randn_like(g[0])) / n for k, g in clipped.items()}
        params, opt_state = apply_gradients(optimizer, noisy, opt_state, params)
        metrics = {
            "loss": losses.mean().detach(),
            **{k: _example_mean(v, losses.dtype) for k, v in aux.items()},
            "clipped": (norms > clip).to(losses.dtype).mean(),
        }
        return params, buffers, opt_state, step + 1, metrics

    return _maybe_compile(TrainStep(model, train), compile, compile_kwargs)
