"""Layer 0, core: the config (keys, presets, phase checks), the method registry, run folders, seeds and logging, and the
layer declaration (`synernet.core.layers`). It uses nothing else of the package."""
