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
    args = parser.parse_args(argv)
    if args.command == "plot":
        from loopkit.plot import plot_run

        try:
            print(plot_run(args.run_dir, args.out))
        except (FileNotFoundError, ValueError, ImportError) as e:
            print(f"loopkit plot: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
