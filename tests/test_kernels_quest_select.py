"""Quest scoring and threshold-selection kernels (interpret mode) vs the jnp functions of quest.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_decode import quest, quest_select

PAGE = 4


def make_inputs(rng, *, batch=2, heads=8, kv_heads=2, d=16, pool=64, pages=24, dtype=jnp.bfloat16):
    q = jnp.asarray(rng.standard_normal((batch, heads, d)), dtype)
    k_min = jnp.asarray(rng.standard_normal((kv_heads, pool, d)), dtype)
    k_max = k_min + jnp.abs(jnp.asarray(rng.standard_normal((kv_heads, pool, d)), dtype))
    table = np.stack([np.stack([rng.permutation(pool)[:pages] for _ in range(kv_heads)]) for _ in range(batch)])
    return q, k_min, k_max, jnp.asarray(table, jnp.int32)


def same_selection(got, want):
    """Same page set per row (order aside), the current page last, same row lengths."""
    (got_table, got_len), (want_table, want_len) = got, want
    np.testing.assert_array_equal(np.sort(np.asarray(got_table), axis=2), np.sort(np.asarray(want_table), axis=2))
    np.testing.assert_array_equal(np.asarray(got_table)[..., -1], np.asarray(want_table)[..., -1])
    np.testing.assert_array_equal(np.asarray(got_len), np.asarray(want_len))


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_page_scores_match_jnp(share, dtype):
    q, k_min, k_max, table = make_inputs(np.random.default_rng(0), dtype=dtype)
    got = quest_select.page_scores(q, k_min, k_max, table, share_pages=share, block_pages=8, interpret=True)
    want = quest.page_upper_bounds(q, k_min, k_max, table, share_pages=share)
    assert got.shape == want.shape[:2] + (32,)  # 24 pages padded to a power of two
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(np.asarray(got[..., :24]), np.asarray(want), rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("rows", [2, 8])
@pytest.mark.parametrize("per_row_budget", [False, True])
def test_threshold_select_matches_top_k(rows, per_row_budget):
    rng = np.random.default_rng(1)
    _, _, _, table = make_inputs(rng)
    # Ragged lengths: full rows, a partial current page, a row short enough for the dense fallback.
    lengths = jnp.asarray([[96, 37], [50, 9]], jnp.int32)
    scores = jnp.asarray(rng.standard_normal((2, rows, 32)) * 10, jnp.float32)  # distinct values: no ties
    budget_pages = jnp.asarray(rng.integers(0, 5, (2, rows)), jnp.int32) if per_row_budget else None
    kwargs = dict(page_size=PAGE, token_budget=4 * PAGE, budget_pages=budget_pages)
    got = quest_select.select_pages(scores, table, lengths, interpret=True, **kwargs)
    same_selection(got, quest.select_pages(scores[..., :24], table, lengths, **kwargs))


@pytest.mark.parametrize("radix_bits", [1, 3])
def test_threshold_select_ties_negative_and_infinite_scores(radix_bits):
    """Ties keep the lowest table positions (as lax.top_k); -inf and negative scores order correctly."""
    rng = np.random.default_rng(2)
    _, _, _, table = make_inputs(rng)
    lengths = jnp.full((2, 2), 96, jnp.int32)
    values = np.array([-np.inf, -3.0, -0.0, 0.0, 1.5, 1.5, 1.5, 2.0], np.float32)
    scores = jnp.asarray(values[rng.integers(0, len(values), (2, 2, 32))])
    for budget in (1, 3, 6, 10):
        kwargs = dict(page_size=PAGE, token_budget=budget * PAGE)
        got = quest_select.select_pages(scores, table, lengths, radix_bits=radix_bits, interpret=True, **kwargs)
        same_selection(got, quest.select_pages(scores[..., :24], table, lengths, **kwargs))


def test_threshold_order_is_a_permutation():
    """Kept positions first in table order, then every other position once."""
    rng = np.random.default_rng(6)
    scores = jnp.asarray(rng.standard_normal((1, 3, 16)), jnp.float32)
    current, budget = jnp.asarray([[12, 16, 5]], jnp.int32), jnp.asarray([[4, 0, 5]], jnp.int32)
    order = np.asarray(quest_select.threshold_order(scores, current, budget, radix_bits=2, num_warps=4,
                                                    interpret=True))
    for row in range(3):
        c, k = int(current[0, row]), int(budget[0, row])
        np.testing.assert_array_equal(np.sort(order[0, row]), np.arange(16))
        want = np.sort(np.argsort(-np.asarray(scores[0, row, :c]), kind="stable")[:k])
        np.testing.assert_array_equal(order[0, row, :k], want)


def test_quest_page_table_end_to_end():
    rng = np.random.default_rng(3)
    q, k_min, k_max, table = make_inputs(rng)
    lengths = jnp.asarray([[96, 61], [90, 12]], jnp.int32)
    for share in (True, False):
        kwargs = dict(page_size=PAGE, token_budget=5 * PAGE, share_pages=share)
        got = quest_select.quest_page_table(q, k_min, k_max, table, lengths, block_pages=4, blocks_per_program=2,
                                            interpret=True, **kwargs)
        same_selection(got, quest.quest_page_table(q, k_min, k_max, table, lengths, **kwargs))


def test_small_table_passes_through():
    _, _, _, table = make_inputs(np.random.default_rng(4), pages=4)
    lengths = jnp.full((2, 2), 13, jnp.int32)
    got_table, got_len = quest_select.select_pages(jnp.zeros((2, 2, 4)), table, lengths, page_size=PAGE,
                                                   token_budget=3 * PAGE, interpret=True)
    np.testing.assert_array_equal(np.asarray(got_table), np.asarray(table))
    np.testing.assert_array_equal(np.asarray(got_len), np.asarray(lengths))


def test_bad_inputs_raise_clear_errors():
    q, k_min, k_max, table = make_inputs(np.random.default_rng(5))
    with pytest.raises(ValueError, match="block_pages .* power of two"):
        quest_select.page_scores(q, k_min, k_max, table, share_pages=True, block_pages=12, interpret=True)
    with pytest.raises(ValueError, match="blocks_per_program .* power of two"):
        quest_select.page_scores(q, k_min, k_max, table, share_pages=True, blocks_per_program=3, interpret=True)
    with pytest.raises(ValueError, match="page_table \\[B, G, P\\]"):
        quest_select.page_scores(q, k_min, k_max, table[:, :1], share_pages=True, interpret=True)
    lengths = jnp.full((2, 2), 96, jnp.int32)
    with pytest.raises(ValueError, match="power of two >= the table width"):
        quest_select.select_pages(jnp.zeros((2, 2, 24)), table, lengths, page_size=PAGE, token_budget=8)
    with pytest.raises(ValueError, match="multiple of page_size"):
        quest_select.select_pages(jnp.zeros((2, 2, 32)), table, lengths, page_size=PAGE, token_budget=6)


def test_triton_lowering_for_h100():
    """Both kernels lower to Triton IR at the benchmark's 128K shapes (no GPU needed)."""
    gpu_info = pytest.importorskip("jax._src.pallas.triton.gpu_info")
    registration = pytest.importorskip("jax._src.pallas.triton.pallas_call_registration")
    h100 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
    patch = pytest.MonkeyPatch()
    patch.setattr(registration.gpu_info_lib, "get_gpu_info", lambda: h100)
    sds = jax.ShapeDtypeStruct
    batch, heads, kv_heads, d, pool, pages = 8, 32, 8, 128, 65536, 8192
    summaries = sds((kv_heads, pool, d), jnp.bfloat16)
    try:
        scores = quest_select.page_scores.trace(
            sds((batch, heads, d), jnp.bfloat16), summaries, summaries, sds((batch, kv_heads, pages), jnp.int32),
            share_pages=True,
        ).lower(lowering_platforms=("cuda",))
        rows = sds((batch, kv_heads), jnp.int32)
        selects = [
            quest_select.threshold_order.trace(
                sds((batch, kv_heads, pages), jnp.float32), rows, rows, radix_bits=bits, num_warps=8, interpret=False
            ).lower(lowering_platforms=("cuda",))
            for bits in (1, 3)
        ]
        for lowered in (scores, *selects):
            assert "__gpu$xla.gpu.triton" in lowered.as_text()
    finally:
        patch.undo()
