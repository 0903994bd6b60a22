"""The comparison script: ``python benchmarks/compare.py [options]`` is
``python -m loopkit bench [options]`` (see ``--help`` and loopkit/bench.py).

    python benchmarks/compare.py --sweep -o benchmarks/results   # what RESULTS.md shows
"""

import sys

from loopkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
