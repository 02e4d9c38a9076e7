#!/usr/bin/env python
"""Check a prepared data set: lists, images, masks and the label file.

Thin wrapper over `python -m synernet.data check` (see data/README.md); `--help` lists the options."""
import sys

from synernet.data.datasets import main

if __name__ == "__main__":
    main(["check"] + sys.argv[1:])
