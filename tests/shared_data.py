"""Where the project's shared data folder (`shared/data`, never committed) is found by tests.

CI checks the repository out with `shared/` beside it; `$SPARSE_JAX_SHARED_DATA` overrides.
Tests that need a file skip when it is absent.
"""

import os
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    candidates = [
        os.environ.get("SPARSE_JAX_SHARED_DATA"),
        _ROOT.parent / "shared" / "data",
        _ROOT / "shared" / "data",
        Path("/work/shared/data"),
    ]
    existing = [Path(c) for c in candidates if c and Path(c).is_dir()]
    return existing[0] if existing else _ROOT.parent / "shared" / "data"


SHARED_DATA = shared_data_dir()
