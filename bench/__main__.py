"""`python -m bench`: see bench/cli.py."""

import sys

from bench.cli import main

# Guarded: libraries that start worker processes with "spawn" (Inductor's compile workers)
# import the main module again in each child, which must not rerun the bench.
if __name__ == "__main__":
    sys.exit(main())
