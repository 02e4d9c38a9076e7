#!/usr/bin/env bash
# Install synernet and its pinned dependencies into a virtual environment (default .venv).
# Works on a fresh machine with no GPU; idempotent: when nothing changed since the last install it returns at once.
#   VENV=path  use another environment folder      PYTHON=python3.11  the interpreter that creates it
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
stamp=$(cat requirements.txt constraints.txt setup.py settings.ini tools/install.sh tools/fix_torchvision.py | sha256sum | cut -c1-16)
if [ -f "$VENV/.synernet-install" ] && [ "$(cat "$VENV/.synernet-install")" = "$stamp" ] \
   && "$VENV/bin/python" -c "import synernet, timm" 2>/dev/null; then
  echo "install: $VENV is up to date"
  exit 0
fi
t0=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pipq() { "$VENV/bin/pip" install -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
# constraints.txt pins torch==2.13.0 and torchvision==0.28.0: an unpinned torch would pull a newer CUDA build.
pipq -r requirements.txt -c constraints.txt
"$VENV/bin/python" tools/fix_torchvision.py          # the CPU-torch + CUDA-torchvision import failure (README)
pipq --no-deps -e .
"$VENV/bin/python" -c "import synernet, timm, torch; print(f'install: synernet {synernet.__version__}, torch {torch.__version__}, timm {timm.__version__}')"
echo "$stamp" > "$VENV/.synernet-install"
echo "install: done in $(( $(date +%s) - t0 )) s; environment size $(du -sh "$VENV" | cut -f1)"
