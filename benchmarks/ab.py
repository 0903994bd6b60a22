"""Before/after timing of a few variants on one case, for comparing two checkouts.

    python benchmarks/ab.py --case 0 --variants imperative_eager,loopkit_eager,loopkit_compiled
    python benchmarks/ab.py --loopkit /path/to/other/checkout ...   # the same, other code

Runs the variants of ``loopkit.bench`` in interleaved rounds in one process and prints, for
each, the fastest and the median round in ms/step and both ratios to the first variant.
The fastest round is the steadiest figure on a shared machine; run the two checkouts one
after the other and compare their ratios (the first variant is the common yardstick).
"""

import argparse
import statistics
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loopkit", help="checkout to import loopkit from (default: this one)")
    parser.add_argument("--case", type=int, default=0, help="index into loopkit.bench.CASES")
    parser.add_argument("--variants", default="imperative_eager,loopkit_eager,loopkit_compiled")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--steps", type=int, default=20, help="steps per round")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    if args.loopkit:
        sys.path.insert(0, args.loopkit)

    import torch

    from loopkit import bench

    if args.threads:
        torch.set_num_threads(args.threads)
    case, device = bench.CASES[args.case], torch.device("cpu")
    variants = args.variants.split(",")
    runners = {v: bench.make_runner(v, case, device, "inductor") for v in variants}
    for runner in runners.values():
        for _ in range(5):  # compile and warm up
            runner.step()
    ms: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v, runner in runners.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                runner.step()
            ms[v].append((time.perf_counter() - start) / args.steps * 1e3)
    print(f"{case.label}, loopkit from {bench.__file__}")
    base = variants[0]
    for v in variants:
        fastest, median = min(ms[v]), statistics.median(ms[v])
        print(
            f"{v:22s} fastest {fastest:.3f} ms ({min(ms[base]) / fastest:.2f}x)  "
            f"median {median:.3f} ms ({statistics.median(ms[base]) / median:.2f}x)"
        )


if __name__ == "__main__":
    main()
