"""Smoke tests: every example runs in its --fast form and learns something."""

import importlib.util
import sys
from pathlib import Path

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
