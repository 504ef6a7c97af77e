"""Shared pytest configuration: CPU-only JAX, the `slow` marker, `--runslow`, no gin state between tests."""

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


@pytest.fixture(autouse=True)
def _no_gin_bindings():
    """Every test starts and ends with no gin bindings: gin's registry is process-global, so a binding one test
    parses (``ExperimentConfig.prefill_sparsity = 0.5``) would otherwise reach every test after it."""
    try:
        import gin
    except ImportError:  # the package's own tests always have it; keep conftest importable without it
        yield
        return
    gin.clear_config()
    yield
    gin.clear_config()
