#!/usr/bin/env python
"""Generate the built-in synthetic data set (deterministic from --seed).

Thin wrapper over `python -m synernet.data synthetic` (see data/README.md); `--help` lists the options."""
import sys

from synernet.data.datasets import main

if __name__ == "__main__":
    main(["synthetic"] + sys.argv[1:])
