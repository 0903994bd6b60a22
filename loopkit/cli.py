"""The ``loopkit`` command (also ``python -m loopkit``)."""

from __future__ import annotations

import argparse
import sys


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
    bench.add_argument("--models", default="mlp,cnn,transformer", help="comma-separated")
    bench.add_argument("--variants", default=None, help="comma-separated (default: all)")
    bench.add_argument("--sweep", action="store_true", help="add the larger sizes and batches")
    bench.add_argument("--sweep-only", action="store_true", help="only the larger sizes")
    bench.add_argument("--tiny", action="store_true", help="tiny sizes: a smoke test")
    bench.add_argument("--device", default="cpu")
    bench.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (1 on a loaded machine)"
    )
    bench.add_argument("--rounds", type=int, default=7)
    bench.add_argument("--steps", type=int, default=20, help="steps per timed round")
    bench.add_argument("--backend", default="inductor", help="torch.compile backend")
    bench.add_argument("--compile-time", default="mlp",
                       help="models whose cold/warm compile is timed in fresh processes "
                       "(comma-separated; '' for none)")  # fmt: skip
    bench.add_argument("-o", "--out", default="runs/bench")
    args = parser.parse_args(argv)
    if args.command == "bench":
        return _bench(args)
    if args.command == "plot":
        from loopkit.plot import plot_run

        try:
            print(plot_run(args.run_dir, args.out))
        except (FileNotFoundError, ValueError, ImportError) as e:
            print(f"loopkit plot: {e}", file=sys.stderr)
            return 1
    return 0


def _bench(args: argparse.Namespace) -> int:
    from loopkit import bench

    models = [m for m in args.models.split(",") if m]
    if args.tiny:
        cases = bench.TINY
    elif args.sweep_only:
        cases = bench.SWEEP
    else:
        cases = bench.CASES + (bench.SWEEP if args.sweep else [])
    cases = [c for c in cases if c.model in models]
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
            compile_time_models=tuple(m for m in args.compile_time.split(",") if m),
        )
    except ValueError as e:
        print(f"loopkit bench: {e}", file=sys.stderr)
        return 1
    paths = bench.write_report(result, args.out)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    print(bench.markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
