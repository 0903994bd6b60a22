"""Functional optimizers at torch.optim parity, composable like optax.

Every optimizer is a :class:`Transform` ``(init, update)``; ``chain`` composes them and
``apply_updates`` adds the result to the params (``apply_gradients`` does both, with torch's
fused kernel for eager Adam and AdamW: :mod:`loopkit.optim.fused`). See
:mod:`loopkit.optim.transforms` for the building blocks and :mod:`loopkit.optim.schedules`
for learning-rate schedules.
:func:`inject_hyperparams` keeps an optimizer's hyperparameters as tensors in its state
(:func:`hyperparams` reads them, :func:`set_hyperparams` changes them).
"""

from loopkit.optim import schedules
from loopkit.optim.aliases import (
    adadelta,
    adafactor,
    adagrad,
    adam,
    adamax,
    adamw,
    asgd,
    muon,
    nadam,
    radam,
    rmsprop,
    rprop,
    sgd,
)
from loopkit.optim.base import (
    Transform,
    apply_gradients,
    apply_updates,
    chain,
    identity,
    with_apply,
)
from loopkit.optim.hyperparams import (
    InjectState,
    hyperparams,
    inject_hyperparams,
    learning_rates,
    set_hyperparams,
    set_learning_rate,
)
from loopkit.optim.transforms import (
    adafactor_update,
    add_decayed_weights,
    asgd_update,
    clip_by_global_norm,
    clip_by_value,
    global_norm,
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
from loopkit.optim.wrappers import (
    accumulate,
    averaged_params,
    ema,
    freeze,
    masked,
    multi_transform,
    set_to_zero,
    swa,
)

__all__ = [
    "InjectState",
    "Transform",
    "accumulate",
    "adadelta",
    "adafactor",
    "adafactor_update",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "add_decayed_weights",
    "apply_gradients",
    "apply_updates",
    "asgd",
    "asgd_update",
    "averaged_params",
    "chain",
    "clip_by_global_norm",
    "clip_by_value",
    "ema",
    "freeze",
    "global_norm",
    "hyperparams",
    "identity",
    "inject_hyperparams",
    "learning_rates",
    "masked",
    "multi_transform",
    "muon",
    "nadam",
    "negate",
    "radam",
    "rmsprop",
    "rprop",
    "scale_by_adadelta",
    "scale_by_adagrad",
    "scale_by_adam",
    "scale_by_adamax",
    "scale_by_learning_rate",
    "scale_by_muon",
    "scale_by_nadam",
    "scale_by_radam",
    "scale_by_rms",
    "scale_by_rprop",
    "schedules",
    "set_hyperparams",
    "set_learning_rate",
    "set_to_zero",
    "sgd",
    "swa",
    "trace",
    "with_apply",
]
