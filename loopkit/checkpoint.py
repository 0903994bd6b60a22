"""Atomic, verified checkpoints of a TrainState.

A checkpoint is a directory::

    step-000000100/
        state.pt     torch.save({"format", "state": {path: tensor}, "extra", "metadata"})
        COMMITTED    JSON {"format", "sha256", "bytes"} of state.pt, written last

``path`` names each leaf of the state (``.params['fc.weight']``, ``.opt_state[1]...``),
``extra`` holds what the driver needs to resume (data position, hook states: tensors and
plain containers only) and ``metadata`` is a JSON string (versions, time, the caller's
metrics).

Writing goes to a hidden temporary directory: ``state.pt`` is written, flushed and fsynced,
then the ``COMMITTED`` marker with its checksum, then the directory is renamed into place
and its parent fsynced. Listings only show directories with a marker, so a checkpoint
whose writer died part-way is never offered, and a file truncated or altered afterwards
fails its checksum (:class:`CorruptCheckpointError`). Loading uses
``torch.load(weights_only=True)``: a checkpoint never runs code. Every leaf is checked
against the state it is loaded into, so a checkpoint of another model or optimizer fails
with the mismatched names and shapes (:class:`CheckpointError`) instead of loading wrongly;
optimizers whose states have the same layout (Adam and RAdam) cannot be told apart, as with
torch.optim's ``load_state_dict``.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch

from loopkit.state import TrainState
from loopkit.tree import flatten_with_names, tree_unflatten

FORMAT = "loopkit.checkpoint/2"
STATE_FILE = "state.pt"
MARKER = "COMMITTED"
_STEP_NAME = re.compile(r"step-(\d+)(?:-(\d+))?")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the given state."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint that is incomplete, damaged or not a plain-tensor checkpoint."""


class NotACheckpointError(CheckpointError):
    """A path that is no checkpoint at all: a file, or a directory with neither a state
    file nor a commit marker (such as a run directory holding ``step-*`` checkpoints)."""


def _fsync_dir(directory: Path) -> None:
    if os.name == "posix":
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _hidden(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _metadata_json(metadata: dict | None) -> str:
    from loopkit import __version__

    meta = {"loopkit": __version__, "torch": str(torch.__version__), "time": time.time()}
    try:
        return json.dumps({**(metadata or {}), **meta})
    except TypeError as e:
        raise TypeError(
            f"checkpoint metadata must be JSON-serialisable (numbers, strings, lists, dicts): {e}"
        ) from e


def save(
    path: str | os.PathLike,
    state: TrainState,
    metadata: dict | None = None,
    *,
    extra: dict | None = None,
) -> Path:
    """Write ``state`` as the checkpoint directory ``path``; a reader never sees a partial
    checkpoint there. ``extra`` (tensors and plain containers) is stored alongside for
    :func:`read`. Returns ``path``.

    A new name appears atomically: a reader finds nothing there, then the whole new
    checkpoint. Replacing an existing name is not atomic (a non-empty directory cannot be
    renamed over another): the old checkpoint is renamed aside, then the new one renamed
    in, so between the two renames a reader finds no checkpoint at ``path`` (never a
    partial one). If the process dies in that window the name stays missing, the old copy
    is in a hidden ``.<name>.old-*`` directory (:func:`clean_temporaries` puts it back)
    and every other checkpoint is intact. ``hooks.Checkpoint`` never replaces a name, so a
    training run never opens that window."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "state": flatten_with_names(state)[0],
        "extra": extra or {},
        "metadata": _metadata_json(metadata),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    marker = {"format": FORMAT, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    tmp = _hidden(path, "tmp")
    old = None
    try:
        tmp.mkdir()
        _write_synced(tmp / STATE_FILE, data)
        _write_synced(tmp / MARKER, json.dumps(marker).encode())
        _fsync_dir(tmp)
        if path.exists():
            old = _hidden(path, "old")
            os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            if old is not None:
                os.rename(old, path)
                old = None
            raise
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def remove(path: str | os.PathLike) -> None:
    """Delete a checkpoint: it is renamed to a hidden name first (so it is never listed
    half-deleted), then removed."""
    path = Path(path)
    if not path.exists():
        return
    trash = _hidden(path, "del")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def read(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's contents, ``{"format", "state", "extra", "metadata"}``, after checking
    its commit marker and checksum, loaded with ``weights_only=True``.

    Raises :class:`NotACheckpointError` for a file, or a directory with neither
    ``state.pt`` nor the marker (a run directory: see :func:`read_latest`), and
    :class:`CorruptCheckpointError` for a checkpoint that is uncommitted (its ``state.pt``
    without the marker), truncated, altered, or holds anything but tensors and plain
    containers (such as pickled code)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}{_moved_aside_hint(path)}")
    _require_checkpoint_directory(path)
    try:
        marker = json.loads((path / MARKER).read_text())
        expected, size = marker["sha256"], marker["bytes"]
    except FileNotFoundError:
        raise CorruptCheckpointError(
            f"checkpoint {path} has no {MARKER} marker: its writer was interrupted before it "
            "finished, so it is incomplete"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"checkpoint {path} has a damaged {MARKER} marker: {e}") from e
    try:
        data = (path / STATE_FILE).read_bytes()
    except OSError as e:
        raise CorruptCheckpointError(f"checkpoint {path}: cannot read {STATE_FILE}: {e}") from e
    if len(data) != size or hashlib.sha256(data).hexdigest() != expected:
        raise CorruptCheckpointError(
            f"checkpoint {path} is corrupt: {STATE_FILE} ({len(data)} bytes) does not match the "
            f"checksum committed with it ({size} bytes); it was truncated or altered"
        )
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CorruptCheckpointError(
            f"checkpoint {path} was refused by torch.load(weights_only=True), which loads only "
            f"tensors and plain containers and never runs code: {e}"
        ) from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CorruptCheckpointError(
            f"{path} is not a loopkit checkpoint (expected format {FORMAT})"
        )
    try:
        metadata = json.loads(payload["metadata"])
        for part in ("state", "extra"):
            if not isinstance(payload[part], dict):
                raise TypeError(f"its {part} is a {type(payload[part]).__name__}, not a dict")
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptCheckpointError(
            f"checkpoint {path} has format {FORMAT} but not its contents ({e!r}): another "
            "program wrote it"
        ) from e
    return {**payload, "metadata": metadata}


def _moved_aside_hint(path: Path) -> str:
    """For a missing ``path`` whose old copy a killed :func:`save` left hidden, what to do."""
    aside = path.parent.glob(f".{glob.escape(path.name)}.old-*") if path.parent.is_dir() else ()
    if not any(_HIDDEN.fullmatch(p.name) for p in aside):
        return ""
    return (
        f": a save over it was interrupted and left the old one in .{path.name}.old-*; "
        f"loopkit.checkpoint.clean_temporaries({str(path.parent)!r}) puts it back"
    )


def _require_checkpoint_directory(path: Path) -> None:
    """Raise :class:`NotACheckpointError` unless ``path`` is a directory holding a state
    file or a marker (a checkpoint, complete or not), naming what to call instead."""
    what = (
        f"a loopkit checkpoint (a directory with {STATE_FILE} and {MARKER}, as written by "
        "loopkit.checkpoint.save)"
    )
    if not path.is_dir():
        raise NotACheckpointError(f"{path} is a file, not {what}")
    if (path / STATE_FILE).exists() or (path / MARKER).exists():
        return
    found = checkpoints(path)
    if found:
        raise NotACheckpointError(
            f"{path} is a directory of {len(found)} checkpoints, not a checkpoint (the newest "
            f"is {found[-1].name}): name one, or take the newest with loopkit.checkpoint."
            "latest(directory) (load(latest(directory), like=state)) or the newest that "
            "reads correctly with read_latest(directory)"
        )
    raise NotACheckpointError(
        f"{path} is not {what}; for the newest checkpoint in a directory of checkpoints use "
        "loopkit.checkpoint.latest(directory) or read_latest(directory)"
    )


def _is_rng(name: str) -> bool:
    return name.startswith(".rng[")


def restore(saved: dict[str, Any], like: TrainState, source: Any = "checkpoint") -> TrainState:
    """The state whose leaves are ``saved`` (the ``"state"`` of :func:`read`), shaped like
    ``like``; each tensor goes to the device of its counterpart in ``like``.

    Generator states are per device (``rng['cpu']``, ``rng['cuda:0']``): a device's state
    that the checkpoint lacks keeps ``like``'s (e.g. a CPU checkpoint resumed on a GPU),
    and one that ``like`` has no device for is dropped. Everything else must match."""
    want, spec = flatten_with_names(like)
    problems = [f"missing {k}" for k in want if k not in saved and not _is_rng(k)]
    problems += [f"unexpected {k}" for k in saved if k not in want and not _is_rng(k)]
    for k, ref in want.items():
        if k not in saved:
            continue
        got = saved[k]
        if isinstance(ref, torch.Tensor) and isinstance(got, torch.Tensor):
            if got.shape != ref.shape or got.dtype != ref.dtype:
                problems.append(
                    f"{k}: checkpoint has {got.dtype}{list(got.shape)}, "
                    f"state has {ref.dtype}{list(ref.shape)}"
                )
        elif isinstance(ref, torch.Tensor) or isinstance(got, torch.Tensor):
            problems.append(  # a custom optimizer's number leaf where the other has a tensor
                f"{k}: checkpoint has {_kind(got)}, state has {_kind(ref)}"
            )
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CheckpointError(
            f"{source} does not match this state (another model or optimizer?):\n"
            f"  {shown}{more}\nBuild the state with the same model and optimizer as the run "
            "that wrote the checkpoint."
        )

    def restored(name: str, ref: Any) -> Any:
        if name not in saved:  # only generator states of devices the checkpoint lacks
            return ref
        value = saved[name]
        return value.to(ref.device) if isinstance(ref, torch.Tensor) else value

    return tree_unflatten([restored(k, ref) for k, ref in want.items()], spec)


def _kind(leaf: Any) -> str:
    if isinstance(leaf, torch.Tensor):
        return f"a tensor {leaf.dtype}{list(leaf.shape)}"
    return f"a Python {type(leaf).__name__}"


def load(path: str | os.PathLike, like: TrainState) -> TrainState:
    """Load the checkpoint at ``path`` into a state shaped like ``like`` (same model and
    optimizer); see :func:`restore`."""
    return restore(read(path)["state"], like, source=f"checkpoint {path}")


def step_of(path: Path) -> int | None:
    """The step in a ``step-<n>`` (or ``step-<n>-<version>``) checkpoint name, or None."""
    match = _STEP_NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def _order(path: Path) -> tuple[int, int]:
    match = _STEP_NAME.fullmatch(path.name)
    assert match is not None
    return int(match.group(1)), int(match.group(2) or 0)


def checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Committed ``step-<n>`` checkpoints in ``directory``, oldest first: by step, then by
    version (``step-<n>-<k>``, a later save at the same step). Uncommitted, temporary and
    half-deleted ones are not listed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [
        p
        for p in directory.iterdir()
        if step_of(p) is not None and p.is_dir() and (p / MARKER).exists()
    ]
    return sorted(found, key=_order)


def latest(directory: str | os.PathLike) -> Path | None:
    """The newest committed checkpoint in ``directory``, or None (it is not read: see
    :func:`read_latest` to skip damaged ones)."""
    found = checkpoints(directory)
    return found[-1] if found else None


def read_latest(directory: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """``(path, read(path))`` of the newest checkpoint in ``directory`` that reads
    correctly, or None if there is none. A damaged newer one is reported with a warning
    and skipped (never deleted); if every checkpoint is damaged, the error lists them."""
    errors = []
    for path in reversed(checkpoints(directory)):
        try:
            contents = read(path)
        except CorruptCheckpointError as e:
            errors.append(str(e))
            continue
        if errors:
            warnings.warn(
                f"skipped {len(errors)} damaged checkpoint(s); resuming from {path}:\n  "
                + "\n  ".join(errors),
                stacklevel=2,
            )
        return path, contents
    if errors:
        raise CorruptCheckpointError(
            f"every checkpoint in {directory} is damaged:\n  " + "\n  ".join(errors)
        )
    return None


_HIDDEN = re.compile(r"\.(.+)\.(tmp|old|del)-\d+-[0-9a-f]{8}")


def clean_temporaries(directory: str | os.PathLike) -> None:
    """Tidy what writers killed part-way left in ``directory``, for checkpoints of any name:
    temporary directories are removed, and a checkpoint moved aside for a replacement that
    never arrived is put back (or removed, if its name is taken). Call it only when no
    other process writes there."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        match = _HIDDEN.fullmatch(p.name)
        if match is None or not p.is_dir():
            continue
        original = directory / match.group(1)
        if match.group(2) == "old" and (p / MARKER).exists() and not original.exists():
            os.rename(p, original)
        else:
            shutil.rmtree(p, ignore_errors=True)
