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

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from tests.fidelity_checks import (
    BLOCK,
    BUDGET_LABELS,
    LayerCase,
    block_sparse_agreement,
    eviction_agreement,
    quest_agreement,
    vertical_slash_agreement,
)

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "fidelity_smollm2"
INFO = json.loads(FIXTURE.with_suffix(".json").read_text())
LAYERS = INFO["layers"]
LENGTH = INFO["prompt_length"]


@functools.cache
def _arrays():
    return dict(np.load(FIXTURE.with_suffix(".npz")))


def _bf16(name: str):
    return jnp.asarray(_arrays()[name].view(ml_dtypes.bfloat16))


@functools.cache
def layer_case(layer: int) -> LayerCase:
    """The fixture's tensors of one layer: queries are zeros but the last 512 prompt rows (all the window
    estimates read); block-sparse reads each block's rows set to the fixture's pooled mean of the block."""
    q_window = _bf16(f"l{layer}.q_window")
    q = jnp.zeros((LENGTH,) + q_window.shape[1:], jnp.bfloat16).at[LENGTH - q_window.shape[0]:].set(q_window)
    q_pooled = _bf16(f"l{layer}.q_pooled")  # [nb, H, d]
    rows = jnp.repeat(q_pooled, BLOCK, axis=0)[:LENGTH]
    tail = LENGTH % BLOCK
    if tail:  # the partial last block: our pooling divides its real rows by 16, as the reference does
        rows = rows.at[LENGTH - tail:].multiply(BLOCK / tail)
    prefix = f"l{layer}."
    reference = {name.removeprefix(prefix): value for name, value in _arrays().items() if name.startswith(prefix)}
    return LayerCase(q=q, q_blocks=rows.astype(jnp.bfloat16), k=_bf16(f"l{layer}.k"),
                     q_decode=_bf16(f"l{layer}.q_decode"), reference=reference, budgets=INFO["budgets"][str(layer)])


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
    _check(("block_sparse", layer, label), tuple(block_sparse_agreement(layer_case(layer), label)))


@pytest.mark.parametrize("method", ["vertical_and_slash", "flexprefill"])
@pytest.mark.parametrize("label", BUDGET_LABELS)
@pytest.mark.parametrize("layer", LAYERS)
def test_fidelity_vertical_slash(layer, label, method):
    verticals, slashes, budget_heads = vertical_slash_agreement(layer_case(layer), label, method)
    _check((method, layer, label), (tuple(verticals), tuple(slashes), budget_heads))


@pytest.mark.parametrize("method", ["snapkv", "ada_snapkv"])
@pytest.mark.parametrize("label", BUDGET_LABELS)
@pytest.mark.parametrize("layer", LAYERS)
def test_fidelity_eviction(layer, label, method):
    _check((method, layer, label), tuple(eviction_agreement(layer_case(layer), label, method)))


@pytest.mark.parametrize("path", ["jnp", pytest.param("kernel", marks=pytest.mark.slow)])
@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("label", BUDGET_LABELS)
@pytest.mark.parametrize("layer", LAYERS)
def test_fidelity_quest(layer, label, share, path):
    _check(("quest_shared" if share else "quest_per_head", layer, label), tuple(quest_agreement(layer_case(layer),
                                                                                               label, share, path)))


def measure_all() -> dict[tuple, tuple]:
    """Every configuration's counts (to refresh ``EXPECTED`` after regenerating the fixture)."""
    measured = {}
    for layer in LAYERS:
        for label in BUDGET_LABELS:
            measured[("block_sparse", layer, label)] = tuple(block_sparse_agreement(layer_case(layer), label))
            for method in ("vertical_and_slash", "flexprefill"):
                v, s, heads = vertical_slash_agreement(layer_case(layer), label, method)
                measured[(method, layer, label)] = (tuple(v), tuple(s), heads)
            for method in ("snapkv", "ada_snapkv"):
                measured[(method, layer, label)] = tuple(eviction_agreement(layer_case(layer), label, method))
            for share in (True, False):
                key = ("quest_shared" if share else "quest_per_head", layer, label)
                measured[key] = tuple(quest_agreement(layer_case(layer), label, share, "jnp"))
    return measured


if __name__ == "__main__":
    for key, value in measure_all().items():
        print(f"    {key!r}: {value!r},")
