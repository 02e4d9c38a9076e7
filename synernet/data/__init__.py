"""Layer 1, data: file formats, transforms and training views, the synthetic set, the VOC / COCO / synthetic readers and
loaders, the preparation commands (`python -m synernet.data`). Uses: core."""
