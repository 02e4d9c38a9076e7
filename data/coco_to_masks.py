#!/usr/bin/env python
"""Convert COCO 2014 instance annotations to class-index PNG masks, split lists and the label file.

Thin wrapper over `python -m synernet.data coco` (see data/README.md); `--help` lists the options."""
import sys

from synernet.data.datasets import main

if __name__ == "__main__":
    main(["coco"] + sys.argv[1:])
