"""Pure train and eval steps: ``grad_and_value`` over ``functional_call``.

``train_step(model, loss_fn, optimizer)`` returns ``step(state, batch) -> (state, metrics)``;
``eval_step(model, loss_fn)`` returns ``evaluate(state, batch) -> metrics``. The module only
supplies the computation: its own tensors are never read or written, and its ``training``
flags are set for the call and restored afterwards.
"""

from __future__ import annotations

import contextlib
import numbers
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad_and_value

from loopkit import scalars
from loopkit.binding import ModuleBinding
from loopkit.errors import CompileError, LossError, StepError
from loopkit.optim.base import Transform, apply_gradients
from loopkit.optim.transforms import clip_by_global_norm_with_norm
from loopkit.precision import LossScaleState, autocast_dtype
from loopkit.rng import rng_scope
from loopkit.state import TrainState
from loopkit.tree import describe, tree_flatten, tree_leaves, tree_map, tree_structure

Metrics = dict[str, torch.Tensor]
LossFn = Callable[[Callable[..., Any], Any], "torch.Tensor | tuple[torch.Tensor, dict]"]


class Net:
    """A callable view of ``module`` bound to given params and buffers:
    ``net(*args, **kwargs)`` is ``functional_call(module, params | buffers, args, kwargs)``,
    made through ``binding``, a :class:`~loopkit.binding.ModuleBinding` of ``module`` (the
    same call without its per-call lookups, and leaving a submodule that appears at two
    places in the tree as it was). Without one, a Net makes its own; one made while
    Dynamo traces calls ``functional_call`` itself (making a binding traces slowly).

    Buffers the forward updates -- in place (BatchNorm) or by reassignment
    (``self.ema = ...``) -- are kept in ``net.buffers`` (a copy of the dict it was given),
    so a second call sees them, as a second call of the module would.
    """

    __slots__ = ("module", "params", "buffers", "binding")

    def __init__(
        self,
        module: nn.Module,
        params: dict,
        buffers: dict,
        binding: ModuleBinding | None = None,
    ):
        self.module, self.params, self.buffers = module, params, dict(buffers)
        if binding is None and not torch.compiler.is_compiling():
            binding = ModuleBinding(module)
        self.binding = binding

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        tensors = {**self.params, **self.buffers}
        if self.binding is None:
            out = functional_call(self.module, tensors, args, kwargs)
        else:
            out = self.binding(tensors, args, kwargs)
        # Both write the tensors the forward reassigned back into `tensors`.
        self.buffers = {k: tensors[k] for k in self.buffers}
        return out

    def holding(self) -> contextlib.AbstractContextManager:
        """A block in which the module holds this net's tensors, as during a call: the
        backward runs in one, so that what it recomputes (activation checkpointing) reads
        the tensors the forward read, not the module's own."""
        if self.binding is None:
            return contextlib.nullcontext()
        return self.binding.holding({**self.params, **self.buffers})


def _split_loss(out: Any) -> tuple[torch.Tensor, Metrics]:
    """``loss`` or ``(loss, metrics)`` -> ``(loss, metrics)``: checks that the loss is a
    floating-point scalar (a one-element tensor of any shape is taken as its scalar, as
    ``loss.backward()`` takes it); metrics become detached tensors (numbers on the loss's
    device)."""
    if isinstance(out, tuple) and len(out) != 2:
        raise LossError(f"loss_fn must return loss or (loss, metrics), got a {len(out)}-tuple")
    loss, aux = out if isinstance(out, tuple) else (out, {})
    if not isinstance(loss, torch.Tensor) or not loss.is_floating_point():
        raise LossError(f"loss_fn must return a floating-point tensor loss, got {describe(loss)}")
    if loss.ndim != 0 and loss.numel() == 1:
        loss = loss.reshape(())
    elif loss.ndim != 0:
        raise LossError(
            f"loss_fn must return a scalar loss, got shape {tuple(loss.shape)}: reduce it, "
            "e.g. F.cross_entropy(logits, y) (mean by default) or loss.mean()"
        )
    if not isinstance(aux, dict):
        raise LossError(f"loss_fn's second output must be a dict of metrics, got {type(aux)}")
    if "loss" in aux:
        raise LossError("loss_fn's metrics dict must not use the key 'loss' (it holds the loss)")
    metrics = {}
    for k, v in aux.items():
        if isinstance(v, torch.Tensor):
            metrics[k] = v.detach()
        elif isinstance(v, (bool, int, float)):
            metrics[k] = torch.tensor(v, device=loss.device)
        elif _is_number(v):
            metrics[k] = _number_tensor(v, loss.device)
        else:
            raise LossError(f"metric {k!r} must be a tensor or a number, got {type(v).__name__}")
    return loss, metrics


def _is_number(v: Any) -> bool:
    """Whether ``v`` is a number: a ``numbers.Number`` (with which NumPy registers its
    number types), a NumPy bool or a 0-dim NumPy array (as Dynamo traces a NumPy scalar);
    NumPy is checked for only where it is imported: it may not be."""
    if isinstance(v, numbers.Number):
        return True
    np = sys.modules.get("numpy")
    return np is not None and (isinstance(v, np.bool_) or isinstance(v, np.ndarray) and v.ndim == 0)


def _number_tensor(v: Any, device: torch.device) -> torch.Tensor:
    """A 0-dim tensor of the number ``v``: a NumPy one keeps its dtype; another real
    number (Fraction, Decimal) becomes a float."""
    if hasattr(v, "dtype") or isinstance(v, complex):  # (as_tensor shares an array's memory)
        return torch.as_tensor(v, device=device).clone()
    return torch.tensor(float(v), device=device)


_MODULE_TRAIN = nn.Module.train


@contextlib.contextmanager
def _training(model: nn.Module, modules: list[nn.Module], mode: bool) -> Iterator[None]:
    """``model.train(mode)`` for the body (so an override of ``train()``, e.g. one that keeps
    BatchNorm frozen, is honoured), then every module's flag as it was before; with an
    override, ``model.train(its mode before)`` first, so what the override set is undone.

    Where no module overrides ``train()`` and every flag already equals ``mode`` (the usual
    case for a train step), that call would change nothing and is skipped: it costs more
    than a small compiled step's kernels."""
    if all(m.training == mode and type(m).train is _MODULE_TRAIN for m in modules):
        try:
            yield
        finally:  # the body (loss_fn, a forward) may have switched a module's mode
            for m in modules:
                if m.training != mode:
                    m.training = mode
        return
    saved = [m.training for m in modules]
    try:
        model.train(mode)
        yield
    finally:
        if any(type(m).train is not _MODULE_TRAIN for m in modules):
            model.train(saved[0])  # an override's side effects, back to the model's mode
        for m, flag in zip(modules, saved, strict=True):
            m.training = flag


# Errors that reach the caller unchanged: loopkit's own (already clear), and running out of
# memory, which callers catch by type to retry with smaller batches.
_PASS_THROUGH = (LossError, StepError, CompileError, torch.OutOfMemoryError)


# Failures whose cause is known from torch's message, and their fix.
_KNOWN_CAUSES = [
    (
        "don't yet support saved tensor hooks",
        "Activation checkpointing (torch.utils.checkpoint) in the model or loss_fn works in "
        "an eager step only: a compiled step differentiates with torch.func.grad_and_value, "
        "which does not support it (nor does an eager step whose params require grad or "
        "that runs under a torch.func transform). Build the step without compile=True, or "
        "remove the checkpointing.",
    ),
    (
        "torch.utils.checkpoint is incompatible with .grad()",
        "The step differentiates with torch.autograd.grad, which reentrant checkpointing "
        "does not support: use torch.utils.checkpoint.checkpoint(..., use_reentrant=False).",
    ),
]


def _params_mismatch(model: nn.Module, state: Any) -> str | None:
    """Why ``state``'s params are not ``model``'s trainable parameters (None if they are)."""
    if not isinstance(state, TrainState):
        return None
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    missing, unknown = sorted(trained - set(state.params)), sorted(set(state.params) - trained)
    if not (missing or unknown):
        return None
    parts = [f"missing {missing[:5]}: trainable in the model, not in the state"] if missing else []
    if unknown:
        parts.append(f"unknown {unknown[:5]}: in the state, not trainable in the model")
    return (
        f"the state's params are not the model's trainable parameters ({'; '.join(parts)}). "
        "The params that train are those whose requires_grad was True when the state was "
        "made: setting requires_grad afterwards (freezing or unfreezing a layer) changes "
        "nothing. To freeze params during training, keep requires_grad and wrap the "
        "optimizer, optim.freeze(optimizer, frozen), from the start; otherwise build the "
        "state with lk.TrainState.create(model, optimizer) from this step's model (as it is "
        "now) and optimizer."
    )


def _state_mismatch(model: nn.Module, optimizer: Transform | None, state: Any) -> str | None:
    """Why ``state`` cannot be a state of ``model`` trained by ``optimizer`` (None if it
    can): params the model does not train, or an optimizer state of another structure."""
    mismatch = _params_mismatch(model, state)
    if mismatch or optimizer is None or not isinstance(state, TrainState):
        return mismatch
    fix = "build it with lk.TrainState.create(model, optimizer) from this step's model and "
    try:
        want = optimizer.init(state.params)
    except Exception:  # an optimizer that cannot start from these params says so itself
        return None
    if tree_structure(want) != tree_structure(state.opt_state):
        return (
            "the state's optimizer state was not built by this step's optimizer: it holds "
            f"{_kinds(state.opt_state)}, the optimizer makes {_kinds(want)}. {fix[0].upper()}"
            f"{fix[1:]}optimizer."
        )
    return None


def _kinds(opt_state: Any) -> str:
    """The names of an optimizer state's parts (one per transform of a chain)."""
    if type(opt_state) in (tuple, list):
        return "(" + ", ".join(_kinds(part) for part in opt_state) + ")"
    return type(opt_state).__name__


def _known_fix(e: BaseException) -> str | None:
    return next((fix for cause, fix in _KNOWN_CAUSES if cause in str(e)), None)


def _gradient_hooks(model: nn.Module) -> str | None:
    """Why ``model``'s parameters cannot train as they are (None if they can): gradient
    hooks on the Parameters themselves, which the step never runs."""
    hooked = [
        (name, kind)
        for name, p in model.named_parameters()
        if p.requires_grad
        for kind, hooks in (
            ("register_hook", p._backward_hooks),
            ("register_post_accumulate_grad_hook", getattr(p, "_post_accumulate_grad_hooks", None)),
        )
        if hooks
    ]
    if not hooked:
        return None
    names = sorted({name for name, _ in hooked})
    kinds = sorted({kind for _, kind in hooked})
    return (
        f"parameters {names[:5]} have gradient hooks ({', '.join(kinds)}), which would never "
        "run: the step differentiates copies of the state's params, not the module's own "
        "Parameters. Do what the hooks do to the gradients in the optimizer instead: chain "
        "a Transform before it, optim.chain(optim.Transform(init, update), optimizer), whose "
        "update(grads, state, params) changes the grads (optim.freeze(optimizer, frozen) "
        "keeps whole params fixed); then remove the hooks (handle.remove())."
    )


def _holds_scaler(state: Any) -> bool:
    """Whether a :class:`~loopkit.precision.LossScaleState` is somewhere in ``state``."""
    if isinstance(state, LossScaleState):
        return True
    if isinstance(state, dict):
        return any(_holds_scaler(v) for v in state.values())
    return isinstance(state, tuple | list) and any(_holds_scaler(v) for v in state)


def _misplaced_scaler(opt_state: Any) -> str | None:
    """Why ``opt_state`` cannot train (None if it can): a loss scaler inside another
    transform, whose scale the step cannot multiply the loss by."""
    if isinstance(opt_state, LossScaleState) or not _holds_scaler(opt_state):
        return None
    return (
        "the optimizer has a loss scaler (dynamic_loss_scale) inside another transform, so "
        "the step cannot scale the loss by it, and its unscaling would divide the gradients "
        "by the scale: make it the outermost one, e.g. "
        "dynamic_loss_scale(chain(clip_by_global_norm(1.0), optimizer)) or "
        "dynamic_loss_scale(accumulate(optimizer, k))"
    )


def _old_reparametrization_fix(model: nn.Module, e: BaseException) -> str | None:
    """The fix for a compile failure caused by the hooks of the old-style
    ``torch.nn.utils.weight_norm`` / ``spectral_norm`` (None if that is not the cause)."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    if not (_is_backend_failure(e) or "TensorWrapper" in str(e)):
        return None
    hooked = [
        name or type(m).__name__
        for name, m in model.named_modules()
        if any(isinstance(h, (WeightNorm, SpectralNorm)) for h in m._forward_pre_hooks.values())
    ]
    if not hooked:
        return None
    return (
        f"Modules {hooked[:3]} use the old torch.nn.utils.weight_norm / spectral_norm, whose "
        "forward hook sets the module's weight as an attribute, which the compiled step "
        "(torch.func.grad_and_value) cannot trace. Use torch.nn.utils.parametrizations."
        "weight_norm / spectral_norm instead (they compile), or the eager step "
        "(compile=False)."
    )


def _untraceable_modules(model: nn.Module) -> str | None:
    """The fix for modules whose forward reads a tensor as a Python number, which neither
    torch.compile's one graph nor vmap can trace (None if there are none)."""
    cumulative = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.momentum is None
        and m.track_running_stats
    ]
    if not cumulative:
        return None
    return (
        f"BatchNorm {cumulative[:3]} has momentum=None (a cumulative average): its forward "
        "reads num_batches_tracked as a Python number, which a compiled step (fullgraph) or "
        "an ensemble (vmap) cannot trace. Give it a numeric momentum, or use the plain "
        "eager step."
    )


def _is_compiler_error(e: BaseException) -> bool:
    from torch._dynamo.exc import TorchDynamoException

    return isinstance(e, TorchDynamoException)


def _is_backend_failure(e: BaseException) -> bool:
    from torch._dynamo.exc import BackendCompilerFailed

    return isinstance(e, BackendCompilerFailed)


def _is_recompile_limit(e: BaseException) -> bool:
    from torch._dynamo.exc import FailOnRecompileLimitHit

    return isinstance(e, FailOnRecompileLimitHit)


def _recompile_limit_error(kind: str, e: BaseException) -> CompileError:
    return CompileError(
        f"torch.compile recompiled the {kind} until Dynamo's recompile limit: something it "
        "specializes on changes from call to call. Most often that is a Python number in "
        "the batch (e.g. mixup's lam), compiled in as a constant: pass it as a tensor, "
        "torch.tensor(lam). Batches of ever new shapes do it too: keep the shapes fixed "
        "(drop_last=True) or compile with dynamic=True. A number read from a closure or "
        f"a config does not recompile: it is stale (see guards=). torch says: {e}"
    )


class _Step:
    """Shared machinery of train and eval steps: training flags, errors, compilation.

    ``pure`` is the uncompiled function (also used to explain compile failures); ``fn`` is
    what a call runs. With ``donate`` the train step's ``fn`` writes the new state into the
    input state's tensors and returns only the metrics (see :func:`compile_step`)."""

    kind = "step"
    traced = False  # True where the step runs under a torch.func transform (ensembles)
    optimizer: Transform | None = None  # set by train_step: checks a failing step's state
    donate = False  # set by compile_step
    cudagraphs = False  # set by compile_step: the call prepares and copies out of a CUDA graph
    fullgraph = True  # set by compile_step (for its errors)
    trains = False  # True for steps that train the model: they get its _TrainChecks

    def __init__(
        self,
        model: nn.Module,
        pure: Callable,
        compiled: Callable | None = None,
        prepare: Callable[[TrainState], int] | None = None,
    ):
        self.model = model
        self.pure = pure
        self.fn = compiled or pure
        self.compiled = compiled is not None
        self.prepare = prepare
        self._modules = list(model.modules())
        if self.trains:
            self._checks = _TrainChecks(model, self._modules)
        # A forward may write a param or buffer in place (Embedding's max_norm). The first
        # call passes copy-on-write views of them, so the caller's state stays as it was;
        # later calls do only if a call wrote them (views cost ~2 µs a tensor, and an
        # inductor kernel materialises the views it reads: a copy). Calls without views
        # compare version counters, so a write is noticed (and warned of) all the same.
        self._first_call, self._writes_inputs = True, False

    @property
    def data_parallel(self) -> bool:
        """True for a step built by :func:`loopkit.distributed.train_step`."""
        return self.prepare is not None

    def compiled_with(self, fn: Callable) -> _Step:
        out = type(self)(self.model, self.pure, fn, self.prepare)
        out.optimizer = self.optimizer
        return out

    def _call(self, state: TrainState, args: tuple) -> Any:
        if self.cudagraphs:
            _prepare_cudagraph_call(args[:-1])
        watched = not (self.donate or self.cudagraphs)  # (those write the state on purpose)
        guarded = watched and (self._first_call or self._writes_inputs)
        if guarded:  # the module gets copy-on-write views of the state's params and buffers
            args = (_lazy_copies(args[0]), _lazy_copies(args[1]), *args[2:])
        versions = _versions(args[:2]) if watched else None
        hooks_on = _saved_tensor_hooks_enabled()
        try:
            out = self.fn(*args)
        except _PASS_THROUGH:
            raise
        except Exception as e:
            if hooks_on and not _saved_tensor_hooks_enabled():
                # torch 2.13: a trace of torch.func.grad that fails leaves saved-tensor
                # hooks disabled process-wide (activation checkpointing then fails anywhere)
                torch._C._autograd._saved_tensors_hooks_enable()
            if self.compiled and _is_recompile_limit(e):
                raise _recompile_limit_error(self.kind, e) from e
            if not (self.compiled and _is_compiler_error(e)):
                raise self._step_error(state, args[-1], e) from e
            cause = e
        else:
            if versions is not None:
                self._note_writes(args[:2], versions, guarded)
            # A CUDA graph's outputs live in memory its next replay overwrites: the metrics
            # are copied out (the state is the donated input, which the caller owns).
            return _clone_metrics(out) if self.cudagraphs else out
        # The compiler failed: run eagerly to tell a bug in the user's code (reported as
        # eager would report it) from something only the compiler rejects (a graph break).
        try:
            out = self.pure(*args)
        except _PASS_THROUGH:
            raise
        except Exception as e:
            raise self._step_error(state, args[-1], e) from e
        if self.donate:  # (the eager run above wrote nothing: it is the step undonated)
            _write_into(args[:4], tuple(out[:4]), write=False)
            if torch.is_grad_enabled() and _requires_grad(args[-1]):
                raise StepError(
                    "donate=True cannot take a batch holding tensors that require grad: the "
                    "donated step's in-place writes cannot be part of their autograd graph. "
                    "Detach the batch, or compile without donate to differentiate through "
                    "the step."
                ) from cause
        raise self._compile_error(cause) from cause

    def _compile_error(self, cause: BaseException) -> CompileError:
        """The error for a compile failure that the eager step does not have."""
        fix = (
            self._number_fix(cause)
            or _old_reparametrization_fix(self.model, cause)
            or _known_fix(cause)
        )
        if fix is None and _is_backend_failure(cause):
            fix = (
                "The compiler backend failed on the traced step; that is no graph break, so "
                "fullgraph=False does not help. Use the eager step (compile=False), or find "
                "the failing op with backend='aot_eager' or backend='eager'."
            )
        elif fix is None:
            fix = (
                "Fix: remove what breaks the graph from loss_fn / the model's forward "
                "(.item(), print, Python branches or loops on tensor values, unsupported "
                "libraries)"
                + (", or compile with fullgraph=False to allow graph breaks (slower)."
                   if self.fullgraph else ".")
            )  # fmt: skip
        how = "as one graph (fullgraph=True)" if self.fullgraph else "(fullgraph=False)"
        return CompileError(
            f"torch.compile could not compile the {self.kind} {how}:\n"
            f"{_shortened(str(cause).strip())}\n{fix}"
        )

    def _note_writes(self, given: tuple, versions: list, guarded: bool) -> None:
        """After a call: if it wrote into the params or buffers it was given, pass views
        from now on (and warn, where they were the caller's own tensors)."""
        # an inference tensor has no version counter (-1): where one was given, keep
        # passing views, as a write to it cannot be seen
        self._first_call = -1 in versions
        if _versions(given) == versions:
            return
        named = _named(given)
        written = [k for (k, t), v in zip(named, versions, strict=True) if v != _version(t)]
        if not self._writes_inputs:
            self._writes_inputs = True
            if not guarded:
                warnings.warn(
                    f"the {self.kind}'s forward wrote in place into the state's {written[:5]} "
                    "(first seen in this call, which therefore modified the state it was "
                    "given); from now on the step gives the model copy-on-write views of "
                    "the state's tensors.",
                    stacklevel=4,
                )

    def _number_fix(self, e: BaseException) -> str | None:
        """The fix for a compiled or vmapped train step that failed on a tensor read as a
        number, where the model has a module known to do that."""
        traced = (self.compiled or self.traced) and "train" in self.kind
        text = str(e)
        if traced and ("data-dependent" in text or ".item()" in text):
            return _untraceable_modules(self.model)
        return None

    def _step_error(self, state: TrainState, batch: Any, e: Exception) -> StepError:
        mismatch = _state_mismatch(self.model, self.optimizer, state)
        if mismatch:
            return StepError(f"{self.kind} {int(state.step)} failed: {mismatch}")
        known = [fix for fix in [self._number_fix(e), _known_fix(e)] if fix]
        return StepError(
            f"{self.kind} {int(state.step)} failed on a batch of {describe(batch)}: "
            f"{type(e).__name__}: {e}\n"
            + (known[0] if known else
               "If the batch is not what the model and loss_fn expect, fix the data; "
               "otherwise the cause is in loss_fn or the model (its traceback is above).")
        )  # fmt: skip


class _TrainChecks:
    """What a step that trains ``model`` checks before a call, and its sparse embeddings.

    On the first call, and whenever a param's ``requires_grad`` changed since, the state's
    params must be the model's trainable ones and none may have a gradient hook (which the
    step would not run). Embeddings with ``sparse=True`` run with ``sparse=False`` during
    the call (:func:`_dense_gradients`)."""

    def __init__(self, model: nn.Module, modules: list[nn.Module]):
        self.model = model
        self.params = list(model.parameters())
        self.trains: list[bool] | None = None  # their requires_grad, when last checked
        self.sparse = [m for m in modules if isinstance(m, _SPARSE) and m.sparse]

    def problem(self, state: Any) -> str | None:
        """Why ``state`` cannot train the model as it is now (None if it can)."""
        trains = [p.requires_grad for p in self.params]
        if trains == self.trains:
            return None
        problem = (
            _gradient_hooks(self.model)
            or _params_mismatch(self.model, state)
            or _misplaced_scaler(getattr(state, "opt_state", None))
        )
        if problem is None:
            self.trains = trains
        return problem

    def running(self) -> contextlib.AbstractContextManager:
        """The context of a call: sparse embeddings made dense (:func:`_dense_gradients`)."""
        return _dense_gradients(self.sparse) if self.sparse else contextlib.nullcontext()


class TrainStep(_Step):
    """``step(state, batch) -> (new_state, metrics)``: one pure training step.

    It checks the model and state first, and runs ``sparse=True`` embeddings with
    ``sparse=False`` (:class:`_TrainChecks`): the same gradient, dense, which every
    optimizer takes (torch.optim takes sparse ones only in SGD and Adagrad, with the same
    results)."""

    kind = "train step"
    trains = True

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        if problem := self._checks.problem(state):
            raise StepError(f"{self.kind} {int(state.step)} cannot run: {problem}")
        args = (state.params, state.buffers, state.opt_state, state.step, batch)
        fold = self.prepare(state) if self.prepare is not None else None
        with (
            self._checks.running(),
            _training(self.model, self._modules, True),
            rng_scope(state.rng, fold) as rng,
        ):
            out = self._call(state, args)
        if self.donate:  # the new state was written into the input state's tensors
            return TrainState(*args[:4], rng), out
        params, buffers, opt_state, step, metrics = out
        return TrainState(params, buffers, opt_state, step, rng), metrics


_SPARSE = (nn.Embedding, nn.EmbeddingBag)  # modules with a sparse=True option


@contextlib.contextmanager
def _dense_gradients(modules: list[nn.Module]) -> Iterator[None]:
    """``sparse=False`` on ``modules`` (sparse embeddings) for the body: their weight's
    gradient comes out dense (equal to the sparse one's values)."""
    for m in modules:
        m.sparse = False
    try:
        yield
    finally:
        for m in modules:
            m.sparse = True


class EvalStep(_Step):
    """``evaluate(state, batch) -> metrics``: eval mode, no gradients, state unchanged
    (random draws come from ``state.rng``, not advanced: see :func:`eval_step`)."""

    kind = "eval step"

    def __call__(self, state: TrainState, batch: Any) -> Metrics:
        args = (state.params, state.buffers, batch)
        with (
            _training(self.model, self._modules, False),
            torch.no_grad(),
            rng_scope(state.rng),
        ):
            return self._call(state, args)


def train_step(
    model: nn.Module,
    loss_fn: LossFn,
    optimizer: Transform,
    *,
    clip_norm: float | None = None,
    precision: str | None = None,
    compile: bool = False,
    sync: Callable | None = None,
    prepare: Callable[[TrainState], int] | None = None,
    **compile_kwargs: Any,
) -> TrainStep:
    """Build the pure training step for ``model``.

    ``loss_fn(net, batch)`` gets ``net``, the model bound to the state's params and buffers
    (:class:`Net`), and returns ``loss`` or ``(loss, metrics)``. The step computes
    ``grads, loss = grad_and_value(loss)(params)``, clips the gradient's global norm to
    ``clip_norm`` (as ``torch.nn.utils.clip_grad_norm_``; the norm before clipping is
    returned as the metric ``grad_norm``), applies ``optimizer`` and increments the step.
    BatchNorm statistics come back in the new state's buffers; Dropout draws from the
    state's ``rng``. ``compile=True`` compiles it with :func:`loopkit.compile`
    (``compile_kwargs`` go there).

    ``precision="bf16"`` or ``"fp16"`` runs ``loss_fn`` under ``torch.autocast`` with that
    dtype; params, gradients and optimizer state stay in their own dtype (float32 master
    params). ``"fp16"`` needs the optimizer wrapped in
    :func:`loopkit.precision.dynamic_loss_scale`. Whenever the optimizer state is that
    scaler's (at any precision, as ``torch.amp.GradScaler`` scales the loss whatever the
    autocast), the step differentiates ``loss * scale`` and the scaler unscales, skips
    steps with inf/NaN gradients and adapts the scale as ``GradScaler``; the metric
    ``loss_scale`` is the scale used, and ``clip_norm`` is refused (it would clip the
    scaled gradients). See :mod:`loopkit.precision`.

    ``sync`` and ``prepare`` are where data parallelism plugs in (see
    :func:`loopkit.distributed.train_step`, which sets them): ``sync(grads, metrics,
    buffers_before, buffers, batch) -> (grads, metrics, buffers)`` runs inside the step
    right after the gradient, and ``prepare(state)``, called before each step outside the
    compiled code, returns the number the step's random draws are folded with.
    """
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"clip_norm must be a positive number or None, got {clip_norm}")
    amp_dtype = autocast_dtype(precision)
    fp16 = amp_dtype == torch.float16
    if fp16 and clip_norm is not None:
        raise ValueError(f"clip_norm with precision='fp16' {_CLIP_SCALED}")
    buffer_names = {name for name, _ in model.named_buffers()}
    binding = ModuleBinding(model)

    def train(params, buffers, opt_state, step, batch):
        # functional_call updates BatchNorm statistics in place: give it copies, and pass
        # them as an input of the differentiated function, as torch.func requires.
        before = buffers
        buffers = {k: v.clone() if k in buffer_names else v for k, v in buffers.items()}

        # The scaler divides the gradients by its scale: the loss is scaled whenever the
        # state is a scaler's, whatever the precision (a Python check, fixed per trace).
        scaled = isinstance(opt_state, LossScaleState)
        if fp16 and not scaled:
            raise StepError(
                "precision='fp16' needs a loss scaler: build the optimizer (and the state) "
                "with loopkit.precision.dynamic_loss_scale(optimizer)"
            )
        if scaled and clip_norm is not None:
            raise StepError(f"clip_norm with a loss scaler (dynamic_loss_scale) {_CLIP_SCALED}")

        nets = []  # the objective's net, held by the module during the backward

        def objective(p, b):
            net = Net(model, p, b, binding)
            nets.append(net)
            with _autocast(p, amp_dtype):
                loss, metrics = _split_loss(loss_fn(net, batch))
            grad_of = loss * opt_state.scale if scaled else loss
            if p and not grad_of.requires_grad:  # (a property fixed per trace)
                raise LossError(_NO_GRAPH)
            return grad_of, (loss, metrics, net.buffers)

        grads, (_, (loss, aux, buffers)) = _grad_and_value(
            objective, params, buffers, lambda: nets[-1].holding(), lambda: _requires_grad(batch)
        )
        metrics = {"loss": loss.detach(), **aux}
        if sync is not None:
            grads, metrics, buffers = sync(grads, metrics, before, buffers, batch)
        if scaled:
            metrics["loss_scale"] = opt_state.scale.clone()  # the input may be donated
        if clip_norm is not None:
            grads, metrics["grad_norm"] = clip_by_global_norm_with_norm(grads, float(clip_norm))
        params, opt_state = apply_gradients(optimizer, grads, opt_state, params)
        return params, buffers, opt_state, step + 1, metrics

    step = TrainStep(model, train, prepare=prepare)
    step.optimizer = optimizer
    return _maybe_compile(step, compile, compile_kwargs)


_NO_GRAPH = (
    "the loss depends on no parameter: it was computed under torch.no_grad(), detached, or "
    "rebuilt from .item(). Its gradients would all be zero (only weight decay would move "
    "the params), and torch's loss.backward() refuses it too. Compute the loss from net's "
    "outputs with grad enabled."
)

_CLIP_SCALED = (
    "would clip the scaled gradients: clip the unscaled ones inside the scaler instead, "
    "dynamic_loss_scale(chain(clip_by_global_norm(max_norm), optimizer))"
)


def _grad_and_value(
    objective: Callable,
    params: dict,
    buffers: dict,
    backward_scope: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    inputs_require_grad: Callable[[], bool] = lambda: False,
) -> tuple[dict, Any]:
    """``grad_and_value(objective, has_aux=True)(params, buffers)``.

    Outside any torch.func transform and outside compilation, the same gradients come from
    one ``torch.autograd.grad`` over detached copies of the params (torch.func's grad runs
    that too, with ``create_graph=True`` and every op wrapped, to compose with other
    transforms): forward and backward of the benchmark MLP take 2.0 instead of 3.2 ms. The
    outputs are the same tensors torch.func returns -- detached, zeros for params the loss
    does not use. Where the loss also depends on other tensors that require grad (a batch
    being learned, a tensor ``loss_fn`` closes over) and grad mode is on, the gradient and
    the outputs keep their graph back to those tensors, as torch.func's do. The backward
    runs inside ``backward_scope()`` (where the module holds the step's tensors, for what
    activation checkpointing recomputes); ``inputs_require_grad`` see
    :func:`_reaches_other_leaves`."""
    if not _plain_autograd_applies(params):
        return grad_and_value(objective, has_aux=True)(params, buffers)
    outer_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        out, aux = objective(leaves, buffers)
        if not out.requires_grad:  # no params (a train step refuses such a loss otherwise)
            keep, grads = False, [torch.zeros_like(v) for v in leaves.values()]
        else:
            keep = outer_graph and _reaches_other_leaves(out, leaves.values(), inputs_require_grad)
            with backward_scope():
                grads = torch.autograd.grad(
                    out, list(leaves.values()), create_graph=keep, allow_unused=True,
                    materialize_grads=True,
                )  # fmt: skip
    if not keep:
        out, aux = out.detach(), _detached(aux)
    return dict(zip(leaves, grads, strict=True)), (out, aux)


def _requires_grad(tree: Any) -> bool:
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_leaves(tree))


def _detached(tree: Any) -> Any:
    """``tree`` with its tensors detached. Dicts, lists and tuples are walked here (torch's
    generic ``tree_map`` builds a tree spec on the way: ~50 µs of a small model's eager
    step for the step's ``(loss, metrics, buffers)``); other nodes through ``tree_map``."""
    kind = type(tree)
    if kind is dict:
        return {k: _detached(v) for k, v in tree.items()}
    if kind is tuple or kind is list:
        return kind(_detached(v) for v in tree)
    if isinstance(tree, torch.Tensor):
        return tree.detach()
    return tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, tree)


def _plain_autograd_applies(params: Any) -> bool:
    """True where plain autograd gives grad_and_value's result: not under a torch.func
    transform, torch.compile, inference mode or forward-mode AD, and params a dict of
    floating-point tensors that are no part of an outer autograd graph."""
    if (
        torch.compiler.is_compiling()
        or torch._C._functorch.peek_interpreter_stack() is not None
        or torch.is_inference_mode_enabled()
        or torch.autograd.forward_ad._current_level >= 0
        or type(params) is not dict
    ):
        return False
    return all(
        isinstance(v, torch.Tensor) and v.is_floating_point() and not v.requires_grad
        for v in params.values()
    )


def _reaches_other_leaves(
    out: torch.Tensor, leaves: Any, inputs_require_grad: Callable[[], bool]
) -> bool:
    """Whether ``out``'s autograd graph reaches a leaf tensor other than ``leaves`` that
    the caller may differentiate to: a batch or a closed-over tensor that requires grad (a
    walk over the graph's nodes: 10 µs for the benchmark MLP). A leaf only the graph holds
    is either one ``loss_fn`` made and dropped (the input of a gradient penalty,
    ``x.clone().requires_grad_()``), which no one can reach after the step, or the leaf
    behind a batch tensor computed from it (``x = leaf.float()``): such leaves count only
    if ``inputs_require_grad()`` (a batch tensor requires grad)."""
    own = {id(v) for v in leaves}
    if out.grad_fn is None:  # the loss is itself a leaf
        return id(out) not in own
    seen, stack, graph_only = set(), [out.grad_fn], False
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if type(node) is _ACCUMULATE_GRAD:  # a leaf's node
            if id(node.variable) not in own:
                if _python_refs(node) > _GRAPH_ONLY_REFS:
                    return True
                graph_only = True
            continue
        for next_node, _ in node.next_functions:
            if next_node is not None:
                stack.append(next_node)
    return graph_only and inputs_require_grad()


_ACCUMULATE_GRAD = torch._C._functions.AccumulateGrad


def _python_refs(node: Any) -> int:
    """References to the Python object of the leaf of ``node`` (an AccumulateGrad)."""
    return sys.getrefcount(node.variable)


def _graph_only_refs() -> int:
    """:func:`_python_refs` of a leaf that only its autograd graph holds."""
    leaf = torch.zeros((), requires_grad=True)
    out = leaf * 1
    del leaf
    return _python_refs(out.grad_fn.next_functions[0][0])


_GRAPH_ONLY_REFS = _graph_only_refs()


def _autocast(params: dict, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    device = next(iter(params.values())).device.type if params else "cpu"
    return torch.autocast(device, dtype=dtype)


def eval_step(
    model: nn.Module,
    loss_fn: LossFn,
    *,
    precision: str | None = None,
    compile: bool = False,
    **compile_kwargs: Any,
) -> EvalStep:
    """Build ``evaluate(state, batch) -> metrics`` with eval-mode semantics: BatchNorm uses
    its running statistics, Dropout is off, no gradients are computed. Metrics are
    ``{"loss": ..., **aux}`` as returned by ``loss_fn``. ``precision`` autocasts as in
    :func:`train_step`.

    Random ops that still draw in eval mode (``F.dropout(x, training=True)``, MC dropout)
    draw from ``state.rng``, which an eval step does not advance (it returns no state):
    every call with the same state draws the same numbers, for any batch. For other draws
    give each call its own generator states, e.g. ``evaluate(state.replace(rng=
    lk.rng_for(i, [device])), batch)`` for the ``i``-th sample."""
    amp_dtype = autocast_dtype(precision)
    binding = ModuleBinding(model)

    def evaluate(params, buffers, batch):
        with _autocast(params, amp_dtype):
            loss, aux = _split_loss(loss_fn(Net(model, params, buffers, binding), batch))
        return {"loss": loss.detach(), **aux}

    return _maybe_compile(EvalStep(model, evaluate), compile, compile_kwargs)


def _maybe_compile(step: _Step, compile: bool, compile_kwargs: dict) -> _Step:
    if compile:
        return compile_step(step, **compile_kwargs)
    if compile_kwargs:
        raise TypeError(
            f"{sorted(compile_kwargs)} are torch.compile options: pass compile=True to use them"
        )
    return step


def compile_step(
    step: _Step,
    *,
    fullgraph: bool = True,
    dynamic: bool | None = False,
    mode: str | None = None,
    backend: Any = "inductor",
    options: dict | None = None,
    donate: bool = False,
    guards: str = "inputs",
) -> _Step:
    """Compile the whole step -- forward, backward and optimizer update -- with
    ``torch.compile`` (one graph with ``fullgraph=True``; a graph break raises
    :class:`CompileError` naming it). The step counter and learning rate are tensors, so
    steps after the first reuse the compiled graph; a batch of a new shape compiles once
    more (``dynamic=False`` keeps shapes static, the fastest code).

    ``donate=True`` (train steps): the step writes the new params, buffers, optimizer state
    and step counter into the input state's tensors, in place, and returns a state holding
    those same tensors. The input state must not be used afterwards (it *is* the new
    state); in exchange no second copy of the state is allocated, so peak memory is the
    imperative loop's, and the update kernels write their results where they read them.

    ``mode="reduce-overhead"`` (CUDA graphs on CUDA) implies ``donate=True``: the state's
    tensors are marked static (``torch._dynamo.mark_static_address``), so the graph
    updates them where they live and only the batch is copied into the graph's inputs;
    the metrics are copied out of the graph's memory after each call. On CPU inductor
    skips CUDA graphs and the step runs as with the default mode.

    ``guards="inputs"`` (the default) keeps Dynamo's guards on the step's inputs -- the
    state's structure and each tensor's dtype, shape, strides and device, the batch's, and
    global state such as grad mode and autocast -- and drops the guards on what the step
    closes over (the model's modules and attributes, ``loss_fn``, the optimizer), which
    cost more per call than the rest together (``torch.compile``'s ``guard_filter_fn``).
    The contract: the model's code and attributes, ``loss_fn`` and the optimizer do not
    change after the first call; to change them, build a new step. ``guards="all"`` keeps
    every guard (a changed attribute then recompiles), and so does ``fullgraph=False``:
    the frames after a graph break are shared by every step built from the same code, and
    only those guards tell apart two steps' compiled frames (another ``loss_fn``'s).
    """
    if guards not in ("inputs", "all"):
        raise ValueError(f"guards must be 'inputs' or 'all', got {guards!r}")
    # CUDA graphs: loopkit's own train and eval steps keep their state static and copy the
    # metrics out; other steps (ensembles, ...) are left to torch's CUDA-graph trees.
    cudagraphs = mode in ("reduce-overhead", "max-autotune") and isinstance(
        step, (TrainStep, EvalStep)
    )
    if cudagraphs and isinstance(step, TrainStep):
        donate = True
    if donate and not isinstance(step, TrainStep):
        raise ValueError(
            "donate=True applies to steps built by loopkit.train_step (an eval step writes "
            f"no state), not to a {type(step).__name__}"
        )
    pure = _donating(step.pure) if donate else step.pure
    options = dict(options or {})
    # Only a whole-step graph is one frame of its own code (_fresh_code). After a graph
    # break the frames that follow are shared by every step built from the same code, and
    # only the guards on what each closes over tell their cached graphs apart.
    filtered = guards == "inputs" and fullgraph
    if mode is not None and backend == "inductor":
        # torch.compile takes mode or options, not both: spell the mode as its options.
        from torch._inductor import list_mode_options

        options = {**list_mode_options(mode, dynamic), **options}
        mode = None
    elif mode is not None and guards == "inputs":
        # Another backend ignores the mode (it configures inductor), and torch would reject
        # it beside the guard filter's option.
        warnings.warn(
            f"mode={mode!r} configures inductor; with backend={backend!r} it is ignored",
            stacklevel=2,
        )
        mode = None
    lifts = isinstance(step, (TrainStep, EvalStep))  # the steps whose float64 scalars
    if lifts:  # are lifted (an ensemble's are stacked, not 0-dim): see loopkit.scalars
        pure = scalars.lowering(pure, isinstance(step, TrainStep), donate)
    if filtered:
        options.setdefault("guard_filter_fn", _input_guards(pure))
    fn = torch.compile(
        _fresh_code(pure),
        fullgraph=fullgraph,
        dynamic=dynamic,
        mode=mode,
        backend=backend,
        options=options or None,
    )
    out = step.compiled_with(scalars.lifting(fn, donate) if lifts else fn)
    out.donate, out.cudagraphs, out.fullgraph = donate, cudagraphs, fullgraph
    return out


def _shortened(message: str, keep: int = 2000) -> str:
    """torch's compile error cut to about ``keep`` characters: its start (what broke the
    graph) and its end, where its "from user code" traceback ends in the innermost frame
    (the user's file and line)."""
    if len(message) <= keep:
        return message
    return f"{message[: keep // 2]}\n...\n{message[-keep // 2 :]}"


def _donating(train: Callable) -> Callable:
    """``train`` that writes the new state into the input state's tensors and returns the
    metrics. Inside a compiled graph each ``copy_`` becomes the update kernel's store into
    the input's memory.

    ``returned``: input tensors (the lifted float64 scalars, see :mod:`loopkit.scalars`)
    whose new values are returned, ``(metrics, their values)``, instead of written: torch
    2.13 drops in-place writes to float64 0-dim CPU inputs of a graph, which they would be
    after a graph break. The metrics are copies: one may be a state tensor (a logged
    param), which the writes overwrite."""

    def train_in_place(params, buffers, opt_state, step, batch, returned=()):
        old = (params, buffers, opt_state, step)
        *new, metrics = train(params, buffers, opt_state, step, batch)
        metrics = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}
        return metrics, _write_into(old, tuple(new), returned=returned)

    return train_in_place


_STATE_PARTS = ("params", "buffers", "opt_state", "step")


def _write_into(old: Any, new: Any, write: bool = True, returned: Any = ()) -> list:
    """Copy each tensor of ``new`` into the tensor at the same place in ``old`` (a state's
    ``(params, buffers, opt_state, step)``), where they are not the same tensor; a
    :class:`StepError` naming the place where the structures, dtypes, shapes or devices
    differ, raised before anything is written (``write=False``: only that check).
    Non-tensor leaves must be equal. A new tensor that is itself one of the old ones being
    written (a state keeping the previous params, or shifting a history) is copied first.
    The old tensors of ``returned`` are not written: their new values are returned, in
    order.

    Dicts, lists, tuples and NamedTuples are walked here, their tensors handled inline:
    Dynamo traces every line of this, and torch's generic ``tree_flatten`` of both states
    cost 0.4-0.9 s of each compile of the benchmark MLP's step. Other pytree nodes are
    flattened."""
    pairs: list = []
    _pair_up(old, new, (), pairs)
    if not write:
        return []
    # Sets and dicts of the tensors themselves (hashed by identity): id() on a traced input
    # would make Dynamo guard on the object, recompiling for every new state.
    overwritten = {o for o, _ in pairs}
    slots = {t: i for i, t in enumerate(returned)}
    values = list(returned)  # an old tensor left as it is keeps its value
    writes = []
    for o, n in pairs:
        if n in overwritten:
            n = n.clone()
        slot = slots.get(o)
        if slot is None:
            writes.append((o, n))
        else:
            values[slot] = n
    for o, n in writes:
        o.copy_(n)
    return values


def _pair_up(old: Any, new: Any, path: tuple, out: list) -> None:
    """Append to ``out`` the ``(old tensor, new tensor)`` pairs of :func:`_write_into`, or
    raise where ``new`` (at ``path``) differs from ``old`` in structure."""
    kind = type(old)
    if kind is dict and type(new) is dict:
        if old.keys() != new.keys():
            raise _structure_error(path, old, new)
        items = [(k, o, new[k]) for k, o in old.items()]
    elif kind is type(new) and (
        kind is list or kind is tuple or (isinstance(old, tuple) and hasattr(kind, "_fields"))
    ):
        if len(old) != len(new):
            raise _structure_error(path, old, new)
        items = list(zip(range(len(old)), old, new, strict=True))
    elif isinstance(old, torch.Tensor):
        if not isinstance(new, torch.Tensor) or _differs(old, new):
            raise _structure_error(path, old, new)
        if new is not old:
            out.append((old, new))
        return
    else:  # anything else: torch's pytree, leaf by leaf
        (old_leaves, old_spec), (new_leaves, new_spec) = tree_flatten(old), tree_flatten(new)
        if old_spec != new_spec or not all(
            isinstance(n, torch.Tensor) == isinstance(o, torch.Tensor)
            and (not _differs(o, n) if isinstance(o, torch.Tensor) else n is o or n == o)
            for o, n in zip(old_leaves, new_leaves, strict=True)
        ):
            raise _structure_error(path, old, new)
        out.extend(
            (o, n)
            for o, n in zip(old_leaves, new_leaves, strict=True)
            if isinstance(o, torch.Tensor) and n is not o
        )
        return
    for key, o, n in items:
        if type(o) is torch.Tensor and type(n) is torch.Tensor:  # the common case, inline
            if n is not o:
                if _differs(o, n):
                    raise _structure_error((*path, key), o, n)
                out.append((o, n))
        else:
            _pair_up(o, n, (*path, key), out)


def _differs(old: torch.Tensor, new: torch.Tensor) -> bool:
    """Whether ``new`` cannot be written into ``old``: another dtype, shape or device (a
    copy would cast or broadcast it silently)."""
    return old.dtype != new.dtype or old.shape != new.shape or old.device != new.device


def _structure_error(path: tuple, old: Any, new: Any) -> StepError:
    where = _STATE_PARTS[path[0]] + "".join(f"[{k!r}]" for k in path[1:]) if path else "state"
    return StepError(
        "donate=True needs the step to return a state of the structure, dtypes and shapes it "
        "was given: at "
        f"{where} it got {describe(new)}, expected {describe(old)}. Make the optimizer keep "
        "its state's structure, or compile without donate."
    )


def _input_guards(fn: Callable) -> Callable[[list], list[bool]]:
    """A ``guard_filter_fn`` keeping the guards on ``fn``'s arguments and on global state
    (grad mode, autocast, ...: the guards without a source), dropping those on its closure
    and globals."""
    import inspect

    args = set(inspect.signature(fn).parameters)

    def keep(entries: list) -> list[bool]:
        return [not e.name or _root_name(e.name) in args for e in entries]

    return keep


def _root_name(source: str) -> str:
    """``"params['fc.weight']"`` -> ``"params"``; ``"opt_state[0].mu"`` -> ``"opt_state"``."""
    end = len(source)
    for i, ch in enumerate(source):
        if not (ch.isalnum() or ch == "_"):
            end = i
            break
    return source[:end]


def _prepare_cudagraph_call(state_parts: tuple) -> None:
    """Before a CUDA-graph call: mark the state's tensors static (their addresses are the
    graph's inputs; unguarded, so a new state re-records the graph rather than recompiling)
    and start a new step, so the previous call's outputs may be overwritten."""
    for t in tree_leaves(state_parts):
        if isinstance(t, torch.Tensor) and not hasattr(t, "_dynamo_static_input_type"):
            torch._dynamo.mark_static_address(t, guard=False)
    torch.compiler.cudagraph_mark_step_begin()


def _saved_tensor_hooks_enabled() -> bool:
    return torch._C._autograd._saved_tensors_hooks_is_enabled()


def _lazy_copies(tensors: dict) -> dict:
    """``tensors`` with each plain tensor replaced by a copy-on-write view of it
    (``torch._lazy_clone``): the same values and storage, copied only when written (the
    writer gets the copy). Tensors whose storage torch cannot share so (numpy-backed,
    shared-memory, memory-mapped) are copied; subclasses are passed as they are."""
    if _lazy_clone is None:
        return tensors
    return {k: _lazy_copy(v) for k, v in tensors.items()}


def _lazy_copy(t: Any) -> Any:
    if type(t) is not torch.Tensor or t.layout != torch.strided:
        return t
    try:
        return _lazy_clone(t)
    except RuntimeError:  # a storage with its own deleter (from_numpy, share_memory_, mmap)
        return t.clone()  # (only on the calls that guard: the first, and after a write)


_lazy_clone = getattr(torch, "_lazy_clone", None)  # torch >= 2.3


def _named(trees: tuple) -> list[tuple[str, Any]]:
    """The ``(name, tensor)`` pairs of the params and buffers dicts ``trees``."""
    return [(k, v) for tree in trees for k, v in tree.items() if isinstance(v, torch.Tensor)]


def _version(t: torch.Tensor) -> int:
    """``t``'s version counter (bumped by every in-place write); -1 for an inference
    tensor, which has none."""
    return -1 if t.is_inference() else t._version


def _versions(trees: tuple) -> list[int]:
    """:func:`_version` of each tensor of :func:`_named` (inlined: it runs every call)."""
    return [
        -1 if t.is_inference() else t._version
        for tree in trees
        for t in tree.values()
        if isinstance(t, torch.Tensor)
    ]


def _clone_metrics(metrics: Metrics) -> Metrics:
    return {k: v.clone() for k, v in metrics.items()}


def _fresh_code(fn: Callable) -> Callable:
    """A copy of ``fn`` with its own code object. Dynamo caches compiled graphs per code
    object, so without this every step built by ``train_step`` would share one cache (and
    its recompile limit) across models."""
    import types

    copy = types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy
