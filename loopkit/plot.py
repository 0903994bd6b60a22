"""Training curves from a run's logs, as a PNG (matplotlib, the ``plot`` extra)."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any


def read_logs(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-epoch records a :class:`~loopkit.hooks.JSONLLogger` (``metrics.jsonl``) or
    :class:`~loopkit.hooks.CSVLogger` (``metrics.csv``) wrote in ``run_dir``."""
    run_dir = Path(run_dir)
    if (run_dir / "metrics.jsonl").exists():
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]
    if (run_dir / "metrics.csv").exists():
        with open(run_dir / "metrics.csv", newline="") as f:
            return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]
    raise FileNotFoundError(
        f"{run_dir} has no metrics.jsonl or metrics.csv: log the run with "
        "hooks.JSONLLogger(run_dir) or hooks.CSVLogger(run_dir)"
    )


def _number(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def curves(records: list[dict[str, Any]]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """``{metric: {prefix: [(step, value), ...]}}``: ``train/loss`` and ``val/loss`` are two
    curves of the panel ``loss``; keys without a prefix (``lr``) get a panel of their own."""
    panels: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for r in records:
        for key, value in r.items():
            if key in ("epoch", "step") or not isinstance(value, int | float):
                continue
            if isinstance(value, bool) or not math.isfinite(value):
                continue
            prefix, _, name = key.rpartition("/")
            panels.setdefault(name, {}).setdefault(prefix or name, []).append(
                (float(r["step"]), float(value))
            )
    return panels


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw one panel per metric (train and validation together) against the step and
    save it to ``out`` (default ``run_dir/curves.png``). Returns the path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("loopkit plot needs matplotlib: pip install 'loopkit[plot]'") from e
    panels = curves(read_logs(run_dir))
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
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(out) if out is not None else Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
