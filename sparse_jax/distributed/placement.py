"""Models and engines placed on a mesh: sharded parameters plus per-shard attention."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

from jax.sharding import Mesh

from sparse_jax.attention.base import AttentionMethod
from sparse_jax.attention.registry import get_method
from sparse_jax.distributed.sharded_method import shard_method
from sparse_jax.distributed.sharding import check_model_fits, param_shardings
from sparse_jax.engine.generate import Engine, EngineConfig
from sparse_jax.models.loading import LoadedModel, load_model
from sparse_jax.models.transformer import Transformer


def shard_model(model: Transformer, mesh: Mesh) -> Transformer:
    """A copy of ``model`` whose parameters are split over ``mesh`` (:mod:`.sharding` rules)."""
    check_model_fits(model.config, mesh)
    params = model.flat_params()
    return Transformer.from_flat_params(
        model.config,
        params,
        dtype=model.dtype,
        param_dtype=model.embed_tokens.embedding.dtype,
        shardings=param_shardings(params, mesh),
    )


def load_sharded_model(source: str | Path, mesh: Mesh, **kwargs: Any) -> LoadedModel:
    """:func:`~sparse_jax.models.loading.load_model` straight into ``mesh``'s shardings.

    A checkpoint is converted tensor by tensor into the shards; an Orbax cache entry is
    restored shard by shard (each device reads only its slices). ``kwargs`` as
    ``load_model`` (``dtype``, ``max_length``, ``cache_dir``, ``fused_qkv``).
    """
    loaded = load_model(source, shardings=functools.partial(param_shardings, mesh=mesh), **kwargs)
    check_model_fits(loaded.config, mesh)
    return loaded


def sharded_engine(
    model: Transformer, method: AttentionMethod | str, mesh: Mesh, config: EngineConfig = EngineConfig()
) -> Engine:
    """An :class:`Engine` running ``model`` sharded over ``mesh`` with ``method`` per shard.

    ``model`` may already be sharded (e.g. from :func:`load_sharded_model`); it is
    placed on ``mesh`` otherwise. ``config.prefill_backend`` applies on each shard.
    """
    method = get_method(method) if isinstance(method, str) else method
    sharded = shard_method(method, mesh, config.prefill_backend)
    if sharded is not method:  # the engine calls the wrapper's prefill, which picks the backend per shard
        config = dataclasses.replace(config, prefill_backend="method")
    return Engine(shard_model(model, mesh), sharded, config)

