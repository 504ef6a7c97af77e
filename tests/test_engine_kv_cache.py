"""The paged KV cache: prefill writes (full and evicted), appends and page summaries."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_decode.reference import gather_rows
from sparse_jax.attention.kv_cache import KeptTokens, PagedKVCache, StackedPagedKVCache

B, G, D, S, P = 3, 2, 4, 4, 5  # rows, KV heads, head dim, page size, pages per row


def empty():
    return PagedKVCache.allocate(batch=B, num_kv_heads=G, head_dim=D, pages_per_row=P, page_size=S, dtype=jnp.float32)


@jax.jit
def write(cache, k, v, lengths, row_start=0, kept=None):
    return cache.write_prompt(k, v, lengths, row_start=row_start, kept=kept)


append = jax.jit(PagedKVCache.append)


def rows(cache):
    """``[B, G, P * S, d]`` K and V as each row sees them through its page table."""
    return gather_rows(cache.k_pages, cache.page_table, G), gather_rows(cache.v_pages, cache.page_table, G)


def check_summaries(cache):
    """Every page summary equals the min/max of the page's valid keys (+-inf when empty)."""
    k, _ = rows(cache)
    k = np.asarray(k).reshape(B, G, P, S, D)
    valid = np.arange(P * S).reshape(P, S)[None, None] < np.asarray(cache.lengths)[:, :, None, None]
    want_min = np.where(valid[..., None], k, np.inf).min(3)
    want_max = np.where(valid[..., None], k, -np.inf).max(3)
    heads = np.arange(G)[None, :, None]
    np.testing.assert_array_equal(np.asarray(cache.k_min)[heads, np.asarray(cache.page_table)], want_min)
    np.testing.assert_array_equal(np.asarray(cache.k_max)[heads, np.asarray(cache.page_table)], want_max)


def test_write_prompt_into_a_row_range_then_append_across_a_page_boundary():
    key = jax.random.PRNGKey(0)
    k, v = jax.random.normal(key, (2, 2, 8, G, D))  # two rows, bucket of 8 tokens
    lengths = jnp.array([3, 8], jnp.int32)
    cache = write(empty(), k, v, lengths, 1)
    np.testing.assert_array_equal(cache.lengths, [[0, 0], [3, 3], [8, 8]])
    np.testing.assert_array_equal(cache.seq_lengths, [0, 3, 8])
    kr, vr = rows(cache)
    for i, n in enumerate([3, 8]):
        np.testing.assert_array_equal(kr[1 + i, :, :n], jnp.swapaxes(k[i, :n], 0, 1))
        np.testing.assert_array_equal(vr[1 + i, :, :n], jnp.swapaxes(v[i, :n], 0, 1))
    check_summaries(cache)

    new = jax.random.normal(jax.random.PRNGKey(1), (6, B, G, D))
    for step in range(3):
        cache = append(cache, new[2 * step], new[2 * step + 1])
        check_summaries(cache)
    np.testing.assert_array_equal(cache.lengths, [[3, 3], [6, 6], [11, 11]])
    kr, vr = rows(cache)
    np.testing.assert_array_equal(kr[2, :, 8:11], jnp.swapaxes(new[0::2, 2], 0, 1))  # row 2: pages 2 and 3
    np.testing.assert_array_equal(vr[1, :, 3:6], jnp.swapaxes(new[1::2, 1], 0, 1))
    np.testing.assert_array_equal(kr[1, :, :3], jnp.swapaxes(k[0, :3], 0, 1))  # the prompt is untouched


def test_write_kept_tokens_per_head_lengths_differ():
    k, v = jax.random.normal(jax.random.PRNGKey(2), (2, B, 12, G, D))
    indices = jnp.array([[[0, 5, 11, 0], [1, 2, 3, 9]]] * B, jnp.int32)  # head 0 keeps 3, head 1 keeps 4
    counts = jnp.array([[3, 4]] * B, jnp.int32)
    kept = KeptTokens(indices, counts, jnp.zeros(B))
    cache = write(empty(), k, v, jnp.full((B,), 12, jnp.int32), kept=kept)
    np.testing.assert_array_equal(cache.lengths, counts)
    np.testing.assert_array_equal(cache.seq_lengths, [12] * B)
    kr, vr = rows(cache)
    for g, idx in enumerate([[0, 5, 11], [1, 2, 3, 9]]):
        np.testing.assert_array_equal(kr[:, g, : len(idx)], k[:, idx, g])
        np.testing.assert_array_equal(vr[:, g, : len(idx)], v[:, idx, g])
    check_summaries(cache)
    cache = append(cache, *jax.random.normal(jax.random.PRNGKey(3), (2, B, G, D)))
    np.testing.assert_array_equal(cache.lengths, counts + 1)  # appended after the kept tokens
    check_summaries(cache)


def test_dense_decode_after_writes_matches_attention_over_the_rows():
    k, v = jax.random.normal(jax.random.PRNGKey(4), (2, B, 16, G, D))
    lengths = jnp.array([1, 9, 16], jnp.int32)
    cache = write(empty(), k, v, lengths)
    q = jax.random.normal(jax.random.PRNGKey(5), (B, 2 * G, D))
    out, stats = jax.jit(lambda c, q: c.dense_decode(q, scale=0.5))(cache, q)
    for b, n in enumerate([1, 9, 16]):
        kb = jnp.repeat(k[b, :n], 2, axis=1)  # [n, H, d]
        p = jax.nn.softmax(jnp.einsum("hd,nhd->hn", q[b], kb) * 0.5, axis=-1)
        want = jnp.einsum("hn,nhd->hd", p, jnp.repeat(v[b, :n], 2, axis=1))
        np.testing.assert_allclose(out[b], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(stats.tokens_read[:, 0], [1, 9, 16])


def test_prompt_longer_than_the_rows_is_refused():
    k = jnp.zeros((1, 24, G, D))
    with pytest.raises(ValueError, match="needs 6 pages per row but the cache has 5"):
        empty().write_prompt(k, k, jnp.array([24], jnp.int32))


def test_stacked_layers_own_disjoint_pages_and_rows_are_contiguous():
    layers = 3
    stack = StackedPagedKVCache.allocate(num_layers=layers, batch=B, num_kv_heads=G, head_dim=D, pages_per_row=P,
                                         page_size=S, dtype=jnp.float32)
    table = np.asarray(stack.page_table)  # [L, B, G, P]
    assert stack.k_pages.shape == (G, B * layers * P, S, D) and stack.num_layers == layers
    pages = np.sort(table[:, :, 0].reshape(-1))  # every (layer, row) owns its pages, together the whole pool
    np.testing.assert_array_equal(pages, np.arange(B * layers * P))
    for b in range(B):  # a row's pages of all layers are one run: a split of the pool by page keeps rows whole
        np.testing.assert_array_equal(np.sort(table[:, b, 0].reshape(-1)), b * layers * P + np.arange(layers * P))
    np.testing.assert_array_equal(table[..., 0, :], table[..., 1, :])  # the same pages in every head's pool


def test_a_layer_of_the_stack_writes_only_its_own_pages():
    stack = StackedPagedKVCache.allocate(num_layers=2, batch=B, num_kv_heads=G, head_dim=D, pages_per_row=P,
                                         page_size=S, dtype=jnp.float32)
    k, v = jax.random.normal(jax.random.PRNGKey(3), (2, B, 6, G, D))
    lengths = jnp.array([6, 2, 5], jnp.int32)
    layer1 = write(stack.layer(1), k, v, lengths)
    layer1 = append(layer1, k[:, 0], v[:, 0])
    stack = stack.with_layer(1, layer1)
    untouched, written = stack.layer(0), stack.layer(1)
    assert int(untouched.lengths.sum()) == 0 and np.all(np.isinf(np.asarray(untouched.k_min)[:, untouched.page_table]))
    np.testing.assert_array_equal(written.lengths, np.broadcast_to((lengths + 1)[:, None], (B, G)))
    np.testing.assert_array_equal(written.seq_lengths, lengths + 1)
    k_rows, _ = rows(written)  # what layer 1 reads through its table: the prompt, then the appended token
    for b, n in enumerate(np.asarray(lengths)):
        np.testing.assert_array_equal(np.asarray(k_rows)[b, :, :n], np.swapaxes(np.asarray(k[b, :n]), 0, 1))
        np.testing.assert_array_equal(np.asarray(k_rows)[b, :, n], np.asarray(k[b, 0]))
    check_summaries(written)
    flat = np.asarray(stack.k_pages)[:, np.asarray(untouched.page_table)[:, 0].reshape(-1)]
    assert not flat.any()  # layer 0's pages are still empty
