#!/usr/bin/env python
"""Build cls_labels_onehot.npy (image-level labels) from the masks of some splits.

Thin wrapper over `python -m synernet.data labels` (see data/README.md); `--help` lists the options."""
import sys

from synernet.data.datasets import main

if __name__ == "__main__":
    main(["labels"] + sys.argv[1:])
