"""Batched generation: one jitted prefill per batch, then one jitted ``lax.while_loop`` decode.

Per batch of prompts (unequal lengths, right-padded to a length bucket):

1. **Prefill** (one compiled program per (rows, bucket)): every layer runs the method's
   prefill attention, asks ``method.compress`` which prompt tokens to keep, and writes
   them into the paged cache (page summaries built on the way). The first new token is
   taken from the logits at each sequence's last real position. Large batches may be
   prefilled in row micro-batches that write into the same (donated) cache.
2. **Decode** (one compiled program per (batch, bucket, max_new_tokens)): a single
   ``lax.while_loop``; each step feeds the previous token at its true absolute position
   (prompt length + step, whatever was evicted), appends its key/value to each layer's
   cache, calls ``method.decode``, and picks the next token. A sequence stops on a stop
   id or at ``max_new_tokens``; the loop ends when all have stopped. The caches are
   donated, so they are updated in place, never copied per step.

Compiled programs are kept for the whole process (:mod:`sparse_jax.engine.programs`) and
take the method's numeric hyper-parameters (its ``traced_fields``, e.g. ``sparsity``) as
arguments, so a sweep over those values compiles each program once
(``EngineConfig.traced_hyperparameters``).

Sparsity statistics are real attended fractions per (sample, layer, query head):
prefill = computed causal pairs / all causal pairs; decode = cached tokens read / tokens
a full cache would hold, averaged over the steps the sample actually decoded. The raw
counts behind them are kept too, for the combined figure of the whole generation
(docs/budgets.md).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Hashable, Sequence
from typing import Any, Protocol, runtime_checkable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from sparse_jax.attention.accounting import PhaseCounts, combined_sparsity
from sparse_jax.attention.base import AttentionMethod
from sparse_jax.attention.kv_cache import PagedKVCache, StackedPagedKVCache, pages_for
from sparse_jax.attention.registry import get_method
from sparse_jax.engine.buckets import bucket_length, group_by_bucket
from sparse_jax.engine.memory import InsufficientMemoryError, MemoryPlan, gib_text, plan_memory, pytree_bytes
from sparse_jax.engine.prefill_attention import PrefillBackend, prefill_attention, resolve_backend
from sparse_jax.engine.programs import PROGRAMS, argument_signature, compile_program, decode_compiler_options
from sparse_jax.engine.sampling import SamplingParams, sample_tokens

log = logging.getLogger(__name__)

TRACED_MAX_BUCKET = 16_384
"""Longest prompt bucket whose programs take the method's values as arguments by default
(``EngineConfig.traced_hyperparameters=None`` on an accelerator). Above it the dense bound's
shapes cost more per prefill than one compile per value: vertical-and-slash at 128K tokens,
0.9, 8B shapes on an H200 prefilled 8 layers in 2.39 s traced (its index as wide as the
prompt) against XXX s baked in, and a compile there takes about 12 s
(experiments/results/speed_h200.md, "Traced or baked in")."""


class Detokenizer(Protocol):
    def decode(self, ids: Sequence[int]) -> str: ...


@runtime_checkable
class CacheLayout(Protocol):
    """Hooks of a method that lays out and updates the KV caches itself.

    :class:`sparse_jax.distributed.sharded_method.ShardedMethod` implements them: caches
    split over a device mesh, written per shard. Arguments as :meth:`PagedKVCache.allocate`,
    :meth:`PagedKVCache.write_prompt` and :meth:`PagedKVCache.append`.
    """

    def cache_shardings(self, batch: int) -> PagedKVCache: ...

    def write_cache(self, cache: PagedKVCache, k, v, prompt_lengths, *, row_start, kept) -> PagedKVCache: ...

    def append_cache(self, cache: PagedKVCache, k, v) -> PagedKVCache: ...


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Settings of the generation engine.

    Attributes:
      page_size: tokens per KV-cache page; the one owner of this fact (methods read it
        from the cache, or from ``LayerSpec.page_size`` in prefill).
      bucket_granularity: prompt buckets are powers of two up to this length, then
        multiples of it (see :mod:`sparse_jax.engine.buckets`).
      batch_size: prompts per batch when :meth:`Engine.generate` gets more prompts.
      prefill_rows: rows per prefill call (micro-batch), ``None`` for the whole batch;
        bounds prefill activation memory without changing results.
      max_input_tokens: longest accepted prompt; ``None`` accepts any length.
      sampling: next-token choice (greedy by default).
      prefill_backend: ``auto`` (cuDNN flash attention for dense-prefill methods on GPU),
        ``method`` (always ``method.prefill``) or ``cudnn`` (required).
      memory_limit_bytes: usable device memory; ``None`` reads the device's memory
        statistics (host memory on CPU).
      cache_dtype: KV-cache dtype; ``None`` uses the model's compute dtype.
      traced_hyperparameters: pass the method's numeric hyper-parameters (its
        ``traced_fields``, e.g. ``sparsity``) to the compiled programs as arguments, so
        one program serves every value; shapes they would decide take their dense
        bound. ``False`` bakes them in as constants (one program per value, shapes
        sized for the value). ``None`` (the default): traced on an accelerator for
        prompt buckets up to :data:`TRACED_MAX_BUCKET` tokens, baked in above it and on
        CPU. On CPU the jnp references' work follows those static sizes (a block-sparse
        prefill at 0.9 costs as much as at 0: 100 s instead of 40 s per 4K sample;
        experiments/results/compile_time.md). On long prompts the dense bound costs an
        accelerator too (index arrays as wide as the prompt): there a prefill costs more
        than a compile (:meth:`Engine.program_method`).
    """

    page_size: int = 16
    bucket_granularity: int = 1024
    batch_size: int = 1
    prefill_rows: int | None = None
    max_input_tokens: int | None = None
    sampling: SamplingParams = SamplingParams()
    prefill_backend: PrefillBackend = "auto"
    memory_limit_bytes: int | None = None
    cache_dtype: Any = None
    traced_hyperparameters: bool | None = None

    def __post_init__(self):
        for name in ("page_size", "bucket_granularity", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.prefill_rows is not None and self.prefill_rows < 1:
            raise ValueError(f"EngineConfig.prefill_rows must be >= 1 or None, got {self.prefill_rows}")
        if self.bucket_granularity % self.page_size:
            raise ValueError(
                f"EngineConfig.bucket_granularity ({self.bucket_granularity}) must be a multiple of "
                f"page_size ({self.page_size})"
            )


@flax.struct.dataclass
class DecodeState:
    """What the decode loop carries from one step to the next (B sequences, L layers, H query heads).

    Attributes:
      step: int32 scalar, the output column being chosen (1 .. ``max_new_tokens``); when
        the loop ends it has run ``step - 1`` decode steps.
      tokens: ``[B, max_new_tokens]`` int32 tokens chosen so far (column 0 from the prefill).
      done: ``[B]`` bool, the sequence has produced a stop id.
      n_out: ``[B]`` int32 tokens each sequence has produced.
      caches: every layer's cache (:class:`StackedPagedKVCache`).
      decode_sum: ``[B, L, H]`` float32 read densities summed over the sequence's steps.
      decode_count: ``[B]`` int32 decode steps each sequence took part in.
      decode_counts: :class:`PhaseCounts` of ``[B, L, H]`` float32 tokens read and tokens
        a full cache would hold, summed over the sequence's steps (docs/budgets.md).
    """

    step: jax.Array
    tokens: jax.Array
    done: jax.Array
    n_out: jax.Array
    caches: StackedPagedKVCache
    decode_sum: jax.Array
    decode_count: jax.Array
    decode_counts: PhaseCounts

    @classmethod
    def start(cls, caches: StackedPagedKVCache, first: jax.Array, stop_ids: jax.Array, *, max_new_tokens: int,
              num_layers: int, num_heads: int) -> DecodeState:
        """The state before the first decode step: ``first [B]`` chosen by the prefill."""
        b = first.shape[0]
        return cls(
            step=jnp.int32(1),
            tokens=jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first),
            done=jnp.isin(first, stop_ids),
            n_out=jnp.ones((b,), jnp.int32),
            caches=caches,
            decode_sum=jnp.zeros((b, num_layers, num_heads), jnp.float32),
            decode_count=jnp.zeros((b,), jnp.int32),
            decode_counts=PhaseCounts(*[jnp.zeros((b, num_layers, num_heads), jnp.float32)] * 2),
        )

    def decode_density(self) -> np.ndarray:
        """``[B, L, H]`` mean read density over each sequence's decode steps (NaN for none)."""
        count = np.asarray(self.decode_count)
        density = np.asarray(self.decode_sum) / np.maximum(count, 1)[:, None, None]
        density[count == 0] = np.nan
        return density


@dataclasses.dataclass(frozen=True)
class SparsityStats:
    """Attended fractions of one sample.

    Attributes:
      prefill_density: ``[layers, H]`` computed causal pairs / all causal pairs.
      decode_density: ``[layers, H]`` cached tokens read / full-cache tokens, mean over
        the sample's decode steps (NaN when it decoded none).
      reported_sparsity: the reference's single figure (docs/reference_behaviour.md section 4.0): mean
        over layers of the method's per-layer ``reported_sparsity``.
      prefill_counts: ``[layers, H]`` computed and dense causal pairs.
      decode_counts: ``[layers, H]`` cached tokens read and full-cache tokens, summed over
        the sample's decode steps (zeros when it decoded none).
    """

    prefill_density: np.ndarray
    decode_density: np.ndarray
    reported_sparsity: float
    prefill_counts: PhaseCounts
    decode_counts: PhaseCounts

    @property
    def combined_sparsity(self) -> float:
        """Skipped share of all (query, key) pairs of the generation, prefill and decode pooled."""
        return combined_sparsity(self.prefill_counts, self.decode_counts)

    @property
    def prefill_sparsity(self) -> float:
        return _skipped_share(self.prefill_density)

    @property
    def decode_sparsity(self) -> float:
        return _skipped_share(self.decode_density)


def _skipped_share(density: np.ndarray) -> float:
    """``1 - mean(density)`` in float64, clipped to [0, 1]: the device's float32 densities of a dense
    pass are 1 to within one ulp (1 - 1.0000001 would record a sparsity of -1.2e-7). NaN stays NaN."""
    return float(np.clip(1.0 - np.mean(density, dtype=np.float64), 0.0, 1.0))


@dataclasses.dataclass(frozen=True)
class BatchTiming:
    """Wall times of one batch (shared by its samples).

    Attributes:
      batch_size: sequences in the batch.
      bucket: padded prompt length.
      compile_seconds: compilation of programs this batch needed first (0 on reuse).
      prefill_seconds: all prefill calls of the batch.
      decode_seconds: the decode loop.
      decode_steps: loop iterations (decode forward passes of the whole batch).
    """

    batch_size: int
    bucket: int
    compile_seconds: float
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int

    @property
    def seconds_per_step(self) -> float | None:
        return self.decode_seconds / self.decode_steps if self.decode_steps else None


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """One sample's output.

    Attributes:
      token_ids: generated ids, the stop token included when generation stopped on one.
      text: ``tokenizer.decode(token_ids)`` when a tokenizer was given.
      output_length: ``len(token_ids)`` (counts the stop token, docs/reference_behaviour.md section 2.3).
      stopped: generation ended on a stop id (not on ``max_new_tokens``).
      prompt_length: prompt tokens.
      timing: the wall times of the sample's batch.
      sparsity: attended fractions and the reference's sparsity figure.
    """

    token_ids: list[int]
    text: str | None
    output_length: int
    stopped: bool
    prompt_length: int
    timing: BatchTiming
    sparsity: SparsityStats


class Engine:
    """Compiles and runs batched prefill + decode of one model with one attention method.

    Args:
      model: a :class:`sparse_jax.models.transformer.Transformer` (NNX module).
      method: an :class:`AttentionMethod` or a registered method name.
      config: engine settings.
    """

    def __init__(self, model: nnx.Module, method: AttentionMethod | str = "dense", config: EngineConfig = EngineConfig()):
        self.method = get_method(method) if isinstance(method, str) else method
        self.method.check_page_size(config.page_size)
        self.config = config
        self.model_config = model.config
        self.graphdef, self.params = nnx.split(model)
        self.cache_dtype = jnp.dtype(config.cache_dtype or model.dtype)
        self.weight_bytes = pytree_bytes(self.params)
        self.prefill_backend = resolve_backend(config.prefill_backend, self.method, self.cache_dtype)
        self.static_method, self.method_values = self.method.split()
        # What the programs read from this engine besides their arguments and static method.
        self._program_key = (self.graphdef, self.prefill_backend, config.sampling)
        self.programs: dict[tuple, Any] = {}  # the programs this engine ran, by key (name first)

    # --- public API ----------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        stop_ids: Sequence[int],
        tokenizer: Detokenizer | None = None,
        rng: jax.Array | None = None,
        progress: bool = True,
    ) -> list[GenerationResult]:
        """Generate for many prompts: batches of up to ``config.batch_size`` sharing a length bucket.

        Arguments as :meth:`generate_batch`; ``progress`` shows a bar over samples.

        Returns:
          One :class:`GenerationResult` per prompt, in input order.
        """
        prompts = self._validate(prompts, max_new_tokens, stop_ids)
        rng = jax.random.PRNGKey(0) if rng is None else rng
        cfg = self.config
        batches = group_by_bucket(
            [len(p) for p in prompts],
            batch_size=cfg.batch_size,
            granularity=cfg.bucket_granularity,
            page_size=cfg.page_size,
        )
        results: list[GenerationResult | None] = [None] * len(prompts)
        with tqdm(total=len(prompts), desc=f"generate [{self.method.name}]", disable=not progress) as bar:
            for n, members in enumerate(batches):
                batch = self._run_batch(
                    [prompts[i] for i in members], max_new_tokens, stop_ids, tokenizer, jax.random.fold_in(rng, n)
                )
                for i, result in zip(members, batch):
                    results[i] = result
                bar.update(len(members))
        return results

    def generate_batch(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        stop_ids: Sequence[int],
        tokenizer: Detokenizer | None = None,
        rng: jax.Array | None = None,
    ) -> list[GenerationResult]:
        """Generate for one batch: all prompts prefilled together, padded to the longest one's bucket.

        Args:
          prompts: token-id lists (after the chat template), of any lengths.
          max_new_tokens: most tokens generated per prompt (stop token included).
          stop_ids: token ids that end a sequence.
          tokenizer: if given, each result carries the decoded text.
          rng: PRNG key for sampling (default ``PRNGKey(0)``; unused when greedy).

        Returns:
          One :class:`GenerationResult` per prompt, in input order.
        """
        prompts = self._validate(prompts, max_new_tokens, stop_ids)
        rng = jax.random.PRNGKey(0) if rng is None else rng
        return self._run_batch(prompts, max_new_tokens, stop_ids, tokenizer, rng)

    def memory_plan(self, batch: int, bucket: int, max_new_tokens: int) -> MemoryPlan:
        """The memory plan of one batch with prompts padded to ``bucket``."""
        return plan_memory(
            self.model_config,
            batch=batch,
            bucket=bucket,
            pages_per_row=self.pages_per_row(bucket, max_new_tokens),
            page_size=self.config.page_size,
            prefill_rows=min(self.config.prefill_rows or batch, batch),
            cache_dtype=self.cache_dtype,
            weight_bytes=self.weight_bytes,
            limit_bytes=self.config.memory_limit_bytes,
        )

    # --- checks --------------------------------------------------------------------

    def _validate(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int]
    ) -> list[list[int]]:
        """Check the request; returns the prompts as lists of Python ints."""
        vocab = self.model_config.vocab_size
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts:
            raise ValueError("generate() got no prompts; pass a non-empty list of token-id lists")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        bad_stop = [s for s in stop_ids if not 0 <= int(s) < vocab]
        if bad_stop:
            raise ValueError(
                f"stop ids {bad_stop} are outside the model's vocabulary [0, {vocab}); "
                "take them from the checkpoint's generation_config.json (LoadedModel.stop_ids)"
            )
        limit = self.config.max_input_tokens
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
            if limit is not None and len(p) > limit:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens, more than max_input_tokens={limit}; "
                    "shorten the prompt or raise EngineConfig.max_input_tokens"
                )
            if min(p) < 0 or max(p) >= vocab:
                raise ValueError(f"prompt {i} holds token ids outside the vocabulary [0, {vocab})")
        return prompts

    # --- one batch -----------------------------------------------------------------

    def bucket(self, longest: int) -> int:
        """The padded prompt length of a batch whose longest prompt has ``longest`` tokens."""
        cfg = self.config
        return bucket_length(longest, granularity=cfg.bucket_granularity, page_size=cfg.page_size)

    def pages_per_row(self, bucket: int, max_new_tokens: int) -> int:
        """Cache pages of one row: the prefill writes ``bucket`` slots; decoding appends at most
        ``max_new_tokens - 1`` tokens (the last generated token is never fed back)."""
        return pages_for(bucket + max_new_tokens - 1, self.config.page_size)

    def program_method(self, bucket: int) -> tuple[AttentionMethod, dict[str, Any]]:
        """``(static method, values)`` of the programs at prompt bucket ``bucket``: the split
        method and its traced values (:meth:`AttentionMethod.split`), or the whole method and
        no values where they are baked in (``EngineConfig.traced_hyperparameters``)."""
        traced = self.config.traced_hyperparameters
        if traced is None:
            traced = jax.default_backend() != "cpu" and bucket <= TRACED_MAX_BUCKET
        return (self.static_method, self.method_values) if traced and self.method_values else (self.method, {})

    def allocate_caches(self, batch: int, bucket: int, max_new_tokens: int) -> StackedPagedKVCache:
        """Every layer's empty cache for one batch (pools shared by the layers, tables ``[L, ...]``)."""
        mcfg = self.model_config
        allocate = functools.partial(
            StackedPagedKVCache.allocate,
            num_layers=mcfg.num_layers,
            batch=batch,
            num_kv_heads=mcfg.num_kv_heads,
            head_dim=mcfg.head_dim,
            pages_per_row=self.pages_per_row(bucket, max_new_tokens),
            page_size=self.config.page_size,
            dtype=self.cache_dtype,
        )
        return _allocate_stacked(allocate, self.method, batch)

    def _run_batch(self, prompts, max_new_tokens, stop_ids, tokenizer, rng) -> list[GenerationResult]:
        cfg = self.config
        b = len(prompts)
        lengths = np.array([len(p) for p in prompts], np.int32)
        bucket = self.bucket(int(lengths.max()))
        rows = min(cfg.prefill_rows or b, b)
        plan = self.memory_plan(b, bucket, max_new_tokens)
        log.info("batch of %d (bucket %d): %s", b, bucket, plan.describe())
        plan.check()

        tokens = np.zeros((b, bucket), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
        pages_per_row = self.pages_per_row(bucket, max_new_tokens)
        caches = self.allocate_caches(b, bucket, max_new_tokens)
        prefill_key, decode_key = jax.random.split(rng)

        static_method, method_values = self.program_method(bucket)
        compile_s = prefill_s = 0.0
        firsts, densities, reported, prefill_counts = [], [], [], []
        for start in range(0, b, rows):
            stop = min(start + rows, b)
            args = (
                self.params,
                caches,
                jnp.asarray(tokens[start:stop]),
                jnp.asarray(lengths[start:stop]),
                jnp.int32(start),
                jax.random.fold_in(prefill_key, start),
                method_values,
            )
            fn, seconds, args = self._prefill_program(static_method, args, plan)
            compile_s += seconds
            t0 = time.perf_counter()
            caches, first, density, rep, counts = jax.block_until_ready(fn(*args))
            prefill_s += time.perf_counter() - t0
            firsts.append(first)
            densities.append(density)
            reported.append(rep)
            prefill_counts.append(counts)
        first = jnp.concatenate(firsts)
        prefill_density = np.asarray(jnp.concatenate(densities))  # [B, L, H]
        reported_sparsity = np.asarray(jnp.concatenate(reported)).mean(axis=1)  # [B]
        prefill_counts = PhaseCounts(*(np.concatenate(c) for c in zip(*prefill_counts)))  # [B, L, H] each

        decode_s, steps = 0.0, 0
        if max_new_tokens > 1:
            args = (
                self.params,
                caches,
                first,
                jnp.asarray(lengths),
                _stop_array(stop_ids),
                decode_key,
                method_values,
            )
            fn, seconds = self._compile(
                ("decode", static_method, max_new_tokens),
                functools.partial(self._decode_fn, static_method=static_method, max_new_tokens=max_new_tokens), args,
                decode_compiler_options(jax.default_backend()),
            )
            compile_s += seconds
            t0 = time.perf_counter()
            final = jax.block_until_ready(fn(*args))
            decode_s = time.perf_counter() - t0
            steps = int(final.step) - 1
            out_tokens, n_out = np.asarray(final.tokens), np.asarray(final.n_out)
            decode_density = final.decode_density()
            decode_counts = PhaseCounts(*map(np.asarray, final.decode_counts))  # [B, L, H] each
            del final  # its caches
        else:
            out_tokens, n_out = np.asarray(first)[:, None], np.ones(b, np.int32)
            decode_density = np.full_like(prefill_density, np.nan)
            decode_counts = PhaseCounts(np.zeros_like(prefill_density), np.zeros_like(prefill_density))
        del caches

        timing = BatchTiming(b, bucket, compile_s, prefill_s, decode_s, steps)
        stop_set = set(int(s) for s in stop_ids)
        results = []
        for i in range(b):
            ids = out_tokens[i, : n_out[i]].tolist()
            results.append(
                GenerationResult(
                    token_ids=ids,
                    text=tokenizer.decode(ids) if tokenizer is not None else None,
                    output_length=len(ids),
                    stopped=bool(ids) and ids[-1] in stop_set,
                    prompt_length=int(lengths[i]),
                    timing=timing,
                    sparsity=SparsityStats(
                        prefill_density[i],
                        decode_density[i],
                        float(reported_sparsity[i]),
                        PhaseCounts(*(c[i] for c in prefill_counts)),
                        PhaseCounts(*(c[i] for c in decode_counts)),
                    ),
                )
            )
        return results

    def _compile(
        self, kind: tuple[Hashable, ...], fn, args, options: dict[str, bool | str] | None = None
    ) -> tuple[Any, float]:
        """The compiled program of ``fn`` for ``args`` (caches donated) and the seconds
        spent compiling it: 0 when this process compiled it before (:data:`PROGRAMS`),
        for this engine or another one with the same model, split method and settings.

        ``kind``: the program's name, then any static value ``fn`` closes over.
        ``options``: XLA compiler options of this program.
        """
        options = options or {}
        key = (*kind, self._program_key, tuple(sorted(options.items())), argument_signature(args))
        program, seconds = PROGRAMS.get(key, lambda: compile_program(fn, args, options))
        self.programs[key] = program
        return program, seconds

    def _prefill_program(self, static_method: AttentionMethod, args: tuple, plan: MemoryPlan
                         ) -> tuple[Any, float, tuple]:
        """``(program, compile seconds, args)`` of one prefill call; ``static_method`` and the
        values ending ``args``: :meth:`program_method`.

        With traced hyper-parameters a method's shapes take their dense bound
        (:meth:`AttentionMethod.shape_value`), which at long prompts can need far more
        working memory than the method's own value (vertical-and-slash at 128K on 8B
        shapes: 200+ GiB for a 0.9 target, 5 GiB baked in). When the traced program's
        temporaries do not fit beside the cache, the program with the method's values
        baked in runs instead (its own compile, logged once per program). When that
        one does not fit either (FlexPrefill's index is sized by ``max_budget``, the
        prompt length by default), :class:`InsufficientMemoryError` says so before running.
        """
        fn, seconds = self._compile(("prefill", static_method),
                                    functools.partial(self._prefill_fn, static_method=static_method), args)
        if _temporaries_fit(fn, plan):
            return fn, seconds, args
        if args[-1]:  # traced: the program with the values baked in sizes its shapes to them
            args = (*args[:-1], {})
            fn, more = self._compile(("prefill", self.method),
                                     functools.partial(self._prefill_fn, static_method=self.method), args)
            seconds += more
            if _temporaries_fit(fn, plan):
                if more:
                    log.info("%s: the traced prefill program needs more memory than is free (%s); using one "
                             "with the method's values baked in", self.method, plan.describe())
                return fn, seconds, args
        raise InsufficientMemoryError(
            f"{self.method.name}: the prefill program's working memory "
            f"({gib_text(fn.memory_analysis().temp_size_in_bytes)}) does not fit beside the KV cache "
            f"({plan.describe()}), with the method's values baked in. A sparse method's index grows with its "
            "budget bound at this prompt length: lower the batch size or the prefill micro-batch, or bound the "
            "budgets (e.g. flexprefill's max_budget)."
        )

    # --- traced programs -------------------------------------------------------------

    def _prefill_fn(self, params, caches, tokens, lengths, row_start, key, method_values, *, static_method):
        """Prefill rows ``row_start ..`` of the caches.

        Args:
          tokens: ``[b, T]`` int32 right-padded prompts; lengths: ``[b]`` int32.
          method_values: the method's traced hyper-parameters (``AttentionMethod.split``).
          static_method: the method without them (:meth:`program_method`); the whole
            method when they are baked in (``method_values`` then empty).

        Returns:
          ``(caches, first_tokens [b], prefill_density [b, L, H], reported_sparsity [b, L],
          PhaseCounts [b, L, H])``.
        """
        model = nnx.merge(self.graphdef, params)
        b, t = tokens.shape
        method = static_method.bind(method_values)
        backend = self.prefill_backend
        write, _ = _cache_updates(method)
        num_layers, num_heads = self.model_config.num_layers, self.model_config.num_heads

        def attend(layer, q, k, v, state):
            cache = state[0]
            layer = layer._replace(page_size=cache.page_size)  # the cache owns the page size
            out, stats = prefill_attention(method, q, k, v, lengths=lengths, layer=layer, backend=backend)
            kept = method.compress(q, k, v, lengths=lengths, layer=layer)
            cache = write(state[0], k, v, lengths, row_start=row_start, kept=kept)
            density = stats.attended_pairs / stats.causal_pairs[:, None]
            reported = stats.reported_sparsity.mean(axis=1) if kept is None else kept.reported_sparsity
            counts = PhaseCounts(stats.attended_pairs, jnp.broadcast_to(stats.causal_pairs[:, None], density.shape))
            return out, (cache, density.astype(jnp.float32), reported.astype(jnp.float32),
                         *(c.astype(jnp.float32) for c in counts))

        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        # Per-layer figures are stacked like the caches: [L, b, H] and [L, b].
        zeros = jnp.zeros((num_layers, b, num_heads), jnp.float32)
        states = (caches, zeros, jnp.zeros((num_layers, b), jnp.float32), zeros, zeros)
        logits, (caches, density, reported, attended, dense) = model(
            tokens, positions, attend=attend, layer_states=states, logits_at=lengths - 1
        )
        counts = PhaseCounts(jnp.swapaxes(attended, 0, 1), jnp.swapaxes(dense, 0, 1))  # [b, L, H] each
        first = sample_tokens(logits, key, self.config.sampling)
        return caches, first, jnp.swapaxes(density, 0, 1), jnp.swapaxes(reported, 0, 1), counts

    def _decode_fn(self, params, caches, first, prompt_lengths, stop_ids, key, method_values, *, static_method,
                   max_new_tokens):
        """The decode loop.

        Args:
          first: ``[B]`` int32 tokens chosen from the prefill logits.
          prompt_lengths: ``[B]`` int32.
          stop_ids: ``[S]`` int32.
          method_values, static_method: as :meth:`_prefill_fn`.

        Returns:
          The final :class:`DecodeState`: ``tokens[b, :n_out[b]]`` are sample ``b``'s outputs.
        """
        model = nnx.merge(self.graphdef, params)
        method, sampling = static_method.bind(method_values), self.config.sampling
        b = first.shape[0]
        num_layers, num_heads = self.model_config.num_layers, self.model_config.num_heads
        _, append = _cache_updates(method)

        def attend(layer, q, k, v, state):
            layer = layer._replace(page_size=state[0].page_size)  # the cache owns the page size
            cache = append(state[0], k[:, 0], v[:, 0])
            out, stats = method.decode(q[:, 0], cache, layer=layer)
            return out[:, None], (cache, (stats.tokens_read / stats.tokens_cached).astype(jnp.float32),
                                  *(c.astype(jnp.float32) for c in stats))

        def cond(state: DecodeState):
            return (state.step < max_new_tokens) & ~jnp.all(state.done)

        def body(state: DecodeState) -> DecodeState:
            step = state.step
            fed = jax.lax.dynamic_index_in_dim(state.tokens, step - 1, axis=1)  # [B, 1]
            positions = (prompt_lengths + step - 1)[:, None]
            zeros = jnp.zeros((num_layers, b, num_heads), jnp.float32)
            logits, (caches, density, read, cached) = model(
                fed, positions, attend=attend, layer_states=(state.caches, zeros, zeros, zeros),
                logits_at=jnp.zeros((b,), jnp.int32),
            )
            active = ~state.done
            density = jnp.swapaxes(density, 0, 1)  # [B, L, H]
            step_counts = PhaseCounts(jnp.swapaxes(read, 0, 1), jnp.swapaxes(cached, 0, 1))  # [B, L, H] each
            nxt = jnp.where(active, sample_tokens(logits, jax.random.fold_in(key, step), sampling), 0)
            return state.replace(
                step=step + 1,
                tokens=jax.lax.dynamic_update_index_in_dim(state.tokens, nxt, step, axis=1),
                done=state.done | (active & jnp.isin(nxt, stop_ids)),
                n_out=state.n_out + active,
                caches=caches,
                decode_sum=state.decode_sum + jnp.where(active[:, None, None], density, 0.0),
                decode_count=state.decode_count + active,
                decode_counts=PhaseCounts(*(
                    t + jnp.where(active[:, None, None], c, 0.0) for t, c in zip(state.decode_counts, step_counts)
                )),
            )

        init = DecodeState.start(caches, first, stop_ids, max_new_tokens=max_new_tokens,
                                 num_layers=num_layers, num_heads=num_heads)
        return jax.lax.while_loop(cond, body, init)


def _allocate_stacked(allocate, method: AttentionMethod, batch: int) -> StackedPagedKVCache:
    """Every layer's empty cache, from ``allocate()`` (a :class:`StackedPagedKVCache`).

    A :class:`CacheLayout` method gets its per-layer layout: the shared pools as one layer's,
    the stacked tables and lengths replicated over the layer axis.
    """
    shardings = None
    if isinstance(method, CacheLayout):  # allocated straight into the method's (mesh) layout
        layer = method.cache_shardings(batch)

        def stacked(s: jax.sharding.NamedSharding) -> jax.sharding.NamedSharding:
            return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(None, *s.spec))

        shardings = StackedPagedKVCache(
            k_pages=layer.k_pages, v_pages=layer.v_pages, k_min=layer.k_min, k_max=layer.k_max,
            page_table=stacked(layer.page_table), lengths=stacked(layer.lengths),
            seq_lengths=stacked(layer.seq_lengths),
        )
    return jax.jit(allocate, out_shardings=shardings)()


def _temporaries_fit(program, plan: MemoryPlan) -> bool:
    """Whether ``program``'s temporaries (XLA's memory analysis) fit in the memory the plan
    leaves free beside the KV cache; ``True`` when the backend does not say."""
    stats = program.memory_analysis()
    if stats is None:
        return True
    return stats.temp_size_in_bytes <= plan.free_bytes - plan.cache_bytes


def _cache_updates(method: AttentionMethod):
    """``(write_prompt, append)``: the method's own (:class:`CacheLayout`) or the cache's."""
    if isinstance(method, CacheLayout):
        return method.write_cache, method.append_cache
    return PagedKVCache.write_prompt, PagedKVCache.append


def _stop_array(stop_ids: Sequence[int]) -> jax.Array:
    """Stop ids padded with ``-1`` (never a token) to a multiple of 8, so stop lists share programs."""
    n = max(8, -(-len(stop_ids) // 8) * 8)
    padded = np.full(n, -1, np.int32)
    padded[: len(stop_ids)] = stop_ids
    return jnp.asarray(padded)


def generate(
    model: nnx.Module,
    prompts: Sequence[Sequence[int]],
    method: AttentionMethod | str = "dense",
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    tokenizer: Detokenizer | None = None,
    rng: jax.Array | None = None,
    config: EngineConfig = EngineConfig(),
) -> list[GenerationResult]:
    """All ``prompts`` as one batch: :meth:`Engine.generate_batch` of a fresh engine."""
    return Engine(model, method, config).generate_batch(
        prompts, max_new_tokens=max_new_tokens, stop_ids=stop_ids, tokenizer=tokenizer, rng=rng
    )
