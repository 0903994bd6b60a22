"""Reading and changing the learning rates held in an optimizer state.

Every optimizer built from :func:`~loopkit.optim.scale_by_learning_rate` (and ASGD and
Adafactor, whose lr enters their update directly) keeps its current lr in its state as a
float64 tensor. These helpers find those tensors wherever they are nested
(chains are tuples, parameter groups are dicts) and return a new state with them replaced;
the input state is not modified.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from loopkit.optim.transforms import AdafactorState, AsgdState, ScaleByLearningRateState

# The states that hold an lr (a float64 tensor in their ``lr`` field).
_LR_STATES = (ScaleByLearningRateState, AsgdState, AdafactorState)


def _map(state: Any, fn: Callable[[Any], Any]) -> Any:
    if isinstance(state, _LR_STATES):
        return fn(state)
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return type(state)(*(_map(s, fn) for s in state))
    if isinstance(state, tuple):
        return tuple(_map(s, fn) for s in state)
    if isinstance(state, dict):
        return {k: _map(v, fn) for k, v in state.items()}
    return state


def learning_rates(opt_state: Any) -> list[torch.Tensor]:
    """The current lr of every ``scale_by_learning_rate`` in ``opt_state`` (in order)."""
    found: list[torch.Tensor] = []

    def collect(s: Any) -> Any:
        found.append(s.lr)
        return s

    _map(opt_state, collect)
    return found


def set_learning_rate(opt_state: Any, lr: float | Callable[[torch.Tensor], Any]) -> Any:
    """A copy of ``opt_state`` with every lr set to ``lr``, or to ``lr(current)`` if it is a
    function (``lambda lr: lr * 0.1`` scales them). Only optimizers built with a number lr
    read it back; a schedule recomputes its lr from the step count at the next update."""
    if not learning_rates(opt_state):
        raise ValueError(
            "this optimizer state holds no learning rate (Rprop, like torch's, uses its lr "
            "only as the initial step size)"
        )

    def replace(s: Any) -> Any:
        new = lr(s.lr) if callable(lr) else lr
        return s._replace(lr=torch.as_tensor(new, dtype=torch.float64, device=s.lr.device))

    return _map(opt_state, replace)
