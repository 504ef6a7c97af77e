"""Paged decode kernels (GPU Triton and TPU Mosaic, in interpret mode) and Quest selection
against the jnp reference, on tiny shapes."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_test_utils import lowering_for_h100
from pallas_kernels.paged_decode import DecodeConfig, default_config, paged_decode_attention, quest, reference

warnings.filterwarnings("ignore", category=DeprecationWarning)

PAGE = 4
D = 32


def make_cache(rng, *, batch, heads, kv_heads, pages_per_row, lengths, per_query_head=False, dtype=jnp.float32,
               page=PAGE, head_dim=D):
    """Random q, pools, shuffled non-contiguous page tables; slots past each row's length hold NaN.

    ``lengths``: ``[batch, rows]`` valid tokens per row (rows = heads if per_query_head else kv_heads).
    """
    rows = heads if per_query_head else kv_heads
    rows_per_kv = rows // kv_heads
    pool = batch * rows_per_kv * pages_per_row + 3  # spare pages that no row uses
    q = rng.standard_normal((batch, heads, head_dim))
    k = rng.standard_normal((kv_heads, pool, page, head_dim))
    v = rng.standard_normal((kv_heads, pool, page, head_dim))
    table = np.zeros((batch, rows, pages_per_row), np.int32)
    for j in range(kv_heads):
        perm = rng.permutation(pool)[: batch * rows_per_kv * pages_per_row].reshape(batch, rows_per_kv, -1)
        table[:, j * rows_per_kv : (j + 1) * rows_per_kv] = perm
    clean = (k.copy(), v.copy())
    for b in range(batch):
        for r in range(rows):
            n = lengths[b][r]
            for slot in range(n, pages_per_row * page):
                k[r // rows_per_kv, table[b, r, slot // page], slot % page] = np.nan
                v[r // rows_per_kv, table[b, r, slot // page], slot % page] = np.nan
    to = lambda x: jnp.asarray(x, dtype)
    args = (to(q), to(k), to(v), jnp.asarray(table), jnp.asarray(lengths, jnp.int32))
    clean_args = (to(q), to(clean[0]), to(clean[1]), jnp.asarray(table), jnp.asarray(lengths, jnp.int32))
    return args, clean_args


def rel_err(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(out - ref) / np.linalg.norm(ref)


IMPLEMENTATIONS = ["triton", "mosaic_tpu"]  # the kernels, interpreted


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "heads,kv_heads,per_query_head,lengths",
    [
        (4, 4, False, [[1, 24, 8, 13], [4, 5, 20, 1]]),  # GQA ratio 1; lengths 1 and page multiples
        (8, 2, False, [[17, 1], [24, 12]]),  # ratio 4, ragged per KV head (evicted cache)
        (16, 2, False, [[9, 24], [3, 16]]),  # ratio 8
        (8, 2, True, [[1, 5, 24, 9, 16, 2, 7, 21], [3, 3, 12, 4, 22, 8, 19, 1]]),  # per-query-head tables
    ],
)
def test_kernel_matches_reference(implementation, heads, kv_heads, per_query_head, lengths):
    rng = np.random.default_rng(hash((heads, kv_heads, per_query_head)) % 2**32)
    args, clean = make_cache(
        rng, batch=2, heads=heads, kv_heads=kv_heads, pages_per_row=6, lengths=lengths, per_query_head=per_query_head
    )
    ref = reference.paged_decode_attention(*clean, scale=0.2)
    out = paged_decode_attention(*args, scale=0.2, implementation=implementation, interpret=True,
                                 config=DecodeConfig(pages_per_block=2, num_splits=2))
    assert np.isfinite(np.asarray(out)).all()
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("ppb,splits", [(1, 1), (4, 3)])
def test_block_and_split_sizes(implementation, ppb, splits):
    """More splits than pages, blocks wider than rows, one page per block: same result."""
    rng = np.random.default_rng(ppb * 10 + splits)
    args, clean = make_cache(rng, batch=1, heads=8, kv_heads=2, pages_per_row=7, lengths=[[25, 2]])
    # (4, 3): blocks wider than the 2-token row and more splits than its one page.
    ref = reference.paged_decode_attention(*clean, scale=0.3)
    out = paged_decode_attention(*args, scale=0.3, implementation=implementation, interpret=True,
                                 config=DecodeConfig(pages_per_block=ppb, num_splits=splits))
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_sliding_window_and_empty_row(implementation):
    rng = np.random.default_rng(7)
    args, clean = make_cache(rng, batch=2, heads=4, kv_heads=2, pages_per_row=6, lengths=[[23, 0], [6, 17]])
    ref = reference.paged_decode_attention(*clean, scale=0.25, sliding_window=7)
    out = paged_decode_attention(*args, scale=0.25, sliding_window=7, implementation=implementation, interpret=True,
                                 config=DecodeConfig(pages_per_block=2, num_splits=3))
    np.testing.assert_array_equal(np.asarray(out)[0, 2:], 0.0)  # KV head 1 of sequence 0 is empty
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_bf16(implementation):
    rng = np.random.default_rng(3)
    args, clean = make_cache(rng, batch=1, heads=8, kv_heads=2, pages_per_row=8, lengths=[[31, 9]],
                             dtype=jnp.bfloat16)
    ref = reference.paged_decode_attention(*clean, scale=D**-0.5)
    out = paged_decode_attention(*args, scale=D**-0.5, implementation=implementation, interpret=True)
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, ref) < 1e-2


def test_xla_implementation_and_default_config():
    rng = np.random.default_rng(0)
    _, clean = make_cache(rng, batch=1, heads=4, kv_heads=2, pages_per_row=3, lengths=[[5, 12]])
    np.testing.assert_array_equal(
        paged_decode_attention(*clean, scale=0.1, implementation="xla"),
        reference.paged_decode_attention(*clean, scale=0.1),
    )
    cfg = default_config(batch=1, rows=8, pages_per_row=8192)
    assert cfg.num_splits == 66 and cfg.pages_per_block == 4
    assert default_config(batch=8, rows=8, pages_per_row=16).num_splits == 4


def test_bad_inputs_raise_clear_errors():
    rng = np.random.default_rng(0)
    (q, k, v, table, lengths), _ = make_cache(rng, batch=1, heads=4, kv_heads=2, pages_per_row=3, lengths=[[5, 12]])
    call = lambda **kw: paged_decode_attention(
        kw.get("q", q), k, v, kw.get("table", table), kw.get("lengths", lengths), scale=0.1, implementation="triton",
        interpret=True,
    )
    with pytest.raises(ValueError, match="int32"):
        call(table=table.astype(jnp.int16))
    with pytest.raises(ValueError, match="rows = 2"):
        call(table=jnp.zeros((1, 3, 3), jnp.int32))
    with pytest.raises(ValueError, match="lengths must be"):
        call(lengths=lengths[:, :1])
    with pytest.raises(ValueError, match="head_dim"):
        call(q=q[..., :8])
    with pytest.raises(ValueError, match="paged_decode_attention: unknown implementation 'cuda'; "
                                         "use one of 'xla', 'triton', 'mosaic_gpu', 'mosaic_tpu'"):
        paged_decode_attention(q, k, v, table, lengths, scale=0.1, implementation="cuda")
    with pytest.raises(ValueError, match="power of two"):
        DecodeConfig(pages_per_block=3)
    with pytest.raises(ValueError, match="positive int"):
        DecodeConfig(num_splits=0)


# ----------------------------------------------------------------------------- Quest


def summaries(k_pages, page_table, lengths):
    """k_min / k_max of every pool page from the valid slots of the rows that own them."""
    g, pool, s, d = k_pages.shape
    k = np.asarray(k_pages, np.float64)
    k_min = np.full((g, pool, d), np.inf)
    k_max = np.full((g, pool, d), -np.inf)
    for b in range(page_table.shape[0]):
        for j in range(g):
            for slot in range(int(lengths[b, j])):
                page = page_table[b, j, slot // s]
                k_min[j, page] = np.minimum(k_min[j, page], k[j, page, slot % s])
                k_max[j, page] = np.maximum(k_max[j, page], k[j, page, slot % s])
    return jnp.asarray(k_min, jnp.float32), jnp.asarray(k_max, jnp.float32)


def quest_oracle(q, k_min, k_max, table, lengths, budget, share):
    """Loop-by-loop Quest selection (docs/reference_behaviour.md 4.7) in float64."""
    q, k_min, k_max = (np.asarray(x, np.float64) for x in (q, k_min, k_max))
    b_, h, _ = q.shape
    g = k_min.shape[0]
    group = h // g
    nb = budget // PAGE
    rows = g if share else h
    tables, lens = [], []
    for b in range(b_):
        for r in range(rows):
            j = r if share else r // group
            heads = range(j * group, (j + 1) * group) if share else [r]
            n = int(lengths[b, j])
            c = (n - 1) // PAGE
            if c <= nb:
                tables.append(list(table[b, j, : nb + 1]))
                lens.append(n)
                continue
            score = [
                sum(np.maximum(q[b, hh] * k_min[j, table[b, j, p]], q[b, hh] * k_max[j, table[b, j, p]]).sum()
                    for hh in heads)
                for p in range(c)
            ]
            best = sorted(range(c), key=lambda p: -score[p])[:nb]
            tables.append([table[b, j, p] for p in best] + [table[b, j, c]])
            lens.append(nb * PAGE + n - c * PAGE)
    return np.array(tables).reshape(b_, rows, -1), np.array(lens).reshape(b_, rows)


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("budget_pages", [1, 3, 9])
def test_quest_selection_matches_oracle(share, budget_pages):
    rng = np.random.default_rng(budget_pages + 100 * share)
    lengths = [[40, 33], [29, 5]]  # the last row has fewer pages than most budgets: dense fallback
    (q, k, v, table, lens), _ = make_cache(rng, batch=2, heads=8, kv_heads=2, pages_per_row=10, lengths=lengths)
    k_min, k_max = summaries(k, np.asarray(table), np.asarray(lens))
    budget = budget_pages * PAGE
    got_table, got_len = quest.quest_page_table(
        q, k_min, k_max, table, lens, page_size=PAGE, token_budget=budget, share_pages=share
    )
    want_table, want_len = quest_oracle(q, k_min, k_max, np.asarray(table), np.asarray(lens), budget, share)
    np.testing.assert_array_equal(got_len, want_len)
    # Best-first order may differ only on exact ties (absent with random data); the current page is last.
    np.testing.assert_array_equal(np.sort(got_table, -1), np.sort(want_table, -1))
    np.testing.assert_array_equal(got_table[..., -1], want_table[..., -1])


def test_quest_pool_and_gather_scoring_agree():
    """Scoring the whole pool then picking rows equals gathering each row's summaries."""
    rng = np.random.default_rng(5)
    q = jnp.asarray(rng.standard_normal((2, 8, D)), jnp.bfloat16)
    k_min = jnp.asarray(rng.standard_normal((2, 30, D)), jnp.bfloat16)
    k_max = k_min + jnp.asarray(rng.random((2, 30, D)), jnp.bfloat16)
    table = jnp.asarray(rng.integers(0, 30, (2, 2, 16)), jnp.int32)  # 2 * 16 >= 30 pool pages: pool path
    pool_scores = quest.page_upper_bounds(q, k_min, k_max, table, share_pages=False)
    gather_scores = quest.page_upper_bounds(q, k_min, k_max, table[:, :, :8], share_pages=False)  # gather path
    np.testing.assert_allclose(pool_scores[..., :8], gather_scores, rtol=1e-6, atol=1e-5)
    qf, mn, mx = (np.asarray(x, np.float64) for x in (q, k_min, k_max))
    t = np.asarray(table)
    brute = np.zeros((2, 8, 16))
    for b in range(2):
        for h in range(8):
            j = h // 4
            brute[b, h] = np.maximum(qf[b, h] * mn[j, t[b, j]], qf[b, h] * mx[j, t[b, j]]).sum(-1)
    np.testing.assert_allclose(pool_scores, brute, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("share,budget_pages", [(True, 1), (False, 10)])
def test_quest_decode_end_to_end(implementation, share, budget_pages):
    """Kernel over the Quest table == reference over the same table; all-pages budget == dense decode."""
    rng = np.random.default_rng(budget_pages)
    lengths = [[37, 40], [22, 31]]
    (q, k, v, table, lens), (_, kc, vc, _, _) = make_cache(
        rng, batch=2, heads=8, kv_heads=2, pages_per_row=10, lengths=lengths
    )
    k_min, k_max = summaries(kc, np.asarray(table), np.asarray(lens))
    sel, sel_len = quest.quest_page_table(
        q, k_min, k_max, table, lens, page_size=PAGE, token_budget=budget_pages * PAGE, share_pages=share
    )
    assert sel.shape[1] == (2 if share else 8)
    out = paged_decode_attention(q, k, v, sel, sel_len, scale=0.2, implementation=implementation, interpret=True,
                                 config=DecodeConfig(pages_per_block=2, num_splits=2))
    ref = reference.paged_decode_attention(q, kc, vc, sel, sel_len, scale=0.2)
    assert rel_err(out, ref) < 1e-5
    if budget_pages >= 9:  # every page fits: Quest reads the whole cache
        dense = reference.paged_decode_attention(q, kc, vc, table, lens, scale=0.2)
        assert rel_err(out, dense) < 1e-5


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_table_read_in_place_with_max_row_pages(implementation):
    """A table with spare columns past ``max_row_pages`` is read as it is; the result is unchanged."""
    from pallas_kernels.paged_decode import split_pages

    rng = np.random.default_rng(11)
    (q, k, v, table, lens), clean = make_cache(rng, batch=2, heads=8, kv_heads=2, pages_per_row=7,
                                               lengths=[[13, 1], [16, 9]])
    # Rows read at most 4 pages; 3 spare columns fit blocks of 2 pages (and 3 < 2 + 4 - 1 would not
    # fit blocks of 4: the kernel then pads, still correct).
    assert split_pages.pad_table(table, 2, max_row_pages=4) is table
    assert split_pages.pad_table(table, 4, max_row_pages=4).shape[2] == 7 + 4
    ref = reference.paged_decode_attention(*clean, scale=0.2)
    for ppb in (2, 4):
        out = paged_decode_attention(q, k, v, table, lens, scale=0.2, max_row_pages=4, implementation=implementation,
                                     interpret=True, config=DecodeConfig(pages_per_block=ppb, num_splits=2))
        assert rel_err(out, ref) < 1e-5
    with pytest.raises(ValueError, match="max_row_pages must be a non-negative int"):
        split_pages.pad_table(table, 2, max_row_pages=-1)


def test_quest_bad_budget():
    with pytest.raises(ValueError, match="multiple of page_size"):
        quest.select_pages(jnp.zeros((1, 2, 8)), jnp.zeros((1, 2, 8), jnp.int32), jnp.ones((1, 2), jnp.int32),
                           page_size=PAGE, token_budget=6)


# ------------------------------------------------------------------- lowering checks


def test_triton_lowering_for_h100():
    """The GPU kernel lowers to Triton IR (Python-side lowering, no GPU needed)."""
    from pallas_kernels.paged_decode import gpu_triton

    with lowering_for_h100():
        for rows in (8, 32):
            args = _abstract_args(rows)
            text = gpu_triton.paged_decode_attention.trace(*args, scale=0.1).lower(lowering_platforms=("cuda",))
            assert "__gpu$xla.gpu.triton" in text.as_text()


def test_mosaic_lowering_for_tpu():
    """The TPU kernel lowers to Mosaic (Python-side lowering, no TPU needed)."""
    from jax._src import mesh as mesh_lib

    from pallas_kernels.paged_decode import tpu

    device = mesh_lib.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)):
        for rows in (8, 32):
            text = tpu.paged_decode_attention.trace(*_abstract_args(rows), scale=0.1).lower(
                lowering_platforms=("tpu",)
            )
            assert "tpu_custom_call" in text.as_text()


def test_mosaic_gpu_lowering_for_hopper():
    """The Mosaic GPU kernel lowers for CUDA (Python-side, no GPU): dense and per-query-head
    tables, a sliding window, a table read in place. Its numbers are checked on the device
    (``experiments/benchmarks/decode_kernels.py`` compares every launch with the reference)."""
    from pallas_kernels.paged_decode import MosaicDecodeConfig, gpu_mosaic

    config = MosaicDecodeConfig(pages_per_block=4, stages=3, num_splits=5)
    for rows, window, bound in [(8, None, None), (32, None, None), (8, 100, None), (8, None, 59)]:
        lowered = gpu_mosaic.paged_decode_attention.trace(
            *_abstract_args(rows), scale=0.1, sliding_window=window, max_row_pages=bound, config=config
        ).lower(lowering_platforms=("cuda",))
        assert "mosaic_gpu" in lowered.as_text()
    sds = jax.ShapeDtypeStruct
    for page, d, heads, kv_heads, ppb in [(16, 64, 9, 3, 4), (32, 128, 32, 8, 2), (128, 128, 16, 2, 1)]:
        pool = sds((kv_heads, 64, page, d), jnp.bfloat16)
        lowered = gpu_mosaic.paged_decode_attention.trace(
            sds((2, heads, d), jnp.bfloat16), pool, pool, sds((2, kv_heads, 16), jnp.int32),
            sds((2, kv_heads), jnp.int32), scale=0.1, config=MosaicDecodeConfig(pages_per_block=ppb, stages=2),
        ).lower(lowering_platforms=("cuda",))
        assert "mosaic_gpu" in lowered.as_text()


def test_mosaic_gpu_coverage_and_config():
    from pallas_kernels.paged_decode import configs, gpu_mosaic, mosaic_config

    assert gpu_mosaic.supports(16, 128, 4, jnp.bfloat16) and gpu_mosaic.supports(8, 64, 64, jnp.float16)
    assert not gpu_mosaic.supports(16, 128, 4, jnp.float32)
    assert not gpu_mosaic.supports(12, 128, 4, jnp.bfloat16)
    assert not gpu_mosaic.supports(16, 256, 4, jnp.bfloat16)
    assert not gpu_mosaic.supports(16, 128, 128, jnp.bfloat16)
    h100 = configs.H100
    cfg = mosaic_config(1, 8, 8192, page_size=16, head_dim=128, kind=h100)
    entry = configs.MOSAIC_LAUNCH[h100]
    assert cfg.num_splits == -(-entry.target_programs // 8)
    # A slot holds at least 64 tokens; the ring is cut to what shared memory holds.
    for page in (8, 16, 32, 64, 128):
        c = mosaic_config(8, 8, 64, page_size=page, head_dim=128, kind=h100)
        tokens = c.pages_per_block * page
        assert tokens % 64 == 0
        assert configs.mosaic_smem_bytes(tokens, 128, c.stages) <= configs.MOSAIC_SMEM_BYTES
    assert mosaic_config(8, 8, 3, page_size=16, head_dim=128, kind=h100).num_splits == 1  # one block per row
    # Quest's tables leave room for the widest page block of either kernel's launch.
    for page in (8, 16, 64):
        want = max(configs.DecodeConfig.pages_per_block, configs.LAUNCH[h100].pages_per_block,
                   entry.pages_per_block(page))
        assert configs.spare_table_columns(page, kind=h100) == want
    assert configs.spare_table_columns(8, kind=h100) >= 64 // 8


def test_mosaic_launch_override_must_give_whole_wgmma_slots(monkeypatch):
    from pallas_kernels.paged_decode import configs, mosaic_config

    monkeypatch.setenv("PALLAS_KERNELS_LAUNCH", '{"paged_decode_mosaic": {"block_tokens": 96}}')
    with pytest.raises(ValueError, match="block_tokens must be a multiple of 64; got 96"):
        mosaic_config(1, 8, 64, page_size=16, head_dim=128, kind=configs.H200)


def test_mosaic_gpu_refuses_what_it_does_not_cover():
    from pallas_kernels.paged_decode import MosaicDecodeConfig, gpu_mosaic

    q, k, v, table, lengths = (jnp.zeros(a.shape, a.dtype) for a in _abstract_args(8))
    with pytest.raises(ValueError, match="multiple of 64"):
        gpu_mosaic.paged_decode_attention(q, k, v, table, lengths, scale=0.1,
                                          config=MosaicDecodeConfig(pages_per_block=2))
    with pytest.raises(ValueError, match="use implementation='triton'"):
        gpu_mosaic.paged_decode_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                          table, lengths, scale=0.1, config=MosaicDecodeConfig())
    with pytest.raises(ValueError, match="'mosaic_gpu' takes a MosaicDecodeConfig; got a DecodeConfig"):
        paged_decode_attention(q, k, v, table, lengths, scale=0.1, implementation="mosaic_gpu", interpret=True,
                               config=DecodeConfig())
    with pytest.raises(ValueError, match="'triton' takes a DecodeConfig; got a MosaicDecodeConfig"):
        paged_decode_attention(q, k, v, table, lengths, scale=0.1, implementation="triton", interpret=True,
                               config=MosaicDecodeConfig())


ON_HOPPER = pytest.mark.skipif("not __import__('pallas_kernels.common').common.is_hopper()",
                               reason="runs the Mosaic GPU kernel: a Hopper GPU only")


@ON_HOPPER
@pytest.mark.parametrize(
    "batch,heads,kv_heads,per_query_head,pages_per_row,lengths,window,config,page,head_dim",
    [
        (3, 32, 8, False, 40, [[0, 1, 15, 16, 17, 300, 639, 640]] * 3, None, (8, 2, 4), 16, 128),  # ragged, empty row
        (2, 32, 8, False, 64, [[1024] * 8] * 2, None, (4, 4, 3), 16, 128),  # full rows, GQA 4
        (2, 32, 8, False, 40, [[1, 63, 64, 65, 200, 511, 600, 640]] * 2, 100, (4, 3, 5), 16, 128),  # sliding window
        (2, 16, 4, True, 24, [list(range(0, 384, 24))] * 2, None, (4, 2, 2), 16, 128),  # per-query-head rows
        (1, 16, 2, False, 70, [[1111, 17]], None, (4, 4, 7), 16, 128),  # GQA 8, more splits than a short row's blocks
        (2, 8, 8, False, 8, [[1] * 8] * 2, None, (4, 5, 16), 16, 128),  # one token, GQA 1
        (2, 9, 3, False, 40, [[0, 17, 639]] * 2, None, (4, 2, 3), 16, 64),  # SmolLM2's heads and head_dim
        (2, 9, 3, False, 40, [[5, 300, 639]] * 2, 200, (4, 3, 4), 16, 64),  # same, sliding window
        (2, 32, 8, False, 24, [[0, 1, 31, 32, 33, 400, 700, 768]] * 2, None, (2, 2, 3), 32, 128),  # 32-token pages
        (2, 32, 8, False, 80, [[1, 7, 8, 9, 100, 500, 639, 640]] * 2, None, (8, 2, 5), 8, 128),  # 8-token pages
        (1, 16, 2, True, 12, [list(range(1, 1536, 96))], None, (1, 2, 3), 128, 128),  # 128-token pages, per head
    ],
)
def test_mosaic_gpu_matches_reference_on_hopper(batch, heads, kv_heads, per_query_head, pages_per_row, lengths, window,
                                               config, page, head_dim):
    """The Mosaic GPU kernel on the device, bf16 pools, NaN past every row's length: finite, and
    within bf16 tolerance of the fp32 reference on the clean pools. Every (page, head_dim) class
    here is one ``gpu_mosaic.DEVICE_CHECKED`` names (test below)."""
    check_mosaic_gpu(batch, heads, kv_heads, per_query_head, pages_per_row, lengths, window, config, page=page,
                     head_dim=head_dim)


def test_device_checked_classes_are_the_device_tests():
    from pallas_kernels.paged_decode import gpu_mosaic

    cases = next(m for m in test_mosaic_gpu_matches_reference_on_hopper.pytestmark if m.name == "parametrize")
    assert {(case[-2], case[-1]) for case in cases.args[1]} == gpu_mosaic.DEVICE_CHECKED
    assert gpu_mosaic.DEFAULT_CLASSES <= gpu_mosaic.DEVICE_CHECKED


@pytest.mark.parametrize(
    "batch,heads,kv_heads,per_query_head,pages_per_row,lengths,window,config,page,head_dim",
    [
        (2, 8, 2, False, 10, [[0, 150], [17, 160]], None, (4, 2, 2), 16, 64),  # empty row, partial last pages
        (1, 8, 2, False, 12, [[150, 191]], 40, (4, 3, 3), 16, 64),  # sliding window, more splits than blocks
        (1, 4, 2, True, 6, [[1, 33, 96, 70]], None, (2, 2, 2), 32, 128),  # per-query-head rows, 32-token pages
        (1, 8, 2, False, 24, [[384, 300]], None, (4, 2, 1), 16, 64),  # one split of 6 blocks: the ring wraps
    ],
)
def test_mosaic_gpu_interpreted_matches_reference(batch, heads, kv_heads, per_query_head, pages_per_row, lengths,
                                                  window, config, page, head_dim):
    """The Mosaic GPU kernel in Mosaic GPU's CPU interpreter (its two products as jnp.dot, the rest
    as on the device), NaN past every row's length: finite, and within bf16 tolerance."""
    check_mosaic_gpu(batch, heads, kv_heads, per_query_head, pages_per_row, lengths, window, config, page=page,
                     head_dim=head_dim, interpret=True)


def check_mosaic_gpu(batch, heads, kv_heads, per_query_head, pages_per_row, lengths, window, config, *, page=16,
                     head_dim=128, interpret=False):
    from pallas_kernels.paged_decode import MosaicDecodeConfig

    rng = np.random.default_rng(batch * 100 + heads + head_dim)
    args, clean = make_cache(rng, batch=batch, heads=heads, kv_heads=kv_heads, pages_per_row=pages_per_row,
                             lengths=lengths, per_query_head=per_query_head, dtype=jnp.bfloat16, page=page,
                             head_dim=head_dim)
    ref = reference.paged_decode_attention(*(x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x for x in clean),
                                           scale=head_dim**-0.5, sliding_window=window)
    ppb, stages, splits = config
    out = paged_decode_attention(*args, scale=head_dim**-0.5, sliding_window=window, implementation="mosaic_gpu",
                                 config=MosaicDecodeConfig(pages_per_block=ppb, stages=stages, num_splits=splits),
                                 interpret=interpret)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert rel_err(out, ref) < 1e-2


@ON_HOPPER
def test_default_implementation_on_hopper():
    """On a Hopper GPU the default is the Mosaic GPU kernel where it covers the shapes, else Triton."""
    from pallas_kernels.paged_decode import default_implementation

    q, k, _, table, _ = _abstract_args(8)
    assert default_implementation(q, k, table, interpret=False) == "mosaic_gpu"
    f32 = jax.ShapeDtypeStruct(k.shape, jnp.float32)
    assert default_implementation(q, f32, table, interpret=False) == "triton"
    d64 = jax.ShapeDtypeStruct(k.shape[:3] + (64,), k.dtype)  # covered, not yet checked on a device
    assert default_implementation(jax.ShapeDtypeStruct(q.shape[:2] + (64,), q.dtype), d64, table,
                                  interpret=False) == "triton"


@pytest.mark.skipif("__import__('pallas_kernels.common').common.is_hopper()", reason="the CPU's defaults")
def test_default_implementation_off_hopper():
    """On the CPU the default is the reference, or the Triton kernel when interpreted."""
    from pallas_kernels.paged_decode import default_implementation

    q, k, _, table, _ = _abstract_args(8)
    assert default_implementation(q, k, table, interpret=False) == "xla"
    assert default_implementation(q, k, table, interpret=True) == "triton"


def _abstract_args(rows, batch=2, heads=32, kv_heads=8, pool=256, pages=64):
    sds = jax.ShapeDtypeStruct
    pages_shape = (kv_heads, pool, 16, 128)
    return (
        sds((batch, heads, 128), jnp.bfloat16), sds(pages_shape, jnp.bfloat16), sds(pages_shape, jnp.bfloat16),
        sds((batch, rows, pages), jnp.int32), sds((batch, rows), jnp.int32),
    )
