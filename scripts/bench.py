"""`make bench`: q2l's benchmarks (see src/q2l/bench/cli.py, or run with --help)."""

import sys

from q2l.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
