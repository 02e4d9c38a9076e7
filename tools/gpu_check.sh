#!/usr/bin/env bash
# The GPU check of a lent device, end to end in at most ~8 minutes (see tools/gpu_check.py for the steps):
#   bash tools/gpu_check.sh            on a GPU machine; writes reports/benchmark_<gpu>.json
#   bash tools/gpu_check.sh --dry-run  the same steps on the CPU with tiny shapes (run by the test suite)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || bash tools/install.sh
exec "$VENV/bin/python" tools/gpu_check.py "$@"
