"""Functional optimizers at torch.optim parity, composable like optax.

Every optimizer is a :class:`Transform` ``(init, update)``; ``chain`` composes them and
``apply_updates`` adds the result to the params. See :mod:`loopkit.optim.transforms` for the
building blocks and :mod:`loopkit.optim.schedules` for learning-rate schedules.
"""

from loopkit.optim import schedules
from loopkit.optim.aliases import adam, adamw, sgd
from loopkit.optim.base import Transform, apply_updates, chain, identity
from loopkit.optim.transforms import (
    add_decayed_weights,
    clip_by_global_norm,
    global_norm,
    negate,
    scale_by_adam,
    scale_by_learning_rate,
    trace,
)

__all__ = [
    "Transform",
    "add_decayed_weights",
    "adam",
    "adamw",
    "apply_updates",
    "chain",
    "clip_by_global_norm",
    "global_norm",
    "identity",
    "negate",
    "scale_by_adam",
    "scale_by_learning_rate",
    "schedules",
    "sgd",
    "trace",
]
