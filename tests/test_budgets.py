"""Every method's achieved counts equal the budget definition of docs/budgets.md on small cases.

One layer is run as the engine runs it (prefill, eviction, cache write, decode steps that
append the new token first), and the method's statistics are compared with counts
written from the document: masks built from the methods' indices for the prefill,
the documented read rules for the decode.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse.reference import index_to_mask as block_mask
from pallas_kernels.vertical_slash.reference import index_to_mask as vertical_slash_mask
from sparse_jax.attention.accounting import PhaseCounts
from sparse_jax.attention.base import LayerSpec, causal_pair_count
from sparse_jax.attention.methods.block_sparse import block_sparse_index
from sparse_jax.attention.registry import get_method
from sparse_jax.attention.kv_cache import PagedKVCache, pages_for

B, T, H, G, D, S = 2, 128, 4, 2, 16, 16
LENGTHS = np.array([128, 100])
STEPS = 5
SCALE = D**-0.5
SNAP = dict(token_capacity=48, approximation_window=32, kernel_size=5, local_window=16, prefix_tokens=4)


def layer_inputs(seed=0, t=T):
    """``q [B, t, H, D]``, ``k, v [B, t, G, D]``; KV head 0 has a few dominant keys."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(ks[0], (B, t, H, D), jnp.float32)
    k = jax.random.normal(ks[1], (B, t, G, D), jnp.float32).at[:, 20:26, 0].multiply(6.0)
    v = jax.random.normal(ks[2], (B, t, G, D), jnp.float32)
    return q, k, v


def empty_cache(t=T):
    return PagedKVCache.allocate(batch=B, num_kv_heads=G, head_dim=D, pages_per_row=pages_for(t + STEPS, S),
                                 page_size=S, dtype=jnp.float32)


def one_layer_generation(method, q, k, v, *, lengths=LENGTHS, window=None):
    """Prefill, eviction and ``STEPS`` decode steps of one layer.

    Returns:
      ``(prefill PhaseCounts [B, H], decode PhaseCounts [B, H] summed over steps, kept)``
      from the method's own statistics.
    """
    layer = LayerSpec(index=0, scale=SCALE, sliding_window=window)
    lengths = jnp.asarray(lengths)
    _, stats = method.prefill(q, k, v, lengths=lengths, layer=layer)
    kept = method.compress(q, k, v, lengths=lengths, layer=layer)
    cache = empty_cache(q.shape[1]).write_prompt(k, v, lengths, kept=kept)
    decode = jax.jit(lambda q, cache: method.decode(q, cache, layer=layer))
    read = cached = 0.0
    for step in range(STEPS):
        cache = cache.append(k[:, step] + 1.0, v[:, step])
        _, dstats = decode(q[:, step], cache)
        read, cached = read + np.asarray(dstats.tokens_read), cached + np.asarray(dstats.tokens_cached)
    dense_pairs = np.broadcast_to(np.asarray(stats.causal_pairs)[:, None], (B, H))
    return PhaseCounts(np.asarray(stats.attended_pairs), dense_pairs), PhaseCounts(read, cached), kept


def causal_mask_pairs(mask, lengths=LENGTHS):
    """``[B, H]`` causal pairs inside each row's real prompt of a ``[B, H, t, t]`` mask."""
    mask = np.asarray(mask)
    live = np.tril(np.ones(mask.shape[-2:], bool))
    return np.stack([(mask[b, :, :n, :n] & live[:n, :n]).sum((-1, -2)) for b, n in enumerate(lengths)])


def quest_reads(n, budget):
    """Tokens Quest reads with ``n`` cached: the best ``budget / S`` complete pages plus the current page."""
    complete = (n - 1) // S
    return min(budget // S, complete) * S + (n - complete * S)


def full_cache_tokens(n):
    """``[B, H]`` decode dense count summed over the steps: ``sum_s (L + s)``."""
    per_row = np.array([sum(length + s for s in range(1, STEPS + 1)) for length in n], np.float64)
    return np.broadcast_to(per_row[:, None], (B, H))


def _assert_dense_prefill(prefill):
    np.testing.assert_array_equal(prefill.dense, np.broadcast_to((LENGTHS * (LENGTHS + 1) / 2)[:, None], (B, H)))
    np.testing.assert_array_equal(prefill.attended, prefill.dense)


def test_dense_counts_every_pair_and_every_cached_token_the_new_one_included():
    prefill, decode, _ = one_layer_generation(get_method("dense"), *layer_inputs())
    _assert_dense_prefill(prefill)
    np.testing.assert_array_equal(decode.dense, full_cache_tokens(LENGTHS))
    np.testing.assert_array_equal(decode.attended, decode.dense)


def test_sliding_window_layers_count_their_window_as_dense():
    for name in ("dense", "block_sparse", "quest", "snapkv"):
        args = SNAP if name == "snapkv" else {}
        prefill, decode, _ = one_layer_generation(get_method(name, **args), *layer_inputs(), window=40)
        want = np.asarray(causal_pair_count(jnp.asarray(LENGTHS), 40))
        np.testing.assert_array_equal(prefill.dense[:, 0], want)
        np.testing.assert_array_equal(prefill.attended, prefill.dense)
        np.testing.assert_array_equal(decode.dense, 40.0 * STEPS)
        np.testing.assert_array_equal(decode.attended, decode.dense)


def test_block_sparse_counts_the_causal_pairs_of_its_tiles_sink_and_diagonals_included():
    method = get_method("block_sparse", chunk_size=16, top_chunks=3)
    q, k, v = layer_inputs(1)
    prefill, decode, _ = one_layer_generation(method, q, k, v)
    top, k_max = method.top_chunks_for(jnp.asarray(LENGTHS), T)
    index = block_sparse_index(q, k, jnp.asarray(LENGTHS), top, block_size=16, max_chunks=k_max)
    mask = np.asarray(block_mask(index, T))
    np.testing.assert_array_equal(prefill.attended, causal_mask_pairs(mask))
    # The full 128-token row: 8 query blocks reading min(m + 1, 3) blocks, one of them the diagonal.
    full_rows = sum(16 * 17 / 2 + (min(m + 1, 3) - 1) * 16 * 16 for m in range(8))
    np.testing.assert_array_equal(prefill.attended[0], full_rows)
    assert mask[:, :, :, :16].any(-1).all() and mask[:, :, np.arange(T), np.arange(T)].all()  # sink, diagonal
    np.testing.assert_array_equal(decode.attended, decode.dense)  # decode is dense


VS_T, VS_LENGTHS = 384, np.array([384, 300])  # 64 local diagonals make shorter prompts dense


@pytest.mark.parametrize("name, kwargs", [
    ("vertical_and_slash", dict(sparsity=0.8, approximation_size=32)),
    ("flexprefill", dict(sparsity=0.8, alpha=0.3, approximation_size=32)),
])
def test_vertical_slash_methods_count_the_union_of_columns_and_diagonals_once(name, kwargs):
    method = get_method(name, **kwargs)
    q, k, v = layer_inputs(2, VS_T)
    prefill, decode, _ = one_layer_generation(method, q, k, v, lengths=VS_LENGTHS)
    assert (prefill.attended < 0.9 * prefill.dense).sum() >= 4, "the case is too dense to test anything"
    index = method.index(q, k, jnp.asarray(VS_LENGTHS), LayerSpec(index=0, scale=SCALE))
    mask = np.asarray(vertical_slash_mask(index, VS_T))
    np.testing.assert_array_equal(prefill.attended, causal_mask_pairs(mask, VS_LENGTHS))
    rows, cols = np.tril_indices(VS_T)
    assert mask[:, :, rows[cols < 4], cols[cols < 4]].all(), "sink columns 0..3 are not all kept"
    near = rows - cols < 64
    assert mask[:, :, rows[near], cols[near]].all(), "the 64 nearest diagonals are not all kept"
    np.testing.assert_array_equal(decode.attended, decode.dense)  # decode is dense


@pytest.mark.parametrize("name", ["snapkv", "ada_snapkv"])
def test_eviction_reads_the_kept_tokens_plus_the_generated_ones(name):
    prefill, decode, kept = one_layer_generation(get_method(name, **SNAP), *layer_inputs(3))
    _assert_dense_prefill(prefill)
    counts = np.asarray(kept.counts)  # [B, G]
    if name == "snapkv":
        np.testing.assert_array_equal(counts, 48)
    else:
        np.testing.assert_array_equal(counts.sum(1), 48 * G)
    for b in range(B):
        for g in range(G):
            ids = set(np.asarray(kept.indices[b, g, : counts[b, g]]).tolist())
            n = int(LENGTHS[b])
            assert set(range(4)) | set(range(n - 16, n)) <= ids, "prefix and local window are part of the budget"
    per_head = np.repeat(counts, H // G, axis=1)
    np.testing.assert_array_equal(decode.attended, STEPS * per_head + sum(range(1, STEPS + 1)))
    np.testing.assert_array_equal(decode.dense, full_cache_tokens(LENGTHS))


@pytest.mark.parametrize("kwargs, budget", [(dict(token_budget=32), lambda n: 32),
                                            (dict(sparsity=0.75), lambda n: int(np.ceil(0.25 * n / S)) * S)])
def test_quest_reads_its_pages_plus_the_current_page(kwargs, budget):
    prefill, decode, _ = one_layer_generation(get_method("quest", page_size=S, **kwargs), *layer_inputs(4))
    _assert_dense_prefill(prefill)
    want = [sum(quest_reads(n + s, budget(n + s)) for s in range(1, STEPS + 1)) for n in LENGTHS]
    np.testing.assert_array_equal(decode.attended, np.broadcast_to(np.array(want, float)[:, None], (B, H)))
    np.testing.assert_array_equal(decode.dense, full_cache_tokens(LENGTHS))
    assert (decode.attended < decode.dense).all()
