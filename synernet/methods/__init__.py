"""Layer 5, methods: ToCo, DSKD (+ GC) and SynerNet. Importing this package registers each method with its config keys
and presets. Uses: core, data, models, ops, engine."""
from . import toco, dskd, synernet  # noqa: F401
