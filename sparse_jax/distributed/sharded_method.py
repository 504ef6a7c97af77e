"""An attention method run per device under ``shard_map``, each device on its own heads.

:class:`ShardedMethod` wraps any :class:`AttentionMethod`. Its ``prefill``, ``compress``
and ``decode`` split the inputs by KV head over the mesh's ``model`` axis (each device
sees ``G / K`` whole KV heads and all of their query heads) and by sequence over
``data`` when the batch divides it, then call the wrapped method (and its Pallas
kernels) on the local block. Results equal the unsharded method's:

* per-head outputs and statistics are concatenated back over heads;
* a per-sequence figure (``KeptTokens.reported_sparsity``) is a mean over KV heads in
  every method, so the shard means are averaged (``pmean``) over ``model``;
* methods that pool a budget across *all* KV heads of a layer (Ada-SnapKV,
  ``pools_kv_heads``) run ``compress`` outside ``shard_map`` on the whole
  layer; XLA partitions its per-head scoring by head and gathers the ``[B, G, T]``
  scores for the pooled top-k, so the selection is the one-device selection.

Decode runs on a local view of the layer's :class:`PagedKVCache`: pools and page table
are the device's KV heads (and rows); page ids are rebased to the local pool, which
relies on the engine's allocation (row ``b`` owns pages ``b * P .. b * P + P - 1``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from sparse_jax.attention.base import AttentionMethod, LayerSpec, PrefillStats
from sparse_jax.attention.kv_cache import DecodeStats, KeptTokens, PagedKVCache
from sparse_jax.distributed.mesh import DATA, MODEL, MeshError, check_mesh
from sparse_jax.distributed.sharding import batch_axis, cache_shardings, cache_specs
from sparse_jax.engine.prefill_attention import PrefillBackend, prefill_attention, resolve_backend


@dataclasses.dataclass(frozen=True)
class ShardedMethod(AttentionMethod):
    """``inner`` run per (``data``, ``model``) shard of ``mesh``.

    Attributes:
      inner: the method to run.
      mesh: a mesh from :func:`sparse_jax.distributed.mesh.make_mesh`.
      prefill_backend: backend of ``inner``'s dense prefill on each shard (``auto`` uses
        cuDNN flash attention on GPUs, as the unsharded engine does).
    """

    inner: AttentionMethod
    mesh: Mesh
    prefill_backend: PrefillBackend = "auto"

    def __post_init__(self):
        check_mesh(self.mesh)
        if isinstance(self.inner, ShardedMethod):
            raise MeshError("ShardedMethod wraps an unsharded method; got a ShardedMethod (shard it once)")

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.inner.name

    def describe(self):
        return self.inner.describe()

    def split(self) -> tuple[AttentionMethod, dict]:
        """Not split: ``inner`` runs inside ``shard_map``, whose bodies take their values as
        arguments, so its hyper-parameters stay constants of the program."""
        return self, {}

    def _specs(self, batch: int, num_kv_heads: int) -> tuple[str | None, P, P]:
        """``(batch axis, [B, T, heads, d] spec, [B, heads] spec)`` for this batch."""
        shards = self.mesh.shape[MODEL]
        if num_kv_heads % shards:
            raise MeshError(
                f"the mesh splits KV heads {shards} ways but this layer has {num_kv_heads}; build the mesh with "
                f"make_mesh(..., num_kv_heads={num_kv_heads})"
            )
        bx = batch_axis(self.mesh, batch)
        return bx, P(bx, None, MODEL, None), P(bx, MODEL)

    def _shard_map(self, fn, in_specs, out_specs):
        # check_vma=False: methods build loop carries from fresh (unvarying) zeros; outputs
        # whose specs omit `model` (per-sequence figures) are equal on every shard by construction.
        return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)

    def prefill(
        self, q: jax.Array, k: jax.Array, v: jax.Array, *, lengths: jax.Array, layer: LayerSpec
    ) -> tuple[jax.Array, PrefillStats]:
        bx, heads, per_head = self._specs(q.shape[0], k.shape[2])

        def local(q, k, v, lengths):
            backend = resolve_backend(self.prefill_backend, self.inner, q.dtype)
            return prefill_attention(self.inner, q, k, v, lengths=lengths, layer=layer, backend=backend)

        out_specs = (heads, PrefillStats(per_head, P(bx), per_head))
        return self._shard_map(local, (heads, heads, heads, P(bx)), out_specs)(q, k, v, lengths)

    def compress(
        self, q: jax.Array, k: jax.Array, v: jax.Array, *, lengths: jax.Array, layer: LayerSpec
    ) -> KeptTokens | None:
        compress = functools.partial(self.inner.compress, layer=layer)
        if self.inner.pools_kv_heads:
            return compress(q, k, v, lengths=lengths)
        bx, heads, per_head = self._specs(q.shape[0], k.shape[2])

        def local(q, k, v, lengths):
            kept = compress(q, k, v, lengths=lengths)
            return kept._replace(reported_sparsity=jax.lax.pmean(kept.reported_sparsity, MODEL))

        # Whether the method evicts at all is static (method and layer); ask on shapes only.
        if jax.eval_shape(lambda q, k, v, n: compress(q, k, v, lengths=n), q, k, v, lengths) is None:
            return None
        out_specs = KeptTokens(P(bx, MODEL, None), per_head, P(bx))
        return self._shard_map(local, (heads, heads, heads, P(bx)), out_specs)(q, k, v, lengths)

    def decode(self, q: jax.Array, cache: PagedKVCache, *, layer: LayerSpec) -> tuple[jax.Array, DecodeStats]:
        bx, _, per_head = self._specs(q.shape[0], cache.num_kv_heads)

        def local(q, cache):
            return self.inner.decode(q, _local_view(cache, bx), layer=layer)

        in_specs = (P(bx, MODEL, None), cache_specs(bx))
        return self._shard_map(local, in_specs, (P(bx, MODEL, None), DecodeStats(per_head, per_head)))(q, cache)

    # --- the KV cache per shard (the engine's CacheLayout hooks) ---------------------

    def cache_shardings(self, batch: int) -> PagedKVCache:
        """Shardings of a cache of ``batch`` rows: split by KV head, and by row when ``data`` divides ``batch``."""
        return cache_shardings(self.mesh, batch)

    def append_cache(self, cache: PagedKVCache, k: jax.Array, v: jax.Array) -> PagedKVCache:
        """:meth:`PagedKVCache.append` of ``k, v [B, G, d]`` on each shard's KV heads and rows."""
        bx, _, _ = self._specs(cache.batch, cache.num_kv_heads)
        specs = cache_specs(bx)

        def local(cache, k, v):
            return _local_view(cache, bx).append(k, v).replace(page_table=cache.page_table)

        return self._shard_map(local, (specs, P(bx, MODEL, None), P(bx, MODEL, None)), specs)(cache, k, v)

    def write_cache(
        self,
        cache: PagedKVCache,
        k: jax.Array,
        v: jax.Array,
        prompt_lengths: jax.Array,
        *,
        row_start: jax.Array | int = 0,
        kept: KeptTokens | None = None,
    ) -> PagedKVCache:
        """:meth:`PagedKVCache.write_prompt` on each shard (``k, v [b, T, G, d]``).

        A prefill micro-batch (``b`` < cache rows) may straddle ``data`` shards; it is
        written by XLA's partitioner instead.
        """
        if k.shape[0] != cache.batch:
            return cache.write_prompt(k, v, prompt_lengths, row_start=row_start, kept=kept)
        bx, heads, per_head = self._specs(cache.batch, cache.num_kv_heads)
        specs = cache_specs(bx)
        kept_specs = P() if kept is None else KeptTokens(P(bx, MODEL, None), per_head, P(bx))

        def local(cache, k, v, prompt_lengths, kept):
            view = _local_view(cache, bx).write_prompt(k, v, prompt_lengths, kept=kept)  # b == rows: row_start is 0
            return view.replace(page_table=cache.page_table)

        in_specs = (specs, heads, heads, P(bx), kept_specs)
        return self._shard_map(local, in_specs, specs)(cache, k, v, prompt_lengths, kept)


def _local_view(cache: PagedKVCache, batch_spec: str | None) -> PagedKVCache:
    """A shard's cache with page ids rebased to its slice of the pool.

    Split over ``data``, shard ``i`` holds rows ``i * b .. (i + 1) * b - 1`` and pool pages
    ``i * N_local .. (i + 1) * N_local - 1``, which are exactly those rows' pages.
    """
    if batch_spec is None:
        return cache
    offset = jax.lax.axis_index(DATA) * cache.k_pages.shape[1]
    return cache.replace(page_table=cache.page_table - offset)


def shard_method(method: AttentionMethod, mesh: Mesh, prefill_backend: PrefillBackend = "auto") -> AttentionMethod:
    """``method`` run per shard of ``mesh``; unchanged on a one-device mesh."""
    return method if mesh.size == 1 else ShardedMethod(method, mesh, prefill_backend)
