"""Which mesh axes each parameter, KV-cache array and batch dimension is split over.

Parameters (flat names as in :meth:`Transformer.flat_params`, kernels ``[in, out]``; the
rules split a parameter's trailing dimensions, so the decoder layers' parameters, stacked
``[num_layers, ...]``, keep their layer axis whole on every device):

================================================  ==================================
``self_attn.{q,k,v,qkv}_proj.kernel`` / ``.bias``  output (heads) over ``model``
``self_attn.o_proj.kernel``                        input (heads) over ``model``
``mlp.{gate,up}_proj.kernel`` / ``.bias``          output (hidden) over ``model x kv_replica``
``mlp.down_proj.kernel``                           input (hidden) over ``model x kv_replica``
``embed_tokens.embedding``, ``lm_head``            vocabulary over ``model x kv_replica``
everything else (norms, ``o_proj.bias``)           replicated
================================================  ==================================

The fused ``qkv_proj`` (``ModelConfig.fused_qkv``) orders its output KV group by KV group
(:mod:`sparse_jax.models.layers`), so an even split of it gives each device the query, key
and value heads of its KV heads, the same heads as the separate projections' splits.

A dimension that the axes do not divide (e.g. a vocabulary of 151646 on 4 devices) is
replicated instead. Attention weights always divide: :func:`make_mesh` sizes ``model``
to a divisor of the KV heads.

KV caches (:class:`~sparse_jax.attention.kv_cache.PagedKVCache`, one layer's) are split by KV head over
``model``; their page pools and per-row arrays also by sequence over ``data`` when the
batch divides it (see :func:`batch_axis`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sparse_jax.attention.kv_cache import PagedKVCache
from sparse_jax.distributed.mesh import DATA, MODEL, TENSOR_AXES, MeshError, check_mesh
from sparse_jax.models.config import ModelConfig

# (pattern on the flat name, the spec of a parameter of that rank)
_RULES: tuple[tuple[re.Pattern, P], ...] = tuple(
    (re.compile(pattern), spec)
    for pattern, spec in (
        (r"self_attn\.(q|k|v|qkv)_proj\.kernel$", P(None, MODEL)),
        (r"self_attn\.(q|k|v|qkv)_proj\.bias$", P(MODEL)),
        (r"self_attn\.o_proj\.kernel$", P(MODEL, None)),
        (r"mlp\.(gate|up)_proj\.kernel$", P(None, TENSOR_AXES)),
        (r"mlp\.(gate|up)_proj\.bias$", P(TENSOR_AXES)),
        (r"mlp\.down_proj\.kernel$", P(TENSOR_AXES, None)),
        (r"^(embed_tokens\.embedding|lm_head)$", P(TENSOR_AXES, None)),
    )
)


def _axes_size(mesh: Mesh, axes: str | tuple[str, ...] | None) -> int:
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else axes
    size = 1
    for a in names:
        size *= mesh.shape[a]
    return size


def param_spec(name: str, shape: Sequence[int], mesh: Mesh) -> P:
    """The :class:`PartitionSpec` of parameter ``name`` of ``shape`` (see the module table)."""
    for pattern, spec in _RULES:
        if pattern.search(name):
            axes = [None] * (len(shape) - len(spec))  # leading (layer) axes stay whole
            for size, axis in zip(shape[len(axes) :], spec):
                if size % _axes_size(mesh, axis) == 0:
                    axes.append(axis)
                elif axis == MODEL:  # attention must split by whole KV heads
                    raise MeshError(
                        f"parameter {name!r} of shape {tuple(shape)} does not split {mesh.shape[MODEL]} ways by heads; "
                        "build the mesh for this model: make_mesh(mesh_config, num_kv_heads=<its KV heads>)"
                    )
                else:
                    axes.append(None)
            return P(*axes)
    return P()


def param_shardings(
    shapes: Mapping[str, jax.ShapeDtypeStruct | jax.Array], mesh: Mesh
) -> dict[str, NamedSharding]:
    """Flat name -> :class:`NamedSharding` for every parameter in ``shapes``."""
    check_mesh(mesh)
    return {name: NamedSharding(mesh, param_spec(name, leaf.shape, mesh)) for name, leaf in shapes.items()}


def check_model_fits(config: ModelConfig, mesh: Mesh) -> None:
    """Raise unless the mesh's ``model`` axis divides the model's KV heads."""
    check_mesh(mesh)
    shards = mesh.shape[MODEL]
    if config.num_kv_heads % shards:
        raise MeshError(
            f"the mesh splits KV heads {shards} ways but the model has {config.num_kv_heads}; build the mesh "
            f"for this model: make_mesh(mesh_config, num_kv_heads={config.num_kv_heads})"
        )


def batch_axis(mesh: Mesh, batch: int) -> str | None:
    """``"data"`` if a batch of ``batch`` sequences splits evenly over it, else ``None`` (replicated)."""
    return DATA if batch % mesh.shape[DATA] == 0 else None


def cache_specs(batch_spec: str | None) -> PagedKVCache:
    """A :class:`PagedKVCache` of the :class:`PartitionSpec` of each of its arrays.

    Pools ``[G, N, S, d]`` split by KV head over ``model`` and by page over ``batch_spec``
    (rows own contiguous page runs, so a ``data`` shard holds the pages of its rows).
    """
    return PagedKVCache(
        k_pages=P(MODEL, batch_spec, None, None),
        v_pages=P(MODEL, batch_spec, None, None),
        k_min=P(MODEL, batch_spec, None),
        k_max=P(MODEL, batch_spec, None),
        page_table=P(batch_spec, MODEL, None),
        lengths=P(batch_spec, MODEL),
        seq_lengths=P(batch_spec),
    )


def cache_shardings(mesh: Mesh, batch: int) -> PagedKVCache:
    """:func:`cache_specs` as :class:`NamedSharding` for a cache of ``batch`` rows."""
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec), cache_specs(batch_axis(mesh, batch)), is_leaf=lambda x: isinstance(x, P)
    )


def batch_sharding(mesh: Mesh, batch: int, rank: int) -> NamedSharding:
    """Sharding of a ``[batch, ...]`` input of ``rank`` dims (tokens, lengths): rows over ``data``."""
    return NamedSharding(mesh, P(batch_axis(mesh, batch), *([None] * (rank - 1))))
