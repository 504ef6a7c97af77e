"""Quest scoring and threshold-selection kernels (interpret mode) vs the jnp functions of quest.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_test_utils import lowering_for_h100
from pallas_kernels import paged_decode
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
    got = quest_select.page_scores(q, k_min, k_max, table, share_pages=share, block_pages=16, blocks_per_program=2,
                                    interpret=True)
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


@pytest.mark.parametrize("candidates", [1, 4])
def test_threshold_select_ties_negative_and_infinite_scores(candidates):
    """Ties keep the lowest table positions (as lax.top_k); -inf and negative scores order correctly."""
    rng = np.random.default_rng(2)
    _, _, _, table = make_inputs(rng)
    lengths = jnp.full((2, 2), 96, jnp.int32)
    values = np.array([-np.inf, -3.0, -0.0, 0.0, 1.5, 1.5, 1.5, 2.0], np.float32)
    scores = jnp.asarray(values[rng.integers(0, len(values), (2, 2, 32))])
    for budget in (1, 3, 6, 10):
        kwargs = dict(page_size=PAGE, token_budget=budget * PAGE)
        got = quest_select.select_pages(scores, table, lengths, candidates=candidates, interpret=True, **kwargs)
        same_selection(got, quest.select_pages(scores[..., :24], table, lengths, **kwargs))


@pytest.mark.parametrize("candidates", [1, 2, 4])
def test_threshold_search_extreme_spans_and_budgets(candidates):
    """Scores spanning the whole fp32 range (key differences beyond int32), tiny and huge
    magnitudes, budgets 0, 1 and all-but-one page, per-query-head rows sharing a KV table."""
    rng = np.random.default_rng(6)
    _, _, _, table = make_inputs(rng, pages=30)
    lengths = jnp.asarray([[120, 119], [65, 117]], jnp.int32)
    spread = rng.choice([-3e38, -1e-30, 0.0, 1e-38, 7.0, 3e38, -np.inf, np.inf], size=(2, 8, 32))
    scores = jnp.asarray(spread * rng.uniform(0.5, 1.0, (2, 8, 32)), jnp.float32)
    budget_pages = jnp.asarray(rng.choice([0, 1, 28], size=(2, 8)), jnp.int32)
    kwargs = dict(page_size=PAGE, token_budget=28 * PAGE, budget_pages=budget_pages)
    got = quest_select.select_pages(scores, table, lengths, candidates=candidates, interpret=True, **kwargs)
    same_selection(got, quest.select_pages(scores[..., :30], table, lengths, **kwargs))


def test_quest_page_table_end_to_end():
    rng = np.random.default_rng(3)
    q, k_min, k_max, table = make_inputs(rng)
    lengths = jnp.asarray([[96, 61], [90, 12]], jnp.int32)
    for share in (True, False):
        kwargs = dict(page_size=PAGE, token_budget=5 * PAGE, share_pages=share)
        got = quest_select.quest_page_table(q, k_min, k_max, table, lengths, block_pages=16, blocks_per_program=2,
                                            interpret=True, **kwargs)
        same_selection(got, quest.quest_page_table(q, k_min, k_max, table, lengths, **kwargs))


def test_quest_page_table_op_has_one_signature_for_every_implementation():
    """The op's reference ("xla") and kernels ("triton", interpreted) take the same arguments
    (per-row budgets, spare columns) and pick the same pages."""
    rng = np.random.default_rng(7)
    q, k_min, k_max, table = make_inputs(rng)
    lengths = jnp.asarray([[96, 61], [90, 12]], jnp.int32)
    kwargs = dict(page_size=PAGE, token_budget=5 * PAGE, share_pages=True, spare_columns=4,
                  budget_pages=jnp.asarray([[5, 2], [3, 0]], jnp.int32))
    want = paged_decode.quest_page_table(q, k_min, k_max, table, lengths, implementation="xla", **kwargs)
    got = paged_decode.quest_page_table(q, k_min, k_max, table, lengths, implementation="triton", interpret=True,
                                        **kwargs)
    assert got[0].shape == want[0].shape == (2, 2, 6 + 4)
    same_selection((got[0][..., :6], got[1]), (want[0][..., :6], want[1]))
    assert int(want[0].min()) >= 0 and int(want[0].max()) < 64  # spare columns: in-range pool pages
    default = paged_decode.quest_page_table(q, k_min, k_max, table, lengths, **kwargs)  # CPU: the reference
    np.testing.assert_array_equal(np.asarray(default[0]), np.asarray(want[0]))
    with pytest.raises(ValueError, match="quest_page_table: unknown implementation 'mosaic_tpu'; use one of 'xla', "
                                         "'triton', or None"):
        paged_decode.quest_page_table(q, k_min, k_max, table, lengths, implementation="mosaic_tpu", **kwargs)


@pytest.mark.parametrize("spare", [3, 40])
def test_spare_columns_after_the_selected_pages(spare):
    """Spare columns follow the b + 1 selected ones (beyond the scores' width: padded)."""
    rng = np.random.default_rng(6)
    _, _, _, table = make_inputs(rng)
    lengths = jnp.asarray([[96, 37], [50, 9]], jnp.int32)
    scores = jnp.asarray(rng.standard_normal((2, 2, 32)), jnp.float32)
    kwargs = dict(page_size=PAGE, token_budget=4 * PAGE)
    narrow = quest_select.select_pages(scores, table, lengths, interpret=True, **kwargs)
    wide_table, wide_len = quest_select.select_pages(scores, table, lengths, spare_columns=spare, interpret=True,
                                                     **kwargs)
    assert wide_table.shape == (2, 2, 5 + spare)
    np.testing.assert_array_equal(np.asarray(wide_table[..., :5]), np.asarray(narrow[0]))
    np.testing.assert_array_equal(np.asarray(wide_len), np.asarray(narrow[1]))
    assert int(wide_table.min()) >= 0 and int(wide_table.max()) < 64  # in-range pool pages


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
    with pytest.raises(ValueError, match="block_pages \\(8\\) must be at least 16"):
        quest_select.page_scores(q, k_min, k_max, table, share_pages=True, block_pages=8, interpret=True)
    with pytest.raises(ValueError, match="blocks_per_program .* power of two"):
        quest_select.page_scores(q, k_min, k_max, table, share_pages=True, blocks_per_program=3, interpret=True)
    with pytest.raises(ValueError, match="page_table \\[B, G, P\\]"):
        quest_select.page_scores(q, k_min, k_max, table[:, :1], share_pages=True, interpret=True)
    lengths = jnp.full((2, 2), 96, jnp.int32)
    with pytest.raises(ValueError, match="power of two >= the table width"):
        quest_select.select_pages(jnp.zeros((2, 2, 24)), table, lengths, page_size=PAGE, token_budget=8)
    with pytest.raises(ValueError, match="multiple of page_size"):
        quest_select.select_pages(jnp.zeros((2, 2, 32)), table, lengths, page_size=PAGE, token_budget=6)
    with pytest.raises(ValueError, match="scores rows \\(3\\) must be a multiple"):
        quest_select.select_pages(jnp.zeros((2, 3, 32)), table, lengths, page_size=PAGE, token_budget=8)
    with pytest.raises(ValueError, match="spare_columns must be a non-negative int"):
        quest_select.select_pages(jnp.zeros((2, 2, 32)), table, lengths, page_size=PAGE, token_budget=8,
                                  spare_columns=-1)
    with pytest.raises(ValueError, match="candidates \\(3\\) must be a power of two"):
        quest_select.select_pages(jnp.zeros((2, 2, 32)), table, lengths, page_size=PAGE, token_budget=8, candidates=3)


def test_triton_lowering_for_h100():
    """Both kernels lower to Triton IR at the benchmark's 128K shapes (no GPU needed)."""
    sds = jax.ShapeDtypeStruct
    batch, heads, kv_heads, d, pool, pages = 8, 32, 8, 128, 65536, 8192
    summaries = sds((kv_heads, pool, d), jnp.bfloat16)
    with lowering_for_h100():
        scores = quest_select.page_scores.trace(
            sds((batch, heads, d), jnp.bfloat16), summaries, summaries, sds((batch, kv_heads, pages), jnp.int32),
            share_pages=True,
        ).lower(lowering_platforms=("cuda",))
        rows = sds((batch, kv_heads), jnp.int32)
        selects = [
            quest_select._select_call.trace(
                sds((batch, kv_heads, pages), jnp.float32), sds((batch, kv_heads, pages), jnp.int32), rows, rows,
                page_size=16, max_pages=256, columns=columns, candidates=candidates, num_warps=8, interpret=False,
            ).lower(lowering_platforms=("cuda",))
            for candidates, columns in ((1, 257 + 4), (4, pages))
        ]
    for lowered in (scores, *selects):
        assert "__gpu$xla.gpu.triton" in lowered.as_text()
