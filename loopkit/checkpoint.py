"""Atomic checkpoints of a TrainState: write to a temporary file, fsync, rename.

A checkpoint is a ``torch.save`` of ``{"format", "state": {path: tensor}, "metadata"}``,
where ``path`` names each leaf of the state (``.params['fc.weight']``, ``.opt_state[1]...``)
and ``metadata`` is a JSON string (versions, time, the caller's metrics).
Loading uses ``torch.load(weights_only=True)`` (a checkpoint never runs code) and checks
every leaf against the state it is loaded into, so a checkpoint of another model or
optimizer fails with the mismatched names and shapes instead of loading wrongly.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from loopkit.state import TrainState
from loopkit.tree import flatten_with_names, tree_unflatten

FORMAT = "loopkit.checkpoint/1"
SUFFIX = ".ckpt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the given state."""


def _fsync_dir(directory: Path) -> None:
    if os.name == "posix":
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save(path: str | os.PathLike, state: TrainState, metadata: dict | None = None) -> Path:
    """Write ``state`` to ``path`` atomically: a reader sees the old file or the new one,
    never a partial write. Returns the path."""
    from loopkit import __version__

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    leaves, _ = flatten_with_names(state)
    meta = {"loopkit": __version__, "torch": str(torch.__version__), "time": time.time()}
    try:
        meta_json = json.dumps({**(metadata or {}), **meta})
    except TypeError as e:
        raise TypeError(
            f"checkpoint metadata must be JSON-serialisable (numbers, strings, lists, dicts): {e}"
        ) from e
    payload = {"format": FORMAT, "state": leaves, "metadata": meta_json}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def read(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's contents, ``{"format", "state", "metadata"}``, loaded with
    ``weights_only=True``."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {path} is unreadable (truncated or corrupt?): {e}"
        ) from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a loopkit checkpoint (expected format {FORMAT})")
    return {**payload, "metadata": json.loads(payload["metadata"])}


def _is_rng(name: str) -> bool:
    return name.startswith(".rng[")


def load(path: str | os.PathLike, like: TrainState) -> TrainState:
    """Load the checkpoint at ``path`` into a state shaped like ``like`` (same model and
    optimizer); each tensor goes to the device of its counterpart in ``like``.

    Generator states are per device (``rng['cpu']``, ``rng['cuda:0']``): a device's state
    that the checkpoint lacks keeps ``like``'s (e.g. a CPU checkpoint resumed on a GPU),
    and one that ``like`` has no device for is dropped. Everything else must match."""
    saved = read(path)["state"]
    want, spec = flatten_with_names(like)
    problems = [f"missing {k}" for k in want if k not in saved and not _is_rng(k)]
    problems += [f"unexpected {k}" for k in saved if k not in want and not _is_rng(k)]
    for k, ref in want.items():
        got = saved.get(k)
        if isinstance(ref, torch.Tensor) and isinstance(got, torch.Tensor):
            if got.shape != ref.shape or got.dtype != ref.dtype:
                problems.append(
                    f"{k}: checkpoint has {got.dtype}{list(got.shape)}, "
                    f"state has {ref.dtype}{list(ref.shape)}"
                )
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CheckpointError(
            f"checkpoint {path} does not match this state (another model or optimizer?):\n"
            f"  {shown}{more}\nBuild the state with the same model and optimizer as the run "
            "that wrote the checkpoint."
        )

    def restored(name: str, ref: Any) -> Any:
        if name not in saved:  # only generator states of devices the checkpoint lacks
            return ref
        value = saved[name]
        return value.to(ref.device) if isinstance(ref, torch.Tensor) else value

    return tree_unflatten([restored(k, ref) for k, ref in want.items()], spec)


def checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Committed checkpoints in ``directory``, oldest first (temporary files are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob(f"*{SUFFIX}") if not p.name.startswith("."))


def latest(directory: str | os.PathLike) -> Path | None:
    """The newest committed checkpoint in ``directory``, or None."""
    found = checkpoints(directory)
    return found[-1] if found else None
