"""The ``loopkit`` command (also ``python -m loopkit``)."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable


def _number(text: str, ok: Callable[[float], bool], rule: str) -> float:
    """``text`` as a float if ``ok`` holds for it, else a usage error saying ``rule``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {rule}, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """An argparse ``type``: a finite number of at least 0 (else a usage error saying so)."""
    return _number(text, lambda v: 0 <= v < math.inf, "a finite number >= 0")


def positive_float(text: str) -> float:
    """An argparse ``type``: a number above 0 (``inf`` included; else a usage error)."""
    return _number(text, lambda v: v > 0, "a number > 0")


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer of at least 1 (else a usage error saying so)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loopkit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    plot = commands.add_parser(
        "plot", help="draw the training and validation curves of a run as a PNG"
    )
    plot.add_argument("run_dir", help="directory holding metrics.jsonl or metrics.csv")
    plot.add_argument("-o", "--out", help="where to write the PNG (default RUN_DIR/curves.png)")
    bench = commands.add_parser(
        "bench",
        help="compare loopkit's step with the imperative loop (steps/s, memory, FLOP/s)",
        description="Time imperative eager/compiled, torchopt and loopkit eager/compiled "
        "training steps, interleaved in this process; write bench.json, bench.md and "
        "bench.png into --out and print the table.",
    )
    bench.add_argument("--models", default=None,
                       help="comma-separated, from mlp, cnn, transformer (default: each "
                       "with a case at the chosen sizes)")  # fmt: skip
    bench.add_argument("--variants", default=None, help="comma-separated (default: all)")
    bench.add_argument("--sweep", action="store_true", help="add the larger sizes and batches")
    bench.add_argument("--sweep-only", action="store_true", help="only the larger sizes")
    bench.add_argument("--tiny", action="store_true", help="tiny sizes: a smoke test")
    bench.add_argument("--device", default="cpu")
    bench.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch intra-op threads (1 on a loaded machine)",
    )
    bench.add_argument("--rounds", type=positive_int, default=7)
    bench.add_argument("--steps", type=positive_int, default=20, help="steps per timed round")
    bench.add_argument("--backend", default="inductor", help="torch.compile backend")
    bench.add_argument("--compile-time", default=None,
                       help="models whose cold/warm compile is timed in fresh processes "
                       "(comma-separated, among --models; '' for none; default: mlp, "
                       "if it is benchmarked)")  # fmt: skip
    bench.add_argument("-o", "--out", default="runs/bench")
    args = parser.parse_args(argv)
    if args.command == "bench":
        return _bench(args, bench)
    if args.command == "plot":
        from loopkit.plot import plot_run

        try:
            print(plot_run(args.run_dir, args.out))
        except (FileNotFoundError, ValueError, ImportError) as e:
            print(f"loopkit plot: {e}", file=sys.stderr)
            return 1
    return 0


def _bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from loopkit import bench

    cases, compile_models = _bench_selection(args, parser)
    try:
        bench.check_device(args.device)
    except ValueError as e:
        parser.error(f"--device {e}")
    variants = args.variants.split(",") if args.variants else None
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        result = bench.run(
            cases,
            variants,
            device=args.device,
            rounds=args.rounds,
            steps=args.steps,
            backend=args.backend,
            compile_time_models=compile_models,
        )
    except ValueError as e:
        print(f"loopkit bench: {e}", file=sys.stderr)
        return 1
    paths = bench.write_report(result, args.out)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    print(bench.markdown(result))
    return 0


def _names(text: str) -> list[str]:
    return [name for name in text.split(",") if name]


def _bench_selection(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> tuple[list, tuple[str, ...]]:
    """``(cases, compile_time_models)`` from the size flags, ``--models`` and
    ``--compile-time``; a usage error for a model name that is unknown or has no case
    among the sizes chosen (never an empty selection)."""
    from loopkit import bench

    if args.tiny:
        cases, what = bench.TINY, "the tiny sizes (--tiny)"
    elif args.sweep_only:
        cases, what = bench.SWEEP, "the sweep sizes (--sweep-only)"
    else:
        cases, what = bench.CASES + (bench.SWEEP if args.sweep else []), "the default sizes"
    try:
        if args.models is None:
            names = list(dict.fromkeys(c.model for c in cases))
        else:
            names = _names(args.models)
        cases = bench.select_cases(cases, names, what)
    except ValueError as e:
        parser.error(f"--models: {e}")
    if args.compile_time is None:  # the default: the MLP's, when it is benchmarked
        return cases, ("mlp",) if any(c.model == "mlp" for c in cases) else ()
    timed = _names(args.compile_time)
    if timed:
        try:
            bench.select_cases(cases, timed, "the selected cases")
        except ValueError as e:
            parser.error(f"--compile-time: {e}")
    return cases, tuple(timed)


if __name__ == "__main__":
    sys.exit(main())
