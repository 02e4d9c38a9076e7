"""Reference parity with ToCo: every fixture family in tests/fixtures/toco (or $SYNERNET_FIXTURES_ROOT/toco).

Each `.npz` holds `case_names` and keys `<case>__<field>` (plus a few case-independent keys). The checks live beside
this file, one module per area (`_ref_cam.py`, `_ref_losses.py`, `_ref_model.py`); each exports
`CHECKS = {family: dict(fields=set_of_case_fields, globals=set_of_case_independent_keys, run=fn)}` where
`run(case: dict[field -> np.ndarray], glob: dict[key -> np.ndarray], name: str)` asserts parity for one case.

The test fails when a family has no check, a check has no family file, or a file holds a field the check does not
know: another fixture set with the same families but other cases, shapes and values must pass unchanged.
"""
import importlib
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES

AREAS = ("_ref_cam", "_ref_losses", "_ref_model")
CHECKS = {}
for _m in AREAS:
    CHECKS.update(importlib.import_module(_m).CHECKS)


def load(family):
    path = Path(FIXTURES) / f"{family}.npz"
    if not path.exists():
        pytest.fail(f"fixture family {family!r} is missing: {path} (set SYNERNET_FIXTURES_ROOT to a folder holding toco/, toco_step/, ...)")
    d = np.load(path)
    names = [str(n) for n in d["case_names"]]
    cases = {n: {} for n in names}
    glob = {}
    for k in d.files:
        if k == "case_names":
            continue
        if "__" in k:
            case, field = k.split("__", 1)
            if case not in cases:
                pytest.fail(f"{path.name}: key {k!r} belongs to case {case!r}, which is not in case_names")
            cases[case][field] = d[k]
        else:
            glob[k] = d[k]
    return cases, glob


def test_every_fixture_family_has_a_check():
    files = {p.stem for p in Path(FIXTURES).glob("*.npz")}
    assert files, f"no fixtures found in {FIXTURES}"
    assert files - set(CHECKS) == set(), f"families without a check: {sorted(files - set(CHECKS))}"
    assert set(CHECKS) - files == set(), f"checks without a fixture file: {sorted(set(CHECKS) - files)}"


@pytest.mark.parametrize("family", sorted(CHECKS))
def test_fields_are_known(family):
    cases, glob = load(family)
    spec = CHECKS[family]
    unknown_glob = set(glob) - set(spec.get("globals", ()))
    assert not unknown_glob, f"{family}: unknown case-independent keys {sorted(unknown_glob)}"
    for name, case in cases.items():
        unknown = set(case) - set(spec["fields"])
        assert not unknown, f"{family}/{name}: unknown fields {sorted(unknown)}"


@pytest.mark.parametrize("family", sorted(CHECKS))
def test_family_matches_reference(family):
    cases, glob = load(family)
    assert cases, f"{family}: no cases"
    for name, case in cases.items():
        CHECKS[family]["run"](case, glob, name)
