"""Training curves from a run's logs, as a PNG (matplotlib, the ``plot`` extra)."""

from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path
from typing import Any

Points = list[tuple[float, float]]

# Prefixes that name where a metric was measured ("train/loss", "val/loss"); any other
# prefix logged next to train's metrics (a Validate(prefix="test") run) counts too.
SPLITS = ("train", "val")


def read_logs(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-epoch records a :class:`~loopkit.hooks.JSONLLogger` (``metrics.jsonl``) or
    :class:`~loopkit.hooks.CSVLogger` (``metrics.csv``) wrote in ``run_dir``."""
    run_dir = Path(run_dir)
    found = []
    if (run_dir / "metrics.jsonl").exists():
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        found.append([json.loads(line) for line in lines if line.endswith("}")])
    if (run_dir / "metrics.csv").exists():
        with open(run_dir / "metrics.csv", newline="") as f:
            found.append([{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)])
    if found:  # where both are there, the one with more records (JSONL on a tie)
        return max(found, key=len)
    raise FileNotFoundError(
        f"{run_dir} has no metrics.jsonl or metrics.csv: log the run with "
        "hooks.JSONLLogger(run_dir) or hooks.CSVLogger(run_dir)"
    )


def _number(text: str) -> float | list | None:
    """A CSV cell as a number, a list (an ensemble's per-member values), or None."""
    try:
        return float(text)
    except (TypeError, ValueError):
        pass
    try:  # CSVLogger writes a list as Python writes it: nan and inf are not JSON's
        value = json.loads(re.sub(r"\binf\b", "Infinity", re.sub(r"\bnan\b", "NaN", text)))
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, list) else None


def x_axis(records: list[dict[str, Any]]) -> str:
    """What the curves are drawn against: ``"step"`` if every record has one, else
    ``"epoch"`` if every record has one, else ``"record"`` (the record's index)."""
    for key in ("step", "epoch"):
        if records and all(isinstance(r.get(key), int | float) for r in records):
            return key
    return "record"


def _splits(keys: set[str]) -> set[str]:
    """The prefixes in ``keys`` that name a split: train, val, and any prefix that logs a
    metric train logs too."""
    train = {key.partition("/")[2] for key in keys if key.startswith("train/")}
    found = set(SPLITS)
    for key in keys:
        prefix, _, name = key.partition("/")
        if name and name in train:
            found.add(prefix)
    return found


def _panel_and_line(key: str, splits: set[str]) -> tuple[str, str]:
    """``train/loss`` -> panel ``loss``, line ``train``; ``lr/0`` -> panel ``lr``, line
    ``0`` (numbered members of one quantity: the lr of each parameter group); any other
    key (``lr``, ``time/epoch_s``) -> a panel of its own."""
    prefix, _, name = key.partition("/")
    if prefix in splits and name:
        return name, prefix
    if name.isdigit():
        return prefix, name
    return key, key


def _values(value: Any) -> list[tuple[str, float]]:
    """``[(suffix, number)]`` of a logged value: ``("", x)`` for a number, ``("[i]", x)``
    per member for a list (an ensemble's); non-finite and non-numeric values are left out."""
    if isinstance(value, list):
        return [(f"[{i}]{s}", x) for i, v in enumerate(value) for s, x in _values(v)]
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return [("", float(value))] if ok else []


def curves(records: list[dict[str, Any]]) -> dict[str, dict[str, Points]]:
    """``{panel: {line: [(x, value), ...]}}``, x as :func:`x_axis` says.

    ``train/loss`` and ``val/loss`` are the lines ``train`` and ``val`` of the panel
    ``loss`` (so are other splits logged next to train: ``test/loss``). Numbered keys are
    lines of one panel: ``lr/0`` and ``lr/1`` (LearningRateMonitor's lr per parameter
    group) of ``lr``. Any other key (``lr``, ``time/epoch_s``) gets a panel of its own.
    An ensemble's list (one value per member) gives one line per member: ``train[0]``,
    ``train[1]``, ..."""
    axis = x_axis(records)
    splits = _splits({key for r in records for key in r})
    panels: dict[str, dict[str, Points]] = {}
    for index, r in enumerate(records):
        x = float(index if axis == "record" else r[axis])
        for key, value in r.items():
            if key in ("epoch", "step"):
                continue
            panel, line = _panel_and_line(key, splits)
            for suffix, number in _values(value):
                panels.setdefault(panel, {}).setdefault(line + suffix, []).append((x, number))
    return panels


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw one panel per metric (train and validation together; see :func:`curves`)
    against the step (or the epoch, or the record's index, for logs without steps) and
    save it to ``out`` (default ``run_dir/curves.png``). Returns the path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("loopkit plot needs matplotlib: pip install 'loopkit[plot]'") from e
    records = read_logs(run_dir)
    panels, axis = curves(records), x_axis(records)
    if not panels:
        raise ValueError(f"the logs in {run_dir} hold no numeric metrics to plot")
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, lines) in zip(axes.flat, sorted(panels.items()), strict=False):
        for label, points in sorted(lines.items()):
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, label=label)
        ax.set_title(name)
        ax.set_xlabel(axis)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7 if len(lines) > 4 else None)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(out) if out is not None else Path(run_dir) / "curves.png"
    out = out if out.suffix else out.with_suffix(".png")  # what matplotlib writes then
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
