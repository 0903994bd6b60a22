"""The comparison script in a tiny configuration: its output is complete and consistent.
Speed is never asserted (timings on a shared CI machine mean nothing)."""

import json
import math

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
    # The spread column is half the JSON's spread_pct (the whole IQR), and says so.
    assert "| spread (±IQR/2) |" in table and "± half the interquartile range" in table
    assert f"| ±{rows[0]['spread_pct'] / 2:.1f}% |" in table
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


def test_step_flops_count_attention():
    """The tiny transformer's matmul FLOPs by hand: per token, the qkv, output, MLP and head
    projections; per sequence, the scores q k^T and their product with v over all T x T
    pairs (CPU's fused attention kernel must not count as zero); backward twice forward."""
    case = bench.TINY[2]
    b, t, d, vocab = 2, 8, 16, 32
    assert case.size == dict(d=d, heads=2, layers=1, context=t, vocab=vocab, batch=b)
    projections = 2 * b * t * (d * 3 * d + d * d + 2 * d * 4 * d + d * vocab)
    attention = 2 * (2 * b * t * t * d)  # q k^T and att v, summed over the heads
    assert bench.step_flops(case, torch.device("cpu")) == 3 * (projections + attention)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--models", "mlp,resnet"], "--models: unknown models ['resnet']; choose from"),
        (["--models", ","], "--models: no models selected"),
        (["--sweep-only", "--models", "cnn"], "sweep sizes (--sweep-only) have no case of ['cnn']"),
        (["--compile-time", "gpt"], "--compile-time: unknown models ['gpt']"),
        (["--models", "mlp", "--compile-time", "cnn"], "--compile-time: the selected cases have"),
        (["--steps", "0"], "argument --steps: must be a positive integer, got 0"),
        (["--rounds", "0"], "argument --rounds: must be a positive integer, got 0"),
        (["--device", "cuda:99"], "--device 'cuda:99': "),
        (["--device", "tpu"], "--device 'tpu' is not a device"),
    ],
)
def test_bench_rejects_bad_arguments_before_running(args, message, monkeypatch, capsys):
    """Usage errors up front; a selection that matches nothing never runs the default set."""
    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("ran the benchmark"))
    with pytest.raises(SystemExit) as exit:
        cli.main(["bench", *args])
    assert exit.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, want",
    [([], bench.CASES), (["--sweep"], bench.CASES + bench.SWEEP), (["--sweep-only"], bench.SWEEP),
     (["--tiny"], bench.TINY), (["--sweep-only", "--models", "mlp"], bench.SWEEP[:2])],
)  # fmt: skip
def test_bench_runs_every_model_with_a_case_at_the_sizes_unless_told(flags, want, monkeypatch):
    """Without --models, each model with a case at the chosen sizes (the sweep has no CNN:
    ``--sweep-only`` alone once failed on the default model list)."""
    ran = {}
    monkeypatch.setattr(bench, "run", lambda cases, *a, **k: ran.setdefault("cases", cases))
    monkeypatch.setattr(bench, "write_report", lambda *a, **k: {})
    monkeypatch.setattr(bench, "markdown", lambda *a, **k: "")
    cli.main(["bench", *flags])
    assert ran["cases"] == want


def test_bench_selection_and_run_never_widen_an_empty_selection():
    assert bench.select_cases(bench.TINY, ["cnn"]) == [bench.TINY[1]]
    with pytest.raises(ValueError, match="no cases to run"):
        bench.run([])


# ------------------------------------------------- loopkit plot (the command's other half)


def test_plot_panels_group_splits_and_numbered_families():
    from loopkit.plot import curves

    records = [
        {"epoch": 0, "step": 4, "train/loss": 2.0, "lr/0": 0.1, "lr/1": 0.01,
         "time/epoch_s": 0.5, "time/steps_per_s": 8.0, "lr": 0.1},
        {"epoch": 1, "step": 8, "train/loss": 1.0, "val/loss": 1.5, "test/loss": 1.6,
         "train/acc": 0.9, "test/acc": 0.8, "lr/0": 0.05, "lr/1": 0.005, "stopped": True},
    ]  # fmt: skip
    panels = curves(records)
    assert {name: sorted(lines) for name, lines in panels.items()} == {
        "loss": ["test", "train", "val"],  # test/ is a split: it logs what train/ logs
        "acc": ["test", "train"],
        "lr": ["0", "1", "lr"],  # lr/<group> and a plain lr share the panel lr
        "time/epoch_s": ["time/epoch_s"],
        "time/steps_per_s": ["time/steps_per_s"],
    }
    assert panels["lr"]["1"] == [(4.0, 0.01), (8.0, 0.005)]


def test_plot_without_steps_and_of_an_ensemble(tmp_path):
    """Records without a step are drawn against the epoch (else their index); an
    ensemble's per-member lists give a line per member."""
    from loopkit.plot import curves, plot_run, x_axis

    members = [{"epoch": e, "train/loss": [1.0 / (e + 1), 2.0, float("nan")]} for e in (0, 1)]
    assert x_axis(members) == "epoch"
    assert curves(members)["loss"] == {"train[0]": [(0.0, 1.0), (1.0, 0.5)],
                                       "train[1]": [(0.0, 2.0), (1.0, 2.0)]}  # fmt: skip
    assert x_axis([{"loss": 1.0}, {"loss": 0.5}]) == "record"
    assert curves([{"loss": 1.0}, {"loss": 0.5}]) == {"loss": {"loss": [(0.0, 1.0), (1.0, 0.5)]}}
    (tmp_path / "metrics.csv").write_text('epoch,train/loss\n0,"[1.0, 2.0]"\n1,"[0.5, 1.5]"\n')
    png = plot_run(tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_reads_csv_lists_with_nan_the_fuller_log_and_names_its_png(tmp_path):
    """A CSV list holds Python's nan/inf (a member gone NaN made the whole metric unreadable
    and its panel vanish); where metrics.jsonl is empty or shorter, metrics.csv is read (an
    empty JSONL beside a full CSV once failed); ``out`` without an extension is the .png
    matplotlib writes, and that is the path returned."""
    from loopkit.plot import plot_run, read_logs

    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / "metrics.csv").write_text(
        'epoch,step,train/loss\n0,1,"[0.5, nan]"\n1,2,"[0.25, inf]"\n2,3,"[0.1, -inf]"\n'
    )
    records = read_logs(tmp_path)
    assert [r["train/loss"][0] for r in records] == [0.5, 0.25, 0.1]
    assert math.isnan(records[0]["train/loss"][1]) and records[2]["train/loss"][1] == -math.inf
    png = plot_run(tmp_path, tmp_path / "curves_no_ext")
    assert png == tmp_path / "curves_no_ext.png" and png.exists()
