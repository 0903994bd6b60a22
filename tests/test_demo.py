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
    result = demo.main(epochs=8, out=str(tmp_path / "run"), fast=True)
    assert result["accuracy"] > 0.9
    out = capsys.readouterr().out
    assert "val/acc" in out and "speed: compiled loopkit step" in out
    ckpt = lk.checkpoint.latest(tmp_path / "run")
    assert ckpt is not None
    restored = lk.checkpoint.load(ckpt, like=result["state"])
    for a, b in zip(
        lk.tree.tree_leaves(restored), lk.tree.tree_leaves(result["state"]), strict=True
    ):
        assert a.dtype == b.dtype and a.shape == b.shape
