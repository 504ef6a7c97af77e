"""Dense-attention coverage and needle recall of method selections (sparse_jax.diagnostics)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse.reference import index_to_mask as block_mask
from pallas_kernels.vertical_slash.reference import index_to_mask as vs_mask
from sparse_jax.attention.base import LayerSpec
from sparse_jax.attention.registry import get_method
from sparse_jax.diagnostics.capture import decode_diagnostics, prefill_diagnostics, prefill_index
from sparse_jax.diagnostics.coverage import kept_slots
from sparse_jax.attention.kv_cache import PagedKVCache

B, T, H, G, D = 2, 160, 4, 2, 16
GROUP = H // G
LENGTHS = np.array([160, 117])
LAYER = LayerSpec(index=0, scale=D**-0.5)
S = 8


def _probs(q, k, n):
    """float64 ``[n, n]`` causal softmax of one head."""
    s = np.asarray(q[:n], np.float64) @ np.asarray(k[:n], np.float64).T * LAYER.scale
    s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def _inputs(seed):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, T, H, D)).astype(np.float32)
    k = rng.normal(size=(B, T, G, D)).astype(np.float32)
    k[:, 40] += 2.0 * q[:, -30:, :GROUP].mean((1, 2))[:, None]  # a key the late queries like
    return jnp.asarray(q), jnp.asarray(k)


@pytest.mark.parametrize(
    "name, kwargs, to_mask",
    [
        ("block_sparse", dict(chunk_size=8, top_chunks=5), block_mask),
        pytest.param("vertical_and_slash", dict(vertical_size=8, slash_size=64, approximation_size=32), vs_mask,
                     marks=pytest.mark.slow),
        pytest.param("flexprefill", dict(alpha=0.3, min_budget=64, approximation_size=32), vs_mask,
                     marks=pytest.mark.slow),
    ],
)
def test_prefill_coverage_and_needle_recall_match_the_mask(name, kwargs, to_mask):
    q, k = _inputs(0)
    method = get_method(name, **kwargs)
    needles = jnp.asarray([[40, 100], [40, -1]], jnp.int32)
    diag = jax.jit(lambda q, k, n, nd: prefill_diagnostics(method, q, k, n, LAYER, nd))(
        q, k, jnp.asarray(LENGTHS), needles)
    mask = np.asarray(to_mask(prefill_index(method, q, k, jnp.asarray(LENGTHS), LAYER), T))
    for b, n in enumerate(LENGTHS):
        for h in range(H):
            p = _probs(np.asarray(q[b, :, h]), np.asarray(k[b, :, h // GROUP]), n)
            m = mask[b, h, :n, :n]
            np.testing.assert_allclose(float(diag.coverage[b, h]), (p * m).sum() / n, rtol=1e-5)
            due = [(i, j) for j in np.asarray(needles[b]) if j >= 0 for i in range(j, n)]
            want = np.mean([m[i, j] for i, j in due])
            np.testing.assert_allclose(float(diag.needle[b, h]), want, rtol=1e-6)
    assert float(diag.coverage.min()) < 0.999  # the cases are sparse enough to miss mass


def test_dense_prefill_covers_everything():
    q, k = _inputs(1)
    diag = prefill_diagnostics(get_method("snapkv"), q, k, jnp.asarray(LENGTHS), LAYER)
    np.testing.assert_array_equal(np.asarray(diag.coverage), np.ones((B, H)))


def _cache(k_tok, v_tok, lengths):
    cache = PagedKVCache.allocate(batch=B, num_kv_heads=G, head_dim=D, pages_per_row=-(-k_tok.shape[1] // S) + 1,
                                  page_size=S, dtype=jnp.float32)
    return cache.write_prompt(jnp.asarray(k_tok), jnp.asarray(v_tok), jnp.asarray(lengths, jnp.int32))


def _decode_probs(q, k, n):
    s = np.asarray(k[:n], np.float64) @ np.asarray(q, np.float64) * LAYER.scale
    p = np.exp(s - s.max())
    return p / p.sum()


@pytest.mark.parametrize("name", ["quest", "oracle_quest"])
@pytest.mark.parametrize("share", [True, False])
def test_quest_decode_coverage_matches_its_pages(name, share):
    rng = np.random.default_rng(2)
    lengths = np.array([203, 131])
    q = rng.normal(size=(B, H, D)).astype(np.float32)
    k_tok = rng.normal(size=(B, 203, G, D)).astype(np.float32)
    cache = _cache(k_tok, k_tok, lengths)
    method = get_method(name, token_budget=48, page_size=S, share_pages=share)
    needles = jnp.asarray([[29, 200], [5, -1]], jnp.int32)
    diag = jax.jit(lambda q, c, nd: decode_diagnostics(method, q, c, LAYER, nd))(jnp.asarray(q), cache, needles)
    table, row_lengths, _ = method.read_table(jnp.asarray(q), cache, LAYER)
    rows = np.asarray(cache.page_table)
    for b, n in enumerate(lengths):
        for h in range(H):
            r = h // GROUP if share else h
            pages = [int(np.flatnonzero(rows[b, h // GROUP] == p)[0]) for p in np.asarray(table[b, r])]
            tokens = np.concatenate([np.arange(p * S, (p + 1) * S) for p in pages])[: int(row_lengths[b, r])]
            p = _decode_probs(q[b, h], k_tok[b, :, h // GROUP], n)
            np.testing.assert_allclose(float(diag.coverage[b, h]), p[tokens].sum(), rtol=1e-5)
            want = [int(x) in set(tokens.tolist()) for x in np.asarray(needles[b]) if x >= 0]
            assert np.asarray(diag.needle[b, h])[: len(want)].tolist() == want
    assert not np.asarray(diag.needle[1, :, 1]).any()  # unused needle slot


def test_eviction_coverage_reads_kept_and_generated_tokens():
    rng = np.random.default_rng(3)
    lengths = np.array([100, 90])
    q = rng.normal(size=(B, H, D)).astype(np.float32)
    k_tok = rng.normal(size=(B, 100, G, D)).astype(np.float32)
    cache = _cache(k_tok, k_tok, lengths)
    prompt = 80  # tokens 80.. play the generated ones
    indices = np.tile(np.arange(0, 80, 2, dtype=np.int32), (B, G, 1))
    kept = kept_slots(jnp.asarray(indices), jnp.asarray([[40, 40], [40, 30]]), prompt)
    diag = decode_diagnostics(get_method("snapkv"), jnp.asarray(q), cache, LAYER, kept=kept)
    with pytest.raises(ValueError, match="kept"):
        decode_diagnostics(get_method("snapkv"), jnp.asarray(q), cache, LAYER)
    for b, n in enumerate(lengths):
        for h in range(H):
            count = 40 if (b, h // GROUP) != (1, 1) else 30
            tokens = np.concatenate([indices[b, 0, :count], np.arange(prompt, n)])
            p = _decode_probs(q[b, h], k_tok[b, :, h // GROUP], n)
            np.testing.assert_allclose(float(diag.coverage[b, h]), p[tokens].sum(), rtol=1e-5)


def test_oracle_tokens_cover_at_least_snapkvs_budget_worth():
    rng = np.random.default_rng(4)
    lengths = np.array([100, 90])
    q = rng.normal(size=(B, H, D)).astype(np.float32)
    k_tok = rng.normal(size=(B, 100, G, D)).astype(np.float32)
    cache = _cache(k_tok, k_tok, lengths)
    oracle = decode_diagnostics(get_method("oracle_tokens", token_capacity=40, local_window=8, prefix_tokens=2),
                                jnp.asarray(q), cache, LAYER)
    dense = decode_diagnostics(get_method("dense"), jnp.asarray(q), cache, LAYER)
    np.testing.assert_allclose(np.asarray(dense.coverage), 1.0, rtol=1e-5)
    # The best 40 of ~100 tokens of a random query hold more than 40% of its mass.
    assert float(oracle.coverage.min()) > 0.4 and float(oracle.coverage.max()) < 1.0


def test_dense_decode_covers_everything_on_a_sliding_window_layer():
    """The module's contract: dense attention covers 1, also where the layer's dense attention is windowed.

    A sliding-window layer attends to its last ``window`` tokens only, so its dense mass outside them is 0
    and a token there holds no needle mass either (the reference distribution was the full causal one,
    which gave Gemma 3's 15 local layers a dense coverage well below 1).
    """
    rng = np.random.default_rng(5)
    lengths = np.array([100, 90])
    q = rng.normal(size=(B, H, D)).astype(np.float32)
    k_tok = rng.normal(size=(B, 100, G, D)).astype(np.float32)
    cache = _cache(k_tok, k_tok, lengths)
    local = LAYER._replace(sliding_window=32)
    needles = jnp.asarray([[10, 95], [10, 80]], jnp.int32)  # token 10 lies outside both rows' windows
    dense = decode_diagnostics(get_method("dense"), jnp.asarray(q), cache, local, needles)
    np.testing.assert_allclose(np.asarray(dense.coverage), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(dense.needle_mass[:, :, 0]), 0.0)
