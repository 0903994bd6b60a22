"""Randomness as data: the generator states a step needs live in the TrainState.

Dropout and other random ops in torch draw from the global per-device generators. A step
makes that pure by *scoping*: it saves the caller's generator states, sets them from the
state's ``rng``, runs, reads the advanced states back into the new state, and restores the
caller's. The same ``rng`` therefore always produces the same masks, and a checkpoint that
holds ``rng`` resumes them exactly.

``rng_for(seed, devices)`` matches ``torch.manual_seed(seed)``: an imperative loop seeded
that way draws exactly the masks an eager loopkit step draws. A compiled step draws from
the same generators, so its masks are reproducible from the state too. On CPU inductor
keeps Dropout's ``bernoulli_`` as the eager kernel, so compiled masks equal eager's; on a
GPU inductor generates them with its own random kernels (and may reorder them), so there
compiled and eager runs with Dropout agree in distribution, not bitwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

RngState = dict[str, torch.Tensor]


def _device_key(device: torch.device) -> str:
    if device.type == "cpu":
        return "cpu"
    index = (
        device.index
        if device.index is not None
        else torch.get_device_module(device).current_device()
    )
    return f"{device.type}:{index}"


def _get(key: str) -> torch.Tensor:
    if key == "cpu":
        return torch.get_rng_state()
    kind, index = key.split(":")
    return torch.get_device_module(kind).get_rng_state(int(index))


def _set(key: str, value: torch.Tensor) -> None:
    value = value.cpu()  # generators take CPU byte tensors (a state moved with .to() is fine)
    if key == "cpu":
        torch.set_rng_state(value)
    else:
        kind, index = key.split(":")
        torch.get_device_module(kind).set_rng_state(value, int(index))


def rng_for(seed: int, devices: Iterable[torch.device] = ()) -> RngState:
    """Generator states for the CPU and each of ``devices``, as ``torch.manual_seed(seed)``
    would leave them. The caller's own generators are not touched."""
    out: RngState = {"cpu": torch.Generator().manual_seed(seed).get_state()}
    for device in devices:
        device = torch.device(device)
        if device.type != "cpu":
            out[_device_key(device)] = torch.Generator(device=device).manual_seed(seed).get_state()
    return out


def _seed_all(rng: RngState, seed: int) -> None:
    for key in rng:
        if key == "cpu":
            torch.manual_seed(seed)
        else:
            kind, index = key.split(":")
            with torch.get_device_module(kind).device(int(index)):
                torch.get_device_module(kind).manual_seed(seed)


@contextlib.contextmanager
def rng_scope(rng: RngState, fold: int | None = None) -> Iterator[RngState]:
    """Run the body with the global generators set from ``rng``; afterwards the yielded dict
    holds their advanced states and the caller's generators are as they were.

    With ``fold`` (a rank), one 62-bit number ``s`` is drawn from ``rng``'s CPU generator
    and the body runs with every generator seeded from ``(s, fold)``: each fold draws
    different numbers, and ``rng`` advances by that one draw whatever the body draws, the
    same for every fold (so data-parallel ranks keep one replicated state). A stacked
    ``rng`` (an ensemble state's) is a ValueError saying how to run it."""
    if any(getattr(v, "ndim", 1) != 1 for v in rng.values()):
        raise ValueError(
            "the state's rng holds stacked generator states: this is an ensemble state. Run "
            "it with lk.ensemble_step(step), or take one member with "
            "lk.ensemble.unstack(state)[k]"
        )
    saved = {key: _get(key) for key in rng}
    advanced: RngState = {}
    try:
        for key, value in rng.items():
            _set(key, value)
        if fold is not None:
            s = int(torch.randint(0, 2**62, ()))
            advanced.update({key: _get(key) for key in rng})
            _seed_all(rng, (s * 1_000_003 + fold) % 2**63)
        yield advanced
        if fold is None:
            advanced.update({key: _get(key) for key in rng})
    finally:
        for key, value in saved.items():
            _set(key, value)
