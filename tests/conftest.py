"""Shared pytest setup: slow tests run only with `-m slow`; the reference fixtures folder is configurable."""
import os
from pathlib import Path
import pytest

FIXTURES = Path(os.environ.get("SYNERNET_FIXTURES", Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "toco"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long tests (paper-scale models); run with -m slow")


def pytest_collection_modifyitems(config, items):
    if "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow test: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
