"""Smoke tests: every example runs in its --fast form and learns something."""

import importlib.util
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"


def load_example(name: str):
    """Import examples/<name>.py as a module (registered in sys.modules, which dynamo needs
    to resolve the example's globals)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_maml_fast(capsys):
    result = load_example("maml_sinusoid").main(iterations=30, meta_batch=5, fast=True)
    assert result["after"][1] < result["before"][1]
    assert "query MSE" in capsys.readouterr().out


def test_digits_cnn_fast(capsys):
    result = load_example("digits_cnn").main(epochs=1, compile=False)
    assert result["accuracy"] > 0.5


def test_dp_digits_fast(capsys):
    results = load_example("dp_digits").main(epochs=2)
    assert results["non-private SGD"] > 0.8 and results["DP-SGD"] > 0.3
    assert "DP-SGD: validation accuracy" in capsys.readouterr().out


def test_ensemble_sweep_fast(tmp_path, capsys):
    plot = tmp_path / "sweep.png"
    result = load_example("ensemble_sweep").main(members=4, epochs=2, compile=False, plot=str(plot))
    assert result["curves"].shape == (2 * 22, 4)
    assert plot.stat().st_size > 0
    assert max(result["accuracy"]) > 0.8
    assert "best lr" in capsys.readouterr().out


def test_char_transformer_fast(capsys):
    result = load_example("char_transformer").main(
        steps=30, context=32, dim=32, layers=1, heads=2, batch_size=16,
        compile=False, max_chars=20_000, sample_chars=100,
    )  # fmt: skip
    assert result["val_loss"] < result["uniform"]
    assert result["sample"].startswith("def ") and len(result["sample"]) == 104


def run_script(name: str, args: list[str], monkeypatch) -> int:
    """Run examples/<name>.py as ``python examples/<name>.py ARGS`` would, in this process;
    its exit code (argparse exits for --help and usage errors, before any training)."""
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *args])
    monkeypatch.syspath_prepend(str(EXAMPLES))
    with pytest.raises(SystemExit) as exit:
        runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="__main__")
    return exit.value.code


SCRIPTS = sorted(p.stem for p in EXAMPLES.glob("*.py"))
COUNTS = {"char_transformer": "--steps", "maml_sinusoid": "--iterations"}


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_describes_the_example_in_whole_sentences(name, monkeypatch, capsys):
    assert run_script(name, ["--help"], monkeypatch) == 0
    first_paragraph = " ".join(load_example(name).__doc__.split("\n\n")[0].split())
    assert first_paragraph.endswith(".")
    assert first_paragraph in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_count_of_zero_is_refused_not_replaced_by_the_default(name, monkeypatch, capsys):
    flag = COUNTS.get(name, "--epochs")
    assert run_script(name, [flag, "0"], monkeypatch) == 2
    assert f"argument {flag}: must be a positive integer, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, args, message",
    [
        ("digits_mlp", ["--batch-size", "0"], "--batch-size: must be a positive integer, got 0"),
        ("ddp_digits", ["--batch-size", "-3"], "--batch-size: must be a positive integer"),
        ("dp_digits", ["--noise-multiplier", "-1"], "must be a finite number >= 0, got -1.0"),
        ("dp_digits", ["--max-grad-norm", "0"], "--max-grad-norm: must be a number > 0, got 0"),
    ],
)
def test_bad_sizes_and_privacy_numbers_are_usage_errors(name, args, message, monkeypatch, capsys):
    """Refused by argparse before any training (they ended in a traceback from inside)."""
    assert run_script(name, args, monkeypatch) == 2
    assert message in capsys.readouterr().err
