"""The sparsity knob: a target ``s`` yields achieved prefill sparsity within 0.05 of ``s``, or the
run says up front that the method cannot reach it (docs/budgets.md, "Reaching the target").

Achieved sparsity is measured as ``run.json`` measures it: the method's ``PrefillStats``
pooled by :func:`sparse_jax.attention.accounting.phase_sparsity`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_jax.attention.accounting import PhaseCounts, phase_sparsity
from sparse_jax.attention.base import LayerSpec
from sparse_jax.attention.composed import REACH_TOLERANCE, describe_reach, prefill_target_reach
from sparse_jax.attention.methods.tile_budget import offset_pair_counts
from sparse_jax.attention.methods.vertical_slash_index import TILE, forced_pattern_sparsity
from sparse_jax.attention.registry import get_method

H, G, D = 2, 1, 32
LAYER = LayerSpec(index=0, scale=D**-0.5)


def random_heads(length: int, seed: int = 0):
    """``q [1, L, H, D]``, ``k, v [1, L, G, D]`` Gaussian: attention spread over every key."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(keys[0], (1, length, H, D), jnp.float32)
    k, v = (jax.random.normal(key, (1, length, G, D), jnp.float32) for key in keys[1:])
    return q, k, v


def local_heads(length: int):
    """Queries and keys on slowly turning sinusoids: each query attends to its near past."""
    angle = jnp.arange(length, dtype=jnp.float32)[:, None] * jnp.geomspace(1e-3, 3e-2, D // 2)  # [L, D / 2]
    feature = 4.0 * jnp.concatenate([jnp.cos(angle), jnp.sin(angle)], axis=-1)  # [L, D]
    q = jnp.broadcast_to(feature[None, :, None], (1, length, H, D))
    k = feature[None, :, None]
    return q, k, k


def achieved_sparsity(method, q, k, v) -> float:
    lengths = jnp.asarray([q.shape[1]])
    _, stats = jax.jit(lambda q, k, v: method.prefill(q, k, v, lengths=lengths, layer=LAYER))(q, k, v)
    counts = PhaseCounts(np.asarray(stats.attended_pairs), np.broadcast_to(np.asarray(stats.causal_pairs)[:, None],
                                                                           stats.attended_pairs.shape))
    return phase_sparsity(counts)


@pytest.mark.parametrize("length", [64, 100, 640, 1000])
def test_offset_pair_counts_match_counting_every_pair(length):
    """Entry ``u - 1`` counts the causal pairs whose key is ``u`` before its row block's end."""
    bucket = 1024
    queries, keys = np.tril_indices(length)
    offsets = TILE * (queries // TILE + 1) - keys  # [pairs]
    expected = np.bincount(offsets - 1, minlength=bucket)
    np.testing.assert_array_equal(np.asarray(offset_pair_counts(jnp.asarray(length), bucket, TILE)), expected)


@pytest.mark.parametrize("heads, sparsity", [(random_heads, 0.9), (random_heads, 0.5), (local_heads, 0.9)])
def test_vertical_and_slash_lands_within_tolerance_of_the_target(heads, sparsity):
    achieved = achieved_sparsity(get_method("vertical_and_slash", sparsity=sparsity), *heads(4096))
    assert abs(achieved - sparsity) <= REACH_TOLERANCE, achieved


def test_flexprefill_reaches_the_target_where_attention_is_concentrated():
    achieved = achieved_sparsity(get_method("flexprefill", sparsity=0.9), *local_heads(4096))
    assert abs(achieved - 0.9) <= REACH_TOLERANCE, achieved


def test_flexprefill_reports_up_front_what_spread_attention_leaves():
    length = 2048
    method = get_method("flexprefill", sparsity=0.9)
    reach = prefill_target_reach(method, length)
    assert reach is not None and not reach["target_reachable"]
    # The figure is sure: spread-out (random) heads reach at least that much, and far less than the target.
    achieved = achieved_sparsity(method, *random_heads(length))
    assert reach["max_reachable_sparsity"] <= achieved + 1e-4 < 0.9 - REACH_TOLERANCE
    assert "NOT within reach" in describe_reach(method.name, reach)


def test_vertical_and_slash_reach_is_the_always_kept_pattern():
    # Short prompts: 64 local diagonals alone hold about 2 * 64 / L of the pairs.
    short = prefill_target_reach(get_method("vertical_and_slash", sparsity=0.9), 1024)
    assert short["max_reachable_sparsity"] == pytest.approx(forced_pattern_sparsity(1024), abs=1e-4)
    assert short["max_reachable_sparsity"] < 0.85 and not short["target_reachable"]
    long = prefill_target_reach(get_method("vertical_and_slash", sparsity=0.9), 32768)
    assert long["target_reachable"] and long["max_reachable_sparsity"] > 0.99


@pytest.mark.parametrize("name, kwargs", [
    ("dense", {}), ("block_sparse", dict(sparsity=0.9)), ("quest", dict(sparsity=0.9)),
    ("vertical_and_slash", dict(vertical_size=64, slash_size=64)),
])
def test_methods_that_meet_any_target_by_construction_report_nothing(name, kwargs):
    assert prefill_target_reach(get_method(name, **kwargs), 4096) is None


def test_a_composition_reports_its_prefill_part():
    method = get_method("vertical_and_slash+quest", prefill_sparsity=0.9, decode_sparsity=0.5)
    assert prefill_target_reach(method, 1024)["target_sparsity"] == 0.9


@pytest.mark.slow
@pytest.mark.parametrize("sparsity", [0.9, 0.5])
def test_vertical_and_slash_at_32k_lands_within_tolerance(sparsity):
    achieved = achieved_sparsity(get_method("vertical_and_slash", sparsity=sparsity), *random_heads(32768))
    assert abs(achieved - sparsity) <= REACH_TOLERANCE, achieved


def test_run_json_keeps_the_reach_entry():
    from sparse_jax.analysis.records import ModelConfig, RunFile, RunSummary

    reach = prefill_target_reach(get_method("vertical_and_slash", sparsity=0.9), 1024)
    run = RunFile(model=ModelConfig("tiny", 2, 64, 128, 100, 2, 1, 32, 1000), task="niah_single", max_input_tokens=1024,
                  method="vertical_and_slash", method_args={}, target_sparsity=0.9,
                  summary=RunSummary(prefill_sparsity=0.8, decode_sparsity=0.0, mean_prompt_tokens=1000.0,
                                     mean_output_tokens=4.0),
                  prefill_target_reach=reach)
    assert RunFile.from_json(run.to_json(), "run.json") == run
    assert run.to_json()["prefill_target_reach"]["target_reachable"] is False


def test_a_run_says_up_front_that_its_target_is_out_of_reach(tmp_path):
    """At 512 tokens the 64 always-kept diagonals alone hold about half of the pairs."""
    from sparse_jax.analysis.records import RunFile
    from tests.test_pipeline_common import config_of, run_cli, write_gin

    method = "ExperimentConfig.method = 'vertical_and_slash'\nExperimentConfig.sparsity = 0.9\n"
    gin_file = write_gin(tmp_path / "vs.gin", tmp_path / "results", method)
    result = run_cli("run", f"--gin_file={gin_file}")
    assert result.code == 0, result.err
    line = "vertical_and_slash: prefill target 0.9 is NOT within reach at 512 tokens"
    assert sum(line in x for x in result.out.splitlines()) == 1, result.out
    reach = RunFile.read(config_of(gin_file).run_dir()).prefill_target_reach
    assert reach["target_reachable"] is False and reach["max_reachable_sparsity"] < 0.85 - REACH_TOLERANCE
