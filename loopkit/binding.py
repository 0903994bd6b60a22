"""Calling a module with given params and buffers: ``functional_call``, resolved once.

``torch.func.functional_call(module, tensors, args)`` finds, at every call, where each
named tensor lives (walking the module tree, untying shared tensors, checking names), swaps
the given tensors in, runs the forward and swaps the module's own back. That lookup costs
~110 µs per call of a 3-layer MLP -- 5% of its eager training step -- and Dynamo traces it
at every compile (0.6 s of the same step's trace). :class:`ModuleBinding` does the lookup
once, when a step is built, and keeps it while the module's structure is unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from loopkit.errors import StepError

Slot = tuple[dict, str]  # a module's ``_parameters`` or ``_buffers`` dict, and a name in it


class ModuleBinding:
    """``binding(tensors, args, kwargs)`` is ``functional_call(module, tensors, args,
    kwargs)`` (``tie_weights=True``, ``strict=False``): each given tensor replaces the
    module's tensor of that name -- every name of a shared (tied) tensor -- for the call;
    names not given keep the module's own; afterwards ``tensors`` holds what the forward
    left in each slot (a buffer it reassigned) and the module is as it was.

    Where each name lives is looked up when the binding is made. Before each call it checks
    that the module tree and its tensors are still those it saw (identity checks, a few µs)
    and looks them up again if not. A name that is no param or buffer of the module, or two
    names of one tied tensor given different values, go to ``functional_call`` itself (its
    semantics, its errors). Unlike torch 2.13's ``functional_call``, it also restores a
    submodule that appears at several places in the tree (whose tensors that one leaves
    swapped).

    The first call after each look-up also checks that the forward registered no param or
    buffer that is not given (a counter made on the first call, a ``None`` slot filled):
    such a tensor would stay in the module, outside the caller's state. It raises a
    :class:`~loopkit.errors.StepError` and leaves the module as it was.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self._holding = 0  # how many holding() blocks are open
        self._resolve()

    def _resolve(self) -> None:
        root = self.module
        modules = list(root.modules())
        # TorchScript modules keep their tensors elsewhere; functional_call refuses them
        # (and DataParallel) with a clear error: such a module always goes there.
        self._plain = not isinstance(root, nn.DataParallel) and all(
            not isinstance(m, torch.jit.ScriptModule) and type(store) is dict
            for m in modules
            for store in (m._modules, m._parameters, m._buffers)
        )
        # What _intact compares: every module's three dicts (the objects, and each entry
        # by identity, None slots included), so a replaced, added or removed submodule,
        # param or buffer is seen.
        self._holders = [(m, m._modules, m._parameters, m._buffers) for m in modules]
        self._stores = [
            (store, dict(store))
            for m in modules
            for store in (m._modules, m._parameters, m._buffers)
            if self._plain
        ]
        self._slots: dict[str, list[Slot]] = {}  # name -> every slot of its tensor
        self._own: dict[str, Slot] = {}  # name -> the slot the name itself denotes
        self._unchecked = True  # the next call checks what its forward registers
        self._group: dict[str, int] = {}  # name -> index of its tensor (tied names share one)
        if not self._plain:
            return
        by_tensor: dict[int, int] = {}
        slots: list[list[Slot]] = []
        for prefix, m in root.named_modules(remove_duplicate=False):
            for store in (m._parameters, m._buffers):
                for attr, t in store.items():
                    if t is None:
                        continue
                    group = by_tensor.setdefault(id(t), len(slots))
                    if group == len(slots):
                        slots.append([])
                    if not any(s is store and a == attr for s, a in slots[group]):
                        slots[group].append((store, attr))
                    name = f"{prefix}.{attr}" if prefix else attr
                    self._slots[name], self._group[name] = slots[group], group
                    self._own[name] = (store, attr)

    def _intact(self) -> bool:
        """Whether the module tree and its tensors are still the ones resolved."""
        for m, modules, params, buffers in self._holders:
            if m._modules is not modules or m._parameters is not params:
                return False
            if m._buffers is not buffers:
                return False
        for store, seen in self._stores:
            if len(store) != len(seen):
                return False
            for key, value in seen.items():
                if store.get(key, _MISSING) is not value:
                    return False
        return True

    def __call__(self, tensors: dict[str, Any], args: tuple, kwargs: dict) -> Any:
        plan = self._plan(tensors)
        if plan is None:
            return functional_call(self.module, tensors, args, kwargs)
        saved: list = []
        try:
            self._swap_in(plan, saved)
            out = self.module(*args, **kwargs)
        finally:
            self._swap_out(tensors, plan, saved)
        if self._unchecked and not torch.compiler.is_compiling():
            self._check_registered(tensors)
            self._unchecked = False
        return out

    def _check_registered(self, given: dict[str, Any]) -> None:
        """Raise (restoring the module's dicts) if the forward registered a param or buffer
        that was not there when resolved and is not in ``given``."""
        if self._intact():
            return
        module = self.module
        new = [
            name
            for named in (module.named_parameters(), module.named_buffers())
            for name, _ in named
            if name not in self._own and name not in given
        ]
        if not new:
            return
        for store, seen in self._stores:
            store.clear()
            store.update(seen)
        raise StepError(
            f"the model's forward registered {new[:5]}, which the state does not hold: it "
            "would stay in the module, so the step would not be pure (the same state giving "
            "other results, a checkpoint missing it). Run one forward before "
            "lk.TrainState.create (e.g. model(example_input)), so the state holds it."
        )

    @contextlib.contextmanager
    def holding(self, tensors: dict[str, Any]) -> Iterator[bool]:
        """Within the block the module holds ``tensors`` (as a call does) and ``True`` is
        yielded; afterwards ``tensors`` holds what the block left in each name's slot and
        the module is as it was. Where only ``functional_call`` applies (see the class
        docstring) nothing is swapped and ``False`` is yielded. For right after a call,
        which checked that the module is as resolved (not for compiled code: Dynamo would
        trace the generator)."""
        plan = self._plan(tensors, check=False)
        if plan is None:
            yield False
            return
        saved: list = []
        try:
            self._swap_in(plan, saved)
            self._holding += 1
            yield True
        finally:
            self._holding -= 1
            self._swap_out(tensors, plan, saved)

    @staticmethod
    def _swap_in(plan: list, saved: list) -> None:
        for _, slots, value in plan:
            for store, attr in slots:
                saved.append((store, attr, store[attr]))
                store[attr] = value

    def _swap_out(self, tensors: dict[str, Any], plan: list, saved: list) -> None:
        for name, _, _ in plan:
            store, attr = self._own[name]
            tensors[name] = store.get(attr)
        for store, attr, old in reversed(saved):
            store[attr] = old

    def _plan(self, tensors: dict[str, Any], check: bool = True) -> list | None:
        """``(name, slots, value)`` for each given tensor, or None where the binding does
        not apply. ``check=False`` skips checking that the module is as resolved (a
        ``holding`` block right after a call, which checked)."""
        # While held, the slots hold given tensors, not the resolved ones: a call then (a
        # recomputation in the backward) is as valid as the block's own swap.
        if check and not self._holding and not self._intact():
            if torch.compiler.is_compiling():  # resolving traces slowly: let torch do it
                return None
            self._resolve()
        if not self._plain:
            return None
        plan, claimed = [], {}
        for name, value in tensors.items():
            group = self._group.get(name)
            if group is None or claimed.get(group, value) is not value:
                return None
            claimed[group] = value
            plan.append((name, self._slots[name], value))
        return plan


_MISSING = object()
