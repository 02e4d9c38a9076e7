"""Shared pytest setup: slow tests run only with `-m slow`; the reference fixtures folder is configurable."""
import os
from pathlib import Path
import pytest

#: The reference fixtures live in the repository, one folder per family (`toco/`, `toco_step/`, `deformer_step/`), so
#: the parity tests run in any clone. `SYNERNET_FIXTURES_ROOT` names another folder with the same subfolders (for
#: example an independent set of the same format) and overrides it for every parity test.
FIXTURES_ROOT = Path(os.environ.get("SYNERNET_FIXTURES_ROOT") or Path(__file__).resolve().parent / "fixtures")


def fixture_dir(family: str) -> Path:
    "The folder of one fixture family (`toco`, `toco_step`, ...) under the fixtures root."
    return FIXTURES_ROOT / family


#: The function-level ToCo family; `SYNERNET_FIXTURES` (older name) still points at that one folder directly.
FIXTURES = Path(os.environ["SYNERNET_FIXTURES"]) if os.environ.get("SYNERNET_FIXTURES") else fixture_dir("toco")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long tests (paper-scale models); run with -m slow")


def pytest_collection_modifyitems(config, items):
    if "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow test: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_float_mode():
    """Every test starts with denormals kept in its thread: a run started earlier in the same process (`start_run`)
    switches the CPU to flush them to zero. Threads created while that was on (torch's worker pool) keep flushing, so
    a test that needs values below float32's normal range computes in float64 (PAR's affinities do)."""
    import torch
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(False)
