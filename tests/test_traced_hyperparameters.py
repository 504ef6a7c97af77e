"""Numeric hyper-parameters as traced program arguments: same outputs, one compile per sweep."""

import types

import jax.numpy as jnp
import numpy as np
import pytest

from sparse_jax.attention.base import TRACED
from sparse_jax.attention.registry import get_method
from sparse_jax.engine import generate as generate_module
from sparse_jax.engine.generate import Engine, EngineConfig
from sparse_jax.engine.memory import MemoryPlan
from sparse_jax.engine.programs import PROGRAMS, ProgramCache
from tests.test_budgets import SNAP
from tests.test_engine_generate import random_prompts, tiny_model

PROMPTS = random_prompts((70, 33), seed=5)
# Vertical-and-slash patterns keep at least 64 diagonals: longer prompts so that they skip pairs.
LONG_PROMPTS = random_prompts((300, 180), seed=5)
MAX_NEW = 6


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _generate(model, method, *, traced=True, prompts=PROMPTS):
    engine = Engine(model, method, EngineConfig(batch_size=2, traced_hyperparameters=traced))
    return engine.generate_batch(prompts, max_new_tokens=MAX_NEW, stop_ids=[])


def test_split_takes_the_numbers_out_and_bind_puts_them_back():
    method = get_method("block_sparse", chunk_size=8, sparsity=0.5)
    static, values = method.split()
    assert static.sparsity is TRACED and static.chunk_size == 8
    assert values == {"sparsity": np.float32(0.5)} and values["sparsity"].dtype == np.float32
    assert static.bind(values) == method
    assert get_method("block_sparse", chunk_size=8, sparsity=0.9).split()[0] == static  # one program key
    assert get_method("block_sparse", chunk_size=8, top_chunks=3).split()[1] == {}  # a raw budget stays static


def test_composed_parts_are_split_under_their_field_names():
    method = get_method("block_sparse+quest", prefill=dict(chunk_size=8), decode=dict(token_budget=16),
                        prefill_sparsity=0.5, decode_sparsity=0.7, dense_layers=1)
    static, values = method.split()
    assert values == {"inner": {"prefill_part": {"sparsity": np.float32(0.5)},
                                "decode_part": {"sparsity": np.float32(0.7)}}}
    assert static.inner.prefill_part.sparsity is TRACED and static.inner.decode_part.sparsity is TRACED
    assert static.bind(values) == method
    assert hash(static) == hash(get_method("block_sparse+quest", prefill=dict(chunk_size=8),
                                           decode=dict(token_budget=16), prefill_sparsity=0.25,
                                           decode_sparsity=0.9, dense_layers=1).split()[0])


def test_shape_value_is_the_dense_bound_once_traced():
    method = get_method("quest", sparsity=0.75)
    assert method.shape_value("sparsity", 0.0) == 0.75
    static, values = method.split()
    assert static.shape_value("sparsity", 0.0) == 0.0
    assert static.bind({"sparsity": jnp.float32(0.75)}).shape_value("sparsity", 0.0) == 0.0


def test_program_cache_drops_the_least_recently_used():
    cache = ProgramCache(size=2)
    compiled = []

    def compile_as(name):
        return lambda: compiled.append(name) or name

    for key in ("a", "b", "a", "c", "b"):
        cache.get(key, compile_as(key))
    # "a" was used after "b", so "c" pushed "b" out and "b" compiled again (pushing "a" out).
    assert compiled == ["a", "b", "c", "b"] and (cache.hits, cache.misses) == (1, 4) and len(cache) == 2


def _assert_same_generation(got, want):
    for a, b in zip(got, want, strict=True):
        assert a.token_ids == b.token_ids
        np.testing.assert_array_equal(a.sparsity.prefill_density, b.sparsity.prefill_density)
        np.testing.assert_array_equal(a.sparsity.decode_density, b.sparsity.decode_density)
        np.testing.assert_array_equal(a.sparsity.prefill_counts.attended, b.sparsity.prefill_counts.attended)
        np.testing.assert_array_equal(a.sparsity.decode_counts.attended, b.sparsity.decode_counts.attended)
        assert a.sparsity.reported_sparsity == b.sparsity.reported_sparsity


VS = dict(approximation_size=32)
CASES = {
    "block_sparse": ("block_sparse", dict(chunk_size=8, sparsity=0.6)),
    "quest": ("quest", dict(sparsity=0.6)),
    "vertical_and_slash": ("vertical_and_slash", VS | dict(sparsity=0.9)),
    "flexprefill": ("flexprefill", dict(alpha=0.05, approximation_size=32, min_budget=64, sparsity=0.9)),
    "snapkv": ("snapkv", SNAP | dict(sparsity=0.6)),
    "ada_snapkv": ("ada_snapkv", SNAP | dict(sparsity=0.6)),
    "oracle_block_sparse": ("oracle_block_sparse", dict(chunk_size=8, sparsity=0.6)),
    "oracle_vertical_and_slash": ("oracle_vertical_and_slash", VS | dict(sparsity=0.9)),
    "oracle_quest": ("oracle_quest", dict(sparsity=0.6)),
    "oracle_tokens": ("oracle_tokens", SNAP | dict(sparsity=0.6)),
    "block_sparse+snapkv": ("block_sparse+snapkv", dict(prefill=dict(chunk_size=8), decode=SNAP,
                                                         prefill_sparsity=0.5, decode_sparsity=0.7, dense_layers=1)),
}
FAST = {"block_sparse", "quest"}


@pytest.mark.parametrize(
    "case", [c if c in FAST else pytest.param(c, marks=pytest.mark.slow) for c in CASES], ids=list(CASES)
)
def test_traced_and_static_hyperparameters_give_the_same_generation(model, case):
    name, kwargs = CASES[case]
    method = get_method(name, **kwargs)
    assert method.split()[1], "the case has no traced value: it would test nothing"
    prompts = LONG_PROMPTS if "vertical_and_slash" in name or name == "flexprefill" else PROMPTS
    traced = _generate(model, method, prompts=prompts)
    _assert_same_generation(traced, _generate(model, method, traced=False, prompts=prompts))
    # The target is applied: the long prompt skips a real share of its prefill or decode attention.
    long = traced[0].sparsity
    assert max(long.prefill_sparsity, long.decode_sparsity) > 0.1


def test_second_sparsity_of_a_sweep_reuses_the_compiled_programs(model):
    first = _generate(model, get_method("block_sparse", chunk_size=8, sparsity=0.3))
    misses = PROGRAMS.misses
    second = _generate(model, get_method("block_sparse", chunk_size=8, sparsity=0.8))
    assert PROGRAMS.misses == misses and second[0].timing.compile_seconds == 0.0
    assert second[0].sparsity.prefill_sparsity > first[0].sparsity.prefill_sparsity + 0.1
    # Baked-in values compile a program per value.
    _generate(model, get_method("block_sparse", chunk_size=8, sparsity=0.55), traced=False)
    assert PROGRAMS.misses == misses + 2  # prefill and decode


@pytest.mark.parametrize("backend, bucket, traced", [
    ("gpu", 1024, True), ("gpu", generate_module.TRACED_MAX_BUCKET, True),
    ("gpu", 2 * generate_module.TRACED_MAX_BUCKET, False), ("tpu", 131072, False), ("cpu", 1024, False),
])
def test_default_traces_values_on_accelerators_up_to_the_bucket_limit(model, monkeypatch, backend, bucket, traced):
    # Above the limit the dense bound's index (as wide as the prompt) costs more per prefill than a compile.
    monkeypatch.setattr(generate_module.jax, "default_backend", lambda: backend)
    method = get_method("vertical_and_slash", **VS, sparsity=0.9)
    static, values = Engine(model, method).program_method(bucket)
    want = method.split() if traced else (method, {})
    assert static == want[0] and values == want[1]
    assert Engine(model, method, EngineConfig(traced_hyperparameters=True)).program_method(bucket)[1] == method.split()[1]
    assert Engine(model, method, EngineConfig(traced_hyperparameters=False)).program_method(bucket) == (method, {})


def test_a_traced_prefill_too_big_for_memory_runs_with_the_values_baked_in(model, monkeypatch):
    # Traced, vertical-and-slash sizes its index to the dense bound: at 128K on 8B shapes 200+ GiB (the
    # H200 ran out of memory). When XLA's memory analysis says the traced program does not fit, the engine
    # runs the program with the method's values baked in, which gives the same generation.
    method = get_method("vertical_and_slash", **VS, sparsity=0.9)
    asked = []
    fits_second_time = lambda program, plan: asked.append(program) or len(asked) > 1  # noqa: E731
    monkeypatch.setattr(generate_module, "_temporaries_fit", fits_second_time)
    engine = Engine(model, method, EngineConfig(batch_size=2, traced_hyperparameters=True))
    got = engine.generate_batch(LONG_PROMPTS, max_new_tokens=MAX_NEW, stop_ids=[])
    assert len(asked) == 2 and asked[0] is not asked[1]  # the traced program did not fit, the baked one does
    assert ("prefill", method) in {key[:2] for key in engine.programs}  # the program with the values in
    _assert_same_generation(got, _generate(model, method, traced=False, prompts=LONG_PROMPTS))


@pytest.mark.parametrize("traced", [True, False])
def test_a_prefill_too_big_even_baked_in_fails_with_one_clear_line(model, monkeypatch, traced):
    # FlexPrefill sizes its index to max_budget (the bucket by default): at 128K on 8B shapes that is 200 GiB
    # whatever the target. The engine says so before running instead of failing in the allocator, whether it
    # tried the traced program first or baked the values in from the start (long prompts, CPU).
    method = get_method("vertical_and_slash", **VS, sparsity=0.9)
    asked = []
    monkeypatch.setattr(generate_module, "_temporaries_fit", lambda program, plan: asked.append(program) and False)
    engine = Engine(model, method, EngineConfig(batch_size=2, traced_hyperparameters=traced))
    with pytest.raises(generate_module.InsufficientMemoryError, match=r"vertical_and_slash: .* GiB.* max_budget"):
        engine.generate_batch(LONG_PROMPTS, max_new_tokens=MAX_NEW, stop_ids=[])
    assert len(asked) == (2 if traced else 1)


@pytest.mark.parametrize("temporaries, fits", [(9, True), (10, True), (11, False), (None, True)])
def test_temporaries_fit_beside_the_cache(temporaries, fits):
    class Program:
        def memory_analysis(self):
            return None if temporaries is None else types.SimpleNamespace(temp_size_in_bytes=temporaries)

    plan = MemoryPlan(cache_bytes=20, activation_bytes=5, weight_bytes=7, limit_bytes=37, in_use_bytes=7, source="t")
    assert generate_module._temporaries_fit(Program(), plan) is fits  # free 30, of which the cache takes 20
