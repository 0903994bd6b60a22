"""Building blocks that the optimizers are chains of.

Each block is a :class:`~loopkit.optim.base.Transform` whose update is the equation in
its docstring, written with the same torch ops, in the same order, as the matching
``torch.optim`` implementation (``_single_tensor_*``), so results agree to rounding.
``g`` is the incoming update (the gradient at the head of a chain), ``p`` the params.

No block uses ``Tensor.add(other, alpha=a)``: torch 2.13's inductor on CPU miscompiles
``mm(...).add(x, alpha=a)`` (it fuses it into an addmm and drops ``a``), and a gradient is
often an mm. ``g + a * x`` computes the same value to one rounding and compiles correctly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.utils._foreach_utils import (
    _device_has_foreach_support,
    _group_tensors_by_device_and_dtype,
)

from loopkit.optim.base import Transform, zeros_like_tree
from loopkit.optim.leafwise import batches, leafwise
from loopkit.optim.schedules import Schedule
from loopkit.tree import PyTree, check_same_keys, flatten_with_names, tree_leaves, tree_map


def _count(params: PyTree) -> torch.Tensor:
    """A step counter on the params' device (int64, so it never loses precision)."""
    leaves = tree_leaves(params)
    device = leaves[0].device if leaves else None
    return torch.zeros((), dtype=torch.int64, device=device)


Hyper = float | torch.Tensor  # a number, or a 0-dim tensor (an injected hyperparameter)


def _at(value: Hyper | Schedule, count: torch.Tensor) -> Hyper:
    """A hyperparameter's value for the update after ``count`` updates: a number or tensor as
    it is, a schedule evaluated (float64), as a torch scheduler that cycles momentum sets it."""
    if callable(value):
        return torch.as_tensor(value(count), dtype=torch.float64, device=count.device)
    return value


def _s(value: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """A scalar hyperparameter in ``like``'s dtype. The float64 0-dim tensors that hold
    bias corrections, schedules and the lr would otherwise promote a 0-dim param's math and
    state to float64 (for larger tensors torch already computes in their dtype)."""
    return value.to(like.dtype) if isinstance(value, torch.Tensor) else value


def _per_dtype(value: Hyper) -> Callable[[torch.Tensor], Hyper]:
    """``like -> _s(value, like)``, converting a tensor ``value`` once per dtype rather than
    once per leaf (each conversion is an op: a dozen leaves, a dozen ops saved per scalar)."""
    if not isinstance(value, torch.Tensor):
        return lambda like: value
    cache: dict[torch.dtype, torch.Tensor] = {}

    def cast(like: torch.Tensor) -> torch.Tensor:
        if like.dtype not in cache:
            cache[like.dtype] = value.to(like.dtype)
        return cache[like.dtype]

    return cast


def _power(base: Hyper, t: torch.Tensor) -> torch.Tensor:
    """``base ** t`` (float64) for ``base`` in [0, 1], computed as ``exp(t * log(base))``.

    The bias corrections are scalars that every param's update reads. Compiled for CPU,
    inductor recomputes such a scalar inside each param's element loop unless its
    expression holds an op it counts as expensive (exp, log, ...); ``pow`` is not one, and
    the kernels are built with ``-fmath-errno``, so the compiler cannot hoist it out of the
    loop either. Written with exp and log, it is computed once per step (on the demo MLP
    that was a quarter of the compiled step). The two agree to an ulp of float64."""
    if isinstance(base, torch.Tensor):
        log_base = torch.log(base.to(torch.float64))
    else:
        log_base = math.log(base) if base > 0 else -math.inf
    return torch.exp(t * log_base)


def _full_like(p: torch.Tensor, value: Hyper) -> torch.Tensor:
    """``torch.full_like(p, value)`` for a number or a 0-dim tensor ``value``."""
    return torch.zeros_like(p) + _s(value, p)


def _addcmul(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, value: Hyper) -> torch.Tensor:
    """``x + value * a * b``: ``Tensor.addcmul`` for a number ``value`` (torch's op), the same
    product written out for a tensor one (addcmul's ``value`` must be a number)."""
    if isinstance(value, torch.Tensor):
        return x + value.to(a.dtype) * a * b
    return x.addcmul(a, b, value=value)


def _lerp(start: torch.Tensor, end: torch.Tensor, weight: float | torch.Tensor) -> torch.Tensor:
    """``torch.lerp`` with a number or a 0-dim tensor weight of any float dtype."""
    if isinstance(weight, torch.Tensor):
        weight = weight.to(start.dtype)
    return torch.lerp(start, end, weight)


def _step_to(new: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The update taking ``p`` to ``new``: ``new - p``, and 0 where they are equal, so that
    ``p + update`` keeps a +-inf entry that the step leaves as it is (``inf - inf`` is NaN)."""
    return torch.where(new == p, 0.0, new - p)


def _need_params(params: PyTree | None, name: str) -> PyTree:
    if params is None:
        raise ValueError(f"{name} needs the params: call update(grads, opt_state, params)")
    return params


def negate() -> Transform:
    """``g <- -g``: torch.optim's ``maximize=True``."""
    return Transform(
        lambda params: (), lambda g, state, params=None: (leafwise(torch.neg, g), state)
    )


def add_decayed_weights(weight_decay: Hyper, *, decoupled: bool = False) -> Transform:
    """``g <- g + weight_decay * p``: L2 regularisation (coupled weight decay), or with
    ``decoupled=True`` AdamW's decoupled decay, placed after the adaptive scaling and before
    the learning rate. A tensor ``weight_decay`` (injected) is applied where it is non-zero:
    at 0 the update passes through unchanged, as torch skips the decay then.

    ``decoupled`` takes the decay term of a +-inf param entry as the largest finite value of
    its sign: torch's ``p *= 1 - lr * weight_decay`` leaves such an entry as it is (for
    ``lr * weight_decay < 1``), and so does adding a finite update to it, where adding
    ``-lr * weight_decay * p`` would give ``inf - inf = NaN``. (That holds for ``lr <= 1``,
    where the scaled term stays finite.) Coupled decay keeps the inf, as torch's
    ``g += weight_decay * p`` does."""
    injected = isinstance(weight_decay, torch.Tensor)

    def update(g, state, params=None):
        if not injected and weight_decay == 0:
            return g, state
        params = _need_params(params, "add_decayed_weights")
        check_same_keys(g, params, "grads", "params")
        wd = _per_dtype(weight_decay)
        nonzero = weight_decay != 0 if injected else None

        def decay(gi, pi):
            term = wd(gi) * pi
            if decoupled:  # +-inf to the largest finite value (see the docstring)
                big = torch.finfo(term.dtype).max
                term = term.clamp(-big, big)
            decayed = gi + term
            return torch.where(nonzero, decayed, gi) if injected else decayed

        return leafwise(decay, g, params), state

    return Transform(lambda params: (), update)


class TraceState(NamedTuple):
    count: torch.Tensor
    initialized: torch.Tensor  # torch creates the buffer at the first step with momentum != 0
    momentum_buffer: PyTree


def trace(momentum: Hyper | Schedule, dampening: Hyper = 0.0, nesterov: bool = False) -> Transform:
    """SGD momentum, as torch.optim.SGD: the first buffer is the raw update,
    ``b_1 = g_1``; then ``b_t = momentum * b_{t-1} + (1 - dampening) * g_t``;
    output ``g_t + momentum * b_t`` if nesterov else ``b_t``. ``momentum`` may be a schedule
    (e.g. :func:`~loopkit.optim.schedules.one_cycle_momentum`); at a step where it is 0 the
    update passes through and the buffer is kept, as torch skips momentum then."""

    def init(params):
        count = _count(params)
        return TraceState(count, torch.zeros_like(count, dtype=torch.bool), zeros_like_tree(params))

    def update(g, state, params=None):
        momentum_t = _at(momentum, state.count)
        active = momentum_t != 0
        if not isinstance(active, torch.Tensor):  # a fill, not a host-to-device copy (a sync)
            active = torch.full_like(state.initialized, bool(active))
        first = ~state.initialized & active
        mom, keep = _per_dtype(momentum_t), _per_dtype(1 - dampening)

        def buf(gi, bi):
            moved = bi * mom(gi) + keep(gi) * gi
            return torch.where(first, gi, torch.where(active, moved, bi))

        def output(gi, bi):
            return torch.where(active, gi + mom(gi) * bi if nesterov else bi, gi)

        new_buf = leafwise(buf, g, state.momentum_buffer)
        out = leafwise(output, g, new_buf)
        return out, TraceState(state.count + 1, state.initialized | active, new_buf)

    return Transform(init, update)


class ScaleByAdamState(NamedTuple):
    count: torch.Tensor
    exp_avg: PyTree
    exp_avg_sq: PyTree
    max_exp_avg_sq: PyTree  # () unless amsgrad (no None: torch's pytree treats it as a leaf)


def scale_by_adam(
    b1: Hyper | Schedule = 0.9, b2: Hyper = 0.999, eps: Hyper = 1e-8, amsgrad: bool = False
) -> Transform:
    """Adam's direction, bias-corrected as torch.optim.Adam (t counts from 1)::

        m_t = lerp(m_{t-1}, g, 1 - b1)            v_t = b2 v_{t-1} + (1 - b2) g^2
        v_t' = max(v'_{t-1}, v_t) if amsgrad else v_t
        out = m_t / (sqrt(v_t') / sqrt(1 - b2^t) + eps) / (1 - b1^t)

    A learning rate ``lr`` then gives torch's ``p -= lr / (1 - b1^t) * m_t / denom``.
    ``b1`` may be a schedule (OneCycleLR's beta1 cycling); as in torch, the current ``b1``
    is used in the bias correction too.
    """

    def init(params):
        return ScaleByAdamState(
            _count(params),
            zeros_like_tree(params),
            zeros_like_tree(params),
            zeros_like_tree(params) if amsgrad else (),
        )

    def update(g, state, params=None):
        count = state.count + 1
        t = count.to(torch.float64)
        b1_t = _at(b1, state.count)
        bias_correction1 = 1 - _power(b1_t, t)
        bias_correction2_sqrt = (1 - _power(b2, t)).sqrt()
        one_minus_b1, b2_ = _per_dtype(1 - b1_t), _per_dtype(b2)
        exp_avg = leafwise(lambda m, gi: _lerp(m, gi, one_minus_b1(m)), state.exp_avg, g)
        exp_avg_sq = leafwise(
            lambda v, gi: _addcmul(v * b2_(v), gi, gi, 1 - b2), state.exp_avg_sq, g
        )
        if amsgrad:
            max_sq = leafwise(torch.maximum, state.max_exp_avg_sq, exp_avg_sq)
            second = max_sq
        else:
            max_sq, second = (), exp_avg_sq
        bc1, bc2_sqrt, eps_ = (_per_dtype(bias_correction1), _per_dtype(bias_correction2_sqrt),
                               _per_dtype(eps))  # fmt: skip

        def direction(m, v):
            denom = v.sqrt() / bc2_sqrt(v) + eps_(v)
            return m / denom / bc1(m)

        out = leafwise(direction, exp_avg, second)
        return out, ScaleByAdamState(count, exp_avg, exp_avg_sq, max_sq)

    return Transform(init, update)


class ScaleByLearningRateState(NamedTuple):
    count: torch.Tensor
    lr: torch.Tensor  # the lr of the most recent update (the first one's before any update)


def _lr_at(lr: Hyper | Schedule, state_lr: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """The lr of the update after ``count`` updates: a schedule's value, a tensor lr itself
    (injected: its current value), or for a number the lr kept in the state."""
    if callable(lr):
        return torch.as_tensor(lr(count), dtype=torch.float64, device=count.device)
    if isinstance(lr, torch.Tensor):
        return lr.to(torch.float64)
    return state_lr


def _first_lr(lr: Hyper | Schedule, count: torch.Tensor) -> torch.Tensor:
    """The lr a new state records: a tensor of its own, never the lr tensor given (a
    donated step writes the state's tensors in place, and other states share that one)."""
    value = lr(count) if callable(lr) else lr
    first = torch.as_tensor(value, dtype=torch.float64, device=count.device)
    return first.clone() if first is value else first


def scale_by_learning_rate(lr: Hyper | Schedule) -> Transform:
    """``g <- -lr_t * g``: ``lr_t = schedule(t)`` for a schedule (t: updates made so far), the
    tensor itself for a 0-dim tensor lr, or for a number the lr held in the state.

    The state keeps the current lr as a float64 tensor, so loggers can read it on device.
    With a number, that tensor *is* the lr: replace it (:func:`loopkit.optim.set_learning_rate`)
    to change the lr, e.g. on a plateau; a compiled step takes the new value without
    recompiling. A tensor lr is read at every update, as torch reads a tensor lr;
    :func:`~loopkit.optim.inject_hyperparams` passes its current lr this way."""

    def init(params):
        count = _count(params)
        return ScaleByLearningRateState(count, _first_lr(lr, count))

    def update(g, state, params=None):
        lr_t = _lr_at(lr, state.lr, state.count)
        minus_lr = _per_dtype(-lr_t)
        out = leafwise(lambda gi: gi * minus_lr(gi), g)
        return out, ScaleByLearningRateState(state.count + 1, lr_t)

    return Transform(init, update)


def _check_foreach(foreach: bool | None, leaves: list[torch.Tensor]) -> None:
    """torch.nn.utils' ``foreach``: None, True or False; True raises torch's RuntimeError
    for leaves on a device without multi-tensor (``torch._foreach_*``) kernels."""
    if foreach not in (None, True, False):
        raise TypeError(f"foreach must be None, True or False, got {foreach!r}")
    if foreach:
        for device in {x.device for x in leaves}:
            if not _device_has_foreach_support(device):
                raise RuntimeError(
                    f"foreach=True was passed, but can't use the foreach API on {device.type} "
                    "tensors"
                )


def global_norm(tree: PyTree, norm_type: float = 2.0, foreach: bool | None = None) -> torch.Tensor:
    """The p-norm of all leaves as one vector, as torch.nn.utils.get_total_norm: the
    ``norm_type``-norm of the stacked per-tensor norms, on the first leaf's device. Eagerly
    (see :func:`~loopkit.optim.leafwise.batches`) it is computed exactly as torch does: the
    leaves grouped by device and dtype in torch's order, each group's norms one
    ``torch._foreach_norm`` where the device has it, or with ``foreach=False`` one
    ``torch.linalg.vector_norm`` per leaf (``foreach=True`` on a device without it raises,
    as in torch); elsewhere the leaves are taken in order, one ``vector_norm`` each."""
    leaves = tree_leaves(tree)
    if not leaves:
        return torch.tensor(0.0)
    _check_foreach(foreach, leaves)
    if batches(leaves):
        norms = []
        for (device, _), ([group], _) in _group_tensors_by_device_and_dtype([leaves]).items():
            if foreach is not False and _device_has_foreach_support(device):
                norms.extend(torch._foreach_norm(group, norm_type))
            else:
                norms.extend(torch.linalg.vector_norm(x, norm_type) for x in group)
    else:
        norms = [torch.linalg.vector_norm(x, norm_type) for x in leaves]
    device = leaves[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)


def clip_by_global_norm_with_norm(
    tree: PyTree,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> tuple[PyTree, torch.Tensor]:
    """``g <- g * min(1, max_norm / (||g|| + 1e-6))``, exactly torch.nn.utils.clip_grad_norm_;
    returns the clipped tree and the norm before clipping. ``foreach`` is torch's: with
    ``False`` the norm (see :func:`global_norm`) and the scaling are per-tensor ops, as in
    torch; otherwise eager scaling is a ``torch._foreach_mul`` wherever
    :func:`~loopkit.optim.leafwise.leafwise` batches (CUDA), as torch's default.

    ``error_if_nonfinite`` raises, as torch does, when the norm is inf or NaN, without a
    host sync: it is a ``torch._assert_async``, which on CPU raises at once (eager and
    compiled) and on CUDA is a device-side assertion that ends the process."""
    total = global_norm(tree, norm_type, foreach)
    if error_if_nonfinite:
        torch._assert_async(
            torch.isfinite(total),
            f"The total norm of order {norm_type} for gradients is non-finite, so it cannot "
            "be clipped. To disable this error and scale the gradients by the non-finite norm "
            "anyway, set error_if_nonfinite=False",
        )
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    # x * coef in coef's precision, rounded once to x's dtype (torch's _foreach_mul_ by a
    # tensor): a float16 leaf beside float32 ones is not scaled by a rounded coefficient.
    each = tree_map if foreach is False else leafwise
    return each(lambda x: (x * coef.to(x.device)).to(x.dtype), tree), total


def clip_by_value(clip_value: float, foreach: bool | None = None) -> Transform:
    """``g <- clamp(g, -clip_value, clip_value)``, as torch.nn.utils.clip_grad_value_.
    ``foreach`` is torch's argument: clamping is exact, so the values do not depend on it,
    but ``True`` raises as in torch for grads on a device without multi-tensor kernels."""
    _check_foreach(foreach, [])

    def update(g, state, params=None):
        _check_foreach(foreach, tree_leaves(g))
        return leafwise(lambda x: x.clamp(-clip_value, clip_value), g), state

    return Transform(lambda params: (), update)


def clip_by_global_norm(
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> Transform:
    """The transform form of :func:`clip_by_global_norm_with_norm` (like torch, any
    ``max_norm`` is accepted: 0 zeroes the gradient; ``foreach`` as there)."""
    _check_foreach(foreach, [])

    def update(g, state, params=None):
        clipped, _ = clip_by_global_norm_with_norm(
            g, float(max_norm), float(norm_type), error_if_nonfinite, foreach
        )
        return clipped, state

    return Transform(lambda params: (), update)


def _scalar_dtype() -> torch.dtype:
    """The dtype torch.optim keeps its scalar state in (float64 only under a float64 default)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class ScaleByRmsState(NamedTuple):
    square_avg: PyTree
    grad_avg: PyTree  # () unless centered


def scale_by_rms(alpha: Hyper = 0.99, eps: Hyper = 1e-8, centered: bool = False) -> Transform:
    """RMSprop's direction, as torch.optim.RMSprop::

    v = alpha v + (1 - alpha) g^2        mean = lerp(mean, g, 1 - alpha) if centered
    out = g / (sqrt(v - mean^2 if centered else v) + eps)
    """

    def init(params):
        return ScaleByRmsState(zeros_like_tree(params), zeros_like_tree(params) if centered else ())

    def update(g, state, params=None):
        square_avg = leafwise(
            lambda v, gi: _addcmul(v * _s(alpha, v), gi, gi, 1 - alpha), state.square_avg, g
        )
        if centered:
            grad_avg = leafwise(lambda m, gi: _lerp(m, gi, 1 - alpha), state.grad_avg, g)
            avg = leafwise(lambda v, m: v.addcmul(m, m, value=-1).sqrt(), square_avg, grad_avg)
        else:
            grad_avg, avg = (), leafwise(torch.sqrt, square_avg)
        out = leafwise(lambda gi, a: gi / (a + _s(eps, a)), g, avg)
        return out, ScaleByRmsState(square_avg, grad_avg)

    return Transform(init, update)


class ScaleByAdagradState(NamedTuple):
    count: torch.Tensor
    sum: PyTree


def scale_by_adagrad(
    lr_decay: Hyper = 0.0, initial_accumulator_value: Hyper = 0.0, eps: Hyper = 1e-10
) -> Transform:
    """Adagrad's direction, as torch.optim.Adagrad (t counts from 1)::

    s = s + g^2        out = g / (sqrt(s) + eps) / (1 + (t - 1) lr_decay)
    """

    def init(params):
        sums = tree_map(lambda p: _full_like(p, initial_accumulator_value), params)
        return ScaleByAdagradState(_count(params), sums)

    def update(g, state, params=None):
        count = state.count + 1
        decay = 1 + (count.to(torch.float64) - 1) * lr_decay
        sums = leafwise(lambda s, gi: s.addcmul(gi, gi, value=1), state.sum, g)
        out = leafwise(lambda gi, s: gi / (s.sqrt() + _s(eps, s)) / _s(decay, gi), g, sums)
        return out, ScaleByAdagradState(count, sums)

    return Transform(init, update)


class ScaleByAdamaxState(NamedTuple):
    count: torch.Tensor
    exp_avg: PyTree
    exp_inf: PyTree


def scale_by_adamax(b1: Hyper | Schedule = 0.9, b2: Hyper = 0.999, eps: Hyper = 1e-8) -> Transform:
    """Adamax's direction, as torch.optim.Adamax (t counts from 1)::

    m = lerp(m, g, 1 - b1)      u = max(b2 u, |g| + eps)      out = m / u / (1 - b1^t)
    """

    def init(params):
        return ScaleByAdamaxState(_count(params), zeros_like_tree(params), zeros_like_tree(params))

    def update(g, state, params=None):
        count = state.count + 1
        b1_t = _at(b1, state.count)  # a schedule: OneCycleLR/CyclicLR cycle betas[0]
        bias_correction = 1 - _power(b1_t, count.to(torch.float64))
        exp_avg = leafwise(lambda m, gi: _lerp(m, gi, 1 - b1_t), state.exp_avg, g)
        exp_inf = leafwise(
            lambda u, gi: torch.maximum(u * _s(b2, u), gi.abs() + _s(eps, gi)), state.exp_inf, g
        )
        out = leafwise(lambda m, u: m / u / _s(bias_correction, m), exp_avg, exp_inf)
        return out, ScaleByAdamaxState(count, exp_avg, exp_inf)

    return Transform(init, update)


class ScaleByNadamState(NamedTuple):
    count: torch.Tensor
    mu_product: torch.Tensor
    exp_avg: PyTree
    exp_avg_sq: PyTree


def scale_by_nadam(
    b1: Hyper | Schedule = 0.9, b2: Hyper = 0.999, eps: Hyper = 1e-8, momentum_decay: Hyper = 4e-3
) -> Transform:
    """NAdam's direction, as torch.optim.NAdam (t counts from 1)::

        mu_t = b1 (1 - 0.96^(t psi) / 2)      P_t = prod_{i<=t} mu_i   (psi: momentum_decay)
        m = lerp(m, g, 1 - b1)                v = b2 v + (1 - b2) g^2
        d = sqrt(v / (1 - b2^t)) + eps
        out = (1 - mu_t) / (1 - P_t) g / d + mu_{t+1} / (1 - P_t mu_{t+1}) m / d

    ``P_t`` is kept in torch's scalar dtype (float32 unless the default dtype is float64),
    as torch.optim does, because its rounding shows in the result.
    """

    def init(params):
        count = _count(params)
        mu_product = torch.ones((), dtype=_scalar_dtype(), device=count.device)
        return ScaleByNadamState(
            count, mu_product, zeros_like_tree(params), zeros_like_tree(params)
        )

    def update(g, state, params=None):
        count = state.count + 1
        t = count.to(torch.float64)
        bias_correction2 = 1 - _power(b2, t)
        b1_t = _at(b1, state.count)
        mu = b1_t * (1.0 - 0.5 * _power(0.96, t * momentum_decay))
        mu_next = b1_t * (1.0 - 0.5 * _power(0.96, (t + 1) * momentum_decay))
        mu_product = state.mu_product * mu.to(state.mu_product.dtype)
        mu_product_next = mu_product.to(torch.float64) * mu_next
        coef_grad = (1.0 - mu) / (1.0 - mu_product.to(torch.float64))
        coef_avg = mu_next / (1.0 - mu_product_next)
        exp_avg = leafwise(lambda m, gi: _lerp(m, gi, 1 - b1_t), state.exp_avg, g)
        exp_avg_sq = leafwise(
            lambda v, gi: _addcmul(v * _s(b2, v), gi, gi, 1 - b2), state.exp_avg_sq, g
        )

        def direction(gi, m, v):
            denom = v.div(_s(bias_correction2, v)).sqrt() + _s(eps, v)
            return gi / denom * _s(coef_grad, gi) + m / denom * _s(coef_avg, m)

        out = leafwise(direction, g, exp_avg, exp_avg_sq)
        return out, ScaleByNadamState(count, mu_product, exp_avg, exp_avg_sq)

    return Transform(init, update)


def scale_by_radam(b1: Hyper | Schedule = 0.9, b2: Hyper = 0.999, eps: Hyper = 1e-8) -> Transform:
    """RAdam's direction, as torch.optim.RAdam (t counts from 1)::

    m, v as Adam          rho_inf = 2 / (1 - b2) - 1
    rho_t = rho_inf - 2 t b2^t / (1 - b2^t)
    out = m / (1 - b1^t) * r_t * sqrt(1 - b2^t) / (sqrt(v) + eps)   if rho_t > 5
        = m / (1 - b1^t)                                             otherwise
    r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
    """

    def init(params):
        return ScaleByAdamState(
            _count(params), zeros_like_tree(params), zeros_like_tree(params), ()
        )

    def update(g, state, params=None):
        count = state.count + 1
        t = count.to(torch.float64)
        b1_t = _at(b1, state.count)
        bias_correction1 = 1 - _power(b1_t, t)
        bias_correction2 = 1 - _power(b2, t)
        rho_inf = 2 / (1 - b2) - 1
        rho_t = rho_inf - 2 * t * _power(b2, t) / bias_correction2
        rect = (
            (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
        ).sqrt()
        rectify = rho_t > 5.0
        exp_avg = leafwise(lambda m, gi: _lerp(m, gi, 1 - b1_t), state.exp_avg, g)
        exp_avg_sq = leafwise(
            lambda v, gi: _addcmul(v * _s(b2, v), gi, gi, 1 - b2), state.exp_avg_sq, g
        )

        def direction(m, v):
            corrected = m / _s(bias_correction1, m)
            adaptive = _s(bias_correction2.sqrt(), v) / (v.sqrt() + _s(eps, v))
            return torch.where(rectify, corrected * adaptive * _s(rect, m), corrected)

        out = leafwise(direction, exp_avg, exp_avg_sq)
        return out, ScaleByAdamState(count, exp_avg, exp_avg_sq, ())

    return Transform(init, update)


class ScaleByAdadeltaState(NamedTuple):
    square_avg: PyTree
    acc_delta: PyTree


def scale_by_adadelta(rho: Hyper = 0.9, eps: Hyper = 1e-6) -> Transform:
    """Adadelta's direction, as torch.optim.Adadelta::

    v = rho v + (1 - rho) g^2      d = sqrt(a + eps) / sqrt(v + eps) * g
    a = rho a + (1 - rho) d^2      out = d
    """

    def init(params):
        return ScaleByAdadeltaState(zeros_like_tree(params), zeros_like_tree(params))

    def update(g, state, params=None):
        square_avg = leafwise(
            lambda v, gi: _addcmul(v * _s(rho, v), gi, gi, 1 - rho), state.square_avg, g
        )
        delta = leafwise(
            lambda a, v, gi: (a + _s(eps, a)).sqrt() / (v + _s(eps, v)).sqrt() * gi,
            state.acc_delta,
            square_avg,
            g,
        )
        acc_delta = leafwise(
            lambda a, d: _addcmul(a * _s(rho, a), d, d, 1 - rho), state.acc_delta, delta
        )
        return delta, ScaleByAdadeltaState(square_avg, acc_delta)

    return Transform(init, update)


class ScaleByRpropState(NamedTuple):
    prev: PyTree
    step_size: PyTree


def scale_by_rprop(
    lr: Hyper = 1e-2,
    etas: tuple[Hyper, Hyper] = (0.5, 1.2),
    step_sizes: tuple[Hyper, Hyper] = (1e-6, 50.0),
) -> Transform:
    """Rprop's update (already signed and scaled), as torch.optim.Rprop::

        s = sign(g * g_prev);  f = eta+ if s > 0, eta- if s < 0, else 1
        step = clamp(step * f, *step_sizes);  g = 0 where s < 0
        out = -sign(g) * step;  g_prev = g

    Step sizes start at ``lr``; as in torch, the lr is not used after that.
    """
    eta_minus, eta_plus = etas
    lo, hi = step_sizes

    def init(params):
        return ScaleByRpropState(
            zeros_like_tree(params), tree_map(lambda p: _full_like(p, lr), params)
        )

    def update(g, state, params=None):
        sign = leafwise(lambda gi, prev: gi.mul(prev).sign(), g, state.prev)
        factor = leafwise(
            lambda s: torch.where(
                s.gt(0), _s(eta_plus, s), torch.where(s.lt(0), _s(eta_minus, s), s.new_ones(()))
            ),
            sign,
        )
        step_size = leafwise(
            lambda st, f: (st * f).clamp(_s(lo, st), _s(hi, st)), state.step_size, factor
        )
        g = leafwise(lambda gi, s: gi.masked_fill(s.lt(0), 0), g, sign)
        out = leafwise(lambda gi, st: -(gi.sign() * st), g, step_size)
        return out, ScaleByRpropState(g, step_size)

    return Transform(init, update)


class AsgdState(NamedTuple):
    count: torch.Tensor
    lr: torch.Tensor  # float64; with a number lr, set_learning_rate changes it
    eta: torch.Tensor
    mu: torch.Tensor
    ax: PyTree  # the running average of the params: ASGD's result


def asgd_update(
    lr: Hyper | Schedule = 1e-2, lambd: Hyper = 1e-4, alpha: Hyper = 0.75, t0: Hyper = 1e6
) -> Transform:
    """Averaged SGD's update, as torch.optim.ASGD (t counts from 1)::

        p' = p (1 - lambd eta) - eta g        out = p' - p  (0 where p' == p: an inf kept)
        ax = ax + mu (p' - ax)  (ax = p' while mu = 1)
        eta = lr_t / (1 + lambd lr_t t)^alpha      mu = 1 / max(1, t - t0)

    ``eta`` and ``mu`` are kept in torch's scalar dtype (float32 unless the default dtype
    is float64), as torch.optim does. The averaged params are ``state.ax``.
    """

    def init(params):
        count = _count(params)
        first_lr = _first_lr(lr, count)
        dtype = _scalar_dtype()
        return AsgdState(
            count,
            first_lr,
            first_lr.to(dtype, copy=True),  # lr and eta: two tensors, also in float64
            torch.ones((), dtype=dtype, device=count.device),
            zeros_like_tree(params),
        )

    def update(g, state, params=None):
        params = _need_params(params, "asgd")
        count = state.count + 1
        t = count.to(torch.float64)
        lr_t = _lr_at(lr, state.lr, state.count)
        # torch sets eta to the group's lr at the first step: an lr set since init counts
        first_eta = lr_t.to(state.eta.dtype)
        eta = torch.where(state.count == 0, first_eta, state.eta).to(torch.float64)
        new = leafwise(lambda p, gi: p * _s(1 - lambd * eta, p) + gi * _s(-eta, gi), params, g)
        averaging = state.mu != 1
        ax = leafwise(
            lambda a, pn: torch.where(averaging, a + (pn - a) * _s(state.mu, a), pn), state.ax, new
        )
        next_eta = lr_t / (1 + lambd * lr_t * t) ** alpha
        next_mu = 1 / torch.clamp(t - t0, min=1)
        out = leafwise(_step_to, new, params)
        dtype = state.eta.dtype
        return out, AsgdState(count, lr_t, next_eta.to(dtype), next_mu.to(dtype), ax)

    return Transform(init, update)


class AdafactorState(NamedTuple):
    count: torch.Tensor
    lr: torch.Tensor  # float64; with a number lr, set_learning_rate changes it
    row_var: dict  # for params with 2+ dims: the row and column factors of the variance
    col_var: dict
    variance: dict  # for the others: the full variance


def adafactor_update(
    lr: Hyper | Schedule = 1e-2,
    beta2_decay: Hyper = -0.8,
    eps: tuple[Hyper | None, Hyper] = (None, 1e-3),
    d: Hyper = 1.0,
    weight_decay: Hyper = 0.0,
) -> Transform:
    """Adafactor's update (lr, decay and clipping included), as torch.optim.Adafactor::

        w_t = t^beta2_decay      rho_t = min(lr, 1 / sqrt(t))
        alpha = max(eps2, rms(p)) * rho_t
        2+ dims: R = lerp(R, mean_last(g^2), w_t), C = lerp(C, mean_penultimate(g^2), w_t),
                 v = R C / clamp(mean(R), eps1)          else: v = lerp(v, g^2, w_t)
        u = g / sqrt(clamp(v, eps1^2))      u /= max(1, rms(u) / d)
        p' = p (1 - lr weight_decay) - alpha u           out = p' - p  (0 where p' == p)

    ``eps1`` defaults to the machine epsilon of the first param's dtype: torch resolves it
    once per group and reuses it for the other params. Params must be a dict.
    """
    eps1, eps2 = eps

    def init(params):
        if not isinstance(params, dict):
            raise TypeError("adafactor needs params as a dict {name: tensor}")

        def factor(p: torch.Tensor, dim: int) -> torch.Tensor:
            shape = list(p.shape)
            shape[dim] = 1
            return p.new_zeros(shape)

        count = _count(params)
        return AdafactorState(
            count,
            _first_lr(lr, count),
            {k: factor(p, -1) for k, p in params.items() if p.dim() > 1},
            {k: factor(p, -2) for k, p in params.items() if p.dim() > 1},
            {k: torch.zeros_like(p) for k, p in params.items() if p.dim() <= 1},
        )

    def update(g, state, params=None):
        params = _need_params(params, "adafactor")
        check_same_keys(g, params, "grads", "params")
        count = state.count + 1
        t = count.to(torch.float64)
        lr_t = _lr_at(lr, state.lr, state.count)
        w = t**beta2_decay
        first_dtype = next(iter(params.values())).dtype if params else torch.float32
        e1 = torch.finfo(first_dtype).eps if eps1 is None else eps1
        rho = torch.minimum(lr_t, 1 / t.sqrt())
        row_var, col_var, variance, out = {}, {}, {}, {}
        for k, gi in g.items():
            p = params[k]
            wk = w.to(gi.dtype)
            if gi.dim() > 1:
                row_mean = torch.linalg.vector_norm(gi, dim=-1, keepdim=True).square() / gi.size(-1)
                col_mean = torch.linalg.vector_norm(gi, dim=-2, keepdim=True).square() / gi.size(-2)
                row_var[k] = torch.lerp(state.row_var[k], row_mean, wk)
                col_var[k] = torch.lerp(state.col_var[k], col_mean, wk)
                row_avg = row_var[k].mean(dim=-2, keepdim=True)
                v = (row_var[k] @ col_var[k]) / row_avg.clamp(min=_s(e1, row_avg))
            else:
                variance[k] = torch.lerp(state.variance[k], gi * gi, wk)
                v = variance[k]
            u = v.clamp(min=_s(e1 * e1, v)).rsqrt() * gi
            numel_sqrt = p.numel() ** 0.5
            alpha = _python_max(eps2, p.norm(2).to(torch.float64) / numel_sqrt) * rho
            denom = _python_max(1.0, u.norm(2).to(torch.float64) / (numel_sqrt * d))
            new_p = p * _s(1 - lr_t * weight_decay, p) + u * _s(-alpha / denom, u)
            out[k] = _step_to(new_p, p)
        return out, AdafactorState(count, lr_t, row_var, col_var, variance)

    return Transform(init, update)


def _python_max(low: Hyper, x: torch.Tensor) -> torch.Tensor:
    """Python's ``max(low, x)``, as torch.optim.Adafactor computes it on ``x.item()``: ``low``
    unless ``x > low``, so a NaN ``x`` (a param holding inf and NaN) gives ``low``."""
    return torch.where(x > low, x, low)


def _newton_schulz(
    g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: Hyper
):
    """Muon's quintic Newton-Schulz orthogonalisation, in bfloat16 as torch.optim.Muon does:
    ``X = G / ||G||``; ``steps`` times ``A = X X^T``, ``X = a X + (b A + c A^2) X``."""
    a, b, c = coefficients
    x = g.bfloat16()
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    norm = x.norm()
    x = x / norm.clamp(min=_s(eps, norm))
    for _ in range(steps):
        gram = x @ x.T
        gram_update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, gram_update, x, beta=a)
    return x.T if tall else x


class ScaleByMuonState(NamedTuple):
    momentum_buffer: PyTree


def scale_by_muon(
    momentum: Hyper = 0.95,
    nesterov: bool = True,
    ns_coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315),
    eps: Hyper = 1e-7,
    ns_steps: int = 5,
    adjust_lr_fn: str | None = None,
) -> Transform:
    """Muon's direction for 2-D params, as torch.optim.Muon::

    b = lerp(b, g, 1 - momentum)      x = lerp(g, b, momentum) if nesterov else b
    out = ratio * NewtonSchulz(x)     ratio = sqrt(max(1, A / B)) ("original")
                                            or 0.2 sqrt(max(A, B)) ("match_rms_adamw")
    """
    if adjust_lr_fn is not None and adjust_lr_fn not in ["original", "match_rms_adamw"]:
        raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")
    if ns_steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if len(ns_coefficients) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")

    def ratio(shape: torch.Size) -> float:
        rows, cols = shape[:2]
        if adjust_lr_fn == "match_rms_adamw":
            return 0.2 * max(rows, cols) ** 0.5
        return max(1, rows / cols) ** 0.5

    def init(params):
        for path, p in flatten_with_names(params)[0].items():
            if p.ndim != 2:
                raise ValueError(
                    f"Muon only supports 2D parameters whereas {path} has size {list(p.shape)}: "
                    "give the others another optimizer, e.g. optim.multi_transform("
                    "{'muon': optim.muon(), 'adamw': optim.adamw()}, lambda n, p: "
                    "'muon' if p.ndim == 2 else 'adamw')"
                )
        return ScaleByMuonState(zeros_like_tree(params))

    def update(g, state, params=None):
        buf = leafwise(lambda b, gi: _lerp(b, gi, 1 - momentum), state.momentum_buffer, g)
        x = leafwise(lambda gi, b: _lerp(gi, b, momentum), g, buf) if nesterov else buf
        out = tree_map(
            lambda xi: (
                _newton_schulz(xi, ns_coefficients, ns_steps, eps).to(xi.dtype) * ratio(xi.shape)
            ),
            x,
        )
        return out, ScaleByMuonState(buf)

    return Transform(init, update)
