"""``load_model``: a Hugging Face folder or a ``.gguf`` file -> a ready Flax model.

With ``cache_dir`` the converted parameters are stored once with Orbax and restored
on later runs (see :mod:`sparse_jax.checkpoints.orbax_cache`).

Loading logs (logger ``sparse_jax.models.loading``, INFO) which RoPE the model runs, and
warns once per source when the checkpoint names no stop token.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sparse_jax.checkpoints import hf, orbax_cache
from sparse_jax.models.config import ConfigError, ModelConfig, RopePolicy
from sparse_jax.models.transformer import Transformer

log = logging.getLogger(__name__)
_warned_no_stop_ids: set[Path] = set()


class LoadedModel(NamedTuple):
    """A loaded model.

    Attributes:
      model: the Flax transformer.
      config: its architecture (with the RoPE of the run; see ``config.rope_description()``).
      stop_ids: generation stop token ids; empty when the checkpoint names none
        (generation then runs to its token limit).
      source: the folder or file it came from.
      from_cache: whether the parameters were restored from the Orbax cache.
    """

    model: Transformer
    config: ModelConfig
    stop_ids: tuple[int, ...]
    source: Path
    from_cache: bool = False


def _is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".gguf"


def _read_source(path: Path) -> tuple[dict[str, Any], dict[str, Any], tuple[int, ...]]:
    """``(hf_config, tensors, stop_ids)`` of a folder or a GGUF file."""
    if _is_gguf(path):
        from sparse_jax.checkpoints.gguf import read_gguf

        contents = read_gguf(path)
        stop_ids = tuple(dict.fromkeys(ModelConfig.from_hf_dict(contents.hf_config).eos_token_ids))
        return contents.hf_config, contents.tensors, stop_ids
    checkpoint = hf.read_checkpoint(path)
    return checkpoint.config, checkpoint.tensors, checkpoint.stop_ids


def _model_config(
    hf_config: dict[str, Any], path: Path, max_length: int | None, rope_policy: RopePolicy, fused_qkv: bool
) -> ModelConfig:
    where = path if _is_gguf(path) else path / hf.CONFIG_FILE
    try:
        config = ModelConfig.from_hf_dict(hf_config).with_fused_qkv(fused_qkv)
    except ConfigError as e:
        raise hf.CheckpointError(f"{where}: {e}") from e
    if max_length is not None:
        config = config.for_run_length(max_length, rope_policy)
    log.info("%s: %s", path, config.rope_summary())
    return config


def _warn_if_no_stop_ids(path: Path, stop_ids: tuple[int, ...]) -> None:
    """Warns once per source that generation will only stop at its token limit."""
    if stop_ids or path in _warned_no_stop_ids:
        return
    _warned_no_stop_ids.add(path)
    if _is_gguf(path):
        fix = f"set tokenizer.ggml.eos_token_id in the metadata of {path}"
    else:
        fix = f"add eos_token_id to {path / hf.GENERATION_CONFIG_FILE} (or {path / hf.CONFIG_FILE})"
    log.warning("%s: the checkpoint names no stop token, so generation runs to max_output_tokens; %s", path, fix)


def load_model(
    source: str | Path,
    *,
    dtype=jnp.bfloat16,
    max_length: int | None = None,
    rope_policy: RopePolicy = "auto",
    cache_dir: str | Path | None = None,
    shardings: Callable[[Mapping[str, jax.ShapeDtypeStruct]], Mapping[str, jax.sharding.Sharding]] | None = None,
    fused_qkv: bool = False,
) -> LoadedModel:
    """Loads a model for inference.

    Args:
      source: a Hugging Face checkpoint folder or a ``.gguf`` file.
      dtype: parameter and activation dtype (``jnp.bfloat16`` or ``jnp.float32``).
      max_length: longest run (prompt + output) this model will serve; decides the
        RoPE with ``rope_policy`` (:meth:`ModelConfig.for_run_length`): a Qwen2 checkpoint
        that declares no scaling runs YaRN past 32768 tokens.
      rope_policy: ``auto``, ``declared`` or ``run_length`` (see
        :meth:`ModelConfig.for_run_length`); used only with ``max_length``.
      cache_dir: folder for the Orbax parameter cache; ``None`` disables caching.
      shardings: parameter shapes (flat name -> ``ShapeDtypeStruct``) -> their target
        shardings (e.g. :func:`sparse_jax.distributed.sharding.param_shardings` with a
        mesh); parameters are converted or restored straight into them.
      fused_qkv: hold each layer's q/k/v projections as one weight (``ModelConfig.fused_qkv``),
        concatenated from the checkpoint's tensors; cached apart from the separate layout.
        Off by default (the checkpoint's layout); runs pass ``ExperimentConfig.fused_qkv``, on.

    Raises:
      FileNotFoundError: ``source`` does not exist.
      ValueError: unknown ``rope_policy``.
      CheckpointError / GGUFError: unreadable checkpoint, unsupported architecture,
        dtype or tensor shape (the message names the file and tensor).
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: model source not found (expected a Hugging Face folder or a .gguf file)")
    if path.is_file() and not _is_gguf(path):
        raise hf.CheckpointError(f"{path}: a model file must be a .gguf; for safetensors pass the checkpoint folder")

    key = None
    if cache_dir is not None:
        files = [path] if _is_gguf(path) else hf.source_files(path)
        key = orbax_cache.cache_key(path, files, dtype, fused_qkv=fused_qkv)
        meta = orbax_cache.load_meta(cache_dir, key)
        if meta is not None:
            config = _model_config(meta["hf_config"], path, max_length, rope_policy, fused_qkv)
            abstract = Transformer.param_shapes(config, dtype=dtype)
            placed = None if shardings is None else shardings(abstract)
            if placed is not None:  # Orbax reads each device's shard only
                abstract = {n: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=placed[n]) for n, a in abstract.items()}
            params = orbax_cache.restore_params(cache_dir, key, abstract)
            model = Transformer.from_flat_params(config, params, dtype=dtype, shardings=placed)
            stop_ids = tuple(meta["stop_ids"])
            _warn_if_no_stop_ids(path, stop_ids)
            return LoadedModel(model, config, stop_ids, path, from_cache=True)

    hf_config, tensors, stop_ids = _read_source(path)
    _warn_if_no_stop_ids(path, stop_ids)
    config = _model_config(hf_config, path, max_length, rope_policy, fused_qkv)
    try:
        placed = None if shardings is None else shardings(Transformer.param_shapes(config, dtype=dtype))
        model = Transformer.from_hf_tensors(config, tensors, dtype=dtype, progress=True, shardings=placed)
    except ValueError as e:
        raise hf.CheckpointError(f"{path}: {e}") from e
    if key is not None:
        meta = {"hf_config": hf_config, "stop_ids": list(stop_ids), "source": str(path.resolve())}
        orbax_cache.save_entry(cache_dir, key, model.flat_params(), meta)
    return LoadedModel(model, config, stop_ids, path)
