"""`make bench` = `python -m benchmarks` (benchmarks/cli.py; --help lists the options)."""

import sys

from benchmarks.cli import main

if __name__ == "__main__":
    sys.exit(main())
