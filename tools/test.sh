#!/usr/bin/env bash
# The whole test suite: notebooks clean, package in sync with the notebooks, notebook tests, pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
B="$VENV/bin"
t0=$(date +%s)
step() { echo; echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
hashes() { find "$@" -type f \( -name '*.ipynb' -o -name '*.py' \) -not -path '*/.ipynb_checkpoints/*' -print0 | sort -z | xargs -0 sha256sum; }
fail=0

step "notebooks clean (nbdev_clean changes nothing)"
before=$(hashes nbs); "$B/nbdev_clean" >/dev/null; after=$(hashes nbs)
if [ "$before" != "$after" ]; then
  echo "FAIL: these notebooks were not clean; nbdev_clean has cleaned them, review and commit:"
  diff <(echo "$before") <(echo "$after") | grep '^>' | awk '{print "  " $3}'; fail=1
else echo "ok"; fi

step "package in sync (nbdev_export changes nothing in synernet/)"
before=$(hashes synernet); "$B/nbdev_export"; after=$(hashes synernet)
if [ "$before" != "$after" ]; then
  echo "FAIL: synernet/ was out of sync with the notebooks; nbdev_export has rewritten, review and commit:"
  diff <(echo "$before") <(echo "$after") | grep '^[<>]' | awk '{print "  " $3}' | sort -u; fail=1
else echo "ok"; fi

step "nbdev_test (notebook tests; papermill notebooks are run by pytest)"
"$B/nbdev_test" --n_workers 2 --timing || fail=1

step "pytest"
"$B/python" -m pytest -q -p no:cacheprovider tests "$@" || fail=1

echo
echo "== total $(( $(date +%s) - t0 )) s; $([ $fail = 0 ] && echo PASSED || echo FAILED)"
exit $fail
