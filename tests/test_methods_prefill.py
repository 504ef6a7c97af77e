"""Prefill sparse methods (block_sparse, vertical_and_slash, flexprefill) against oracles.

Oracles are written from docs/reference_behaviour.md section 4 with numpy on small inputs: brute-force
block scores and top-k, full ``[A, L]`` window probabilities, masked dense softmax.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse.reference import index_to_mask as block_mask
from pallas_kernels.vertical_slash.reference import index_to_mask as vs_mask
from sparse_jax.attention.base import LayerSpec
from sparse_jax.attention.dense import dense_causal_attention
from sparse_jax.attention.methods import budgets
from sparse_jax.attention.methods.block_sparse import block_sparse_index
from sparse_jax.attention.methods.flexprefill import flexprefill_index
from sparse_jax.attention.methods.vertical_and_slash import vertical_and_slash_index
from sparse_jax.attention.methods.vertical_slash_index import build_index
from sparse_jax.attention.registry import get_method

B, T, H, G, D = 2, 160, 4, 2, 16
LENGTHS = np.array([160, 117])
LAYER = LayerSpec(index=0, scale=D**-0.5)


def _inputs(seed=0, t=T):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(ks[0], (B, t, H, D), jnp.float32)
    k = jax.random.normal(ks[1], (B, t, G, D), jnp.float32)
    v = jax.random.normal(ks[2], (B, t, G, D), jnp.float32)
    return q, k, v


def _prefill(method, q, k, v, lengths):
    run = jax.jit(lambda q, k, v, n: method.prefill(q, k, v, lengths=n, layer=LAYER))
    return run(q, k, v, jnp.asarray(lengths))


def _masked_attention(q, k, v, mask, scale):
    """numpy softmax attention of one head: q [L, d], k/v [L, d], mask [L, L]."""
    s = np.where(mask, q @ k.T * scale, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def _check_against_mask(out, stats, mask, q, k, v, lengths):
    """Outputs equal masked dense attention; attended pairs equal the mask's count."""
    q, k, v, out, mask = map(np.asarray, (q, k, v, out, mask))
    for b, n in enumerate(lengths):
        m = mask[b, :, :n, :n]
        assert not np.any(np.triu(m, 1)), "a non-causal pair is attended"
        np.testing.assert_array_equal(np.asarray(stats.attended_pairs[b]), m.sum((-1, -2)).astype(np.float32))
        for h in range(H):
            ref = _masked_attention(q[b, :n, h], k[b, :n, h // (H // G)], v[b, :n, h // (H // G)], m[h], LAYER.scale)
            np.testing.assert_allclose(out[b, :n, h], ref, atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(np.asarray(stats.causal_pairs), lengths * (lengths + 1) / 2)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("block_sparse", dict(chunk_size=16, top_chunks=10)),
        ("block_sparse", dict(chunk_size=8, sparsity=0.0)),
        ("vertical_and_slash", dict(vertical_size=T, slash_size=T, approximation_size=32)),
        ("vertical_and_slash", dict(sparsity=0.0)),
        ("flexprefill", dict(sparsity=0.0, approximation_size=32)),
    ],
)
def test_zero_sparsity_is_dense(name, kwargs):
    q, k, v = _inputs()
    out, stats = _prefill(get_method(name, **kwargs), q, k, v, LENGTHS)
    ref = dense_causal_attention(q, k, v, scale=LAYER.scale)
    for b, n in enumerate(LENGTHS):
        np.testing.assert_allclose(np.asarray(out[b, :n]), np.asarray(ref[b, :n]), atol=1e-5, rtol=1e-5)
    dense_pairs = np.repeat(np.asarray(stats.causal_pairs)[:, None], H, axis=1)
    np.testing.assert_array_equal(np.asarray(stats.attended_pairs), dense_pairs)


# ---------------------------------------------------------------- block_sparse


def _block_sparse_oracle(q, k, length, bs, top):
    """Selected key blocks per real query block of one head, per docs/reference_behaviour.md 4.2."""
    q, k = np.asarray(q[:length], np.float64), np.asarray(k[:length], np.float64)
    pad = bs - length % bs if length % bs else bs
    nb = (length + pad) // bs
    qp = np.pad(q, ((0, pad), (0, 0))).reshape(nb, bs, -1).mean(1)
    kp = np.pad(k, ((0, pad), (0, 0))).reshape(nb, bs, -1).mean(1)
    s = qp @ kp.T
    m = np.arange(nb)
    s[m, m] = np.inf
    s[m[1:], m[1:] - 1] = np.inf
    s[m[:, None] < m[None, :]] = -np.inf
    s[:, 0] = np.inf
    keff = min(top, nb)
    rows = []
    for r in range(-(-length // bs)):
        chosen = np.sort(np.argsort(-s[r], kind="stable")[:keff])
        rows.append(chosen[: min(r + 1, keff)].tolist())
    return rows


def test_block_sparse_pattern_output_and_stats_match_oracle():
    q, k, v = _inputs(seed=1)
    method = get_method("block_sparse", chunk_size=8, top_chunks=5)
    out, stats = _prefill(method, q, k, v, LENGTHS)
    index = jax.jit(block_sparse_index, static_argnames=("block_size", "max_chunks"))(
        q, k, jnp.asarray(LENGTHS), jnp.full((B,), 5), block_size=8, max_chunks=5
    )
    for b, n in enumerate(LENGTHS):
        for h in range(H):
            want = _block_sparse_oracle(q[b, :, h], k[b, :, h // 2], n, 8, 5)
            got = [index.block_ids[b, h, r, : index.counts[b, h, r]].tolist() for r in range(len(want))]
            assert got == want, (b, h)
    _check_against_mask(out, stats, block_mask(index, T), q, k, v, LENGTHS)
    nb = -(-LENGTHS // 8)
    expected = 1 - (5 * 6 / 2 + (nb - 5) * 5) / (nb * (nb + 1) / 2)
    np.testing.assert_allclose(np.asarray(stats.reported_sparsity), np.repeat(expected[:, None], H, 1), rtol=1e-6)


def test_block_sparse_reported_figure_and_sparsity_search():
    # The reference's figures: L = 8000 -> 0.7606; L = 512 -> 0.939 although attention is dense.
    np.testing.assert_allclose(budgets.block_sparse_reported_sparsity(500, 64), 0.7606, atol=1e-4)
    np.testing.assert_allclose(budgets.block_sparse_reported_sparsity(32, 64), 0.939, atol=1e-3)
    for n in (3, 10, 57, 500):
        for target in (0.0, 0.3, 0.77, 0.95):
            k = int(budgets.block_sparse_top_chunks(n, target))
            candidates = np.arange(min(3, n), n + 1)
            errors = np.abs(budgets.block_sparse_reported_sparsity(n, candidates) - target)
            assert abs(budgets.block_sparse_reported_sparsity(n, k) - target) <= errors.min() + 1e-6, (n, target)
            assert int(budgets.block_sparse_top_chunks(n, target, jnp)) == k


def test_block_sparse_sparsity_target_sets_budget_per_length():
    q, k, v = _inputs(seed=2)
    out, stats = _prefill(get_method("block_sparse", chunk_size=8, sparsity=0.6), q, k, v, LENGTHS)
    nb = -(-LENGTHS // 8)
    k_rows = budgets.block_sparse_top_chunks(nb, 0.6)
    np.testing.assert_allclose(
        np.asarray(stats.reported_sparsity[:, 0]), budgets.block_sparse_reported_sparsity(nb, k_rows), rtol=1e-6
    )
    # Block-level sparsity is near the target, and exact pairs are below the dense count.
    assert np.all(np.abs(np.asarray(stats.reported_sparsity[:, 0]) - 0.6) < 0.1)
    assert np.all(np.asarray(stats.attended_pairs) < np.asarray(stats.causal_pairs)[:, None])


# ---------------------------------------------------------- vertical-slash family


def _window_probs(q, k, length, window, scale, prescale, to_bf16):
    """Brute-force probabilities ``[A, L]`` of the last ``min(window, L)`` queries of one head."""
    a = min(window, length)
    qw = q[length - a : length]
    s = (qw * scale) @ k[:length].T if prescale else (qw @ k[:length].T) * scale
    pos = np.arange(length - a, length)
    s = jnp.where(np.arange(length)[None, :] <= pos[:, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    if to_bf16:
        p = p.astype(jnp.bfloat16)
    return np.asarray(p.astype(jnp.float32), np.float64), pos


def _vs_scores(p, pos, length):
    v_score = p.sum(0)
    s_score = np.zeros(length)
    for i, qpos in enumerate(pos):
        keys = np.arange(qpos + 1)
        np.add.at(s_score, qpos - keys, p[i, keys])
    return v_score, s_score


def _cover(x, alpha):
    return 1 + int(np.sum(np.cumsum(np.sort(x)[::-1]) <= alpha))


def _vs_oracle_index(v_score, s_score, nv, ns, length, rows):
    v_score, s_score = v_score.copy(), s_score.copy()
    v_score[:4] = np.inf
    s_score[:64] = np.inf
    # Selections padded to a fixed size (unselected slots flagged) so build_index compiles once.
    size = 64 * rows
    verticals = np.argsort(-np.pad(v_score, (0, size - length), constant_values=-1), kind="stable")
    offsets = np.argsort(-np.pad(s_score, (0, size - length), constant_values=-1), kind="stable")
    index = build_index(
        jnp.asarray(verticals), jnp.arange(size) < min(nv, length),
        jnp.asarray(offsets), jnp.arange(size) < min(ns, length),
        num_row_blocks=rows,
    )
    return [
        (index.block_starts[r, : index.block_counts[r]].tolist(), index.columns[r, : index.column_counts[r]].tolist())
        for r in range(-(-length // 64))
    ]


def _index_rows(index, b, h, length):
    return [
        (
            index.block_starts[b, h, r, : index.block_counts[b, h, r]].tolist(),
            index.columns[b, h, r, : index.column_counts[b, h, r]].tolist(),
        )
        for r in range(-(-length // 64))
    ]


def _vs_inputs(seed, t):
    """Inputs with a few strong key columns so verticals and slashes both matter."""
    q, k, v = _inputs(seed, t)
    return q, k.at[:, 70].multiply(4.0).at[:, 100].add(q[:, -1, 0][:, None]), v


def test_vertical_and_slash_pattern_output_and_stats_match_oracle():
    t = 320
    lengths = np.array([320, 250])
    q, k, v = _vs_inputs(3, t)
    nv, ns, a = 8, 80, 48
    method = get_method("vertical_and_slash", vertical_size=nv, slash_size=ns, approximation_size=a)
    out, stats = _prefill(method, q, k, v, lengths)
    statics = ("approximation_size", "max_verticals", "max_slashes", "scale")
    index = jax.jit(vertical_and_slash_index, static_argnames=statics)(
        q, k, jnp.asarray(lengths), jnp.full((B,), nv), jnp.full((B,), ns),
        approximation_size=a, max_verticals=nv, max_slashes=ns, scale=LAYER.scale,
    )
    qn, kn = np.asarray(q), np.asarray(k)
    for b, n in enumerate(lengths):
        for h in range(H):
            p, pos = _window_probs(qn[b, :, h], kn[b, :, h // 2], n, a, LAYER.scale, prescale=False, to_bf16=True)
            v_score, s_score = _vs_scores(p, pos, n)
            assert _index_rows(index, b, h, n) == _vs_oracle_index(v_score, s_score, nv, ns, n, -(-t // 64)), (b, h)
    _check_against_mask(out, stats, vs_mask(index, t), q, k, v, lengths)
    tiles = [
        sum(64 * 64 * len(bl) + 64 * len(cl) for bl, cl in _index_rows(index, b, 0, n)) for b, n in enumerate(lengths)
    ]
    expected = 1 - np.array(tiles) / (lengths * (lengths + 1) / 2)
    np.testing.assert_allclose(np.asarray(stats.reported_sparsity[:, 0]), expected, rtol=1e-6)


def test_flexprefill_coverage_budgets_match_oracle():
    t = 320
    lengths = np.array([320, 200])
    q, k, _ = _vs_inputs(4, t)
    alpha, a, min_budget = 0.5, 40, 64
    index = jax.jit(flexprefill_index, static_argnames=("alpha", "approximation_size", "max_budget", "scale"))(
        q, k, jnp.asarray(lengths), jnp.full((B,), min_budget),
        alpha=alpha, approximation_size=a, max_budget=t, scale=LAYER.scale,
    )
    qn, kn = np.asarray(q), np.asarray(k)
    for b, n in enumerate(lengths):
        for h in range(H):
            p, pos = _window_probs(qn[b, :, h], kn[b, :, h // 2], n, a, LAYER.scale, prescale=True, to_bf16=False)
            v_score, s_score = _vs_scores(p, pos, n)
            v_score, s_score = v_score / len(pos), s_score / len(pos)
            nv = max(min_budget, _cover(v_score, alpha))
            ns = max(min_budget, _cover(s_score, alpha))
            assert _index_rows(index, b, h, n) == _vs_oracle_index(v_score, s_score, nv, ns, n, t // 64), (b, h)


def test_short_prompts_are_documented_fallbacks():
    t = 48  # below 64 tokens (vertical_and_slash asserts in the reference), below A and min_budget (flexprefill)
    lengths = np.array([48, 30])
    q, k, v = _inputs(5, t)
    ref = dense_causal_attention(q, k, v, scale=LAYER.scale)
    for method in (get_method("vertical_and_slash"), get_method("flexprefill")):
        out, stats = _prefill(method, q, k, v, lengths)
        for b, n in enumerate(lengths):
            np.testing.assert_allclose(np.asarray(out[b, :n]), np.asarray(ref[b, :n]), atol=1e-5)
        np.testing.assert_array_equal(np.asarray(stats.attended_pairs[:, 0]), lengths * (lengths + 1) / 2)


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("block_sparse", dict(sparsity=1.0), "outside \\[0, 1\\)"),
        ("block_sparse", dict(chunk_size=4), "chunk_size >= 8"),
        ("block_sparse", dict(top_chunks=2), "top_chunks >= 3"),
        ("vertical_and_slash", dict(sparsity=-0.1), "outside \\[0, 1\\)"),
        ("vertical_and_slash", dict(slash_size=32), "slash_size >= 64"),
        ("vertical_and_slash", dict(approximation_size=0), "approximation_size=0 must be a positive integer"),
        ("flexprefill", dict(alpha=0.0), "alpha=0.0 must be in \\(0, 1\\]"),
        ("flexprefill", dict(min_budget=16), "min_budget=16 must be >= 64"),
    ],
)
def test_bad_arguments_raise_clear_errors(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_method(name, **kwargs)
