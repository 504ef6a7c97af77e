"""Shared pytest configuration: CPU-only JAX, the `slow` marker and `--runslow`."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)
