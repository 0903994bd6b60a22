"""torch.optim's optimizers as chains of transforms, with torch's argument names, defaults
and validation. ``lr`` may be a float or a schedule ``step -> lr``; so may SGD's and
RMSprop's ``momentum`` and the Adam family's ``betas[0]``, which torch's CyclicLR and
OneCycleLR cycle. Any other hyperparameter is scheduled by injecting it
(:func:`~loopkit.optim.inject_hyperparams`); a schedule given for it here is a TypeError
that says so.

Every numeric hyperparameter may also be a one-element tensor, read as a 0-dim one (as
torch reads it): it is then used as it is at every update, unvalidated (no host sync), and
the chain keeps every link it could need (a tensor ``momentum`` always has a momentum
buffer, a tensor ``weight_decay`` always a decay that is a no-op at 0). That is how
:func:`~loopkit.optim.inject_hyperparams` passes the current values; structure
(``amsgrad``, ``nesterov``, ``centered``, ``maximize``...) stays Python.

torch's implementation switches ``foreach``, ``capturable`` and ``differentiable`` are
accepted where torch takes them (None, True or False) and change nothing, so code ported
from torch.optim runs as it is: they choose among torch's implementations of one update,
and loopkit picks its own (multi-tensor ops where torch defaults to them:
:mod:`loopkit.optim.leafwise`), keeps its state and scalars on the params' device, and
can always be differentiated through (the fused paths step aside when autograd flows
through the update). RMSprop's ``foreach=False``
and the ``fused`` of SGD, Adam, AdamW and Adagrad choose loopkit's implementation (see
their docstrings)."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import numbers
from collections.abc import Callable, Iterator
from typing import Any

import torch

from loopkit.optim import fused as fused_kernel
from loopkit.optim.base import (
    ApplyFn,
    Transform,
    _registered_apply,
    apply_updates,
    chain,
    with_apply,
)
from loopkit.optim.schedules import Schedule
from loopkit.optim.transforms import (
    Hyper,
    ScaleByAdagradState,
    ScaleByAdamState,
    ScaleByLearningRateState,
    ScaleByRmsState,
    TraceState,
    adafactor_update,
    add_decayed_weights,
    asgd_update,
    negate,
    scale_by_adadelta,
    scale_by_adagrad,
    scale_by_adam,
    scale_by_adamax,
    scale_by_learning_rate,
    scale_by_muon,
    scale_by_nadam,
    scale_by_radam,
    scale_by_rms,
    scale_by_rprop,
    trace,
)
from loopkit.tree import check_no_none, check_same_keys, flatten_with_names


def _checked(tx: Transform) -> Transform:
    """``tx`` whose init rejects params that are not real floating-point tensors and whose
    update checks that the grads line up with the params, with no None among them."""

    def init(params):
        for path, p in flatten_with_names(params)[0].items():
            if not (isinstance(p, torch.Tensor) and p.is_floating_point()):
                raise TypeError(
                    f"param {path} has dtype {getattr(p, 'dtype', type(p).__name__)}: optimizers "
                    "update real floating-point tensors only. Convert it, or keep it out of "
                    "the params (TrainState.create keeps requires_grad=False tensors as buffers)."
                )
        return tx.init(params)

    def update(grads, state, params=None):
        if params is not None:
            check_same_keys(grads, params, "grads", "params")
        else:
            check_no_none(grads, "grads")
        return _dense_only(tx.update, grads, state, params)

    inner_apply = _registered_apply(tx.update)
    if inner_apply is None:
        return Transform(init, update)

    def apply(grads, state, params):
        check_same_keys(grads, params, "grads", "params")
        return _dense_only(inner_apply, grads, state, params)

    return Transform(init, with_apply(update, apply))


def _dense_only(fn: Callable, grads: Any, *args: Any) -> Any:
    """``fn(grads, *args)``; where it fails on a sparse gradient (torch's error then names a
    backend kernel), a TypeError saying so. The check runs only on failure."""
    if torch.compiler.is_compiling():
        return fn(grads, *args)
    try:
        return fn(grads, *args)
    except (NotImplementedError, RuntimeError) as e:
        if isinstance(e, torch.OutOfMemoryError) or "sparse" not in str(e).lower():
            raise
        sparse = [
            (path, g.layout)
            for path, g in flatten_with_names(grads)[0].items()
            if isinstance(g, torch.Tensor) and g.layout != torch.strided
        ]
        if not sparse:
            raise
        path, layout = sparse[0]
        raise TypeError(
            f"grads{path} is a sparse tensor ({layout}): this optimizer takes dense "
            "gradients. Pass grad.to_dense() (a train step does so for sparse embeddings), "
            "or use torch.optim.SparseAdam for a lazy sparse Adam."
        ) from e


# Set while inject_hyperparams rebuilds an optimizer from its current tensors, which it
# validated once as numbers: torch checks values when an optimizer is built, not when a
# param group's value changes, and reading a CUDA tensor would cost a sync each update.
_INJECTING: contextvars.ContextVar[bool] = contextvars.ContextVar("injecting", default=False)


@contextlib.contextmanager
def injecting() -> Iterator[None]:
    """Within the block the optimizers built here take tensor hyperparameters unchecked
    (see :func:`~loopkit.optim.inject_hyperparams`)."""
    token = _INJECTING.set(True)
    try:
        yield
    finally:
        _INJECTING.reset(token)


def _checked_value(value: Any) -> Any:
    """``value`` as torch compares it: a number, or a tensor given by the user (torch
    compares a tensor lr, eps or beta itself); None for a schedule, and for a tensor under
    ``torch.compile`` or passed by inject_hyperparams (see ``_INJECTING``)."""
    if callable(value):
        return None
    if isinstance(value, torch.Tensor) and (torch.compiler.is_compiling() or _INJECTING.get()):
        return None
    return value


def _negative_or_nan(v: Any) -> bool:  # ``not 0.0 <= v``: most torch.optim arguments' check
    return not 0.0 <= v


def _negative(v: Any) -> bool:  # ``v < 0.0``: torch.optim.SGD's check
    return v < 0.0


def _check(value: Any, message: str, invalid: Callable[[Any], Any] = _negative_or_nan) -> None:
    """torch's ``ValueError(f"{message}{value}")`` where ``invalid(value)``, torch's own
    comparison, holds: a NaN fails or passes as in torch (a tensor as
    :func:`_checked_value` says)."""
    checked = _checked_value(value)
    if checked is not None and invalid(checked):
        raise ValueError(f"{message}{value}")


def _lr(
    lr: Any,
    invalid: Callable[[Any], Any] = _negative_or_nan,
    message: str = "Invalid learning rate: ",
) -> Hyper | Schedule:
    """A schedule or a one-element tensor as it is (a 0-dim view, read at every update, as
    torch reads a tensor lr), or the lr as a float; rejected with torch's errors: a tensor
    of more than one element, and ``message`` where ``invalid(lr)`` (see :func:`_check`)."""
    if callable(lr):
        return lr
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
    elif isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"lr must be a number or a schedule (callable step -> lr), got {lr!r}")
    _check(lr, message, invalid)
    return lr.reshape(()) if isinstance(lr, torch.Tensor) else float(lr)


def _num(value: Any) -> Hyper:
    """A hyperparameter as a float, or a one-element tensor (given, or injected) as a 0-dim
    view, as torch reads it (``_to_scalar``): a ``[1]`` tensor would broadcast a 0-dim
    param's update, and its state, to ``[1]``."""
    if not isinstance(value, torch.Tensor):
        return float(value)
    if value.ndim == 0:
        return value
    if value.numel() != 1:
        raise ValueError(
            f"a tensor hyperparameter must have one element, got one of shape {list(value.shape)}"
        )
    return value.reshape(())


def _scheduled(value: Any) -> Hyper | Schedule:
    """A hyperparameter that may be a schedule (SGD's and RMSprop's ``momentum``, the Adam
    family's ``betas[0]``, which CyclicLR and OneCycleLR cycle): as it is, else :func:`_num`."""
    return value if callable(value) else _num(value)


def _numbers_only(optimizer: str, **values: Any) -> None:
    """Reject a schedule given for an argument that ``optimizer`` reads as a number, naming
    the argument and the way to schedule it: :func:`~loopkit.optim.inject_hyperparams`. A
    tuple argument is checked element by element, but for ``betas[0]``, which the Adam
    family takes as a schedule. Skipped while injecting (the values were checked when the
    optimizer was built) and under ``torch.compile``, which cannot read ``_INJECTING``."""
    if torch.compiler.is_compiling() or _INJECTING.get():
        return
    for name, value in values.items():
        parts = value if isinstance(value, tuple) else (value,)
        for i, part in enumerate(parts):
            if not callable(part) or (name == "betas" and i == 0):
                continue
            where, example = name, f"{name}=schedule"
            if isinstance(value, tuple):
                shown = ", ".join("schedule" if callable(v) else repr(v) for v in value)
                where, example = f"{name}[{i}]", f"{name}=({shown})"
            raise TypeError(
                f"optim.{optimizer} takes {where} as a number, not a schedule (lr may be a "
                "schedule, and SGD's and RMSprop's momentum and the Adam family's betas[0]). "
                f"To change {where} at every update, inject it: "
                f"optim.inject_hyperparams(optim.{optimizer})({example})"
            )


def _check_switches(**switches: Any) -> None:
    """torch's implementation switches (``foreach``, ``capturable``, ``differentiable``):
    None, True or False, as torch takes them; they change nothing here (module docstring)."""
    for name, value in switches.items():
        _check_switch(name, value)


def _fixed(value: Any) -> bool:
    """Whether ``value`` is a plain number (a tensor or a schedule may change each step)."""
    return not (callable(value) or isinstance(value, torch.Tensor))


def sgd(
    lr: float | Schedule = 1e-3,
    momentum: float | Schedule = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    *,
    maximize: bool = False,
    foreach: bool | None = None,
    differentiable: bool = False,
    fused: bool | None = None,
) -> Transform:
    """torch.optim.SGD: ``g += weight_decay * p``; momentum buffer ``b`` (first ``b = g``,
    then ``b = momentum * b + (1 - dampening) * g``); ``g = g + momentum * b`` (nesterov) or
    ``g = b``; ``p -= lr * g``. ``maximize`` negates the gradient first.

    Eager steps run torch's fused SGD kernel where it applies, with numeric momentum,
    dampening and weight decay; ``fused`` as for :func:`adam`, except that float16 and
    bfloat16 CPU params always run the chain (torch 2.13's CPU kernel drops most of their
    update)."""
    # torch.optim.SGD's checks are `x < 0.0`: a NaN lr, momentum or weight decay passes
    _numbers_only("sgd", dampening=dampening, weight_decay=weight_decay)
    _check_switches(foreach=foreach, differentiable=differentiable)
    lr = _lr(lr, _negative)
    varying = not _fixed(momentum)  # a schedule (one_cycle_momentum) or injected
    _check(momentum, "Invalid momentum value: ", _negative)
    _check(weight_decay, "Invalid weight_decay value: ", _negative)
    _check_switch("fused", fused)
    if nesterov and (
        (_fixed(momentum) and momentum <= 0) or (_fixed(dampening) and dampening != 0)
    ):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    has_trace = varying or momentum != 0
    lr_tx = scale_by_learning_rate(lr)
    tx = chain(
        *([negate()] if maximize else []),
        add_decayed_weights(_num(weight_decay)),
        *([trace(_scheduled(momentum), _num(dampening), nesterov)] if has_trace else []),
        lr_tx,
    )
    if fused is not False and all(map(_fixed, (momentum, dampening, weight_decay))):
        kernel = functools.partial(
            fused_kernel.sgd_step, momentum=float(momentum), dampening=float(dampening),
            weight_decay=float(weight_decay), nesterov=bool(nesterov), maximize=bool(maximize),
            any_dtype=bool(fused),
        )  # fmt: skip
        # the chain is [negate], decay, [trace], lr
        at = int(maximize) + 1 if has_trace else None
        links = int(maximize) + 2 + int(has_trace)
        apply = _kernel_apply(tx, lr_tx, kernel, links=links, at=at, kind=TraceState)
        tx = tx._replace(update=with_apply(tx.update, apply))
    return _checked(tx)


def _check_switch(name: str, value: Any) -> None:
    """``fused`` / ``foreach``: None (where it applies), True or False, as torch takes them."""
    if value not in (None, True, False):
        raise TypeError(f"{name} must be None, True or False, got {value!r}")


def _kernel_apply(
    tx: Transform,
    lr_tx: Transform,
    kernel: Callable,
    *,
    links: int,
    at: int | None,
    kind: type,
) -> ApplyFn:
    """The ``apply`` of a built-in chain ``tx`` of ``links`` transforms ending in ``lr_tx``,
    whose only other state is the ``kind`` state at position ``at`` (None: no other state;
    the negate and decay links keep none): ``kernel(params, grads, that state, lr)``
    (:mod:`loopkit.optim.fused`) where it returns ``(new params, new state)``, otherwise
    ``tx.update`` and ``apply_updates``. ``tx`` is the chain before the apply is attached."""

    def apply(grads, state, params):
        if (
            type(state) is tuple
            and len(state) == links
            and isinstance(state[-1], ScaleByLearningRateState)
            and (at is None or isinstance(state[at], kind))
        ):
            _, lr_state = lr_tx.update({}, state[-1])  # the lr of this update, in its state
            out = kernel(params, grads, None if at is None else state[at], lr_state.lr)
            if out is not None:
                new_params, link_state = out
                new_state = list(state)
                if at is not None:
                    new_state[at] = link_state
                new_state[-1] = lr_state
                return new_params, tuple(new_state)
        updates, state = tx.update(grads, state, params)
        return apply_updates(params, updates), state

    return apply


def _beta1(betas: tuple) -> Hyper | Schedule:
    """betas[0] as :func:`_num` gives it, or as it is if it is a schedule (cycled like
    OneCycleLR does)."""
    return _scheduled(betas[0])


def _check_adam(betas, eps, weight_decay) -> None:
    """The Adam family's checks, in torch's order (a beta1 schedule, for OneCycleLR-style
    cycling, is not checked). Torch checks ``betas[0]`` and ``betas[1]`` only, and fails
    at its first step on more betas (unpacking a pair): here that is an error at once."""
    _check(eps, "Invalid epsilon value: ")
    for i in (0, 1):
        _check(betas[i], f"Invalid beta parameter at index {i}: ", lambda v: not 0.0 <= v < 1.0)
    _check(weight_decay, "Invalid weight_decay value: ")
    if len(betas) > 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")


def _check_beta_types(betas) -> None:
    """torch.optim.Adam's (and AdamW's) further rule: both betas floats or both tensors
    (a beta1 schedule goes with either)."""
    first, second = betas[0], betas[1]
    if callable(first):
        return
    if not any(isinstance(first, t) and isinstance(second, t) for t in (float, torch.Tensor)):
        raise ValueError("betas must be either both floats or both Tensors")


def adam(
    lr: float | Schedule = 1e-3,
    betas: tuple[float | Schedule, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    *,
    foreach: bool | None = None,
    maximize: bool = False,
    capturable: bool = False,
    differentiable: bool = False,
    fused: bool | None = None,
    decoupled_weight_decay: bool = False,
) -> Transform:
    """torch.optim.Adam: L2 weight decay ``g += weight_decay * p`` (or AdamW's decoupled
    decay with ``decoupled_weight_decay=True``), then :func:`scale_by_adam`, then ``-lr``.

    Eager steps (:func:`~loopkit.optim.apply_gradients`, which ``train_step`` uses) run
    torch's fused Adam kernel where it applies -- float32 params on the CPU or CUDA (and
    float64 on the CPU), dense and outside autograd, with numeric betas, eps and weight
    decay; see :mod:`loopkit.optim.fused` -- with the chain's results to rounding.
    ``fused=False`` always runs the chain. ``fused=True`` also fuses float16 and bfloat16
    params (the kernel computes them in float32) and float64 params on CUDA (whose kernel
    reads a float32 lr); unlike torch's flag it is not an error where the kernel cannot run
    (compiled steps, torch.func transforms, autograd through the update, other layouts):
    the chain runs there."""
    name = "adamw" if decoupled_weight_decay else "adam"
    _numbers_only(name, betas=betas, eps=eps, weight_decay=weight_decay)
    _check_switches(foreach=foreach, capturable=capturable, differentiable=differentiable)
    lr = _lr(lr)
    _check_adam(betas, eps, weight_decay)
    _check_beta_types(betas)
    _check_switch("fused", fused)
    adaptive = scale_by_adam(_beta1(betas), _num(betas[1]), _num(eps), amsgrad)
    kernel = None
    if fused is not False and all(map(_fixed, (betas[0], betas[1], eps, weight_decay))):
        kernel = functools.partial(
            fused_kernel.adam_step,
            b1=float(betas[0]), b2=float(betas[1]), eps=float(eps),
            weight_decay=float(weight_decay), amsgrad=bool(amsgrad), maximize=bool(maximize),
            decoupled=decoupled_weight_decay, any_dtype=bool(fused),
        )  # fmt: skip
    return _adaptive(
        adaptive, lr, weight_decay, decoupled_weight_decay, maximize, kernel, ScaleByAdamState
    )


def _adaptive(
    direction: Transform,
    lr: float | Schedule,
    weight_decay: float,
    decoupled: bool,
    maximize: bool,
    kernel: Callable | None = None,
    kind: type | None = None,
) -> Transform:
    """``[negate] -> L2 decay -> direction -> -lr``, or with decoupled decay (AdamW-style,
    ``p -= lr * weight_decay * p``) ``[negate] -> direction -> decay -> -lr``; with
    ``kernel`` (Adam's or Adagrad's, see :func:`_kernel_apply`), taking ``direction``'s
    state of type ``kind``, as the chain's apply."""
    decay = add_decayed_weights(_num(weight_decay), decoupled=decoupled)
    core = [direction, decay] if decoupled else [decay, direction]
    lr_tx = scale_by_learning_rate(lr)
    tx = chain(*([negate()] if maximize else []), *core, lr_tx)
    if kernel is not None:  # direction's state follows [negate] and, if L2, decay
        at = int(maximize) + int(not decoupled)
        links = int(maximize) + 3
        apply = _kernel_apply(tx, lr_tx, kernel, links=links, at=at, kind=kind)
        tx = tx._replace(update=with_apply(tx.update, apply))
    return _checked(tx)


def adamw(
    lr: float | Schedule = 1e-3,
    betas: tuple[float | Schedule, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
    foreach: bool | None = None,
    capturable: bool = False,
    differentiable: bool = False,
    fused: bool | None = None,
) -> Transform:
    """torch.optim.AdamW: ``p -= lr * weight_decay * p`` (decoupled from the moments), then
    the Adam step. Equivalent to ``adam(..., decoupled_weight_decay=True)`` (``fused`` as
    there)."""
    return adam(
        lr, betas, eps, weight_decay, amsgrad, maximize=maximize, decoupled_weight_decay=True,
        foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
    )  # fmt: skip


def rmsprop(
    lr: float | Schedule = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float | Schedule = 0.0,
    centered: bool = False,
    *,
    capturable: bool = False,
    foreach: bool | None = None,
    maximize: bool = False,
    differentiable: bool = False,
) -> Transform:
    """torch.optim.RMSprop: ``g += weight_decay * p``; ``x = g / (sqrt(v) + eps)`` with
    :func:`scale_by_rms`; with momentum ``b = momentum * b + x`` and ``p -= lr * b``,
    otherwise ``p -= lr * x``. ``momentum`` may be a schedule, as CyclicLR and OneCycleLR
    cycle it (at a step where it is 0 the buffer is kept and skipped, as torch does).

    Eager steps on the CPU run torch.optim.RMSprop's own in-place ops, batched over the
    params (:func:`loopkit.optim.fused.rmsprop_step`: bitwise torch's default result),
    where its rules allow and alpha, eps, weight decay and momentum are numbers;
    ``foreach=False`` always runs the chain."""
    _numbers_only("rmsprop", alpha=alpha, eps=eps, weight_decay=weight_decay)
    _check_switches(capturable=capturable, differentiable=differentiable)
    lr = _lr(lr)
    _check(eps, "Invalid epsilon value: ")
    _check(momentum, "Invalid momentum value: ")
    _check(weight_decay, "Invalid weight_decay value: ")
    _check(alpha, "Invalid alpha value: ")
    _check_switch("foreach", foreach)
    direction = scale_by_rms(_num(alpha), _num(eps), centered)
    if not _fixed(momentum) or momentum > 0:
        direction = chain(direction, trace(_scheduled(momentum)))
    kernel = kind = None
    if foreach is not False and all(map(_fixed, (alpha, eps, weight_decay, momentum))):
        kernel = functools.partial(
            fused_kernel.rmsprop_step, alpha=float(alpha), eps=float(eps),
            weight_decay=float(weight_decay), momentum=float(momentum),
            centered=bool(centered), maximize=bool(maximize),
        )  # fmt: skip
        kind = ScaleByRmsState if momentum == 0 else tuple
    return _adaptive(direction, lr, weight_decay, False, maximize, kernel, kind)


def adagrad(
    lr: float | Schedule = 1e-2,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
    *,
    foreach: bool | None = None,
    maximize: bool = False,
    differentiable: bool = False,
    fused: bool | None = None,
) -> Transform:
    """torch.optim.Adagrad: ``g += weight_decay * p``; ``s += g^2``;
    ``p -= lr / (1 + (t - 1) lr_decay) * g / (sqrt(s) + eps)``. Dense gradients only.

    Eager steps run torch's fused Adagrad kernel where it applies: as for :func:`adam`,
    with numeric lr_decay, weight decay and eps, and on the CPU only (torch 2.13 has no
    CUDA kernel). ``fused`` as for :func:`adam`: ``True`` also fuses float16 and bfloat16
    params."""
    _numbers_only(
        "adagrad", lr_decay=lr_decay, weight_decay=weight_decay,
        initial_accumulator_value=initial_accumulator_value, eps=eps,
    )  # fmt: skip
    _check_switches(foreach=foreach, differentiable=differentiable)
    lr = _lr(lr)
    _check(lr_decay, "Invalid lr_decay value: ")
    _check(weight_decay, "Invalid weight_decay value: ")
    _check(initial_accumulator_value, "Invalid initial_accumulator_value value: ")
    _check(eps, "Invalid epsilon value: ")
    _check_switch("fused", fused)
    direction = scale_by_adagrad(_num(lr_decay), _num(initial_accumulator_value), _num(eps))
    kernel = None
    if fused is not False and all(map(_fixed, (lr_decay, weight_decay, eps))):
        kernel = functools.partial(
            fused_kernel.adagrad_step, lr_decay=float(lr_decay),
            weight_decay=float(weight_decay), eps=float(eps), maximize=bool(maximize),
            any_dtype=bool(fused),
        )  # fmt: skip
    return _adaptive(direction, lr, weight_decay, False, maximize, kernel, ScaleByAdagradState)


def adamax(
    lr: float | Schedule = 2e-3,
    betas: tuple[float | Schedule, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    foreach: bool | None = None,
    maximize: bool = False,
    capturable: bool = False,
    differentiable: bool = False,
) -> Transform:
    """torch.optim.Adamax: ``g += weight_decay * p``, then :func:`scale_by_adamax`, ``-lr``."""
    _numbers_only("adamax", betas=betas, eps=eps, weight_decay=weight_decay)
    _check_switches(foreach=foreach, capturable=capturable, differentiable=differentiable)
    lr = _lr(lr)
    _check_adam(betas, eps, weight_decay)
    direction = scale_by_adamax(_beta1(betas), _num(betas[1]), _num(eps))
    return _adaptive(direction, lr, weight_decay, False, maximize)


def nadam(
    lr: float | Schedule = 2e-3,
    betas: tuple[float | Schedule, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum_decay: float = 4e-3,
    decoupled_weight_decay: bool = False,
    *,
    foreach: bool | None = None,
    maximize: bool = False,
    capturable: bool = False,
    differentiable: bool = False,
) -> Transform:
    """torch.optim.NAdam: weight decay (L2, or decoupled like AdamW), then
    :func:`scale_by_nadam`, then ``-lr``."""
    _numbers_only(
        "nadam", betas=betas, eps=eps, weight_decay=weight_decay, momentum_decay=momentum_decay
    )
    _check_switches(foreach=foreach, capturable=capturable, differentiable=differentiable)
    lr = _lr(lr)
    _check_adam(betas, eps, weight_decay)
    _check(momentum_decay, "Invalid momentum_decay value: ")
    direction = scale_by_nadam(_beta1(betas), _num(betas[1]), _num(eps), _num(momentum_decay))
    return _adaptive(direction, lr, weight_decay, decoupled_weight_decay, maximize)


def radam(
    lr: float | Schedule = 1e-3,
    betas: tuple[float | Schedule, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    *,
    foreach: bool | None = None,
    maximize: bool = False,
    capturable: bool = False,
    differentiable: bool = False,
) -> Transform:
    """torch.optim.RAdam: weight decay (L2, or decoupled like AdamW), then
    :func:`scale_by_radam`, then ``-lr``."""
    _numbers_only("radam", betas=betas, eps=eps, weight_decay=weight_decay)
    _check_switches(foreach=foreach, capturable=capturable, differentiable=differentiable)
    lr = _lr(lr)
    _check_adam(betas, eps, weight_decay)
    direction = scale_by_radam(_beta1(betas), _num(betas[1]), _num(eps))
    return _adaptive(direction, lr, weight_decay, decoupled_weight_decay, maximize)


def adadelta(
    lr: float | Schedule = 1.0,
    rho: float = 0.9,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    *,
    foreach: bool | None = None,
    maximize: bool = False,
    capturable: bool = False,
    differentiable: bool = False,
) -> Transform:
    """torch.optim.Adadelta: ``g += weight_decay * p``, then :func:`scale_by_adadelta`,
    then ``-lr``."""
    _numbers_only("adadelta", rho=rho, eps=eps, weight_decay=weight_decay)
    _check_switches(foreach=foreach, capturable=capturable, differentiable=differentiable)
    lr = _lr(lr)
    _check(rho, "Invalid rho value: ", lambda v: not 0.0 <= v <= 1.0)
    _check(eps, "Invalid epsilon value: ")
    _check(weight_decay, "Invalid weight_decay value: ")
    direction = scale_by_adadelta(_num(rho), _num(eps))
    return _adaptive(direction, lr, weight_decay, False, maximize)


def rprop(
    lr: float | Schedule = 1e-2,
    etas: tuple[float, float] = (0.5, 1.2),
    step_sizes: tuple[float, float] = (1e-6, 50),
    *,
    foreach: bool | None = None,
    maximize: bool = False,
    capturable: bool = False,
    differentiable: bool = False,
) -> Transform:
    """torch.optim.Rprop: sign-based steps whose sizes (starting at ``lr``) grow by
    ``etas[1]`` while the gradient keeps its sign and shrink by ``etas[0]`` when it flips
    (:func:`scale_by_rprop`). As in torch, a schedule only sets the initial step size."""
    _numbers_only("rprop", etas=etas, step_sizes=step_sizes)
    _check_switches(foreach=foreach, capturable=capturable, differentiable=differentiable)
    lr = _lr(lr)
    low, high = _checked_value(etas[0]), _checked_value(etas[1])
    if low is not None and high is not None and not 0.0 < low < 1.0 < high:
        raise ValueError(f"Invalid eta values: {etas[0]}, {etas[1]}")
    first = float(lr(torch.tensor(0))) if callable(lr) else lr
    core = scale_by_rprop(first, tuple(map(_num, etas)), tuple(map(_num, step_sizes)))
    return _checked(chain(*([negate()] if maximize else []), core))


def asgd(
    lr: float | Schedule = 1e-2,
    lambd: float = 1e-4,
    alpha: float = 0.75,
    t0: float = 1e6,
    weight_decay: float = 0.0,
    *,
    foreach: bool | None = None,
    maximize: bool = False,
    capturable: bool = False,
    differentiable: bool = False,
) -> Transform:
    """torch.optim.ASGD: ``g += weight_decay * p``, then :func:`asgd_update` (SGD with a
    decaying step ``eta`` and a running average of the params in ``opt_state[-1].ax``)."""
    _numbers_only("asgd", lambd=lambd, alpha=alpha, t0=t0, weight_decay=weight_decay)
    _check_switches(foreach=foreach, capturable=capturable, differentiable=differentiable)
    lr = _lr(lr)
    _check(weight_decay, "Invalid weight_decay value: ")
    core = asgd_update(lr, _num(lambd), _num(alpha), _num(t0))
    return _checked(
        chain(*([negate()] if maximize else []), add_decayed_weights(_num(weight_decay)), core)
    )


def adafactor(
    lr: float | Schedule = 1e-2,
    beta2_decay: float = -0.8,
    eps: tuple[float | None, float] = (None, 1e-3),
    d: float = 1.0,
    weight_decay: float = 0.0,
    *,
    foreach: bool | None = None,
    maximize: bool = False,
) -> Transform:
    """torch.optim.Adafactor: factored second moments for 2+-dim params, relative step
    sizes and update clipping (:func:`adafactor_update`). Params must be a dict."""
    _numbers_only("adafactor", beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay)
    _check_switches(foreach=foreach)
    lr = _lr(lr, message="Learning rate should be >= 0 but is: ")
    _check(beta2_decay, "beta2_decay should be <= 0 but is: ", lambda v: not 0.0 >= v)
    if eps[0] is not None:
        _check(eps[0], "epsilon1 should be >= 0 but is: ")
    _check(eps[1], "epsilon2 should be >= 0 but is: ")
    _check(d, "Clipping threshold d should be >= 1 but is: ", lambda v: not 1.0 <= v)
    _check(weight_decay, "weight_decay should be >= 0 but is: ")
    eps = tuple(None if e is None else _num(e) for e in eps)
    core = adafactor_update(lr, _num(beta2_decay), eps, _num(d), _num(weight_decay))
    return _checked(chain(*([negate()] if maximize else []), core))


def muon(
    lr: float | Schedule = 1e-3,
    weight_decay: float = 0.1,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315),
    eps: float = 1e-7,
    ns_steps: int = 5,
    adjust_lr_fn: str | None = None,
) -> Transform:
    """torch.optim.Muon, for 2-D params: :func:`scale_by_muon` (momentum, Newton-Schulz
    orthogonalisation in bfloat16, shape-dependent lr ratio), decoupled weight decay
    ``p -= lr * weight_decay * p``, then ``-lr``. Give other params another optimizer with
    :func:`~loopkit.optim.multi_transform`."""
    _numbers_only("muon", weight_decay=weight_decay, momentum=momentum, eps=eps)
    lr = _lr(lr, message="Learning rate should be >= 0 but is: ")
    _check(momentum, "momentum should be >= 0 but is: ")
    _check(weight_decay, "weight decay should be >= 0 but is: ")
    direction = scale_by_muon(
        _num(momentum), nesterov, tuple(ns_coefficients), _num(eps), int(ns_steps), adjust_lr_fn
    )
    return _adaptive(direction, lr, weight_decay, True, False)


# Arguments that fix muon's structure (the Newton-Schulz loop): never injected.
muon.static_args = ("ns_coefficients", "ns_steps")
