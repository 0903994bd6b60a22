"""The demo (make demo) in its fast form."""

import importlib.util
import sys
from pathlib import Path

import pytest

import loopkit as lk

pytestmark = pytest.mark.compile


def test_demo_trains_digits_to_high_accuracy(tmp_path, capsys, monkeypatch):
    path = Path(__file__).parents[1] / "examples" / "digits_mlp.py"
    spec = importlib.util.spec_from_file_location("digits_mlp", path)
    demo = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "digits_mlp", demo)  # dynamo resolves globals through it
    spec.loader.exec_module(demo)
    run = tmp_path / "run"
    stale = run / "step-000009999"  # an earlier run's newer checkpoint in the same directory
    stale.mkdir(parents=True)
    (stale / lk.checkpoint.MARKER).write_text("{}")
    result = demo.main(epochs=8, out=str(run), fast=True)
    assert result["accuracy"] > 0.9
    out = capsys.readouterr().out
    assert "val/acc" in out and "speed: compiled loopkit step" in out
    ckpt = result["checkpoint"]  # in a directory of its own, not beside an earlier run's
    assert ckpt == run / "run-1" / f"step-{int(result['state'].step):09d}"
    assert lk.checkpoint.latest(ckpt.parent) == ckpt
    assert f"checkpoint {ckpt};" in out
    restored = lk.checkpoint.load(ckpt, like=result["state"])
    for a, b in zip(
        lk.tree.tree_leaves(restored), lk.tree.tree_leaves(result["state"]), strict=True
    ):
        assert a.dtype == b.dtype and a.shape == b.shape
