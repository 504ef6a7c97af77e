"""Selections of every method on real SmolLM2 attention against the reference framework's algorithms.

`tests/fixtures/fidelity_smollm2.npz` holds post-RoPE q/k of two layers of SmolLM2-135M-Instruct on a 4K
`niah_single` prompt and the selections the reference algorithms (written in PyTorch by
`tests/fixtures/make_fidelity_fixtures.py`) make on them. Each test runs this project's selection on the same
bf16 tensors and counts the selected elements that differ. A difference is *explained* when the reference
scores the element within two bf16 steps of its selection boundary (a near-tie, which the reference's own
bf16 arithmetic or summation order could break either way). The counts are asserted exactly, so any change of
a method's selection on real data fails here; docs/fidelity.md and experiments/results/fidelity_smollm2.md
explain them.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pallas_kernels.paged_decode import quest_page_table
from sparse_jax.attention.base import LayerSpec
from sparse_jax.attention.kv_cache import PagedKVCache
from sparse_jax.attention.methods.block_sparse import block_sparse_index
from sparse_jax.attention.methods.flexprefill import flexprefill_scores
from sparse_jax.attention.methods.vertical_and_slash import vertical_and_slash_scores
from sparse_jax.attention.methods.vertical_slash_index import select_from_scores
from sparse_jax.attention.registry import get_method

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "fidelity_smollm2"
INFO = json.loads(FIXTURE.with_suffix(".json").read_text())
LAYERS = INFO["layers"]
LENGTH = INFO["prompt_length"]
STEPS = INFO["decode_steps"]
BUDGET_LABELS = ("0.5", "0.9", "default")


@functools.cache
def _arrays():
    return dict(np.load(FIXTURE.with_suffix(".npz")))


def _bf16(name: str) -> jax.Array:
    return jnp.asarray(_arrays()[name].view(ml_dtypes.bfloat16))


def _unpack(name: str, width: int) -> np.ndarray:
    return np.unpackbits(_arrays()[name], axis=-1, count=width).astype(bool)


class Agreement(NamedTuple):
    """Selected elements of one configuration, those that differ, and those differences not near a tie."""

    selected: int
    differing: int
    unexplained: int


def _compare(ours: list[set], reference: list[set], near_tie: list[np.ndarray]) -> Agreement:
    """Elements in one selection but not the other; a difference is explained when it is a near-tie."""
    selected = differing = unexplained = 0
    for mine, theirs, ties in zip(ours, reference, near_tie):
        selected += len(theirs)
        for element in mine ^ theirs:
            differing += 1
            unexplained += not ties[element]
    return Agreement(selected, differing, unexplained)


def _layer_inputs(layer: int):
    """``q [1, L, H, d]`` (zeros but the last 512 prompt rows) and ``k [1, L, G, d]`` of the prompt."""
    k = _bf16(f"l{layer}.k")
    q_window = _bf16(f"l{layer}.q_window")
    q = jnp.zeros((LENGTH,) + q_window.shape[1:], jnp.bfloat16).at[LENGTH - q_window.shape[0]:].set(q_window)
    return q[None], k[None, :LENGTH]


def _scale(layer_q: jax.Array) -> float:
    return layer_q.shape[-1] ** -0.5


def _budgets(layer: int, name: str) -> dict:
    return INFO["budgets"][str(layer)][name]


# ---------------------------------------------------------------------------------------------- block-sparse


def block_sparse_agreement(layer: int, label: str) -> Agreement:
    """Our block index from the fixture's pooled queries (each block's rows set to its mean) vs the reference."""
    name = f"l{layer}.block_sparse@{label}"
    top = _budgets(layer, f"block_sparse@{label}")["top_chunks"]
    if label != "default":  # our closed-form budget equals the reference's search
        method = get_method("block_sparse", sparsity=float(label))
        assert int(method.top_chunks_for(jnp.asarray([LENGTH]), LENGTH)[0][0]) == top
    q_pooled = _bf16(f"l{layer}.q_pooled")  # [nb, H, d]
    rows = jnp.repeat(q_pooled, 16, axis=0)[:LENGTH]
    tail = LENGTH % 16
    if tail:  # the partial last block: our pooling divides its real rows by 16, as the reference does
        rows = rows.at[LENGTH - tail:].multiply(16 / tail)
    _, k = _layer_inputs(layer)
    index = block_sparse_index(rows[None].astype(jnp.bfloat16), k, jnp.asarray([LENGTH]), jnp.asarray([top]),
                               block_size=16, max_chunks=min(top, q_pooled.shape[0]))
    ids, counts = np.asarray(index.block_ids[0]), np.asarray(index.counts[0])
    want = _arrays()[f"{name}.ids"]  # [H, rows, top], -1 padded
    heads, real_rows = want.shape[:2]
    ties = _unpack(f"{name}.near_tie", q_pooled.shape[0]).reshape(heads, real_rows, -1)
    ours, reference, near = [], [], []
    for h in range(heads):
        for m in range(real_rows):
            ours.append(set(ids[h, m, : counts[h, m]].tolist()))
            reference.append(set(x for x in want[h, m].tolist() if x >= 0))
            near.append(ties[h, m])
    return _compare(ours, reference, near)


# ------------------------------------------------------------------------------- vertical-and-slash, FlexPrefill


def _selection_sets(selection, heads: int):
    v, vv, s, sv = (np.asarray(a[0]) for a in selection)
    verticals = [set(v[h][vv[h]].tolist()) for h in range(heads)]
    slashes = [set(s[h][sv[h]].tolist()) for h in range(heads)]
    return verticals, slashes


def _reference_sets(name: str, heads: int):
    arrays = _arrays()
    verticals = [set(x for x in arrays[f"{name}.verticals"][h].tolist() if x >= 0) for h in range(heads)]
    slashes = [set(x for x in arrays[f"{name}.slashes"][h].tolist() if x >= 0) for h in range(heads)]
    v_ties = _unpack(f"{name}.vertical_near_tie", LENGTH)
    s_ties = _unpack(f"{name}.slash_near_tie", LENGTH)
    return verticals, slashes, v_ties, s_ties


def vertical_slash_agreement(layer: int, label: str, method: str) -> tuple[Agreement, Agreement, int]:
    """(vertical agreement, slash agreement, heads whose FlexPrefill budgets differ) of one configuration."""
    name = f"l{layer}.{method}@{label}"
    budgets = _budgets(layer, f"{method}@{label}")
    q, k = _layer_inputs(layer)
    heads = q.shape[2]
    lengths = jnp.asarray([LENGTH])
    if method == "vertical_and_slash":
        nv, ns = budgets["vertical_size"], budgets["slash_size"]
        if label != "default":
            got = get_method(method, sparsity=float(label)).budgets_for(lengths, LENGTH)
            assert (int(got[0][0]), int(got[1][0])) == (nv, ns)
        scores = vertical_and_slash_scores(256, LENGTH, _scale(q))
        selection = select_from_scores(scores, q, k, lengths, jnp.asarray([nv]), jnp.asarray([ns]), nv_max=nv,
                                       ns_max=ns)
    else:
        min_budget = budgets["min_budget"]
        if label != "default":
            assert int(get_method(method, sparsity=float(label)).min_budgets_for(lengths, LENGTH)[0][0]) == min_budget
        scores = flexprefill_scores(512, LENGTH, _scale(q), alpha=0.65, max_budget=LENGTH)
        selection = select_from_scores(scores, q, k, lengths, jnp.asarray([min_budget]), jnp.asarray([min_budget]),
                                       nv_max=LENGTH, ns_max=LENGTH)
    verticals, slashes = _selection_sets(selection, heads)
    ref_v, ref_s, v_ties, s_ties = _reference_sets(name, heads)
    budget_heads = 0
    if method == "flexprefill":
        arrays = _arrays()
        ours_nv = np.array([len(v) for v in verticals])
        ours_ns = np.array([len(s) for s in slashes])
        budget_heads = int(np.sum((ours_nv != arrays[f"{name}.vertical_budgets"])
                                  | (ours_ns != arrays[f"{name}.slash_budgets"])))
    return _compare(verticals, ref_v, v_ties), _compare(slashes, ref_s, s_ties), budget_heads


# ---------------------------------------------------------------------------------------- SnapKV, Ada-SnapKV


def eviction_agreement(layer: int, label: str, method: str) -> Agreement:
    name = f"l{layer}.{method}@{label}"
    capacity = _budgets(layer, f"{method}@{label}")["token_capacity"]
    q, k = _layer_inputs(layer)
    kwargs = dict(token_capacity=capacity) if label == "default" else dict(sparsity=float(label))
    kept = get_method(method, **kwargs).compress(q, k, jnp.zeros_like(k), lengths=jnp.asarray([LENGTH]),
                                                 layer=LayerSpec(index=layer, scale=_scale(q)))
    indices, counts = np.asarray(kept.indices[0]), np.asarray(kept.counts[0])
    ours = [set(indices[j, : counts[j]].tolist()) for j in range(indices.shape[0])]
    if method == "snapkv":
        reference = [set(row.tolist()) for row in _arrays()[f"{name}.kept"]]
    else:
        reference = [set(np.flatnonzero(row).tolist()) for row in _unpack(f"{name}.kept", LENGTH)]
    return _compare(ours, reference, list(_unpack(f"{name}.near_tie", LENGTH)))


# ------------------------------------------------------------------------------------------------------ Quest


def _step_cache(k: jax.Array, n: int) -> PagedKVCache:
    pages = -(-k.shape[0] // 16) + 1
    cache = PagedKVCache.allocate(batch=1, num_kv_heads=k.shape[1], head_dim=k.shape[2], pages_per_row=pages,
                                  page_size=16, dtype=jnp.bfloat16)
    return cache.write_prompt(k[None, :n], k[None, :n], jnp.asarray([n], jnp.int32))


def quest_agreement(layer: int, label: str, share: bool, path: str) -> Agreement:
    """Quest's earlier pages per decode step: ``path`` is ``"jnp"`` or ``"kernel"`` (Triton kernel, interpreted)."""
    name = f"l{layer}.quest_{'shared' if share else 'per_head'}@{label}"
    k = _bf16(f"l{layer}.k")
    q_decode = _bf16(f"l{layer}.q_decode")
    want = _arrays()[f"{name}.pages"]  # [steps, rows, b]
    ties = _arrays()[f"{name}.near_tie"]
    kwargs = dict(share_pages=share) if label == "default" else dict(share_pages=share, sparsity=float(label))
    method = get_method("quest", **kwargs)
    layer_spec = LayerSpec(index=layer, scale=_scale(q_decode))
    ours, reference, near = [], [], []
    for step in range(STEPS):
        n = LENGTH + step + 1
        cache = _step_cache(k, n)
        q = q_decode[step][None]
        budget = int(method.budget_tokens(jnp.asarray(n), 16)) if method.sparsity is not None else method.token_budget
        b = budget // 16
        table, _ = quest_page_table(q, cache.k_min, cache.k_max, cache.page_table, cache.lengths, page_size=16,
                                    token_budget=budget, share_pages=share,
                                    implementation="xla" if path == "jnp" else "triton", interpret=path == "kernel")
        table = np.asarray(table[0])
        current = (n - 1) // 16
        step_ties = np.unpackbits(ties[step], axis=-1, count=current).astype(bool)
        for r in range(table.shape[0]):
            ours.append(set(table[r, :b].tolist()))
            reference.append(set(x for x in want[step, r].tolist() if x >= 0))
            near.append(step_ties[r])
    return _compare(ours, reference, near)


# ----------------------------------------------------------------------------------------------------- tests
# Measured differences (selected, differing, unexplained) per layer and configuration; see
# experiments/results/fidelity_smollm2.md for what explains them.
EXPECTED: dict[tuple, tuple] = {
    ('block_sparse', 6, '0.5'): (146475, 440, 0),
    ('vertical_and_slash', 6, '0.5'): ((10683, 0, 0), (10683, 0, 0), 0),
    ('flexprefill', 6, '0.5'): ((10683, 0, 0), (12269, 0, 0), 0),
    ('snapkv', 6, '0.5'): (6096, 8, 0),
    ('ada_snapkv', 6, '0.5'): (6096, 10, 0),
    ('quest_shared', 6, '0.5'): (3048, 8, 0),
    ('quest_per_head', 6, '0.5'): (9144, 44, 0),
    ('block_sparse', 6, '0.9'): (29016, 116, 0),
    ('vertical_and_slash', 6, '0.9'): ((1872, 0, 0), (1872, 0, 0), 0),
    ('flexprefill', 6, '0.9'): ((1950, 0, 0), (10011, 0, 0), 0),
    ('snapkv', 6, '0.9'): (1248, 6, 0),
    ('ada_snapkv', 6, '0.9'): (1248, 0, 0),
    ('quest_shared', 6, '0.9'): (624, 30, 0),
    ('quest_per_head', 6, '0.9'): (1872, 38, 0),
    ('block_sparse', 6, 'default'): (128160, 408, 0),
    ('vertical_and_slash', 6, 'default'): ((4608, 0, 0), (4608, 0, 0), 0),
    ('flexprefill', 6, 'default'): ((4608, 0, 0), (10232, 0, 0), 0),
    ('snapkv', 6, 'default'): (3072, 4, 0),
    ('ada_snapkv', 6, 'default'): (3072, 8, 0),
    ('quest_shared', 6, 'default'): (1536, 22, 0),
    ('quest_per_head', 6, 'default'): (4608, 48, 0),
    ('block_sparse', 21, '0.5'): (146475, 910, 0),
    ('vertical_and_slash', 21, '0.5'): ((10683, 0, 0), (10683, 0, 0), 0),
    ('flexprefill', 21, '0.5'): ((10683, 0, 0), (10683, 0, 0), 0),
    ('snapkv', 21, '0.5'): (6096, 10, 0),
    ('ada_snapkv', 21, '0.5'): (6096, 0, 0),
    ('quest_shared', 21, '0.5'): (3048, 14, 0),
    ('quest_per_head', 21, '0.5'): (9144, 76, 0),
    ('block_sparse', 21, '0.9'): (29016, 348, 0),
    ('vertical_and_slash', 21, '0.9'): ((1872, 0, 0), (1872, 0, 0), 0),
    ('flexprefill', 21, '0.9'): ((2321, 0, 0), (3216, 0, 0), 0),
    ('snapkv', 21, '0.9'): (1248, 4, 0),
    ('ada_snapkv', 21, '0.9'): (1248, 2, 0),
    ('quest_shared', 21, '0.9'): (624, 14, 0),
    ('quest_per_head', 21, '0.9'): (1872, 38, 0),
    ('block_sparse', 21, 'default'): (128160, 824, 0),
    ('vertical_and_slash', 21, 'default'): ((4608, 0, 0), (4608, 0, 0), 0),
    ('flexprefill', 21, 'default'): ((4621, 0, 0), (4617, 0, 0), 0),
    ('snapkv', 21, 'default'): (3072, 0, 0),
    ('ada_snapkv', 21, 'default'): (3072, 6, 0),
    ('quest_shared', 21, 'default'): (1536, 14, 0),
    ('quest_per_head', 21, 'default'): (4608, 56, 0),
}


def _check(key: tuple, agreement) -> None:
    assert key in EXPECTED, f"no expected counts for {key}: measured {agreement}"
    assert tuple(agreement) == EXPECTED[key], f"{key}: measured {agreement}, expected {EXPECTED[key]}"


@pytest.mark.parametrize("label", BUDGET_LABELS)
@pytest.mark.parametrize("layer", LAYERS)
def test_fidelity_block_sparse(layer, label):
    _check(("block_sparse", layer, label), tuple(block_sparse_agreement(layer, label)))


@pytest.mark.parametrize("method", ["vertical_and_slash", "flexprefill"])
@pytest.mark.parametrize("label", BUDGET_LABELS)
@pytest.mark.parametrize("layer", LAYERS)
def test_fidelity_vertical_slash(layer, label, method):
    verticals, slashes, budget_heads = vertical_slash_agreement(layer, label, method)
    _check((method, layer, label), (tuple(verticals), tuple(slashes), budget_heads))


@pytest.mark.parametrize("method", ["snapkv", "ada_snapkv"])
@pytest.mark.parametrize("label", BUDGET_LABELS)
@pytest.mark.parametrize("layer", LAYERS)
def test_fidelity_eviction(layer, label, method):
    _check((method, layer, label), tuple(eviction_agreement(layer, label, method)))


@pytest.mark.parametrize("path", ["jnp", pytest.param("kernel", marks=pytest.mark.slow)])
@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("label", BUDGET_LABELS)
@pytest.mark.parametrize("layer", LAYERS)
def test_fidelity_quest(layer, label, share, path):
    _check(("quest_shared" if share else "quest_per_head", layer, label), tuple(quest_agreement(layer, label,
                                                                                               share, path)))


def measure_all() -> dict[tuple, tuple]:
    """Every configuration's counts (to refresh ``EXPECTED`` after regenerating the fixture)."""
    measured = {}
    for layer in LAYERS:
        for label in BUDGET_LABELS:
            measured[("block_sparse", layer, label)] = tuple(block_sparse_agreement(layer, label))
            for method in ("vertical_and_slash", "flexprefill"):
                v, s, heads = vertical_slash_agreement(layer, label, method)
                measured[(method, layer, label)] = (tuple(v), tuple(s), heads)
            for method in ("snapkv", "ada_snapkv"):
                measured[(method, layer, label)] = tuple(eviction_agreement(layer, label, method))
            for share in (True, False):
                key = ("quest_shared" if share else "quest_per_head", layer, label)
                measured[key] = tuple(quest_agreement(layer, label, share, "jnp"))
    return measured


if __name__ == "__main__":
    for key, value in measure_all().items():
        print(f"    {key!r}: {value!r},")
