"""Oracle methods (oracle_quest, oracle_tokens, oracle_block_sparse) against brute-force top-k."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse.reference import index_to_mask
from sparse_jax.attention.base import LayerSpec
from sparse_jax.attention.methods.attention_mass import block_attention_mass
from sparse_jax.attention.methods.block_sparse import block_sparse_index
from sparse_jax.attention.methods.oracles import OracleBlockSparse
from sparse_jax.attention.registry import available_methods, get_method
from sparse_jax.attention.kv_cache import PagedKVCache

B, H, G, D = 2, 4, 2, 16
GROUP = H // G
LAYER = LayerSpec(index=0, scale=D**-0.5)
S = 8  # page size


def _dense_probs(q, k, n):
    """float64 softmax of ``q [d]`` over ``k [n, d]``."""
    s = k[:n] @ q * LAYER.scale
    p = np.exp(s - s.max())
    return p / p.sum()


def _cache(k_tok, v_tok, lengths):
    """A cache filled through the engine's own prompt write (``k_tok [B, N, G, d]``)."""
    cache = PagedKVCache.allocate(batch=B, num_kv_heads=G, head_dim=D, pages_per_row=-(-k_tok.shape[1] // S) + 1,
                                  page_size=S, dtype=jnp.float32)
    return cache.write_prompt(jnp.asarray(k_tok), jnp.asarray(v_tok), jnp.asarray(lengths, jnp.int32))


def _decode_inputs(seed, n_max):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, H, D))
    k_tok = rng.normal(size=(B, n_max, G, D)).astype(np.float32)
    v_tok = rng.normal(size=(B, n_max, G, D)).astype(np.float32)
    return q, k_tok, v_tok


def _attend(q, k, v, tokens):
    p = _dense_probs(q, k[tokens], len(tokens))
    return p @ v[tokens]


def _decode(method, q, cache):
    return jax.jit(lambda q, c: method.decode(q, c, layer=LAYER))(jnp.asarray(q, jnp.float32), cache)


def test_oracles_are_registered():
    assert {"oracle_quest", "oracle_tokens", "oracle_block_sparse"} <= set(available_methods())


@pytest.mark.parametrize("share", [True, False])
def test_oracle_quest_reads_the_pages_of_most_attention(share):
    lengths = np.array([203, 131])
    q, k_tok, v_tok = _decode_inputs(0, 203)
    k64, v64 = k_tok.astype(np.float64), v_tok.astype(np.float64)
    out, stats = _decode(get_method("oracle_quest", token_budget=48, page_size=S, share_pages=share), q,
                         _cache(k_tok, v_tok, lengths))
    for b, n in enumerate(lengths):
        c = (n - 1) // S
        mass = np.stack([_dense_probs(q[b, h], k64[b, :, h // GROUP], n)[: c * S].reshape(c, S).sum(1)
                         for h in range(H)])
        for h in range(H):
            j = h // GROUP
            score = mass[j * GROUP:(j + 1) * GROUP].sum(0) if share else mass[h]
            pages = np.argsort(-score, kind="stable")[:6]
            tokens = np.concatenate([np.arange(p * S, (p + 1) * S) for p in pages] + [np.arange(c * S, n)])
            np.testing.assert_allclose(np.asarray(out[b, h]), _attend(q[b, h], k64[b, :, j], v64[b, :, j], tokens),
                                       atol=2e-5, rtol=2e-5)
            assert stats.tokens_read[b, h] == len(tokens)


def test_oracle_quest_finds_the_needle_quest_misses_at_the_same_budget():
    lengths = np.array([203, 131])
    q, k_tok, v_tok = _decode_inputs(1, 203)
    q[:, 1::2] = q[:, ::2]  # both heads of a group ask the same
    k_tok *= 0.1
    sign = np.sign(q[:, ::2])  # [B, G, d]
    for page in (5, 9):  # decoys: every dimension large in some key, no key large overall
        for slot in range(S):
            dims = slice(2 * slot, 2 * slot + 2)
            k_tok[:, page * S + slot, :, dims] = 10.0 * sign[:, :, dims]
    k_tok[:, 29] = 8.0 * q[:, ::2]  # the needle, in page 3
    cache = _cache(k_tok, v_tok, lengths)
    quest_out, quest_stats = _decode(get_method("quest", token_budget=16, page_size=S), q, cache)
    oracle_out, oracle_stats = _decode(get_method("oracle_quest", token_budget=16, page_size=S), q, cache)
    dense_out, _ = _decode(get_method("dense"), q, cache)
    np.testing.assert_array_equal(np.asarray(oracle_stats.tokens_read), np.asarray(quest_stats.tokens_read))
    oracle_err = np.abs(np.asarray(oracle_out) - np.asarray(dense_out)).max()
    quest_err = np.abs(np.asarray(quest_out) - np.asarray(dense_out)).max()
    assert oracle_err < 0.1 < quest_err, (oracle_err, quest_err)


@pytest.mark.parametrize("kwargs", [dict(token_capacity=40), dict(sparsity=0.7)])
def test_oracle_tokens_reads_the_budget_of_most_attention(kwargs):
    lengths = np.array([203, 131])
    q, k_tok, v_tok = _decode_inputs(2, 203)
    k64, v64 = k_tok.astype(np.float64), v_tok.astype(np.float64)
    method = get_method("oracle_tokens", local_window=8, prefix_tokens=2, budget_multiple=S, **kwargs)
    out, stats = _decode(method, q, _cache(k_tok, v_tok, lengths))
    for b, n in enumerate(lengths):
        budget = 40 if "token_capacity" in kwargs else int(np.ceil(0.3 * n / S) * S)
        for j in range(G):
            mass = sum(_dense_probs(q[b, h], k64[b, :, j], n) for h in range(j * GROUP, (j + 1) * GROUP))
            mass[:2] = mass[n - 8:] = np.inf
            tokens = np.sort(np.argsort(-mass, kind="stable")[:budget])
            for h in range(j * GROUP, (j + 1) * GROUP):
                np.testing.assert_allclose(np.asarray(out[b, h]), _attend(q[b, h], k64[b, :, j], v64[b, :, j], tokens),
                                           atol=2e-5, rtol=2e-5)
                assert stats.tokens_read[b, h] == budget


def test_block_attention_mass_matches_dense_matrix():
    rng = np.random.default_rng(3)
    t, length, bs = 45, 37, 8
    q, k = rng.normal(size=(t, D)), rng.normal(size=(t, D))
    mass = jax.jit(lambda q, k: block_attention_mass(q, k, jnp.int32(length), block_size=bs, scale=LAYER.scale))(
        jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32))
    nb = -(-t // bs)
    p = np.zeros((nb * bs, nb * bs))
    for i in range(length):
        p[i, : i + 1] = _dense_probs(q[i], k, i + 1)
    want = p.reshape(nb, bs, nb, bs).sum((1, 3))
    np.testing.assert_allclose(np.asarray(mass), want, atol=1e-5)


def test_oracle_block_sparse_keeps_the_blocks_of_most_attention():
    t, bs, top = 96, 8, 4
    lengths = np.array([96, 70])
    rng = np.random.default_rng(4)
    q = jnp.asarray(rng.normal(size=(B, t, H, D)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, t, G, D)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, t, G, D)), jnp.float32)
    method = get_method("oracle_block_sparse", chunk_size=bs, top_chunks=top)
    out, stats = jax.jit(lambda q, k, v, n: method.prefill(q, k, v, lengths=n, layer=LAYER))(
        q, k, v, jnp.asarray(lengths))
    index = block_sparse_index(q, k, jnp.asarray(lengths), jnp.full((B,), top), block_size=bs, max_chunks=top,
                               scorer=method.block_scorer(LAYER))
    qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
    for b, n in enumerate(lengths):
        for h in range(H):
            kh = kn[b, :, h // GROUP]
            p = np.zeros((t, t))
            for i in range(n):
                p[i, : i + 1] = _dense_probs(qn[b, i, h], kh, i + 1)
            mass = p.reshape(t // bs, bs, t // bs, bs).sum((1, 3))
            for m in range(-(-n // bs)):
                score = mass[m].copy()
                score[[0, m, max(m - 1, 0)]] = np.inf
                score[m + 1:] = -np.inf
                want = np.sort(np.argsort(-score, kind="stable")[: min(top, m + 1)])
                assert index.block_ids[b, h, m, : index.counts[b, h, m]].tolist() == want.tolist(), (b, h, m)
    # Same budget and accounting as block_sparse: identical counts, exact computed pairs.
    _, base_stats = jax.jit(lambda q, k, v, n: get_method("block_sparse", chunk_size=bs, top_chunks=top).prefill(
        q, k, v, lengths=n, layer=LAYER))(q, k, v, jnp.asarray(lengths))
    np.testing.assert_array_equal(np.asarray(stats.attended_pairs), np.asarray(base_stats.attended_pairs))
    np.testing.assert_array_equal(np.asarray(stats.reported_sparsity), np.asarray(base_stats.reported_sparsity))
    mask = np.asarray(index_to_mask(index, t))
    for b, n in enumerate(lengths):
        assert stats.attended_pairs[b, 0] == mask[b, 0, :n, :n].sum()
        for h in range(H):
            kh, vh = kn[b, :n, h // GROUP], vn[b, :n, h // GROUP]
            for i in range(0, n, 7):
                keys = np.flatnonzero(mask[b, h, i, : i + 1])
                np.testing.assert_allclose(np.asarray(out[b, i, h]), _attend(qn[b, i, h], kh, vh, keys),
                                           atol=2e-5, rtol=2e-5)


def test_oracle_block_sparse_at_least_as_accurate_as_block_sparse():
    t, bs = 128, 8
    rng = np.random.default_rng(5)
    q = rng.normal(size=(1, t, H, D))
    k = rng.normal(size=(1, t, G, D))
    k[:, 50] += 3.0 * q[:, 100:, :GROUP].sum((1, 2)) / np.linalg.norm(q[:, 100:, :GROUP].sum((1, 2)))
    q, k = jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32)
    v = jnp.asarray(rng.normal(size=(1, t, G, D)), jnp.float32)
    lengths = jnp.asarray([t])

    def error(name):
        out, _ = get_method(name, chunk_size=bs, sparsity=0.8).prefill(q, k, v, lengths=lengths, layer=LAYER)
        dense, _ = get_method("dense").prefill(q, k, v, lengths=lengths, layer=LAYER)
        return float(jnp.abs(out - dense).mean())

    assert error("oracle_block_sparse") <= error("block_sparse")
    assert isinstance(get_method("oracle_block_sparse"), OracleBlockSparse)


@pytest.mark.parametrize("name, kwargs", [("oracle_quest", dict(sparsity=0.5, page_size=16)),
                                          ("oracle_tokens", dict(sparsity=0.5, local_window=4, prefix_tokens=2)),
                                          ("oracle_block_sparse", dict(sparsity=0.5))])
def test_oracles_run_through_the_engine(name, kwargs):
    from sparse_jax.engine.generate import generate
    from tests.test_engine_generate import random_prompts, tiny_model

    prompts = random_prompts((300, 200))  # long enough for more pages than the budget
    results = generate(tiny_model(), prompts, get_method(name, **kwargs), max_new_tokens=4, stop_ids=[])
    for r in results:
        assert r.output_length == 4
        if name == "oracle_block_sparse":
            assert float(np.min(r.sparsity.prefill_density)) < 1.0
        else:  # decode reads about half of the cached tokens
            assert 0.4 < float(np.mean(r.sparsity.decode_density)) < 0.8


def test_oracle_vertical_and_slash_ranks_by_mass_over_every_query():
    from sparse_jax.attention.methods.vertical_slash_index import select_from_scores

    t, length, nv, ns = 150, 131, 12, 70
    rng = np.random.default_rng(6)
    q = jnp.asarray(rng.normal(size=(1, t, H, D)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, t, G, D)), jnp.float32)
    method = get_method("oracle_vertical_and_slash", vertical_size=nv, slash_size=ns)
    selection = select_from_scores(method.score_fn(t, LAYER.scale), q, k, jnp.asarray([length]),
                                   jnp.asarray([nv]), jnp.asarray([ns]), nv_max=nv, ns_max=ns)
    qn, kn = np.asarray(q[0], np.float64), np.asarray(k[0], np.float64)
    for h in range(H):
        p = np.zeros((length, length))
        for i in range(length):
            p[i, : i + 1] = _dense_probs(qn[i, h], kn[:, h // GROUP], i + 1)
        verticals = p.sum(0)
        verticals[:4] = np.inf
        slashes = np.array([np.trace(p, offset=-delta) for delta in range(length)])
        slashes[:64] = np.inf
        assert set(np.asarray(selection.verticals[0, h]).tolist()) == set(np.argsort(-verticals)[:nv].tolist())
        assert set(np.asarray(selection.offsets[0, h]).tolist()) == set(np.argsort(-slashes)[:ns].tolist())
    out, stats = method.prefill(q, k, k, lengths=jnp.asarray([length]), layer=LAYER)
    _, base = get_method("vertical_and_slash", vertical_size=nv, slash_size=ns).prefill(
        q, k, k, lengths=jnp.asarray([length]), layer=LAYER)
    assert out.shape == q.shape
    np.testing.assert_array_equal(np.asarray(stats.causal_pairs), np.asarray(base.causal_pairs))
