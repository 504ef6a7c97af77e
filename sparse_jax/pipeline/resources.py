"""Models and tokenizers a run needs, loaded once per process and reused across runs."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp

from sparse_jax.models.loading import LoadedModel, load_model
from sparse_jax.tokenizer import Tokenizer

EMBEDDED_MODEL = "smollm2"


class ModelBundle(NamedTuple):
    loaded: LoadedModel
    tokenizer: Tokenizer


def cache_dir() -> Path:
    """Where converted checkpoints are cached (``$SPARSE_JAX_CACHE``, default ``~/.cache/sparse-jax``)."""
    return Path(os.environ.get("SPARSE_JAX_CACHE", Path.home() / ".cache" / "sparse-jax"))


def model_source(model: str) -> Path:
    """``"smollm2"`` -> the embedded GGUF; anything else is a checkpoint folder or ``.gguf`` file."""
    if model == EMBEDDED_MODEL:
        from sparse_jax.embedded import embedded_model_path

        return embedded_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model {model!r}: no such checkpoint folder or .gguf file. Download the Hugging Face checkpoint "
            f"(config.json, *.safetensors, tokenizer files) to that path, or use model='{EMBEDDED_MODEL}'."
        )
    return path


def load_tokenizer(model: str) -> Tokenizer:
    return _tokenizer(str(model_source(model)))


@functools.lru_cache(maxsize=4)
def _tokenizer(source: str) -> Tokenizer:
    return Tokenizer.from_source(source)


@functools.lru_cache(maxsize=2)
def load_bundle(model: str, dtype: str, max_length: int) -> ModelBundle:
    """The model (parameters cached with Orbax after the first conversion) and its tokenizer."""
    source = model_source(model)
    loaded = load_model(
        source, dtype=jnp.dtype(dtype), max_length=max_length, cache_dir=cache_dir() / "orbax"
    )
    return ModelBundle(loaded, _tokenizer(str(source)))
