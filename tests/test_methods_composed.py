"""Composed PREFILL+DECODE methods, dense leading layers and the combined sparsity figure (docs/budgets.md)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse.reference import index_to_mask as block_mask
from pallas_kernels.vertical_slash.reference import index_to_mask as vertical_slash_mask
from sparse_jax.attention.accounting import PhaseCounts, combined_sparsity, phase_sparsity
from sparse_jax.attention.base import AttentionMethod, LayerSpec
from sparse_jax.attention.composed import ComposedMethod, DenseLayers, Phase, method_phase, phase_targets
from sparse_jax.attention.methods.block_sparse import block_sparse_index
from sparse_jax.attention.registry import get_method
from sparse_jax.engine.generate import Engine, EngineConfig
from tests.test_budgets import (
    B, G, H, LENGTHS, SCALE, SNAP, STEPS, T, VS_LENGTHS, VS_T, causal_mask_pairs, empty_cache, layer_inputs,
    one_layer_generation, quest_reads,
)
from tests.test_engine_generate import random_prompts, tiny_model
from tests.test_pipeline_common import REPO



# --- names, phases and errors -----------------------------------------------------


def test_phases_come_from_the_overridden_hooks():
    want = {
        "dense": Phase.DENSE,
        "block_sparse": Phase.PREFILL,
        "vertical_and_slash": Phase.PREFILL,
        "flexprefill": Phase.PREFILL,
        "snapkv": Phase.DECODE,
        "ada_snapkv": Phase.DECODE,
        "quest": Phase.DECODE,
    }
    assert {name: method_phase(type(get_method(name))) for name in want} == want


def test_composition_builds_each_part_with_its_own_args_and_target():
    method = get_method(
        "vertical_and_slash+quest",
        prefill={"approximation_size": 64},
        decode={"page_size": 32, "token_budget": 64},
        prefill_sparsity=0.5,
        sparsity=0.9,  # the fallback: only the decode part takes it
    )
    assert isinstance(method, ComposedMethod) and method.name == "vertical_and_slash+quest"
    assert method.prefill_part == get_method("vertical_and_slash", approximation_size=64, sparsity=0.5)
    assert method.decode_part == get_method("quest", page_size=32, token_budget=64, sparsity=0.9)
    assert method.describe()["decode"]["sparsity"] == 0.9
    hash(method)  # a static jit argument
    # dense parts have no target; the other part still gets its own.
    assert get_method("dense+quest", prefill_sparsity=0.5, decode_sparsity=0.7).decode_part.sparsity == 0.7


@pytest.mark.parametrize(
    "name, match",
    [
        ("vertical_and_slash+block_sparse", "'block_sparse' is a prefill-phase method"),
        ("block_sparse+flexprefill", "'flexprefill' is a prefill-phase method"),
        ("quest+snapkv", "'quest' is a decode-phase method"),
        ("vertical_and_slash+qest", "unknown attention method 'qest'. Did you mean 'quest'"),
        ("vertical_and_slash+quest+snapkv", "exactly two methods"),
    ],
)
def test_bad_compositions_name_the_valid_pairs(name, match):
    with pytest.raises(ValueError, match=match) as error:
        get_method(name)
    message = str(error.value)
    assert "\n" not in message
    prefill = "block_sparse, dense, flexprefill, oracle_block_sparse, oracle_vertical_and_slash, vertical_and_slash"
    assert f"PREFILL one of {prefill} and DECODE one of ada_snapkv, dense, oracle_quest, oracle_tokens, quest, snapkv" in message


def test_bad_composition_arguments_are_named():
    with pytest.raises(ValueError, match=r"no argument\(s\) token_budget; valid arguments: prefill, decode"):
        get_method("dense+quest", token_budget=64)
    with pytest.raises(ValueError, match=r"decode part: attention method 'quest' has no argument\(s\) top_chunks"):
        get_method("block_sparse+quest", decode={"top_chunks": 3})
    with pytest.raises(ValueError, match=r"dense_layers=-1 must be an integer >= 0"):
        get_method("quest", dense_layers=-1)


def test_dense_layers_wraps_any_method_and_zero_is_the_method_itself():
    assert get_method("snapkv", dense_layers=0) == get_method("snapkv")
    wrapped = get_method("block_sparse+snapkv", dense_layers=2, decode=SNAP)
    assert isinstance(wrapped, DenseLayers) and wrapped.name == "block_sparse+snapkv"
    assert wrapped.describe()["dense_layers"] == 2 and wrapped.pools_kv_heads is False
    assert get_method("ada_snapkv", dense_layers=1).pools_kv_heads is True


# --- the engine: dense on either side equals the other method alone -----------------

PROMPTS = random_prompts((70, 33), seed=3)
MAX_NEW = 6


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _generate(model, method):
    engine = Engine(model, method, EngineConfig(batch_size=2))
    return engine.generate_batch(PROMPTS, max_new_tokens=MAX_NEW, stop_ids=[])


def _assert_same_generation(got, want):
    for a, b in zip(got, want):
        assert a.token_ids == b.token_ids
        np.testing.assert_array_equal(a.sparsity.prefill_density, b.sparsity.prefill_density)
        np.testing.assert_array_equal(a.sparsity.decode_density, b.sparsity.decode_density)
        assert a.sparsity.reported_sparsity == b.sparsity.reported_sparsity
        assert a.sparsity.combined_sparsity == b.sparsity.combined_sparsity


def _assert_counts_are_the_generation_totals(results):
    """Dense counts are every causal pair of prompt plus fed tokens; the densities follow from the counts."""
    for r in results:
        n, steps = r.prompt_length, r.output_length - 1
        s = r.sparsity
        np.testing.assert_array_equal(s.prefill_counts.dense, n * (n + 1) / 2)
        np.testing.assert_array_equal(s.decode_counts.dense, sum(n + i for i in range(1, steps + 1)))
        np.testing.assert_allclose(s.prefill_counts.attended / s.prefill_counts.dense, s.prefill_density, rtol=1e-6)
        prefill, decode = (PhaseCounts(*map(np.float64, p)) for p in (s.prefill_counts, s.decode_counts))
        want = 1 - (prefill.attended.sum() + decode.attended.sum()) / (prefill.dense.sum() + decode.dense.sum())
        assert s.combined_sparsity == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize(
    "composed, alone",
    [
        (("dense+quest", dict(decode=dict(token_budget=16))), ("quest", dict(token_budget=16))),
        (("block_sparse+dense", dict(prefill=dict(chunk_size=8, top_chunks=3))),
         ("block_sparse", dict(chunk_size=8, top_chunks=3))),
        pytest.param(("dense+snapkv", dict(decode=SNAP | dict(token_capacity=24, local_window=8))),
                     ("snapkv", SNAP | dict(token_capacity=24, local_window=8)), marks=pytest.mark.slow),
        pytest.param(("dense+ada_snapkv", dict(decode_sparsity=0.6, decode=dict(local_window=8))),
                     ("ada_snapkv", dict(sparsity=0.6, local_window=8)), marks=pytest.mark.slow),
    ],
    ids=["dense+quest", "block_sparse+dense", "dense+snapkv", "dense+ada_snapkv"],
)
def test_dense_on_either_side_equals_the_other_method_alone(model, composed, alone):
    got = _generate(model, get_method(composed[0], **composed[1]))
    want = _generate(model, get_method(alone[0], **alone[1]))
    _assert_same_generation(got, want)
    _assert_counts_are_the_generation_totals(got)
    assert any(r.sparsity.combined_sparsity > 0.05 for r in got), "the case is not sparse enough to test anything"


def test_dense_leading_layers_count_as_dense_in_the_achieved_sparsity(model):
    method = get_method("block_sparse+quest", prefill=dict(chunk_size=8, top_chunks=3),
                        decode=dict(token_budget=16), dense_layers=1)
    results = _generate(model, method)
    long = results[0].sparsity  # 70-token prompt: both phases sparse in layer 1
    np.testing.assert_allclose(long.prefill_density[0], 1.0, rtol=1e-6)  # a float32 ratio
    np.testing.assert_allclose(long.decode_density[0], 1.0, rtol=1e-6)
    assert long.prefill_density[1].max() < 1.0 and long.decode_density[1].max() < 1.0
    _assert_counts_are_the_generation_totals(results)


@pytest.mark.slow
def test_every_layer_dense_is_the_dense_generation(model):
    all_dense = _generate(model, get_method("block_sparse+quest", prefill=dict(chunk_size=8, top_chunks=3),
                                            decode=dict(token_budget=16), dense_layers=2))
    _assert_same_generation(all_dense, _generate(model, "dense"))


# --- dense_layers with a static or a traced layer index --------------------------------


def _hooks(method, index, q, k, v, lengths):
    """Prefill, compress and one decode step of one layer, jitted with ``index`` static or traced."""

    def run(index):
        layer = LayerSpec(index=index, scale=SCALE)
        out, stats = method.prefill(q, k, v, lengths=lengths, layer=layer)
        kept = method.compress(q, k, v, lengths=lengths, layer=layer)
        cache = empty_cache().write_prompt(k, v, lengths, kept=kept).append(k[:, 0] * 2.0, v[:, 0])
        dec, dstats = method.decode(q[:, -1], cache, layer=layer)
        return out, stats, kept, dec, dstats

    if isinstance(index, int):
        return jax.jit(lambda: run(index))()
    return jax.jit(run)(index)


def _kept_sets(kept, b, g):
    return None if kept is None else set(np.asarray(kept.indices[b, g, : kept.counts[b, g]]).tolist())


@pytest.mark.parametrize("name, kwargs", [("block_sparse+snapkv", dict(prefill=dict(top_chunks=3), decode=SNAP)),
                                          ("dense+quest", dict(decode=dict(token_budget=32)))])
def test_dense_layers_agree_with_a_traced_layer_index(name, kwargs):
    q, k, v = layer_inputs()
    lengths = jnp.asarray(LENGTHS)
    wrapped = get_method(name, dense_layers=1, **kwargs)
    for index, same_as in ((0, AttentionMethod()), (1, get_method(name, **kwargs))):
        want = _hooks(same_as, index, q, k, v, lengths)
        for got in (_hooks(wrapped, index, q, k, v, lengths), _hooks(wrapped, jnp.int32(index), q, k, v, lengths)):
            out, stats, kept, dec, dstats = got
            np.testing.assert_allclose(np.asarray(out), np.asarray(want[0]), atol=1e-6)
            np.testing.assert_array_equal(np.asarray(stats.attended_pairs), np.asarray(want[1].attended_pairs))
            np.testing.assert_allclose(np.asarray(dec), np.asarray(want[3]), atol=1e-6)
            np.testing.assert_array_equal(np.asarray(dstats.tokens_read), np.asarray(want[4].tokens_read))
            for b in range(B):
                for g in range(G):  # a traced index keeps every token as explicit indices: same set
                    want_kept = _kept_sets(want[2], b, g) or set(range(int(LENGTHS[b])))
                    assert (_kept_sets(kept, b, g) or set(range(int(LENGTHS[b])))) == want_kept


# --- the combined figure against an independent count from the indices ----------------


def test_combined_sparsity_of_block_sparse_plus_quest_equals_a_count_from_the_indices():
    q, k, v = layer_inputs(1)
    lengths = jnp.asarray(LENGTHS)
    method = get_method("block_sparse+quest", prefill=dict(top_chunks=3), decode=dict(token_budget=32))
    prefill, decode, _ = one_layer_generation(method, q, k, v)
    top, k_max = method.prefill_part.top_chunks_for(lengths, T)
    index = block_sparse_index(q, k, lengths, top, block_size=16, max_chunks=k_max)
    attended = causal_mask_pairs(block_mask(index, T)).sum() + H * sum(
        quest_reads(n + s, 32) for n in LENGTHS for s in range(1, STEPS + 1)
    )
    dense = H * sum(n * (n + 1) / 2 + sum(n + s for s in range(1, STEPS + 1)) for n in LENGTHS)
    assert combined_sparsity(prefill, decode) == pytest.approx(1 - attended / dense, abs=1e-12)
    # Pooled pairs lie between the two phases' own figures.
    low, high = sorted([phase_sparsity(prefill), phase_sparsity(decode)])
    assert low < combined_sparsity(prefill, decode) < high


def test_combined_sparsity_of_vertical_and_slash_plus_snapkv_equals_a_count_from_the_indices():
    q, k, v = layer_inputs(2, VS_T)
    method = get_method("vertical_and_slash+snapkv", prefill=dict(approximation_size=32), prefill_sparsity=0.8,
                        decode=SNAP)
    prefill, decode, kept = one_layer_generation(method, q, k, v, lengths=VS_LENGTHS)
    index = method.prefill_part.index(q, k, jnp.asarray(VS_LENGTHS), LayerSpec(index=0, scale=SCALE))
    prefill_pairs = causal_mask_pairs(vertical_slash_mask(index, VS_T), VS_LENGTHS).sum()
    kept_per_head = np.repeat(np.asarray(kept.counts), H // G, axis=1)  # [B, H]
    decode_reads = sum((kept_per_head + s).sum() for s in range(1, STEPS + 1))
    dense = H * sum(n * (n + 1) / 2 + sum(n + s for s in range(1, STEPS + 1)) for n in VS_LENGTHS)
    assert combined_sparsity(prefill, decode) == pytest.approx(1 - (prefill_pairs + decode_reads) / dense, abs=1e-12)
    np.testing.assert_array_equal(np.asarray(kept.counts), 48)
    assert phase_sparsity(prefill) > 0.2 and phase_sparsity(decode) > 0.5


def test_combined_sparsity_pools_pairs_not_ratios():
    prefill = PhaseCounts(np.array([[10.0, 30.0]]), np.array([[100.0, 100.0]]))
    decode = PhaseCounts(np.array([[50.0, 50.0]]), np.array([[50.0, 50.0]]))
    assert phase_sparsity(prefill) == pytest.approx(0.8)
    assert combined_sparsity(prefill, decode) == pytest.approx(1 - 140 / 300)
    assert combined_sparsity(prefill, None) == phase_sparsity(prefill)
    assert np.isnan(phase_sparsity(PhaseCounts(np.zeros(2), np.zeros(2))))


# --- gin and the command line -----------------------------------------------------------


def test_composition_sweeps_expand_to_buildable_methods(monkeypatch):
    from sparse_jax.pipeline.sweep import expand

    monkeypatch.chdir(REPO)  # gin include paths are relative to the current folder
    runs = expand("configs/sweeps/composition.gin")
    assert len(runs) == 36 and len({r.label() for r in runs}) == 36
    targets = set()
    for cfg in runs:
        method = get_method(cfg.method, **cfg.method_kwargs())
        assert isinstance(method, ComposedMethod) and method.name == cfg.method and cfg.samples == 40
        targets.add(tuple(phase_targets(method).values()))
    assert targets == {(0.5, 0.5), (0.5, 0.9), (0.9, 0.5), (0.9, 0.9)}
    assert len(expand("configs/sweeps/composition_baselines.gin")) == 13


def test_experiment_config_composes_with_a_shared_target_and_rejects_bad_pairs():
    from sparse_jax.pipeline.errors import ConfigError
    from sparse_jax.pipeline.experiment import ExperimentConfig
    from sparse_jax.pipeline.runner import check_config

    cfg = ExperimentConfig(method="flexprefill+quest", decode_sparsity=0.9, dense_layers=1, sparsity=0.5)
    method = get_method(cfg.method, **cfg.method_kwargs())
    assert phase_targets(method) == {"prefill": 0.5, "decode": 0.9}
    assert method.describe()["dense_layers"] == 1
    assert phase_targets(get_method("quest", sparsity=0.8)) == {"prefill": None, "decode": 0.8}
    with pytest.raises(ConfigError, match="ExperimentConfig.method='snapkv\\+quest'.*Valid compositions"):
        check_config(ExperimentConfig(method="snapkv+quest"), task_args=False)


def test_gin_binds_each_part_on_its_own_class():
    from sparse_jax.pipeline.experiment import current_config, parse_gin

    parse_gin([], ["ExperimentConfig.method = 'vertical_and_slash+quest'", "Quest.token_budget = 2048",
                   "ExperimentConfig.prefill_sparsity = 0.5", "ExperimentConfig.dense_layers = 1"])
    cfg = current_config()
    assert cfg.method_args == {"decode": {"token_budget": 2048}}
    method = get_method(cfg.method, **cfg.method_kwargs())
    assert method.describe()["dense_layers"] == 1
    assert phase_targets(method) == {"prefill": 0.5, "decode": None}
    assert cfg.label().endswith("vertical_and_slash+quest@p0.5@dense1")


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        (dict(method="quest", decode_sparsity=0.9), "need a composed method 'PREFILL\\+DECODE'.*use sparsity instead"),
        (dict(method="quest", dense_layers=-1), "dense_layers must be an int >= 0"),
        (dict(method="quest", rope_policy="yarn"), "rope_policy must be one of auto, declared, run_length"),
    ],
)
def test_experiment_config_refuses_bad_phase_settings(fields, match):
    from sparse_jax.pipeline.errors import ConfigError
    from sparse_jax.pipeline.experiment import ExperimentConfig

    with pytest.raises(ConfigError, match=match):
        ExperimentConfig(**fields)
