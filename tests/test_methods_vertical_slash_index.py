"""Vertical-slash index construction: golden vectors, invariants, exact pair counts and the walk row by row."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.vertical_slash.index import VerticalSlashIndex
from pallas_kernels.vertical_slash.reference import index_to_mask
from sparse_jax.attention.base import LayerSpec
from sparse_jax.attention.methods import vertical_slash_index
from sparse_jax.attention.methods.vertical_and_slash import VerticalAndSlash
from sparse_jax.attention.methods.vertical_slash_index import TILE, build_index, index_stats
from shared_data import SHARED_DATA

GOLDEN = SHARED_DATA / "golden_vs_index_cases.json"


def _cases():
    return json.loads(GOLDEN.read_text())["cases"]


def _as_batch(index):
    """``[R, ...]`` one-head index -> ``[1, 1, R, ...]``."""
    return index._replace(**{f: getattr(index, f)[None, None] for f in index._fields[:4]})


@pytest.mark.skipif(not GOLDEN.exists(), reason="golden_vs_index_cases.json not available")
@pytest.mark.parametrize("case", range(4))
def test_golden_vectors_match_exactly(case):
    c = _cases()[case]
    length = c["seq_len"]
    verticals = np.array(c["verticals_ascending"], np.int32)
    offsets = np.array(c["slash_offsets_descending"], np.int32)
    rng = np.random.default_rng(case)  # the builder must not depend on input order
    verticals, offsets = rng.permutation(verticals), rng.permutation(offsets)
    index = build_index(
        jnp.asarray(verticals),
        jnp.ones(verticals.shape, bool),
        jnp.asarray(offsets),
        jnp.ones(offsets.shape, bool),
        num_row_blocks=-(-length // TILE),
    )
    for row in c["rows"]:
        r = row["row_block"]
        assert index.block_starts[r, : index.block_counts[r]].tolist() == row["block_starts"], r
        assert index.columns[r, : index.column_counts[r]].tolist() == row["columns"], r
    _, reported = index_stats(_as_batch(index), jnp.array([length]))
    np.testing.assert_allclose(float(reported[0, 0]), c["reported_sparsity"], rtol=1e-6)


def test_unselected_entries_are_ignored_and_padding_repeats_last():
    # Offset 0 plus 130 (selected) and 5 (not selected); vertical 3 selected, 40 not.
    index = build_index(
        jnp.array([40, 3]),
        jnp.array([False, True]),
        jnp.array([5, 0, 130]),
        jnp.array([False, True, True]),
        num_row_blocks=4,
    )
    # Row 3 (queries 192..255): offset 130 -> window [62, 126), offset 0 -> [192, 256).
    assert index.block_starts[3].tolist() == [62, 192, 192]
    assert int(index.block_counts[3]) == 2
    assert index.columns[3].tolist() == [3, 3] and int(index.column_counts[3]) == 1
    # Row 0: only offset 0 -> [0, 64); vertical 3 is inside it, so no column.
    assert index.block_starts[0].tolist() == [0, 0, 0] and int(index.block_counts[0]) == 1
    assert int(index.column_counts[0]) == 0


@pytest.mark.parametrize("seed", [0, 1])
def test_random_selections_invariants_and_exact_pairs(seed):
    rng = np.random.default_rng(seed)
    length, nv, ns = 333, 12, 70
    rows = -(-length // TILE)
    verticals = np.stack([rng.choice(length, nv, replace=False) for _ in range(2)])
    offsets = np.stack([np.concatenate([np.arange(64), rng.choice(np.arange(64, length), ns - 64, replace=False)])
                        for _ in range(2)])
    index = build_index(
        jnp.asarray(verticals[None]),
        jnp.ones((1, 2, nv), bool),
        jnp.asarray(offsets[None]),
        jnp.ones((1, 2, ns), bool),
        num_row_blocks=rows,
    )
    for h in range(2):
        for r in range(rows):
            starts = np.asarray(index.block_starts[0, h, r, : index.block_counts[0, h, r]])
            cols = np.asarray(index.columns[0, h, r, : index.column_counts[0, h, r]])
            assert np.all(np.diff(starts) >= TILE), "ranges overlap"
            assert np.all(cols < TILE * r), "a column is not strictly before the row block"
            for c in cols:
                assert not np.any((starts <= c) & (c < starts + TILE)), "a column lies inside a range"
            assert set(cols) <= set(verticals[h])
    attended, _ = index_stats(index, jnp.array([length]))
    mask = np.asarray(index_to_mask(index, length))
    np.testing.assert_array_equal(np.asarray(attended), mask.sum(axis=(-1, -2)).astype(np.float32))
    # Every selected diagonal is fully attended.
    for h in range(2):
        for delta in offsets[h]:
            i = np.arange(delta, length)
            assert mask[0, h, i, i - delta].all()


def test_stats_count_only_real_queries_of_padded_rows():
    index = build_index(
        jnp.zeros((2, 1, 4), jnp.int32) + jnp.arange(4),
        jnp.ones((2, 1, 4), bool),
        jnp.zeros((2, 1, 64), jnp.int32) + jnp.arange(64),
        jnp.ones((2, 1, 64), bool),
        num_row_blocks=3,
    )
    lengths = jnp.array([150, 70])
    attended, _ = index_stats(index, lengths)
    for b, length in enumerate([150, 70]):
        mask = np.asarray(index_to_mask(index, 192))[b, 0, :length, :length]
        assert float(attended[b, 0]) == mask.sum()


def _walk_oracle(verticals, vertical_valid, offsets, offset_valid, rows):
    """The index of one head by the module docstring's rules, row by row in Python, padded as
    :func:`build_index` pads: ``(starts [R, min(ns, R)], counts [R], columns [R, nv], counts [R])``."""
    selected = sorted(offsets[offset_valid].tolist(), reverse=True)
    kept = sorted(verticals[vertical_valid].tolist())
    out = ([], [], [], [])
    for r in range(rows):
        row_end, end, starts = TILE * (r + 1), None, []
        for delta in selected:
            if delta >= row_end:
                continue
            e = max(row_end - delta, TILE)
            if end is None or e > end + TILE:
                starts.append(e - TILE)
                end = e
            elif e > end:
                starts.append(end)
                end += TILE
        columns = [v for v in kept if end is not None and v < end and not any(s <= v < s + TILE for s in starts)]
        for slots, ids, arrays in ((min(len(offsets), rows), starts, out[:2]), (len(verticals), columns, out[2:])):
            arrays[0].append(ids + [ids[-1] if ids else 0] * (slots - len(ids)))
            arrays[1].append(len(ids))
    return tuple(np.array(a, np.int32) for a in out)


@pytest.mark.parametrize(
    "length, rows, nv, ns, heads",
    [(333, 6, 12, 70, 3), (700, 11, 40, 9, 2), (64, 1, 4, 64, 1), (1000, 17, 90, 300, 4), (129, 4, 7, 5, 2)],
)
def test_build_index_equals_the_walk_row_by_row(length, rows, nv, ns, heads):
    # Heads select different numbers of offsets (the walk stops after the most any head selected) and some
    # entries are unselected or past the prompt; every array is compared whole, padding included.
    rng = np.random.default_rng(length + ns)
    verticals = np.stack([rng.choice(TILE * rows, nv, replace=False) for _ in range(heads)]).astype(np.int32)
    offsets = np.stack([rng.choice(TILE * rows, ns, replace=False) for _ in range(heads)]).astype(np.int32)
    offsets[:, 0] = 0
    vertical_valid = rng.random((heads, nv)) < rng.uniform(0.2, 1.0, (heads, 1))
    offset_valid = (rng.random((heads, ns)) < rng.uniform(0.1, 1.0, (heads, 1))) & (offsets < length)
    offset_valid[:, 0] = True
    index = build_index(*(jnp.asarray(x[None]) for x in (verticals, vertical_valid, offsets, offset_valid)),
                        num_row_blocks=rows)
    for h in range(heads):
        expected = _walk_oracle(verticals[h], vertical_valid[h], offsets[h], offset_valid[h], rows)
        for name, want in zip(index._fields[:4], expected):
            got = np.asarray(getattr(index, name)[0, h])
            assert got.dtype == np.int32, name
            np.testing.assert_array_equal(got, want, err_msg=f"{name}, head {h}")


def _oracle_build_index(verticals, vertical_valid, offsets, offset_valid, *, num_row_blocks, block_m, block_n):
    """:func:`build_index` by :func:`_walk_oracle`, head by head (``block_m == block_n == TILE``)."""
    assert block_m == block_n == TILE
    arrays = [np.asarray(x) for x in (verticals, vertical_valid, offsets, offset_valid)]
    lead = arrays[0].shape[:-1]
    heads = [_walk_oracle(*(a.reshape(-1, a.shape[-1])[i] for a in arrays), num_row_blocks)
             for i in range(int(np.prod(lead)))]
    fields = (np.stack([head[f] for head in heads]) for f in range(4))
    return VerticalSlashIndex(*(jnp.asarray(x.reshape(lead + x.shape[1:])) for x in fields), block_m, block_n)


@pytest.mark.parametrize(
    "t, lengths, heads, kv_heads, sparsity",
    [(384, [384, 250], 4, 2, 0.5), (384, [384, 250], 4, 2, 0.9), (700, [513, 700], 2, 1, 0.5), (320, [64, 300], 2, 2, None)],
)
def test_method_index_equals_the_walk_row_by_row(monkeypatch, t, lengths, heads, kv_heads, sparsity):
    # The whole fitted index (ragged prompts, grouped KV heads): both of fit_to_target's builds by the oracle instead.
    kq, kk = jax.random.split(jax.random.key(t + heads), 2)
    q = jax.random.normal(kq, (len(lengths), t, heads, 64), jnp.bfloat16)
    k = jax.random.normal(kk, (len(lengths), t, kv_heads, 64), jnp.bfloat16)
    method = VerticalAndSlash(sparsity=sparsity, vertical_size=40, slash_size=100)
    args = (q, k, jnp.asarray(lengths, jnp.int32), LayerSpec(0, 0.125))
    index = method.index(*args)
    monkeypatch.setattr(vertical_slash_index, "build_index", _oracle_build_index)
    expected = method.index(*args)
    for name in index._fields[:4]:
        np.testing.assert_array_equal(np.asarray(getattr(index, name)), np.asarray(getattr(expected, name)), name)
