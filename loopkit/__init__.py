"""loopkit: a functional, compiled training loop for PyTorch.

opt = optim.adamw(lr=3e-4)
state = TrainState.create(model, opt, seed=0)
step = train_step(model, loss_fn, opt, compile=True)   # pure
state, metrics = step(state, batch)
state = fit(step, state, loader, epochs=10, hooks=[...])
"""

__version__ = "0.1.0"

from loopkit import (
    checkpoint,
    data,
    distributed,
    ensemble,
    hooks,
    optim,
    precision,
    privacy,
    tree,
)
from loopkit.driver import Hook, Loop, evaluate, fit
from loopkit.ensemble import ensemble_step
from loopkit.errors import CompileError, LossError, StepError
from loopkit.privacy import dp_train_step, per_sample_grads
from loopkit.rng import rng_for, rng_scope
from loopkit.state import TrainState
from loopkit.step import EvalStep, Net, TrainStep, eval_step, train_step
from loopkit.step import compile_step as compile

__all__ = [
    "CompileError",
    "EvalStep",
    "Hook",
    "Loop",
    "LossError",
    "Net",
    "StepError",
    "TrainState",
    "TrainStep",
    "checkpoint",
    "compile",
    "data",
    "distributed",
    "dp_train_step",
    "ensemble",
    "ensemble_step",
    "eval_step",
    "evaluate",
    "fit",
    "hooks",
    "optim",
    "per_sample_grads",
    "precision",
    "privacy",
    "rng_for",
    "rng_scope",
    "train_step",
    "tree",
]
