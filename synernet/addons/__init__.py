"""Layer 6, addons: BMP, PSS and AMR, switchable components that subscribe to the hook points of the ToCo and SynerNet
steps. Importing this package registers each with its switch, keys and presets. Uses: every layer below."""
from . import bmp, pss, amr  # noqa: F401
