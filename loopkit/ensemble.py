"""Ensembles and sweeps: K models trained at once by one ``torch.func.vmap``-ed step.

An *ensemble state* is an ordinary :class:`~loopkit.TrainState` whose tensors carry a
leading member dimension ``K`` (``stack`` builds one, ``unstack`` takes it apart, with
``torch.func.stack_module_state`` semantics). Because it is still a TrainState pytree,
``loopkit.fit``, ``hooks.Checkpoint`` and ``checkpoint.save``/``load`` work on it unchanged.
The layout:

- ``params``, ``buffers``, ``opt_state``: each leaf stacked to ``[K, *shape]``. A number
  learning rate lives in the optimizer state as a tensor, so stacking states built with
  different lrs (or :func:`set_hyperparams`) gives each member its own lr: a sweep. With
  ``optim.inject_hyperparams`` the other hyperparameters (weight decay, betas, ...) are
  tensors in the state too, and sweep the same way.
- ``rng``: each generator state stacked to ``[K, n]``: every member keeps its own stream.
- ``step``: one shared scalar (the members step together).

``ensemble_step(step)`` turns a train (or eval) step into ``step(state, batch) -> (state,
metrics)`` over an ensemble state; every metric gets a leading ``[K]`` (per member).
With ``shared_batch=True`` all members see the same batch; with ``False`` every tensor of
the batch has a leading ``[K]`` dimension, member k training on ``batch[k]``.

Randomness (Dropout): in an eager ensemble step, member k's ``F.dropout`` (``nn.Dropout``)
masks are drawn from member k's own generator, in the order a separate run draws them, so
member k equals a separate eager run of the plain step from member k's state, masks
included. Other random ops inside the step raise an error in eager mode (only Dropout is
routed per member). A compiled ensemble step draws its masks with inductor's kernels under
``vmap(randomness="different")`` from member 0's generator (which it advances; the others'
are carried unchanged): masks differ between members and are reproducible from the state,
but, as for the plain compiled step, they are not the eager masks.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap
from torch.overrides import TorchFunctionMode

from loopkit.errors import StepError
from loopkit.optim.base import Transform
from loopkit.optim.hyperparams import hyperparams as optim_hyperparams
from loopkit.optim.hyperparams import learning_rates, set_learning_rate
from loopkit.optim.hyperparams import set_hyperparams as optim_set_hyperparams
from loopkit.rng import _device_key, rng_scope
from loopkit.state import TrainState
from loopkit.step import EvalStep, TrainStep, _Step, _training, compile_step
from loopkit.tree import flatten_with_names, tree_flatten, tree_unflatten

__all__ = [
    "EnsembleEvalStep",
    "EnsembleTrainStep",
    "create",
    "ensemble_step",
    "hyperparams",
    "is_ensemble",
    "set_hyperparams",
    "size",
    "stack",
    "unstack",
]

_STACKED_FIELDS = ("params", "buffers", "opt_state", "rng")


# --- stacking ------------------------------------------------------------------------------


def _check_like(states: Sequence[TrainState]) -> None:
    """Raise a ValueError naming the first difference in structure, shape or dtype."""
    first, spec = flatten_with_names(states[0])
    for k, s in enumerate(states[1:], start=1):
        leaves, other = flatten_with_names(s)
        if other != spec:
            missing = [p for p in first if p not in leaves][:5]
            extra = [p for p in leaves if p not in first][:5]
            raise ValueError(
                f"cannot stack: state {k} differs in structure from state 0 (missing "
                f"{missing or 'nothing'}, unexpected {extra or 'nothing'}). Stack states "
                "of the same model architecture built with the same optimizer."
            )
        for path, a in first.items():
            b = leaves[path]
            if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
                raise ValueError(f"cannot stack: {path} is a tensor in one state only")
            if not isinstance(a, torch.Tensor):
                if a != b:
                    raise ValueError(
                        f"cannot stack: {path} is {a!r} in state 0 but {b!r} in state {k}; "
                        "non-tensor values must be equal across members"
                    )
            elif a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
                raise ValueError(
                    f"cannot stack: {path} is {a.dtype}{list(a.shape)} on {a.device} in "
                    f"state 0 but {b.dtype}{list(b.shape)} on {b.device} in state {k}. "
                    "Members must share the architecture, dtype and device."
                )


def _stack_leaves(trees: Sequence[Any]) -> Any:
    flat = [tree_flatten(t) for t in trees]
    spec = flat[0][1]
    columns = zip(*(leaves for leaves, _ in flat), strict=True)
    out = [torch.stack(c) if isinstance(c[0], torch.Tensor) else c[0] for c in columns]
    return tree_unflatten(out, spec)


def stack(states: Sequence[TrainState]) -> TrainState:
    """Stack K single-model states into one ensemble state (member k = ``states[k]``).

    Every tensor gets a leading ``[K]`` dimension except ``step``, which the members share:
    the states must have the same structure, shapes, dtypes and devices, and equal steps.
    The inputs are not modified (the result holds copies).
    """
    states = list(states)
    if not states:
        raise ValueError("stack needs at least one state")
    for k, s in enumerate(states):
        if not isinstance(s, TrainState):
            raise TypeError(f"stack expects TrainStates, got {type(s).__name__} at {k}")
        if is_ensemble(s):
            raise ValueError(f"state {k} is already an ensemble state: unstack it first")
    _check_like(states)
    steps = [int(s.step) for s in states]
    if len(set(steps)) > 1:
        raise ValueError(
            f"cannot stack states at different steps {steps}: the members of an ensemble "
            "step together. Stack states from the same point of training."
        )
    fields = {f: _stack_leaves([getattr(s, f) for s in states]) for f in _STACKED_FIELDS}
    return TrainState(step=states[0].step.clone(), **fields)


def is_ensemble(state: TrainState) -> bool:
    """Whether ``state`` is an ensemble state (its generator states are stacked, 2-D)."""
    return any(v.ndim == 2 for v in state.rng.values())


def size(state: TrainState) -> int:
    """The number of members K of an ensemble state."""
    if not is_ensemble(state):
        raise ValueError(
            "this is a single-model TrainState, not an ensemble state: build one with "
            "lk.ensemble.stack([...]) or lk.ensemble.create(...)"
        )
    return next(iter(state.rng.values())).shape[0]


def _index(tree: Any, k: int) -> Any:
    leaves, spec = tree_flatten(tree)
    return tree_unflatten(
        [x[k].clone() if isinstance(x, torch.Tensor) else x for x in leaves], spec
    )


def unstack(state: TrainState) -> list[TrainState]:
    """The K single-model states of an ensemble state (copies): the inverse of :func:`stack`."""
    return [
        TrainState(
            step=state.step.clone(), **{f: _index(getattr(state, f), k) for f in _STACKED_FIELDS}
        )
        for k in range(size(state))
    ]


def create(
    make_model: Callable[[], nn.Module], optimizer: Transform, seeds: Sequence[int]
) -> TrainState:
    """An ensemble state of ``len(seeds)`` members: member k's model is ``make_model()``
    called after ``torch.manual_seed(seeds[k])`` (so its initialisation comes from that
    seed) and its ``rng`` is seeded with ``seeds[k]`` -- exactly the state
    ``TrainState.create(model, optimizer, seed=seeds[k])`` of a separate run. The caller's
    global RNG is left as it was."""
    states = []
    for seed in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = make_model()
        states.append(TrainState.create(model, optimizer, seed=seed))
    return stack(states)


# --- hyperparameters ------------------------------------------------------------------------


def hyperparams(state: TrainState) -> dict[str, list[torch.Tensor]]:
    """The per-member hyperparameters held in an ensemble state's optimizer state:
    ``{"lr": [...], "weight_decay": [...], ...}``, each a list with one ``[K, ...]`` tensor
    per place in the state that holds it (the lrs of ``optim.learning_rates``, then those
    of every ``optim.inject_hyperparams``)."""
    size(state)
    return _held(state.opt_state)


def _held(opt_state: Any) -> dict[str, list[torch.Tensor]]:
    out: dict[str, list[torch.Tensor]] = {"lr": learning_rates(opt_state)}
    for site in optim_hyperparams(opt_state):
        for name, value in site.items():
            if name != "lr":  # an injected lr is already among learning_rates
                out.setdefault(name, []).append(value)
    return out


def set_hyperparams(state: TrainState, **values: Sequence[Any] | torch.Tensor) -> TrainState:
    """A copy of ensemble ``state`` whose member k uses ``values[name][k]``.

    ``lr=[...]`` sets every learning rate in the optimizer state (as
    :func:`loopkit.optim.set_learning_rate` does for one model). Any other hyperparameter
    (``weight_decay=[...]``, ``betas=[(0.9, 0.999), ...]``, ``momentum``, ``eps``...) must be
    held as a tensor, i.e. the optimizer built with ``optim.inject_hyperparams``; it is set
    with :func:`loopkit.optim.set_hyperparams`. Each value has a leading dimension ``K``.
    """
    k = size(state)
    opt_state = state.opt_state
    for name, value in values.items():
        value = torch.as_tensor(value, dtype=torch.float64)
        if value.ndim == 0 or value.shape[0] != k:
            raise ValueError(
                f"{name} needs one value per member: a leading dimension of {k}, got shape "
                f"{list(value.shape)}"
            )
        if name == "lr":
            _check_member_shape(name, value, (k,))
            opt_state = set_learning_rate(opt_state, value)
        elif not optim_hyperparams(opt_state):
            raise ValueError(
                f"cannot sweep {name!r}: this optimizer holds it as a Python number. Build it "
                f"with optim.inject_hyperparams, e.g. optim.inject_hyperparams(optim.adamw)"
                f"(lr=1e-3, weight_decay=0.01), so that {name} is a tensor in its state."
            )
        else:
            for held in optim_hyperparams(opt_state):
                if name in held:
                    _check_member_shape(name, value, held[name].shape)
            opt_state = optim_set_hyperparams(opt_state, **{name: value})
        _SWEPT.update((id(t), t) for t in _held(opt_state).get(name, []))
    return state.replace(opt_state=opt_state)


def _check_member_shape(name: str, value: torch.Tensor, shape: Sequence[int]) -> None:
    """ValueError unless ``value`` has the ``shape`` of what it replaces: with 2 members, a
    ``[0.9, 0.5]`` for ``betas`` (shape ``[2, 2]``) would otherwise broadcast as one pair
    for both members."""
    if tuple(value.shape) != tuple(shape):
        raise ValueError(
            f"{name} needs shape {list(shape)}: one value of shape {list(shape[1:])} per member, "
            f"got {list(value.shape)}"
        )


# --- the vmapped steps ---------------------------------------------------------------------


def _dropout_args(input, p=0.5, training=True, inplace=False):  # F.dropout's signature
    return input, p, training


class _MemberDropout(TorchFunctionMode):
    """Routes ``F.dropout`` inside the vmapped step to per-member generators: member k's
    mask is drawn from ``generators[k]`` exactly as eager ``F.dropout`` draws it
    (``empty_like(x).bernoulli_(1 - p) / (1 - p)``), then batched over the member dim."""

    def __init__(self, generators: list[dict[str, torch.Generator]]):
        super().__init__()
        self.generators = generators
        self.level: int | None = None  # the ensemble vmap's level, set when it starts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.dropout or self.level is None:
            return func(*args, **kwargs)
        x, p, training = _dropout_args(*args, **kwargs)
        if p < 0.0 or p > 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        if not training or p == 0.0 or x.numel() == 0:
            return x
        if p == 1.0:
            return x * torch.zeros((), dtype=x.dtype, device=x.device)
        return x * self._noise(x, p)

    def _noise(self, x: torch.Tensor, p: float) -> torch.Tensor:
        from torch._C._functorch import _add_batch_dim
        from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack

        key = _device_key(x.device)
        strides = self._member_strides(x)
        with temporarily_clear_interpreter_stack(), torch.no_grad():
            # laid out as empty_like(x) lays out a member's x: bernoulli_ fills memory in
            # order, so a transposed x (channels-last, permuted) draws its mask transposed
            like = torch.empty_strided(x.shape, strides, dtype=x.dtype, device="meta")
            masks = [
                torch.empty_like(like, device=x.device).bernoulli_(1 - p, generator=gens[key])
                for gens in self.generators
            ]
            noise = torch.stack(masks).div_(1 - p)
        return _add_batch_dim(noise, 0, self.level)

    def _member_strides(self, x: torch.Tensor) -> tuple[int, ...]:
        """The strides of one member's ``x``: those of the tensor under the ensemble's
        batch dim, without it (``x`` itself where it is not batched over the members)."""
        from torch._C._functorch import (
            get_unwrapped,
            is_batchedtensor,
            maybe_get_bdim,
            maybe_get_level,
        )

        if not is_batchedtensor(x) or maybe_get_level(x) != self.level:
            if is_batchedtensor(x):  # batched at another level: its layout is not known
                return torch.empty(x.shape, device="meta").stride()
            return tuple(x.stride())
        strides = list(get_unwrapped(x).stride())
        del strides[maybe_get_bdim(x)]
        return tuple(strides)


def _generators(rng: dict[str, torch.Tensor], k: int) -> list[dict[str, torch.Generator]]:
    out = []
    for member in range(k):
        gens = {}
        for key, value in rng.items():
            g = torch.Generator(device="cpu" if key == "cpu" else key)
            g.set_state(value[member].cpu().clone())  # a view segfaults set_state
            gens[key] = g
        out.append(gens)
    return out


def _batch_dims(batch: Any, k: int, shared: bool) -> Any:
    if shared:
        return None
    leaves, spec = tree_flatten(batch)
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and (leaf.ndim == 0 or leaf.shape[0] != k):
            raise ValueError(
                f"ensemble step with shared_batch=False needs every batch tensor to have a "
                f"leading member dimension of {k}, got shape {list(leaf.shape)}. Stack one "
                "batch per member (torch.stack), or use shared_batch=True."
            )
    return tree_unflatten([0 if isinstance(x, torch.Tensor) else None for x in leaves], spec)


class _EnsembleStep(_Step):
    """A step over an ensemble state; ``shared_batch`` as in :func:`ensemble_step`."""

    traced = True  # under vmap

    def __init__(self, model: nn.Module, pure: Callable, compiled: Callable | None = None, *,
                 shared_batch: bool = True):  # fmt: skip
        super().__init__(model, pure, compiled)
        self.shared_batch = shared_batch

    def compiled_with(self, fn: Callable) -> _EnsembleStep:
        return type(self)(self.model, self.pure, fn, shared_batch=self.shared_batch)


class EnsembleTrainStep(_EnsembleStep):
    """``step(state, batch) -> (state, metrics)`` over an ensemble state: every member takes
    one step of the wrapped train step; metrics have a leading ``[K]``."""

    kind = "ensemble train step"
    trains = True

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, dict]:
        if problem := self._checks.problem(state):
            raise StepError(f"{self.kind} cannot run: {problem}")
        k = size(state)
        bdims = _batch_dims(batch, k, self.shared_batch)
        args = (state.params, state.buffers, state.opt_state, state.step, bdims, batch)
        with self._checks.running(), _training(self.model, self._modules, True):
            if self.compiled:
                # One stream (member 0's) under vmap(randomness="different").
                first = {key: v[0].clone() for key, v in state.rng.items()}
                with rng_scope(first) as advanced:
                    params, buffers, opt_state, step, metrics = self._call(state, args)
                rng = {key: v.clone() for key, v in state.rng.items()}
                for key, v in advanced.items():
                    rng[key][0] = v
            else:
                with _per_member_rng(state.rng, k) as (recorder, rng):
                    recorded = (*args[:4], _Recorded(bdims, recorder), batch)
                    params, buffers, opt_state, step, metrics = self._call(state, recorded)
        if _SWEPT:
            _check_swept(state.opt_state, opt_state)
        return TrainState(params, buffers, opt_state, step, rng), metrics


# The lr tensors set_hyperparams(lr=...) made, by id, until a step has taken them.
_SWEPT: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()


def _check_swept(before: Any, after: Any) -> None:
    """At the first step from values :func:`set_hyperparams` set: warn where the members'
    values of a hyperparameter differed and are all one after the step (it is a schedule,
    which recomputed it, so the sweep did nothing)."""
    now = _held(after)
    for name, olds in _held(before).items():
        for old, new in zip(olds, now[name], strict=True):
            if _SWEPT.get(id(old)) is not old:
                continue
            del _SWEPT[id(old)]
            if old.ndim and not bool((old == old[0]).all()) and bool((new == new[0]).all()):
                warnings.warn(
                    f"the members' {name} differed before the first ensemble step and are "
                    f"one value after it: the optimizer's {name} is a schedule, which "
                    "recomputes it, so the sweep did nothing. Sweep an optimizer with a "
                    f"number {name} (injected with optim.inject_hyperparams).",
                    stacklevel=3,
                )


class _Recorded:
    """The batch dims plus the hook that tells the Dropout mode the vmap level."""

    __slots__ = ("dims", "recorder")

    def __init__(self, dims: Any, recorder: Callable):
        self.dims, self.recorder = dims, recorder


@contextlib.contextmanager
def _per_member_rng(rng: dict[str, torch.Tensor], k: int) -> Iterator[tuple[Callable, dict]]:
    gens = _generators(rng, k)
    mode = _MemberDropout(gens)

    def recorder() -> None:
        from torch._C._functorch import maybe_current_level

        mode.level = maybe_current_level()

    advanced: dict[str, torch.Tensor] = {}
    with mode:
        yield recorder, advanced
    for key, value in rng.items():
        advanced[key] = torch.stack([g[key].get_state() for g in gens]).to(value.device)


class EnsembleEvalStep(_EnsembleStep):
    """``evaluate(state, batch) -> metrics`` over an ensemble state, per member ``[K]``."""

    kind = "ensemble eval step"

    def __call__(self, state: TrainState, batch: Any) -> dict:
        bdims = _batch_dims(batch, size(state), self.shared_batch)
        args = (state.params, state.buffers, bdims, batch)
        first = {key: v[0].clone() for key, v in state.rng.items()}
        with _training(self.model, self._modules, False), torch.no_grad(), rng_scope(first):
            return self._call(state, args)


def _train_fn(train: Callable, randomness: str) -> Callable:
    def ensemble_train(params, buffers, opt_state, step, dims, batch):
        recorder = dims.recorder if isinstance(dims, _Recorded) else None
        batch_dims = dims.dims if isinstance(dims, _Recorded) else dims

        def member(p, b, o, s, x):
            if recorder is not None:
                recorder()
            return train(p, b, o, s, x)

        in_dims = (0, 0, 0, None, batch_dims)
        try:
            return vmap(
                member, in_dims=in_dims, out_dims=(0, 0, 0, None, 0), randomness=randomness
            )(params, buffers, opt_state, step, batch)
        except RuntimeError as e:
            if "randomness error mode" not in str(e):
                raise
            raise RuntimeError(
                "a random op other than F.dropout / nn.Dropout ran inside an eager ensemble "
                "step: only Dropout draws from each member's own generator. Use nn.Dropout, "
                "or compile the ensemble step (compile=True), whose random ops draw from "
                "member 0's generator with vmap(randomness='different')."
            ) from e

    return ensemble_train


def _eval_fn(evaluate: Callable) -> Callable:
    def ensemble_eval(params, buffers, batch_dims, batch):
        return vmap(evaluate, in_dims=(0, 0, batch_dims), randomness="different")(
            params, buffers, batch
        )

    return ensemble_eval


def ensemble_step(
    step: TrainStep | EvalStep,
    *,
    shared_batch: bool = True,
    compile: bool | None = None,
    **compile_kwargs: Any,
) -> EnsembleTrainStep | EnsembleEvalStep:
    """Turn a train step (``lk.train_step``) or eval step (``lk.eval_step``) into one over an
    ensemble state (see the module docstring): member k's result equals the plain step's on
    member k's state (:func:`unstack`). ``shared_batch``: every member sees the same batch
    (True) or member k sees ``batch[k]`` (False). ``compile`` (default: as ``step`` was
    built) compiles the whole vmapped step as one graph; ``compile_kwargs`` go to
    :func:`loopkit.compile`.
    """
    if not isinstance(step, (TrainStep, EvalStep)):
        raise TypeError(
            f"ensemble_step takes a step built by lk.train_step or lk.eval_step, got "
            f"{type(step).__name__}"
        )
    compile = step.compiled if compile is None else compile
    if isinstance(step, TrainStep):
        randomness = "different" if compile else "error"
        pure = _train_fn(step.pure, randomness)
        out: _Step = EnsembleTrainStep(step.model, pure, shared_batch=shared_batch)
    else:
        out = EnsembleEvalStep(step.model, _eval_fn(step.pure), shared_batch=shared_batch)
    if compile:
        return compile_step(out, **compile_kwargs)
    if compile_kwargs:
        raise TypeError(
            f"{sorted(compile_kwargs)} are torch.compile options: pass compile=True to use them"
        )
    return out
