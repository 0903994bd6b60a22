"""pytest-benchmark: one training step of each model, each variant of the comparison.

    .venv/bin/python -m pytest benchmarks/ --benchmark-columns=median,iqr,ops
    .venv/bin/python -m pytest benchmarks/ -k "mlp and loopkit"    # a subset

Not part of `make test` (timings are measured, never asserted). The side-by-side
comparison in one process, with ratios, memory and FLOP/s, is `python -m loopkit bench`
(`benchmarks/compare.py`); the variants and models are the same (loopkit/bench.py).
"""

import pytest
import torch

from loopkit import bench

VARIANTS = [
    pytest.param(
        v,
        marks=pytest.mark.skipif(
            v.startswith("torchopt") and not bench.torchopt_available(),
            reason="torchopt is not installed",
        ),
    )
    for v in bench.VARIANTS
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", bench.CASES, ids=lambda c: c.model)
def test_step(benchmark, case, variant):
    torch._dynamo.reset()
    runner = bench.make_runner(variant, case, torch.device("cpu"), "inductor")
    for _ in range(3):  # compile and warm up outside the timing
        runner.step()
    benchmark(runner.step)
