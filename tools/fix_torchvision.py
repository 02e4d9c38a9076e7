"""Make `import torchvision` (and so `import timm`) work with the CPU build of torch 2.13.0.

The only torchvision wheel that requires exactly torch 2.13.0 (0.28.0) is a CUDA build. With the CPU torch its
compiled extension cannot load, and two unconditional `torch.library.register_fake("torchvision::nms" / "qnms")`
decorators in `torchvision/_meta_registrations.py` then fail at import time with
`RuntimeError: operator torchvision::nms does not exist`.

This script guards those two registrations with `torchvision.extension._has_ops()`, exactly as torchvision already
guards its other meta registrations. It is idempotent, and it changes nothing when torchvision already imports
(a GPU machine, or a CPU build of torchvision). Run it with the Python of the environment to fix:

    .venv/bin/python tools/fix_torchvision.py

torchvision's compiled ops (nms, roi_align) stay unavailable on such a machine; synernet does not use them.
Re-run this after reinstalling torchvision (`make install` does).
"""
import importlib.util, subprocess, sys
from pathlib import Path

MARK = "# synernet: guarded register_fake (tools/fix_torchvision.py)"
HELPER = f'''

{MARK}
def _register_fake_if_ops(op_name):
    def wrapper(fn):
        if torchvision.extension._has_ops():
            return torch.library.register_fake(op_name)(fn)
        return fn
    return wrapper
'''
ANCHOR = "import torchvision.extension  # noqa: F401"


def imports() -> tuple[bool, str]:
    r = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
    return r.returncode == 0, r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""


def main() -> int:
    ok, err = imports()
    if ok:
        print("fix_torchvision: torchvision imports; nothing to change.")
        return 0
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        print("fix_torchvision: torchvision is not installed in this environment.", file=sys.stderr)
        return 1
    if "torchvision::nms" not in err:
        print(f"fix_torchvision: torchvision fails to import for another reason, left untouched:\n  {err}",
              file=sys.stderr)
        return 1
    path = Path(spec.submodule_search_locations[0]) / "_meta_registrations.py"
    src = path.read_text()
    if MARK not in src:
        if ANCHOR not in src:
            print(f"fix_torchvision: {path} does not have the expected layout; not patched.", file=sys.stderr)
            return 1
        src = src.replace(ANCHOR, ANCHOR + HELPER, 1)
        for op in ("nms", "qnms"):
            src = src.replace(f'@torch.library.register_fake("torchvision::{op}")',
                              f'@_register_fake_if_ops("torchvision::{op}")')
        path.write_text(src)
        print(f"fix_torchvision: guarded the nms/qnms fake registrations in {path}")
    ok, err = imports()
    if not ok:
        print(f"fix_torchvision: torchvision still fails to import: {err}", file=sys.stderr)
        return 1
    print("fix_torchvision: torchvision imports now.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
