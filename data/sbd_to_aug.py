#!/usr/bin/env python
"""Assemble VOC 2012 SegmentationClassAug and ImageSets/Segmentation/train_aug.txt from SBD.

Thin wrapper over `python -m synernet.data sbd` (see data/README.md); `--help` lists the options."""
import sys

from synernet.data.datasets import main

if __name__ == "__main__":
    main(["sbd"] + sys.argv[1:])
