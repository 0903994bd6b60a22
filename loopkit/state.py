"""TrainState: everything a training step reads and writes, as one pytree of tensors."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from loopkit.optim.base import Transform
from loopkit.rng import RngState, rng_for


@dataclasses.dataclass(frozen=True)
class TrainState:
    """The state of a training run.

    - ``params``: the trainable parameters, ``{name: tensor}`` keyed like
      ``model.named_parameters()`` (those with ``requires_grad=True``).
    - ``buffers``: ``model.named_buffers()`` (BatchNorm statistics, ...) plus any parameter
      with ``requires_grad=False``: tensors the model needs that the optimizer never updates.
    - ``opt_state``: the optimizer's state (``optimizer.init(params)``).
    - ``step``: the number of training steps taken, an int64 tensor on the params' device.
    - ``rng``: the generator states random ops (Dropout) draw from, see :mod:`loopkit.rng`.

    It is registered with torch's pytree, so ``torch.func``, ``torch.compile`` and the
    ``loopkit.tree`` helpers see through it. It is immutable: use :meth:`replace`.
    """

    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    opt_state: Any
    step: torch.Tensor
    rng: RngState

    @classmethod
    def create(cls, model: nn.Module, optimizer: Transform, *, seed: int = 0) -> TrainState:
        """Copy ``model``'s tensors into a new state (the module is neither mutated nor
        aliased) and initialise the optimizer; ``seed`` seeds ``rng``."""
        params: dict[str, torch.Tensor] = {}
        buffers: dict[str, torch.Tensor] = {}
        for name, p in model.named_parameters():
            if p.layout != torch.strided:
                raise TypeError(
                    f"parameter {name!r} is {p.layout}; loopkit trains dense (strided) "
                    "tensors only. Convert it with .to_dense()."
                )
            if p.requires_grad and not p.is_floating_point():
                raise TypeError(
                    f"parameter {name!r} has dtype {p.dtype}; only real floating-point "
                    "parameters can be trained. Convert it (e.g. model.float()) or set "
                    "requires_grad=False to keep it fixed."
                )
            (params if p.requires_grad else buffers)[name] = p.detach().clone()
        for name, b in model.named_buffers():
            buffers[name] = b.detach().clone()
        devices = {t.device for t in (*params.values(), *buffers.values())}
        step_device = next(iter(params.values())).device if params else torch.device("cpu")
        return cls(
            params=params,
            buffers=buffers,
            opt_state=optimizer.init(params),
            step=torch.zeros((), dtype=torch.int64, device=step_device),
            rng=rng_for(seed, devices),
        )

    def replace(self, **changes: Any) -> TrainState:
        """A copy with the given fields replaced."""
        return dataclasses.replace(self, **changes)


_FIELDS = [f.name for f in dataclasses.fields(TrainState)]
pytree.register_pytree_node(
    TrainState,
    lambda s: ([getattr(s, f) for f in _FIELDS], None),
    lambda children, _: TrainState(*children),
    serialized_type_name="loopkit.TrainState",
    flatten_with_keys_fn=lambda s: ([(pytree.GetAttrKey(f), getattr(s, f)) for f in _FIELDS], None),
)
