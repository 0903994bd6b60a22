"""Hyperparameters as optimizer state: injecting them, reading them and changing them.

:func:`inject_hyperparams` turns an optimizer factory's numeric arguments into float64
tensors kept in the optimizer state (optax's ``inject_hyperparams``), so a logger can read
them on device, :func:`set_hyperparams` can change them between steps (the functional
``param_group[name] = value``), and a compiled step takes the new values without
recompiling. Every optimizer built from :func:`~loopkit.optim.scale_by_learning_rate` (and
ASGD and Adafactor) also keeps its current lr in its state; :func:`learning_rates` and
:func:`set_learning_rate` find it, or an injected ``lr``, wherever it is nested (chains are
tuples, parameter groups are dicts). All functions return new states; none modifies its
input.
"""

from __future__ import annotations

import functools
import inspect
import numbers
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch

from loopkit.optim.aliases import injecting
from loopkit.optim.base import Transform, apply_gradients, with_apply
from loopkit.optim.transforms import (
    AdafactorState,
    AsgdState,
    ScaleByLearningRateState,
    _count,
)

# The states that hold an lr (a float64 tensor in their ``lr`` field).
_LR_STATES = (ScaleByLearningRateState, AsgdState, AdafactorState)


class InjectState(NamedTuple):
    count: torch.Tensor  # updates made so far (the step the schedules are evaluated at)
    hyperparams: dict[str, torch.Tensor]  # float64; the values of the most recent update
    inner: Any  # the state of the optimizer the factory builds


def _is_number(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return v.numel() == 1 and v.is_floating_point()
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _injectable(v: Any) -> bool:
    """A number, a one-element float tensor, a schedule, or a tuple of those (``betas``)."""
    if isinstance(v, tuple):
        return len(v) > 0 and all(_is_number(x) or callable(x) for x in v)
    return _is_number(v) or callable(v)


def _value(v: Any, count: torch.Tensor) -> torch.Tensor:
    """``v`` at ``count`` updates as a float64 tensor (a tuple as a 1-D tensor)."""
    if isinstance(v, tuple):
        return torch.stack([_value(x, count) for x in v])
    x = v(count) if callable(v) else v
    return torch.as_tensor(x, dtype=torch.float64, device=count.device).reshape(())


def _current(spec: Any, stored: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """A schedule's value at ``count``; a number's (possibly changed) value from the state."""
    if callable(spec):
        return _value(spec, count)
    if isinstance(spec, tuple) and any(map(callable, spec)):
        parts = zip(spec, stored.unbind(), strict=True)
        return torch.stack([_value(x, count) if callable(x) else s for x, s in parts])
    return stored


def _as_argument(spec: Any, value: torch.Tensor) -> Any:
    """What the factory is given: a 0-dim tensor, or a tuple of them for a tuple argument."""
    return tuple(value.unbind()) if isinstance(spec, tuple) else value


def inject_hyperparams(
    factory: Callable[..., Transform], names: Iterable[str] | None = None
) -> Callable[..., Transform]:
    """``inject_hyperparams(optim.adamw)(lr=1e-3, weight_decay=0.01)``: the optimizer
    ``factory(...)`` builds, with its numeric hyperparameters kept as float64 tensors in the
    state ``InjectState(count, hyperparams, inner)`` instead of Python numbers.

    Injected (``names=None``): every argument, given or defaulted, whose value is a number
    (not a bool), a one-element float tensor, a schedule ``step -> value``, or a tuple of
    those (``betas``, ``etas``, ``step_sizes`` and Adafactor's ``eps`` pair are stored as
    1-D tensors: ``betas`` is ``tensor([beta1, beta2])``), except those a factory lists in
    its ``static_args`` attribute (Muon's ``ns_coefficients`` and ``ns_steps``). Or name
    them: ``names=("lr", "weight_decay")``. Booleans, strings and ``None`` fix the
    optimizer's structure and are never injected.

    The contract:

    - The initial values are validated once, with torch's messages, by calling ``factory``
      with them as numbers (a schedule's value at step 0). Values set later are not checked.
    - Each update evaluates the schedules at the step count and stores their values; the
      other values are read from the state, where :func:`set_hyperparams` changes them.
      ``factory`` is then called with 0-dim tensors, so the update is plain torch ops on
      them: no host sync, one compiled graph for any values, and ``torch.func.vmap`` over
      states with a different value per member.
    - The structure is fixed at construction and assumes every injected value may be
      non-zero: an injected SGD ``momentum`` always keeps a momentum buffer (skipped while
      the value is 0, as torch skips it), an injected ``weight_decay`` is always present and
      is exactly a no-op at 0. Changing a value between updates equals torch.optim's
      ``param_group[name] = value`` between ``step()`` calls.
    """
    signature = inspect.signature(factory)
    static = set(getattr(factory, "static_args", ()))
    chosen = None if names is None else tuple(names)

    @functools.wraps(factory)
    def build(*args: Any, **kwargs: Any) -> Transform:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        if chosen is None:
            hyper = {k: v for k, v in values.items() if k not in static and _injectable(v)}
        else:
            for k in chosen:
                if k not in values:
                    raise ValueError(
                        f"{factory.__name__} has no argument {k!r} to inject; "
                        f"its arguments: {sorted(values)}"
                    )
                if not _injectable(values[k]):
                    raise TypeError(
                        f"cannot inject {k}={values[k]!r}: only numbers, one-element float "
                        "tensors, schedules and tuples of them can be injected (a bool, a "
                        f"string or None fixes the structure of {factory.__name__})"
                    )
            hyper = {k: values[k] for k in chosen}
        zero = torch.zeros((), dtype=torch.int64)
        initial = {k: _value(v, zero) for k, v in hyper.items()}
        factory(**(values | {k: _as_python(v) for k, v in initial.items()}))  # validate

        def transform(hp: dict[str, torch.Tensor]) -> Transform:
            arguments = values | {k: _as_argument(hyper[k], v) for k, v in hp.items()}
            if torch.compiler.is_compiling():  # (where tensors are not read anyway)
                return factory(**arguments)
            with injecting():  # the values were validated above, as torch validates them
                return factory(**arguments)

        def init(params):
            count = _count(params)
            hp = {k: v.to(count.device, copy=True) for k, v in initial.items()}  # per state
            return InjectState(count, hp, transform(hp).init(params))

        def current(state: InjectState) -> dict[str, torch.Tensor]:
            return {k: _current(v, state.hyperparams[k], state.count) for k, v in hyper.items()}

        def update(g, state, params=None):
            hp = current(state)
            updates, inner = transform(hp).update(g, state.inner, params)
            return updates, InjectState(state.count + 1, hp, inner)

        def apply(g, state, params):
            # The factory's own apply where it has one (e.g. Adam's fused kernel, when only
            # the lr is injected and the other hyperparameters stay numbers).
            hp = current(state)
            new_params, inner = apply_gradients(transform(hp), g, state.inner, params)
            return new_params, InjectState(state.count + 1, hp, inner)

        return Transform(init, with_apply(update, apply))

    return build


def _as_python(value: torch.Tensor) -> float | tuple[float, ...]:
    return tuple(value.tolist()) if value.ndim else value.item()


def _walk(state: Any, visit: Callable[[Any], Any]) -> Any:
    """``state`` with each node replaced by ``visit(node)`` where that is not None; the other
    nodes are searched (named tuples, tuples, dicts)."""
    new = visit(state)
    if new is not None:
        return new
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return type(state)(*(_walk(s, visit) for s in state))
    if isinstance(state, tuple):
        return tuple(_walk(s, visit) for s in state)
    if isinstance(state, dict):
        return {k: _walk(v, visit) for k, v in state.items()}
    return state


def _as_value(x: Any, like: torch.Tensor) -> torch.Tensor:
    """``x`` as a tensor like ``like``: a one-element tensor (or list) as a 0-dim one, as
    torch reads a ``param_group`` value such as ``torch.tensor([0.02])``."""
    value = torch.as_tensor(x, dtype=like.dtype, device=like.device)
    return value.reshape(()) if value.numel() == 1 else value


def _set(old: torch.Tensor, new: Any) -> torch.Tensor:
    """``new`` (a value, or a function of ``old``) as a tensor like ``old``."""
    new = new(old) if callable(new) else new
    if isinstance(new, tuple):
        new = torch.stack([_as_value(x, old) for x in new])
    return _as_value(new, old).expand(old.shape).clone()


def hyperparams(opt_state: Any) -> list[dict[str, torch.Tensor]]:
    """The injected hyperparameters of ``opt_state``: one dict ``{name: float64 tensor}`` per
    :func:`inject_hyperparams` in it, in order (e.g. per parameter group). The values are
    those of the most recent update (before any, the initial ones), or as set since."""
    found: list[dict[str, torch.Tensor]] = []

    def visit(s: Any) -> Any:
        if isinstance(s, InjectState):
            found.append(dict(s.hyperparams))
            _walk(s.inner, visit)
            return s
        return None

    _walk(opt_state, visit)
    return found


def set_hyperparams(opt_state: Any, **values: Any) -> Any:
    """A copy of ``opt_state`` with the named injected hyperparameters set, in every
    :func:`inject_hyperparams` that has them: ``set_hyperparams(s, lr=1e-4, betas=(0.9,
    0.95))``, or a function of the current value (``lr=lambda lr: lr * 0.1``). Equal to
    torch.optim's ``param_group[name] = value``; a schedule overwrites its value at the next
    update."""
    sites = hyperparams(opt_state)
    if not sites:
        raise ValueError(
            "this optimizer state holds no injected hyperparameters: build the optimizer "
            "with optim.inject_hyperparams(factory)(...)"
        )
    available = sorted(set().union(*sites))
    unknown = sorted(set(values) - set(available))
    if unknown:
        raise ValueError(f"no injected hyperparameter named {unknown}; available: {available}")

    def visit(s: Any) -> Any:
        if isinstance(s, InjectState):
            hp = {k: _set(v, values[k]) if k in values else v for k, v in s.hyperparams.items()}
            return s._replace(hyperparams=hp, inner=_walk(s.inner, visit))
        return None

    return _walk(opt_state, visit)


def _map_lr(opt_state: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``opt_state`` with ``fn`` applied to every lr: an injected ``lr`` (its inner state is
    then not searched: it holds a copy), or the lr of an lr-holding state."""

    def visit(s: Any) -> Any:
        if isinstance(s, InjectState) and "lr" in s.hyperparams:
            return s._replace(hyperparams=s.hyperparams | {"lr": fn(s.hyperparams["lr"])})
        if isinstance(s, _LR_STATES):
            return s._replace(lr=fn(s.lr))
        return None

    return _walk(opt_state, visit)


def learning_rates(opt_state: Any) -> list[torch.Tensor]:
    """The current lr of every ``scale_by_learning_rate`` (or ASGD, Adafactor, or injected
    ``lr``) in ``opt_state``, in order."""
    found: list[torch.Tensor] = []

    def collect(lr: torch.Tensor) -> torch.Tensor:
        found.append(lr)
        return lr

    _map_lr(opt_state, collect)
    return found


def set_learning_rate(opt_state: Any, lr: float | Callable[[torch.Tensor], Any]) -> Any:
    """A copy of ``opt_state`` with every lr set to ``lr``, or to ``lr(current)`` if it is a
    function (``lambda lr: lr * 0.1`` scales them). Only optimizers built with a number lr
    (or an injected one) read it back; a schedule recomputes its lr from the step count at
    the next update."""
    if not learning_rates(opt_state):
        raise ValueError(
            "this optimizer state holds no learning rate (Rprop, like torch's, uses its lr "
            "only as the initial step size)"
        )
    return _map_lr(opt_state, lambda old: _set(old, lr))
