"""Decode-side methods (snapkv, ada_snapkv, quest) against numpy oracles of docs/reference_behaviour.md 4.5-4.7."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_decode.quest import quest_page_table
from sparse_jax.attention.base import LayerSpec
from sparse_jax.attention.kv_cache import PagedKVCache
from sparse_jax.attention.registry import get_method

B, T, H, G, D = 2, 192, 4, 2, 16
GROUP = H // G
LENGTHS = np.array([192, 150])
LAYER = LayerSpec(index=0, scale=D**-0.5)


def _inputs(seed=0, kv_heads=G):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(ks[0], (B, T, H, D), jnp.float32)
    k = jax.random.normal(ks[1], (B, T, kv_heads, D), jnp.float32)
    # KV head 0 gets a few dominant keys (peaked attention), the others stay diffuse.
    k = k.at[:, 20:26, 0].multiply(6.0)
    v = jax.random.normal(ks[2], (B, T, kv_heads, D), jnp.float32)
    return q, k, v


def _compress(method, q, k, v, lengths):
    run = jax.jit(lambda q, k, v, n: method.compress(q, k, v, lengths=n, layer=LAYER))
    return run(q, k, v, jnp.asarray(lengths))


def _group_probs(q, k, length, window):
    """``[g, A, L]`` bf16-rounded window probabilities of one KV head's group (pre-scaled queries)."""
    a = min(window, length)
    pos = np.arange(length - a, length)
    s = jnp.einsum("agd,td->gat", q[length - a : length] * LAYER.scale, k[:length])
    s = jnp.where(np.arange(length)[None, None, :] <= pos[None, :, None], s, -jnp.inf)
    return np.asarray(jax.nn.softmax(s, axis=-1).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


def _pool_and_force(imp, length, kernel, local, prefix):
    pooled = np.convolve(imp, np.ones(kernel) / kernel, mode="same")
    pooled[:prefix] = np.inf
    pooled[length - local :] = np.inf
    return pooled


def _kept_sets(kept, b):
    return [set(kept.indices[b, j, : kept.counts[b, j]].tolist()) for j in range(kept.counts.shape[1])]


SNAP = dict(token_capacity=48, approximation_window=32, kernel_size=5, local_window=16, prefix_tokens=4)


KV_HEADS = pytest.mark.parametrize("kv_heads", [G, 1])  # 1: one KV head for all query heads (Gemma 3 270M)


@KV_HEADS
def test_snapkv_selection_matches_oracle(kv_heads):
    q, k, v = _inputs(kv_heads=kv_heads)
    group = H // kv_heads
    kept = _compress(get_method("snapkv", **SNAP), q, k, v, LENGTHS)
    qn, kn = np.asarray(q), np.asarray(k)
    for b, n in enumerate(LENGTHS):
        for j in range(kv_heads):
            probs = _group_probs(qn[b, :, j * group : (j + 1) * group], kn[b, :, j], n, SNAP["approximation_window"])
            scores = _pool_and_force(probs.mean(0).sum(0), n, 5, 16, 4)
            want = set(np.argsort(-scores, kind="stable")[:48].tolist())
            assert _kept_sets(kept, b)[j] == want, (b, j)
            idx = np.asarray(kept.indices[b, j, : kept.counts[b, j]])
            assert np.all(np.diff(idx) > 0), "kept positions are not ascending"
    np.testing.assert_allclose(np.asarray(kept.reported_sparsity), 1 - 48 / LENGTHS, rtol=1e-6)


@KV_HEADS
def test_ada_snapkv_pools_budget_across_all_heads(kv_heads):
    q, k, v = _inputs(1, kv_heads)
    group = H // kv_heads
    kept = _compress(get_method("ada_snapkv", **SNAP, min_head_capacity_ratio=0.5), q, k, v, LENGTHS)
    m = max(int(48 * 0.5), 16 + 4)
    qn, kn = np.asarray(q), np.asarray(k)
    for b, n in enumerate(LENGTHS):
        scores = []
        for j in range(kv_heads):
            probs = _group_probs(qn[b, :, j * group : (j + 1) * group], kn[b, :, j], n, SNAP["approximation_window"])
            scores.append(_pool_and_force(probs.max(1).max(0), n, 5, 16, 4))
        scores = np.stack(scores)  # [G, L]
        own = np.zeros_like(scores, bool)
        for j in range(kv_heads):
            own[j, np.argsort(-scores[j], kind="stable")[:m]] = True
        rest = np.where(own, -np.inf, scores).ravel()
        pooled = np.zeros(rest.shape, bool)
        pooled[np.argsort(-rest, kind="stable")[: kv_heads * (48 - m)]] = True
        keep = own | pooled.reshape(kv_heads, n)
        assert _kept_sets(kept, b) == [set(np.flatnonzero(keep[j]).tolist()) for j in range(kv_heads)], b
        counts = np.asarray(kept.counts[b])
        assert counts.sum() == kv_heads * 48 and np.all(counts >= m)
    if kv_heads > 1:  # the peaked head 0 and a diffuse head get different budgets
        assert int(kept.counts[0, 0]) != int(kept.counts[0, 1])
    np.testing.assert_allclose(np.asarray(kept.reported_sparsity), 1 - 48 / LENGTHS, rtol=1e-6)


@pytest.mark.parametrize("name", ["snapkv", "ada_snapkv"])
def test_eviction_keeps_everything_at_zero_sparsity_and_short_prompts(name):
    q, k, v = _inputs(2)
    lengths = np.array([192, 20])  # 20 < approximation_window: the reference fails, here all is kept
    for method in (get_method(name, sparsity=0.0), get_method(name, token_capacity=192)):
        kept = _compress(method, q, k, v, lengths)
        for b, n in enumerate(lengths):
            np.testing.assert_array_equal(np.asarray(kept.counts[b]), [n] * G)
            np.testing.assert_array_equal(np.asarray(kept.indices[b, :, :n]), np.tile(np.arange(n), (G, 1)))
        np.testing.assert_array_equal(np.asarray(kept.reported_sparsity), [0.0, 0.0])


def test_eviction_sparsity_target_sets_capacity_per_length():
    q, k, v = _inputs(3)
    kept = _compress(get_method("snapkv", sparsity=0.75, local_window=16, budget_multiple=16), q, k, v, LENGTHS)
    capacity = np.ceil(0.25 * LENGTHS / 16) * 16  # 48 and 48 (37.5 -> 48)
    np.testing.assert_array_equal(np.asarray(kept.counts), np.repeat(capacity[:, None], G, 1))


# ----------------------------------------------------------------------- quest

S = 8  # page size
PAGES = 32  # pages per row


def _cache(k_tok, v_tok, lengths, seed=0):
    """A PagedKVCache holding ``k_tok/v_tok [B, N, G, d]`` with shuffled, per-head page tables."""
    rng = np.random.default_rng(seed)
    b, n, g, d = k_tok.shape
    pool = b * PAGES
    table = np.stack([rng.permutation(pool).reshape(b, PAGES) for _ in range(g)], axis=1)  # [B, G, P]
    k_pages = np.zeros((g, pool, S, d), np.float32)
    v_pages = np.zeros((g, pool, S, d), np.float32)
    k_min = np.full((g, pool, d), np.inf, np.float32)
    k_max = np.full((g, pool, d), -np.inf, np.float32)
    for bi in range(b):
        for j in range(g):
            for p in range(-(-int(lengths[bi]) // S)):
                rows = slice(p * S, min((p + 1) * S, lengths[bi]))
                page = table[bi, j, p]
                chunk = k_tok[bi, rows, j]
                k_pages[j, page, : len(chunk)] = chunk
                v_pages[j, page, : len(chunk)] = v_tok[bi, rows, j]
                k_min[j, page], k_max[j, page] = chunk.min(0), chunk.max(0)
    lens = np.repeat(np.asarray(lengths)[:, None], g, 1)
    return PagedKVCache(*map(jnp.asarray, (k_pages, v_pages, k_min, k_max, table.astype(np.int32), lens, lengths)))


def _quest_oracle(q, k_tok, v_tok, lengths, budget, share):
    """numpy outputs ``[B, H, d]`` and tokens read ``[B, H]`` of Quest's selection."""
    out = np.zeros(q.shape)
    read = np.zeros(q.shape[:2])
    for b, n in enumerate(lengths):
        nb = budget[b] // S
        c = (n - 1) // S
        kk = k_tok[b, :n]
        mins = np.stack([kk[p * S : (p + 1) * S].min(0) for p in range(c)]) if c else np.zeros((0, G, D))
        maxs = np.stack([kk[p * S : (p + 1) * S].max(0) for p in range(c)]) if c else np.zeros((0, G, D))
        u = np.stack(
            [np.maximum(q[b, h] * mins[:, h // GROUP], q[b, h] * maxs[:, h // GROUP]).sum(-1) for h in range(H)]
        )
        for h in range(H):
            score = u[(h // GROUP) * GROUP : (h // GROUP + 1) * GROUP].sum(0) if share else u[h]
            pages = np.argsort(-score, kind="stable")[:nb]
            tokens = np.concatenate([np.arange(p * S, (p + 1) * S) for p in pages] + [np.arange(c * S, n)])
            s = kk[tokens, h // GROUP] @ q[b, h] * LAYER.scale
            p_ = np.exp(s - s.max())
            out[b, h] = (p_ / p_.sum()) @ v_tok[b, tokens, h // GROUP]
            read[b, h] = len(tokens)
    return out, read


def _quest_inputs(seed, n_max):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = np.asarray(jax.random.normal(ks[0], (B, H, D)), np.float64)
    k_tok = np.asarray(jax.random.normal(ks[1], (B, n_max, G, D)), np.float32)
    v_tok = np.asarray(jax.random.normal(ks[2], (B, n_max, G, D)), np.float32)
    return q, k_tok, v_tok


@pytest.mark.parametrize("share", [True, False])
def test_quest_selection_matches_oracle(share):
    lengths = np.array([203, 131])  # 25 and 16 complete earlier pages; budget 6 pages
    q, k_tok, v_tok = _quest_inputs(4, 203)
    cache = _cache(k_tok, v_tok, lengths)
    method = get_method("quest", token_budget=48, page_size=S, share_pages=share)
    out, stats = jax.jit(lambda q, c: method.decode(q, c, layer=LAYER))(jnp.asarray(q, jnp.float32), cache)
    want, read = _quest_oracle(q, k_tok.astype(np.float64), v_tok.astype(np.float64), lengths, [48, 48], share)
    np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(np.asarray(stats.tokens_read), read)
    np.testing.assert_array_equal(np.asarray(stats.tokens_cached), np.repeat(lengths[:, None], H, 1))
    # The decode kernels' selection helper agrees (same page sets and lengths).
    table, row_lengths = quest_page_table(
        jnp.asarray(q, jnp.float32), cache.k_min, cache.k_max, cache.page_table, cache.lengths,
        page_size=S, token_budget=48, share_pages=share,
    )
    np.testing.assert_array_equal(np.asarray(row_lengths), np.asarray(stats.tokens_read)[:, :: GROUP if share else 1])


def test_quest_sparsity_target_sets_budget_from_cached_tokens():
    lengths = np.array([203, 131])
    q, k_tok, v_tok = _quest_inputs(7, 203)
    cache = _cache(k_tok, v_tok, lengths, seed=1)
    method = get_method("quest", page_size=S, sparsity=0.5)
    out, stats = jax.jit(lambda q, c: method.decode(q, c, layer=LAYER))(jnp.asarray(q, jnp.float32), cache)
    budget = np.ceil(0.5 * lengths / S).astype(int) * S  # 104 and 72 tokens
    want, read = _quest_oracle(q, k_tok.astype(np.float64), v_tok.astype(np.float64), lengths, budget, True)
    np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(np.asarray(stats.tokens_read), read)


def test_quest_short_prompts_and_zero_sparsity_read_everything():
    lengths = np.array([40, 9])  # fewer complete pages than the 1024-token budget: dense fallback
    q, k_tok, v_tok = _quest_inputs(5, 40)
    cache = _cache(k_tok, v_tok, lengths)
    dense, dense_stats = cache.dense_decode(jnp.asarray(q, jnp.float32), scale=LAYER.scale)
    for method in (get_method("quest", page_size=S), get_method("quest", page_size=S, sparsity=0.0)):
        out, stats = jax.jit(lambda q, c: method.decode(q, c, layer=LAYER))(jnp.asarray(q, jnp.float32), cache)
        np.testing.assert_allclose(np.asarray(out), np.asarray(dense), atol=1e-5)
        np.testing.assert_array_equal(np.asarray(stats.tokens_read), np.asarray(dense_stats.tokens_read))


def test_quest_prefill_is_dense_and_reports_reference_figure():
    q, k, v = _inputs()
    out, stats = get_method("quest").prefill(q, k, v, lengths=jnp.asarray(LENGTHS), layer=LAYER)
    dense, _ = get_method("dense").prefill(q, k, v, lengths=jnp.asarray(LENGTHS), layer=LAYER)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(dense))
    np.testing.assert_allclose(np.asarray(stats.reported_sparsity[:, 0]), 1 - 1024 / LENGTHS, rtol=1e-6)


def test_quest_rejects_a_cache_with_another_page_size():
    q, k_tok, v_tok = _quest_inputs(6, 40)
    cache = _cache(k_tok, v_tok, np.array([40, 30]))
    with pytest.raises(ValueError, match="page_size=16 but the cache has pages of 8 tokens; drop quest's page_size"):
        get_method("quest", page_size=16).decode(jnp.asarray(q, jnp.float32), cache, layer=LAYER)
    with pytest.raises(ValueError, match="token_budget=20 must be a multiple of page_size=8"):
        get_method("quest", token_budget=20).decode(jnp.asarray(q, jnp.float32), cache, layer=LAYER)


def test_quest_takes_the_page_size_of_the_cache():
    lengths = np.array([203, 131])
    q, k_tok, v_tok = _quest_inputs(8, 203)
    cache = _cache(k_tok, v_tok, lengths)
    decode = lambda method: jax.jit(lambda q, c: method.decode(q, c, layer=LAYER))(jnp.asarray(q, jnp.float32), cache)
    for kwargs in (dict(token_budget=48), dict(sparsity=0.5)):
        (out, stats), (want, want_stats) = decode(get_method("quest", **kwargs)), decode(
            get_method("quest", page_size=S, **kwargs))
        np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
        np.testing.assert_array_equal(np.asarray(stats.tokens_read), np.asarray(want_stats.tokens_read))
    # Prefill has no cache: the engine puts its page size in the LayerSpec.
    q, k, v = _inputs()
    prefill = lambda method, layer: method.prefill(q, k, v, lengths=jnp.asarray(LENGTHS), layer=layer)[1]
    got = prefill(get_method("quest", sparsity=0.7), LAYER._replace(page_size=S))
    want = prefill(get_method("quest", page_size=S, sparsity=0.7), LAYER)
    np.testing.assert_array_equal(np.asarray(got.reported_sparsity), np.asarray(want.reported_sparsity))
    with pytest.raises(ValueError, match="page size is unknown outside the engine"):
        prefill(get_method("quest", sparsity=0.7), LAYER)
    assert "page_size" not in get_method("quest").describe()  # the engine's, not the method's


def test_quest_implementation_is_passed_to_its_ops():
    lengths = np.array([203, 131])
    q, k_tok, v_tok = _quest_inputs(9, 203)
    cache = _cache(k_tok, v_tok, lengths)
    decode = lambda method: method.decode(jnp.asarray(q, jnp.float32), cache, layer=LAYER)
    out, _ = decode(get_method("quest", token_budget=48))
    xla, _ = decode(get_method("quest", token_budget=48, implementation="xla"))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(xla))  # the default on CPU is the reference
    assert get_method("quest", implementation="xla").describe()["implementation"] == "xla"
    with pytest.raises(ValueError, match="quest_page_table: unknown implementation 'mosaic_gpu'; use one of 'xla', "):
        decode(get_method("quest", token_budget=48, implementation="mosaic_gpu"))


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("snapkv", dict(sparsity=1.5), "outside \\[0, 1\\)"),
        ("snapkv", dict(kernel_size=4), "kernel_size=4 must be odd"),
        ("snapkv", dict(token_capacity=100), "must exceed local_window \\+ prefix_tokens"),
        ("ada_snapkv", dict(min_head_capacity_ratio=1.5), "min_head_capacity_ratio=1.5"),
        ("quest", dict(token_budget=100, page_size=16), "multiple of page_size=16"),
        ("quest", dict(sparsity=-1.0), "outside \\[0, 1\\)"),
    ],
)
def test_bad_arguments_raise_clear_errors(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_method(name, **kwargs)
