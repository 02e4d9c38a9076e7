"""Helpers shared by the whole-iteration parity tests (`test_step_reference.py`, `test_deformer_reference.py`):
reading a fixture family and comparing arrays with the tolerances of its README."""
import numpy as np
import pytest
import torch

from conftest import fixture_dir


def load_family(family: str, case_lists=("case_names",)):
    """The `.npz` of a fixture family as (one {case: {field: array}} per list of case names in `case_lists`, the
    case-independent keys). Keys are `<case>__<field>`; a missing file fails with the path and how to point at one."""
    path = fixture_dir(family) / f"{family}.npz"
    if not path.exists():
        pytest.fail(f"fixture family {family!r} is missing: {path} (set SYNERNET_FIXTURES_ROOT to a folder holding "
                    f"{family}/)")
    d = np.load(path)
    lists = [[str(n) for n in d[k]] if k in d.files else [] for k in case_lists]
    cases = {n: {} for names in lists for n in names}
    glob = {}
    for k in d.files:
        if k in case_lists:
            continue
        head, _, rest = k.partition("__")
        if head in cases:
            cases[head][rest] = d[k]
        else:
            glob[k] = d[k]
    return [{n: cases[n] for n in names} for names in lists], glob


def assert_close(got, want, what, atol=0.0, rtol=0.0):
    "|got - want| <= atol + rtol |want| everywhere; the message names the worst entry and how many are outside."
    got = got.detach().double().cpu().numpy() if torch.is_tensor(got) else np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    err = np.abs(got - want) - (atol + rtol * np.abs(want))
    if (err > 0).any():
        k = np.unravel_index(np.argmax(err), got.shape)
        raise AssertionError(f"{what}: at {k} got {got[k]!r}, want {want[k]!r} (atol {atol:g}, rtol {rtol:g}; "
                             f"{int((err > 0).sum())} of {err.size} outside)")


def assert_labels(got, want, what, frac, fragile=None):
    "Integer maps: exact, except a fraction `frac` of the entries and the `fragile` ones (float32 at a threshold)."
    got = got.detach().cpu().numpy().astype(np.int64) if torch.is_tensor(got) else np.asarray(got, np.int64)
    want = np.asarray(want).astype(np.int64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    bad = got != want
    if fragile is not None:
        bad &= ~fragile
    assert bad.mean() <= frac, f"{what}: {int(bad.sum())} of {bad.size} entries differ (first at " \
                               f"{np.argwhere(bad)[0].tolist()}: got {got[bad][0]}, want {want[bad][0]})"


def assert_grads(case: dict, grads: dict, rename, what: str, tol: dict, source: str) -> set:
    """Every stored `grad__<name>` against this network's gradient of `rename(name)`, and no gradient here that the
    source does not have. Returns the case keys it consumed."""
    want = {k[len("grad__"):]: v for k, v in case.items() if k.startswith("grad__")}
    for tn, g in want.items():
        ours = rename(tn)
        assert ours is not None and grads.get(ours) is not None, f"{what}: {tn} gets no gradient here"
        assert_close(grads[ours], g, f"{what}/grad {tn}", **tol)
    extra = {k for k, g in grads.items() if g is not None} - {rename(k) for k in want}
    assert not extra, f"{what}: gradients {source} does not have: {sorted(extra)}"
    return {"grad__" + k for k in want}


def assert_params_after(case: dict, params: dict, rename, what: str, tol: dict, prefixes=("after__",)) -> set:
    "Every stored `<prefix><name>` (a parameter after the step) against `params[rename(name)]`; returns the keys used."
    used = {k for k in case if k.startswith(tuple(prefixes))}
    for k in used:
        p = next(p for p in prefixes if k.startswith(p))
        ours = rename(k[len(p):])
        assert ours in params, f"{what}: {k} has no counterpart"
        assert_close(params[ours], case[k], f"{what}/{k}", **tol)
    return used
