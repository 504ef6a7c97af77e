"""Models and tokenizers a run needs, loaded once per process and reused across runs."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp
from jax.sharding import Mesh

from sparse_jax.models.config import RopePolicy
from sparse_jax.models.loading import LoadedModel, load_model
from sparse_jax.tokenizer import Tokenizer

EMBEDDED_MODEL = "smollm2"


class ModelBundle(NamedTuple):
    """A loaded model, its tokenizer, and the device mesh it is split over (``None``: one device)."""

    loaded: LoadedModel
    tokenizer: Tokenizer
    mesh: Mesh | None = None


def cache_dir() -> Path:
    """Where converted checkpoints are cached (``$SPARSE_JAX_CACHE``, default ``~/.cache/sparse-jax``)."""
    return Path(os.environ.get("SPARSE_JAX_CACHE", Path.home() / ".cache" / "sparse-jax"))


def model_source(model: str) -> Path:
    """``"smollm2"`` / ``"gemma3_270m"`` -> the packaged GGUF; anything else is a checkpoint folder or ``.gguf``
    file."""
    from sparse_jax.embedded import PACKAGED_MODELS

    if model in PACKAGED_MODELS:
        return PACKAGED_MODELS[model]()
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model {model!r}: no such checkpoint folder or .gguf file. Download the Hugging Face checkpoint "
            f"(config.json, *.safetensors, tokenizer files) to that path, or use model='{EMBEDDED_MODEL}'."
        )
    return path


def load_tokenizer(model: str, prompt_format: str = "chat") -> Tokenizer:
    return _tokenizer(str(model_source(model))).with_prompt_format(prompt_format)


@functools.lru_cache(maxsize=4)
def _tokenizer(source: str) -> Tokenizer:
    return Tokenizer.from_source(source)


def _hf_model_config(source: Path):
    """The :class:`~sparse_jax.models.config.ModelConfig` of a Hugging Face checkpoint folder."""
    from sparse_jax.models.config import ModelConfig

    return ModelConfig.from_hf_dict(json.loads((source / "config.json").read_text()))


def _num_kv_heads(source: Path) -> int:
    """KV heads of a checkpoint, read from its config (the mesh layout depends on them)."""
    from sparse_jax.models.config import ModelConfig

    if source.suffix == ".gguf":
        from sparse_jax.checkpoints.gguf import read_gguf

        return ModelConfig.from_hf_dict(read_gguf(source).hf_config).num_kv_heads
    return _hf_model_config(source).num_kv_heads


def trained_context(model: str, max_length: int) -> int | None:
    """The longest sequence ``model`` serves at run length ``max_length``; ``None`` if it does not say.

    A folder's ``max_position_embeddings`` after the run-length RoPE rule
    (``ModelConfig.for_run_length``: Qwen2's YaRN switch extends it on purpose), or a GGUF
    file's ``{architecture}.context_length`` (read from its header alone).
    """
    source = model_source(model)
    if source.suffix == ".gguf":
        from sparse_jax.checkpoints.gguf import read_gguf_header

        metadata = read_gguf_header(source).metadata
        length = metadata.get(f"{metadata.get('general.architecture')}.context_length")
        return None if length is None else int(length)
    return _hf_model_config(source).for_run_length(max_length).max_position_embeddings


@functools.lru_cache(maxsize=2)
def load_bundle(
    model: str, dtype: str, max_length: int, mesh: str = "1x1", rope_policy: RopePolicy = "auto",
    prompt_format: str = "chat", fused_qkv: bool = False,
) -> ModelBundle:
    """The model (parameters cached with Orbax after the first conversion) and its tokenizer.

    Args:
      model: ``"smollm2"`` or a checkpoint path.
      dtype: ``"float32"`` or ``"bfloat16"``.
      max_length: longest prompt + output the model serves (YaRN switch for Qwen2).
      mesh: ``"DATAxMODEL"`` device mesh (``sparse_jax.distributed.mesh``); other than
        ``"1x1"``, parameters are restored straight into their shards.
      prompt_format: the tokenizer's prompt format (``"chat"`` or ``"completion"``).
      fused_qkv: each layer's q/k/v projections as one weight (``ModelConfig.fused_qkv``). Off
        by default, as in ``load_model``; runs pass ``ExperimentConfig.fused_qkv`` (on by default).
    """
    source = model_source(model)
    tokenizer = _tokenizer(str(source)).with_prompt_format(prompt_format)
    kwargs = dict(
        dtype=jnp.dtype(dtype), max_length=max_length, cache_dir=cache_dir() / "orbax", rope_policy=rope_policy,
        fused_qkv=fused_qkv,
    )
    if mesh == "1x1":
        return ModelBundle(load_model(source, **kwargs), tokenizer)
    from sparse_jax.distributed.mesh import MeshConfig, make_mesh
    from sparse_jax.distributed.placement import load_sharded_model

    device_mesh = make_mesh(MeshConfig.parse(mesh), _num_kv_heads(source))
    return ModelBundle(load_sharded_model(source, device_mesh, **kwargs), tokenizer, device_mesh)
