"""End-to-end checks of the generation engine on tiny random-weight models (CPU)."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_jax.attention.accounting import PhaseCounts
from sparse_jax.attention.base import AttentionMethod
from sparse_jax.attention.kv_cache import KeptTokens
from sparse_jax.attention.registry import get_method
from sparse_jax.engine import generate as generate_module
from sparse_jax.engine.generate import Engine, EngineConfig, generate
from sparse_jax.engine.memory import InsufficientMemoryError
from sparse_jax.engine.programs import decode_compiler_options
from sparse_jax.engine.reference import reference_greedy
from sparse_jax.engine.sampling import SamplingParams
from sparse_jax.models.config import ModelConfig, RopeScaling
from sparse_jax.models.transformer import Transformer

VOCAB = 211


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    """A 2-layer GQA model (4 query heads, 2 KV heads) with random fp32 weights, big enough to vary its output."""
    fields = dict(
        family="llama",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        rms_norm_eps=1e-6,
        rope=RopeScaling(theta=10_000.0),
    )
    config = ModelConfig(**{**fields, **overrides})
    abstract = Transformer.abstract(config, dtype=jnp.float32)
    rng = np.random.default_rng(seed)
    params = {}
    for name, leaf in abstract.flat_params().items():
        if "norm" in name:
            params[name] = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
        else:
            fan_in = leaf.shape[1] if name.startswith("layers.") else leaf.shape[0]  # layers are [L, in, out]
            params[name] = rng.standard_normal(leaf.shape) * (1.5 / np.sqrt(fan_in))
    return Transformer.from_flat_params(config, {k: v.astype(np.float32) for k, v in params.items()}, dtype=jnp.float32)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def random_prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, n).tolist() for n in lengths]


# Short and long prompts in one batch (bucket 128); the short one is shorter than a page.
LENGTHS = (3, 70, 33)
MAX_NEW = 9


@pytest.fixture(scope="module")
def free_running(model):
    """Reference continuations without stop ids."""
    return [reference_greedy(model, p, max_new_tokens=MAX_NEW) for p in random_prompts(LENGTHS)]


def test_reference_outputs_are_not_degenerate(free_running):
    # A model that repeats one token would make the equality checks below weak.
    assert all(len(set(out)) >= 3 for out in free_running), free_running


@pytest.fixture(scope="module")
def dense_engine(model):
    return Engine(model, "dense", EngineConfig(batch_size=2))


def test_greedy_batch_matches_full_recompute_with_stops(dense_engine, free_running):
    # A stop id that ends the middle sample early while the others continue.
    stop = free_running[1][3]
    expected = []
    for out in free_running:
        cut = out.index(stop) + 1 if stop in out else len(out)
        expected.append(out[:cut])
    assert len(expected[1]) <= 4 and max(map(len, expected)) == MAX_NEW

    results = dense_engine.generate_batch(random_prompts(LENGTHS), max_new_tokens=MAX_NEW, stop_ids=[stop])
    assert [r.token_ids for r in results] == expected
    for r, exp, n in zip(results, expected, LENGTHS):
        assert r.output_length == len(exp)  # the stop token counts
        assert r.stopped == (exp[-1] == stop)
        assert r.prompt_length == n
        assert r.timing.bucket == 128 and r.timing.batch_size == 3
        assert r.timing.decode_steps == MAX_NEW - 1
        np.testing.assert_allclose(r.sparsity.prefill_density, 1.0, rtol=1e-6)
        np.testing.assert_allclose(r.sparsity.decode_density, 1.0, rtol=1e-6)
        assert r.sparsity.reported_sparsity == 0.0


def test_decoded_text_uses_the_tokenizer_and_programs_are_reused(dense_engine, free_running):
    class Spell:
        def decode(self, ids):
            return "-".join(map(str, ids))

    def run():
        return dense_engine.generate_batch(
            random_prompts(LENGTHS), max_new_tokens=MAX_NEW, stop_ids=[1, 2], tokenizer=Spell()
        )

    run()  # compiles, unless an earlier test already ran these shapes
    results = run()
    assert [r.text for r in results] == ["-".join(map(str, r.token_ids)) for r in results]
    assert results[0].timing.compile_seconds == 0.0  # the programs of the first call are reused


def test_every_cache_buffer_is_donated_to_prefill_and_decode(dense_engine, model):
    # Each compiled program aliases the 7 arrays of the cache (stacked over layers) from input to output,
    # so the cache is updated in place, never copied (programs are reused from the tests above when they ran).
    dense_engine.generate_batch(random_prompts(LENGTHS), max_new_tokens=MAX_NEW, stop_ids=[])
    kinds = {key[0] for key in dense_engine.programs}
    assert kinds == {"prefill", "decode"}
    for program in dense_engine.programs.values():
        hlo = program.as_text()
        assert hlo.count("may-alias") + hlo.count("must-alias") == 7


def test_decode_loop_never_copies_a_layers_cache_out_of_the_pools(dense_engine):
    # All layers share the page pools (StackedPagedKVCache): a layer's cache is the pools themselves, its
    # append a scatter into them and its attention a read of its own pages. No instruction of the optimized
    # decode program (loop bodies included) takes a slice of a pool or writes one back.
    dense_engine.generate_batch(random_prompts(LENGTHS), max_new_tokens=MAX_NEW, stop_ids=[])
    (decode,) = [p for key, p in dense_engine.programs.items() if key[0] == "decode"]
    hlo = decode.as_text()
    caches = dense_engine.allocate_caches(len(LENGTHS), dense_engine.bucket(max(LENGTHS)), MAX_NEW)
    for pool in (caches.k_pages, caches.k_min):
        pool_type = f"[{','.join(map(str, pool.shape))}]"
        assert re.search(re.escape(pool_type) + r"\S* scatter\(", hlo)  # appended to in place...
        assert not re.search(r"\[1," + re.escape(pool_type[1:]) + r"\S* dynamic-slice\(", hlo)  # ...never sliced
        assert not re.search(re.escape(pool_type) + r"\S* dynamic-update-slice\(", hlo)


def test_decode_program_gets_the_platforms_compiler_options(model, monkeypatch):
    gpu = decode_compiler_options("gpu")  # cuBLAS reads each layer's weights in the stack; no q/k/v concatenation
    assert gpu == {"xla_gpu_enable_triton_gemm": False, "xla_disable_hlo_passes": "dot-merger"}
    assert decode_compiler_options("cpu") == {} and decode_compiler_options("tpu") == {}
    options = gpu  # DebugOptions fields: every backend accepts them
    monkeypatch.setattr(generate_module, "decode_compiler_options", lambda platform: options)
    engine = Engine(model, "dense", EngineConfig(batch_size=4))
    engine.generate_batch(random_prompts(LENGTHS), max_new_tokens=MAX_NEW, stop_ids=[])
    keys = {key[0]: key for key in engine.programs}
    # key: name, static method, [max_new_tokens,] engine, options, arguments
    assert keys["decode"][4] == tuple(sorted(options.items()))
    assert keys["prefill"][3] == ()  # the prefill program keeps XLA's defaults


def test_prefill_micro_batches_give_the_same_tokens(model, free_running):
    engine = Engine(model, "dense", EngineConfig(prefill_rows=2))  # rows {0, 1} then {2}
    results = engine.generate_batch(random_prompts(LENGTHS), max_new_tokens=MAX_NEW, stop_ids=[])
    assert [r.token_ids for r in results] == free_running


@pytest.mark.slow
def test_generate_groups_prompts_by_bucket_and_keeps_input_order(dense_engine, free_running):
    results = dense_engine.generate(random_prompts(LENGTHS), max_new_tokens=MAX_NEW, stop_ids=[], progress=False)
    assert [r.token_ids for r in results] == free_running
    assert [r.timing.bucket for r in results] == [16, 128, 64]


def test_sliding_window_layers_match_full_recompute():
    # Gemma-3-style local layer (window 8) before a global one; prompts shorter and longer than the window.
    model = tiny_model(seed=1, layer_types=("sliding_attention", "full_attention"), sliding_window=8)
    prompts = random_prompts((5, 21), seed=1)
    expected = [reference_greedy(model, p, max_new_tokens=7) for p in prompts]
    results = generate(model, prompts, max_new_tokens=7, stop_ids=[])
    assert [r.token_ids for r in results] == expected
    # The local layer reads at most 8 tokens, and its dense count is capped the same way.
    np.testing.assert_allclose(results[1].sparsity.decode_density, 1.0, rtol=1e-6)


@dataclasses.dataclass(frozen=True)
class KeepEnds(AttentionMethod):
    """Test eviction: KV head g keeps the first ``head`` and last ``tail + g`` prompt tokens."""

    head: int = 2
    tail: int = 3

    def compress(self, q, k, v, *, lengths, layer):
        b, t, g, _ = k.shape
        cap = self.head + self.tail + g
        slot = jnp.arange(cap)
        heads = jnp.arange(g)[None, :, None]
        tail = self.tail + heads  # [1, G, 1]
        start = lengths[:, None, None] - tail
        idx = jnp.where(slot < self.head, slot, start + slot - self.head)
        counts = jnp.broadcast_to(self.head + tail[..., 0], (b, g)).astype(jnp.int32)
        idx = jnp.where(slot < counts[..., None], idx, 0).astype(jnp.int32)
        return KeptTokens(idx, counts, 1.0 - counts.sum(1) / (g * lengths))


def test_eviction_stats_and_reported_sparsity(model):
    prompts = random_prompts((20, 40))
    max_new = 4
    results = generate(model, prompts, KeepEnds(), max_new_tokens=max_new, stop_ids=[])
    for r, n in zip(results, (20, 40)):
        kept = np.array([5.0, 6.0])  # per KV head: head 2 + tail 3 + g
        assert r.sparsity.reported_sparsity == pytest.approx(1.0 - kept.sum() / (2 * n), rel=1e-6)
        np.testing.assert_allclose(r.sparsity.prefill_density, 1.0)  # the prefill itself is dense
        steps = np.arange(1, max_new)  # decode step s reads kept + s of n + s tokens
        per_kv_head = [np.mean((k + steps) / (n + steps)) for k in kept]
        expected = np.repeat(per_kv_head, 2)  # 2 query heads per KV head
        np.testing.assert_allclose(r.sparsity.decode_density, np.broadcast_to(expected, (2, 4)), rtol=1e-5)
        assert r.output_length == max_new


def test_sampling_is_reproducible_per_key(model, free_running):
    prompts = random_prompts(LENGTHS)
    hot = Engine(model, "dense", EngineConfig(sampling=SamplingParams(temperature=5.0)))
    runs = [
        [r.token_ids for r in hot.generate_batch(prompts, max_new_tokens=MAX_NEW, stop_ids=[], rng=jax.random.PRNGKey(s))]
        for s in (1, 1, 2)
    ]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    assert runs[0] != free_running


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts=[]), "no prompts"),
        (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
        (dict(prompts=[[1] * 40], config=EngineConfig(max_input_tokens=32)), "max_input_tokens=32"),
        (dict(stop_ids=[VOCAB]), "outside the model's vocabulary"),
        (dict(prompts=[[1, VOCAB + 5]]), "outside the vocabulary"),
        (dict(method="densee"), "unknown attention method 'densee'"),
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
        # The engine's cache owns the page size; a Quest page size that disagrees is refused.
        (dict(method=get_method("quest", page_size=32, sparsity=0.5)), "page_size=32 but the cache has pages of 16"),
    ],
)
def test_bad_input_gives_clear_errors(model, kwargs, message):
    args = dict(prompts=[[1, 2, 3]], method="dense", max_new_tokens=2, stop_ids=[0], config=EngineConfig())
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        generate(model, args.pop("prompts"), args.pop("method"), **args)


def test_run_that_cannot_fit_fails_before_allocating_with_numbers(model):
    config = EngineConfig(memory_limit_bytes=64 * 1024)
    with pytest.raises(InsufficientMemoryError, match=r"KV cache .* GiB .* free .* GiB"):
        generate(model, random_prompts((600,)), max_new_tokens=500, stop_ids=[], config=config)


def test_a_dense_samples_float32_densities_record_zero_sparsity():
    """Densities of one ulp above 1 (float32 on the device) are no negative sparsity; NaN (no decode) stays NaN."""
    over_one = np.nextafter(np.float32(1), np.float32(2))
    counts = PhaseCounts(np.ones((2, 3)), np.ones((2, 3)))
    stats = generate_module.SparsityStats(np.full((2, 3), over_one, np.float32), np.full((2, 3), np.nan, np.float32),
                                          0.0, counts, counts)
    assert stats.prefill_sparsity == 0.0
    assert np.isnan(stats.decode_sparsity)
