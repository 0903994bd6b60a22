"""The comparison script in a tiny configuration: its output is complete and consistent.
Speed is never asserted (timings on a shared CI machine mean nothing)."""

import json

import pytest
import torch

from loopkit import bench, cli


def test_bench_smoke(tmp_path, capsys):
    variants = ["imperative_eager", "loopkit_eager", "loopkit_compiled"]
    argv = [
        "bench",
        "--tiny",
        "--rounds",
        "2",
        "--steps",
        "2",
        "--backend",
        "eager",
        "--compile-time",
        "",
        "--variants",
        ",".join(variants),
        "-o",
        str(tmp_path),
    ]
    assert cli.main(argv) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    rows = result["rows"]
    assert [(r["model"], r["variant"]) for r in rows] == [
        (case.model, v) for case in bench.TINY for v in variants
    ]
    for case in {r["case"] for r in rows}:
        by_variant = {r["variant"]: r for r in rows if r["case"] == case}
        ref = by_variant["imperative_eager"]
        assert ref["ratio"] == 1.0
        for r in by_variant.values():
            # The same training: same losses over the first three steps as torch.optim.AdamW.
            torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref["losses"]),
                                       rtol=1e-4, atol=1e-5)  # fmt: skip
            assert r["steps_per_s"] > 0 and len(r["samples"]) == 2
            assert r["ratio"] == pytest.approx(r["steps_per_s"] / ref["steps_per_s"])
            assert r["achieved_gflops"] == pytest.approx(
                r["flops_per_step"] * r["steps_per_s"] / 1e9
            )
            assert r["peak_memory_mb"] > 0
    # MLP 8-16-16-10 at batch 4: forward 2*4*(8*16 + 16*16 + 16*10) FLOPs, backward twice
    # that less the input gradient of the first layer (2*4*8*16).
    mlp = next(r for r in rows if r["model"] == "mlp")
    assert mlp["flops_per_step"] == 3 * 2 * 4 * (8 * 16 + 16 * 16 + 16 * 10) - 2 * 4 * 8 * 16
    assert result["machine"]["matmul_gflops"] > 0
    table = (tmp_path / "bench.md").read_text()
    assert table.count("| loopkit_compiled |") == len(bench.TINY)
    assert table in capsys.readouterr().out  # the table is printed last
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_unknown_variants(tmp_path, capsys):
    assert cli.main(["bench", "--tiny", "--variants", "fastest", "-o", str(tmp_path)]) == 1
    assert "unknown variants ['fastest']" in capsys.readouterr().err


def test_cpu_peak_memory_counts_transient_buffers_of_eager_and_compiled_code():
    """The peak is what a step holds at once on top of its state, freed buffers subtracted,
    including the buffers a compiled graph allocates and frees inside (which the
    profiler's per-op figures net out)."""
    mb = 2**20
    x = torch.randn(512, 512)  # 1 MB

    def eager_step():
        a = x * 2
        b = a * 3  # 2 MB held here
        del a
        c = b * 4  # b and c: 2 MB again; the peak stays 2 MB
        return c.sum()

    runner = bench.Runner(eager_step, lambda: [x])
    peak = bench.peak_step_memory(runner, torch.device("cpu"))
    assert 3 * mb <= peak < 3 * mb + 64 * 1024  # x (the state) + 2 MB

    compiled = torch.compile(lambda x: torch.relu(x @ x) @ x, backend="inductor")
    runner = bench.Runner(lambda: compiled(x).sum(), lambda: [x])
    peak = bench.peak_step_memory(runner, torch.device("cpu"))
    assert 3 * mb <= peak < 3 * mb + 64 * 1024  # x + the intermediate + the output
