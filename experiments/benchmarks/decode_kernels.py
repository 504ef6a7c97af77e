"""Paged decode kernels on one GPU: dense, Quest-selected and evicted caches (issue 7).

Shapes: 32 query heads, 8 KV heads, d=128, bf16, page size 16, shuffled page tables.
Each timed function runs ``REPEATS`` (``--steps``) decode steps inside one jit (distinct
queries, no loop), so host dispatch is amortised; we report the median per step over
``TRIALS`` calls after warm-up. Bandwidth counts the K and V bytes of the valid tokens.
The headline rows (empty step, fastest dense, Quest, evicted) are also timed two more ways
(:class:`StepTime`): pipelined (calls queued back to back, one wait at the end: a decode
loop's throughput) and on the device (the span of a call's kernels in a JAX profiler trace,
:mod:`device_timeline`, divided by the steps, with a per-kernel table).

Run on the device: ``PYTHONUNBUFFERED=1 python experiments/benchmarks/decode_kernels.py --out $OUT``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from tqdm import tqdm

from experiments.benchmarks import device_timeline
from pallas_kernels.paged_decode import (
    DecodeConfig,
    MosaicDecodeConfig,
    gpu_mosaic,
    gpu_triton,
    quest,
    quest_select,
    reference,
)
from pallas_kernels.paged_decode.configs import FAMILY, MOSAIC_FAMILY, DecodeLaunch, MosaicDecodeLaunch, splits_for
from sparse_jax.atomic_files import atomic_write_json

warnings.filterwarnings("ignore", category=DeprecationWarning)

H, G, D, PAGE = 32, 8, 128, 16
# Mosaic GPU launches swept beside the Triton ones (Hopper only): programs per call,
# tokens per shared-memory slot, slots in flight (each fits in shared memory with d = 128).
MOSAIC_SWEEP = [MosaicDecodeLaunch(target_programs=t, block_tokens=n, stages=s)
                for t, n, s in [(132, 128, 2), (264, 128, 2), (264, 64, 4), (528, 64, 4), (264, 64, 5), (1056, 64, 3)]]
REPEATS, TRIALS = 10, 15
INTERPRET = False  # --interpret: CPU smoke run of the script
SCALE = D**-0.5


def make_cache(key, batch: int, pages_per_row: int, lengths: np.ndarray):
    """Pools sized to the tables, shuffled tables; ``lengths [batch, G]``."""
    pool = batch * pages_per_row
    kk, kv, kq, kt, km = jax.random.split(key, 5)
    k = jax.random.normal(kk, (G, pool, PAGE, D), jnp.bfloat16)
    v = jax.random.normal(kv, (G, pool, PAGE, D), jnp.bfloat16)
    qs = jax.random.normal(kq, (REPEATS, batch, H, D), jnp.bfloat16)
    perms = jax.vmap(lambda kk_: jax.random.permutation(kk_, pool))(jax.random.split(kt, G))  # [G, pool]
    table = jnp.swapaxes(perms.reshape(G, batch, pages_per_row), 0, 1).astype(jnp.int32)
    k_min = jax.random.normal(km, (G, pool, D), jnp.bfloat16)
    k_max = k_min + jnp.abs(jax.random.normal(kk, (G, pool, D), jnp.bfloat16))
    return dict(qs=qs, k=k, v=v, table=table, lengths=jnp.asarray(lengths, jnp.int32), k_min=k_min, k_max=k_max)


def chain_steps(fn):
    """``jit(many)``: ``many(qs, *rest)`` runs ``fn(q, *rest)`` for the REPEATS queries in ``qs``."""
    def many(qs, *rest):
        # Each step's query depends on the previous output, so XLA cannot fuse sibling
        # steps into one pass over the shared cache. (Tying the steps with
        # lax.optimization_barrier instead was measured too: no change in the Quest ratio.)
        outs, link = [], jnp.zeros((), qs.dtype)
        for i in range(REPEATS):
            out = fn(qs[i] + link, *rest)
            outs.append(out)
            link = (jax.tree.leaves(out)[0].reshape(-1)[0] * 0).astype(qs.dtype)
        return outs

    return jax.jit(many)


def _serial_seconds(many, args) -> float:
    """Median seconds per step over TRIALS calls of ``many``, each waited for."""
    jax.block_until_ready(many(*args))
    jax.block_until_ready(many(*args))
    times = []
    for _ in range(TRIALS):
        t0 = time.perf_counter()
        jax.block_until_ready(many(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / REPEATS


def time_steps(fn, *args) -> float:
    """Median seconds per decode step of ``fn(q, *args)`` over the REPEATS queries in ``args[0]``."""
    return _serial_seconds(chain_steps(fn), args)


@dataclasses.dataclass(frozen=True)
class StepTime:
    """Seconds per decode step, measured three ways.

    Attributes:
      serial: :func:`time_steps` (each call waited for: its dispatch and sync are in it).
      pipelined: TRIALS calls queued back to back and waited for once, so the host
        prepares a call while the device runs the previous one (a decode loop's throughput).
      timeline: the device's kernels in one call (median of 3 traced calls); ``None`` where
        the profiler records no GPU kernel (interpret mode).
    """

    serial: float
    pipelined: float
    timeline: device_timeline.Timeline | None

    @property
    def device(self) -> float | None:
        return None if self.timeline is None else self.timeline.span_ns / REPEATS / 1e9

    @property
    def ranking(self) -> float:
        """The time sweeps rank variants by: on the device where traced (no host noise)."""
        return self.serial if self.device is None else self.device


def measure_steps(fn, *args) -> StepTime:
    """:class:`StepTime` of ``fn(q, *args)`` (as :func:`time_steps`)."""
    many = chain_steps(fn)
    serial = _serial_seconds(many, args)
    t0 = time.perf_counter()
    jax.block_until_ready([many(*args) for _ in range(TRIALS)])
    pipelined = (time.perf_counter() - t0) / (TRIALS * REPEATS)
    try:
        timeline = device_timeline.trace_call(many, *args)
    except RuntimeError as e:
        tqdm.write(f"  no device timeline: {e}")
        timeline = None
    return StepTime(serial, pipelined, timeline)


def _copy_kernel(q_ref, out_ref):
    out_ref[...] = q_ref[...]


def copy_fn(q):
    """One tiny Pallas kernel (copies ``q``): the fixed cost of a timed step, launch included."""
    return pl.pallas_call(_copy_kernel, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), interpret=INTERPRET)(q)


def kv_bytes(tokens: int) -> int:
    return tokens * G * D * 2 * 2  # K and V, bf16


def decode_kernel(q, k, v, table, lengths, *, config: DecodeConfig | MosaicDecodeConfig, max_row_pages=None):
    """The Triton kernel for a :class:`DecodeConfig`, the Mosaic GPU one for a :class:`MosaicDecodeConfig`."""
    if isinstance(config, MosaicDecodeConfig):
        return gpu_mosaic.paged_decode_attention(q, k, v, table, lengths, scale=SCALE, config=config,
                                                 max_row_pages=max_row_pages, interpret=INTERPRET)
    return gpu_triton.paged_decode_attention(q, k, v, table, lengths, scale=SCALE, config=config,
                                           max_row_pages=max_row_pages, interpret=INTERPRET)


def mosaic_sweep() -> list[MosaicDecodeLaunch]:
    """The Mosaic launches to time: all of :data:`MOSAIC_SWEEP`, or its first in a CPU smoke run
    (the interpreter runs every program on the host)."""
    return MOSAIC_SWEEP[:1] if INTERPRET else MOSAIC_SWEEP


def config_for(launch: DecodeLaunch | MosaicDecodeLaunch, batch: int, pages_per_row: int, rows: int = G):
    """The config a launch entry gives a call of ``batch`` sequences, ``rows`` table rows each of
    ``pages_per_row`` pages (splits as the library picks them)."""
    if isinstance(launch, MosaicDecodeLaunch):
        ppb = launch.pages_per_block(PAGE)
        splits = splits_for(batch, rows, pages_per_row, launch.target_programs, ppb)
        return MosaicDecodeConfig(pages_per_block=ppb, stages=launch.stages, num_splits=splits)
    splits = splits_for(batch, rows, pages_per_row, launch.target_programs, launch.pages_per_block)
    return DecodeConfig(pages_per_block=launch.pages_per_block, num_splits=splits, num_warps=launch.num_warps,
                        num_stages=launch.num_stages)


def kernel_fn(config: DecodeConfig | MosaicDecodeConfig):
    def fn(q, k, v, table, lengths):
        return decode_kernel(q, k, v, table, lengths, config=config)
    return fn


def reference_fn(q, k, v, table, lengths):
    return reference.paged_decode_attention(q, k, v, table, lengths, scale=SCALE)


def xla_contiguous_fn(q, k, v):
    """Dense decode over a contiguous ``[B, G, T, d]`` cache, as XLA compiles it."""
    b = q.shape[0]
    qg = q.reshape(b, G, H // G, D)
    s = jnp.einsum("bgnd,bgtd->bgnt", qg, k, preferred_element_type=jnp.float32) * SCALE
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bgnt,bgtd->bgnd", p.astype(k.dtype), v).reshape(b, H, D)


def quest_fn(config: DecodeConfig, budget: int):
    def fn(q, k, v, table, lengths, k_min, k_max):
        sel, sel_len = quest.quest_page_table(
            q, k_min, k_max, table, lengths, page_size=PAGE, token_budget=budget, share_pages=True
        )
        return decode_kernel(q, k, v, sel, sel_len, config=config)
    return fn


def selection_fn(budget: int):
    def fn(q, table, lengths, k_min, k_max):
        return quest.quest_page_table(q, k_min, k_max, table, lengths, page_size=PAGE, token_budget=budget,
                                      share_pages=True)
    return fn


def quest_kernel_fn(config: DecodeConfig, budget: int, score_cfg: dict, select_cfg: dict, in_place: bool = True):
    """Quest with the Pallas scoring and threshold-selection kernels, then the decode kernel.
    ``in_place``: the selection leaves the decode blocks' spare columns, so the decode reads
    its table as it is (else: through a padded copy, one more kernel per step)."""
    spare = config.pages_per_block if in_place else 0
    max_row_pages = budget // PAGE + 1 if in_place else None

    def fn(q, k, v, table, lengths, k_min, k_max):
        scores = quest_select.page_scores(q, k_min, k_max, table, share_pages=True, interpret=INTERPRET, **score_cfg)
        sel, sel_len = quest_select.select_pages(scores, table, lengths, page_size=PAGE, token_budget=budget,
                                                 spare_columns=spare, interpret=INTERPRET, **select_cfg)
        return decode_kernel(q, k, v, sel, sel_len, config=config, max_row_pages=max_row_pages)
    return fn


def fastest(variants, run):
    """``(seconds, variant)`` of the fastest variant; ``run(variant)`` times one (a variant that
    fails to compile is reported and skipped). Runs rank by :attr:`StepTime.ranking`."""
    best = None
    for variant in variants:
        try:
            t = run(variant)
        except Exception as e:
            tqdm.write(f"    {variant}: {type(e).__name__}: {str(e)[:300]}")
            continue
        if best is None or t < best[0]:
            best = (t, variant)
    return best


def quest_kernel_stages(c, batch: int, budget: int, dense: StepTime, record) -> None:
    """Per-stage timings of the kernel Quest path, checked against the jnp selection first."""
    qs, table, lengths, k_min, k_max = c["qs"], c["table"], c["lengths"], c["k_min"], c["k_max"]
    want_scores = quest.page_upper_bounds(qs[0], k_min, k_max, table, share_pages=True)
    summary_bytes = 2 * batch * G * table.shape[2] * D * k_min.dtype.itemsize

    def run_scores(cfg):
        score = lambda q, table, k_min, k_max: quest_select.page_scores(
            q, k_min, k_max, table, share_pages=True, interpret=INTERPRET, **cfg)
        got = score(qs[0], table, k_min, k_max)[..., : table.shape[2]]
        err = float(jnp.abs(got - want_scores).max() / jnp.abs(want_scores).max())
        t = measure_steps(score, qs, table, k_min, k_max)
        record(f"quest kernel scores b{batch} {cfg} (err {err:.1e}, {summary_bytes / t.ranking / 1e12:.2f} TB/s)", t,
               None)
        return t.ranking

    score_variants = [dict(block_pages=bp, blocks_per_program=n, num_warps=w, num_stages=st)
                      for bp, n, w, st in [(64, 4, 4, 3), (32, 4, 4, 3), (64, 8, 4, 4), (32, 16, 4, 3), (16, 8, 4, 3),
                                           (128, 2, 8, 3), (64, 8, 4, 2), (32, 8, 4, 2), (128, 4, 4, 2), (64, 8, 8, 4)]]
    _, score_cfg = fastest(score_variants, run_scores)
    scores = quest_select.page_scores(qs[0], k_min, k_max, table, share_pages=True, interpret=INTERPRET, **score_cfg)
    want_table, want_len = quest.select_pages(scores[..., : table.shape[2]], table, lengths, page_size=PAGE,
                                              token_budget=budget)
    scores_rep = jnp.stack([scores] * REPEATS)

    def run_select(cfg):
        sel = lambda s, table, lengths: quest_select.select_pages(s, table, lengths, page_size=PAGE,
                                                                  token_budget=budget, interpret=INTERPRET, **cfg)
        got_table, got_len = sel(scores, table, lengths)
        same = bool(jnp.array_equal(jnp.sort(got_table, axis=2), jnp.sort(want_table, axis=2))
                    & jnp.array_equal(got_len, want_len))
        t = measure_steps(sel, scores_rep, table, lengths)
        record(f"quest select kernel b{batch} {cfg} ({'same pages as top_k' if same else 'FAIL: pages differ'})",
               t, None)
        return t.ranking if same else float("inf")

    _, select_cfg = fastest([dict(candidates=c, num_warps=w) for c, w in [(1, 4), (1, 8), (2, 8), (4, 16)]],
                            run_select)
    sel = lambda s, table, lengths: quest_select.select_pages(s, table, lengths, page_size=PAGE, token_budget=budget,
                                                              interpret=INTERPRET, **select_cfg)
    topk = lambda s, table, lengths: quest.select_pages(s, table, lengths, page_size=PAGE, token_budget=budget)
    record(f"quest lax.top_k select b{batch} (same scores)",
           time_steps(topk, scores_rep[..., : table.shape[2]], table, lengths), None)
    sel_table, sel_len = sel(scores, table, lengths)
    sel_pages = sel_table.shape[2]

    def run_decode(cfg):
        t = measure_steps(kernel_fn(cfg), qs, c["k"], c["v"], sel_table, sel_len)
        record(f"quest decode kernel only ({budget + PAGE} tokens) b{batch} {cfg}", t, batch * int(sel_len[0, 0]))
        return t.ranking

    variants = [config_for(DecodeLaunch(pages_per_block=ppb, num_stages=stages), batch, sel_pages)
                for ppb, stages in [(2, 3), (2, 4), (4, 3), (4, 4), (8, 3), (16, 3)]]
    variants += [DecodeConfig(pages_per_block=ppb, num_splits=splits, num_stages=3)
                 for ppb, splits in [(8, 5), (4, 32), (8, 16)]]
    variants += [config_for(launch, batch, sel_pages) for launch in mosaic_sweep()]
    dcfg = fastest(variants, run_decode)[1]
    qargs = (qs, c["k"], c["v"], table, lengths, k_min, k_max)
    want = reference_fn(qs[0], c["k"], c["v"], sel_table, sel_len)
    for in_place in (False, True):
        fn = quest_kernel_fn(dcfg, budget, score_cfg, select_cfg, in_place=in_place)
        check(fn(qs[0], *qargs[1:]), want, f"quest kernels b{batch} in_place={in_place}")
        t = measure_steps(fn, *qargs)
        table_how = "decode reads the selection's table in place" if in_place else "padded table copy"
        record(f"quest {budget} b{batch} KERNEL PATH (scores + select + decode; {table_how}) {score_cfg} "
               f"{select_cfg} {dcfg}", t, batch * (budget + PAGE), dense=dense)


def dense_baselines(c, base, batch: int, ctx: int, tokens: int, record) -> None:
    """The jnp gather reference and XLA's decode over a contiguous cache."""
    try:
        record(f"dense jnp reference (gather) b{batch}", time_steps(reference_fn, *base), tokens)
    except Exception as e:  # the fp32 gathered copies may not fit at batch 8
        tqdm.write(f"dense jnp reference b{batch}: {type(e).__name__}: {str(e)[:200]}")
    kc = jax.random.normal(jax.random.key(0), (batch, G, ctx, D), jnp.bfloat16)
    record(f"dense XLA contiguous b{batch}", time_steps(xla_contiguous_fn, c["qs"], kc, kc[::-1]), tokens)


def launch_entry_line(best: DecodeLaunch | MosaicDecodeLaunch, batch: int, context: int) -> str:
    """The sweep's best dense launch as a ``paged_decode.configs`` table entry (``LAUNCH`` or
    ``MOSAIC_LAUNCH``) and as a ``$PALLAS_KERNELS_LAUNCH`` override that replays it through the engine."""
    fields = dataclasses.asdict(best)
    entry = ", ".join(f"{k}={v}" for k, v in fields.items())
    family = MOSAIC_FAMILY if isinstance(best, MosaicDecodeLaunch) else FAMILY
    override = json.dumps({family: fields})
    return (f"best launch b{batch} {context} tokens on {jax.devices()[0].device_kind!r}: "
            f"{type(best).__name__}({entry})  PALLAS_KERNELS_LAUNCH='{override}'")


CHECK_TOL = 2e-2  # relative error of a bf16 kernel against the fp32 reference


def check(out, want, name):
    err = float(jnp.linalg.norm((out - want).astype(jnp.float32)) / jnp.linalg.norm(want.astype(jnp.float32)))
    status = "ok" if err < CHECK_TOL else "FAIL"
    print(f"  check {name}: rel err {err:.2e} {status}")
    return err


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--context", type=int, default=128 * 1024)
    parser.add_argument("--interpret", action="store_true", help="Pallas interpreter (CPU smoke run)")
    parser.add_argument("--budget", type=int, default=4096, help="Quest token budget")
    parser.add_argument("--quest-only", action="store_true", help="only the Quest cases (one dense config)")
    parser.add_argument("--steps", type=int, default=10, help="decode steps chained in one timed call")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be at least 1; got {args.steps}")
    global INTERPRET, TRIALS, REPEATS
    INTERPRET = args.interpret
    REPEATS = args.steps
    if INTERPRET:
        TRIALS = 1
    print(jax.devices())
    ctx = args.context
    rows = []
    key = jax.random.key(0)
    sweep = [DecodeLaunch(pages_per_block=p, num_warps=w, num_stages=s)
             for p, w, s in [(4, 4, 3), (4, 4, 4), (4, 8, 3), (8, 4, 3), (8, 8, 2), (2, 4, 4)]]
    sweep += mosaic_sweep()

    def record(name, timing, tokens, dense: StepTime | None = None, **extra):
        """``timing``: seconds (serial) or a :class:`StepTime`; ``dense``: the dense step to compare with."""
        step = timing if isinstance(timing, StepTime) else None
        seconds = step.serial if step else timing
        bw = kv_bytes(tokens) / seconds / 1e12 if tokens else None
        if step:
            extra["pipelined_us"] = step.pipelined * 1e6
            if tokens:
                extra["pipelined_tb_s"] = kv_bytes(tokens) / step.pipelined / 1e12
            if step.device:
                extra["device_us"] = step.device * 1e6
                if tokens:
                    extra["device_tb_s"] = kv_bytes(tokens) / step.device / 1e12
                extra["kernels"] = {k: [n / REPEATS, t / REPEATS / 1e3]
                                    for k, (n, t) in step.timeline.per_kernel().items()}
        if dense:
            extra["speedup_vs_dense"] = dense.serial / step.serial
            extra["pipelined_speedup_vs_dense"] = dense.pipelined / step.pipelined
            if dense.device and step.device:
                extra["device_speedup_vs_dense"] = dense.device / step.device
        rows.append(dict(name=name, us=seconds * 1e6, tb_s=bw, steps_per_call=REPEATS, **extra))
        if args.out:  # after every row, so that a run stopped at a deadline keeps what it measured
            atomic_write_json(Path(args.out) / f"decode_kernels_steps{REPEATS}.json", rows)
        bw_txt = f"{bw:6.2f} TB/s" if bw else ""
        tqdm.write(f"{name:58s} {seconds * 1e6:10.1f} us  {bw_txt}")
        if step:
            tqdm.write(f"  pipelined {step.pipelined * 1e6:.1f} us/step")
            if step.timeline is not None:
                tqdm.write(step.timeline.format(REPEATS, top=6))

    if args.quest_only:  # the default and the run-2 best dense configs
        sweep = [sweep[0], sweep[-1]]
    for batch in (8, 1):
        pages = ctx // PAGE
        lengths = np.full((batch, G), ctx)
        c = make_cache(key, batch, pages, lengths)
        base = (c["qs"], c["k"], c["v"], c["table"], c["lengths"])
        tokens = batch * ctx
        record(f"empty step b{batch} (one tiny kernel: the harness's fixed cost per step)",
               measure_steps(copy_fn, c["qs"]), None)
        want = reference_fn(c["qs"][0], *base[1:])
        best = None
        for launch in tqdm(sweep, desc=f"dense b{batch} sweep"):
            cfg = config_for(launch, batch, pages)
            try:
                err = check(kernel_fn(cfg)(c["qs"][0], *base[1:]), want, f"dense b{batch} {cfg}")
                t = measure_steps(kernel_fn(cfg), *base)
            except Exception as e:  # a launch that does not compile on this GPU is reported, not fatal
                tqdm.write(f"  dense b{batch} {cfg}: {type(e).__name__}: {str(e)[:300]}")
                continue
            record(f"dense kernel b{batch} {cfg}", t, tokens, config=str(cfg), rel_err=err)
            if err < CHECK_TOL and (best is None or t.ranking < best[1].ranking):
                best = (launch, t)
        if not args.quest_only:
            dense_baselines(c, base, batch, ctx, tokens, record)
        best_launch, dense = best  # the Quest rows compare with this dense step
        tqdm.write(launch_entry_line(best_launch, batch, ctx))
        # Quest, 4096-token budget, selection included.
        budget = args.budget
        qargs = base + (c["k_min"], c["k_max"])
        qcfg = config_for(best_launch, batch, budget // PAGE + 1)
        sel, sel_len = selection_fn(budget)(c["qs"][0], c["table"], c["lengths"], c["k_min"], c["k_max"])
        check(quest_fn(qcfg, budget)(c["qs"][0], *qargs[1:]),
              reference_fn(c["qs"][0], c["k"], c["v"], sel, sel_len), f"quest b{batch}")
        t_quest = measure_steps(quest_fn(qcfg, budget), *qargs)
        t_sel = time_steps(selection_fn(budget), c["qs"], c["table"], c["lengths"], c["k_min"], c["k_max"])
        record(f"quest {budget} b{batch} (XLA scores + lax.top_k selection + kernel)", t_quest,
               batch * (budget + PAGE), dense=dense)
        record(f"quest {budget} b{batch} selection only", t_sel, None)
        score = lambda q, table, k_min, k_max: quest.page_upper_bounds(q, k_min, k_max, table, share_pages=True)
        record(f"quest {budget} b{batch} scores only", time_steps(score, c["qs"], c["table"], c["k_min"], c["k_max"]),
               None)
        quest_kernel_stages(c, batch, budget, dense, record)
        del c, base, qargs
        if args.quest_only:
            continue
        # SnapKV-evicted: 1024 kept per head in a 128K-capacity table vs a dense 1024-token cache.
        kept = 1024
        rng = np.random.default_rng(batch)
        for name, lens, width in [
            ("evicted 1024/128K", np.full((batch, G), kept), pages),
            ("evicted ragged (Ada) mean 1024/128K", rng.integers(kept // 2, 3 * kept // 2 + 1, (batch, G)), pages),
            ("dense 1024 cache", np.full((batch, G), kept), kept // PAGE),
        ]:
            c = make_cache(key, batch, width, lens)
            cfg = config_for(best_launch, batch, -(-int(lens.max()) // PAGE))
            base = (c["qs"], c["k"], c["v"], c["table"], c["lengths"])
            check(kernel_fn(cfg)(c["qs"][0], *base[1:]), reference_fn(c["qs"][0], *base[1:]), name)
            record(f"{name} b{batch}", measure_steps(kernel_fn(cfg), *base), int(lens.sum()) // G)
            del c, base

    print("\nSUMMARY")
    for r in rows:
        extra = f"  speedup {r['speedup_vs_dense']:.2f}x" if "speedup_vs_dense" in r else ""
        if "pipelined_us" in r:
            extra += f"  pipelined {r['pipelined_us']:.1f} us"
        if "pipelined_speedup_vs_dense" in r:
            extra += f" ({r['pipelined_speedup_vs_dense']:.2f}x)"
        if "device_us" in r:
            extra += f"  device {r['device_us']:.1f} us"
        if "device_tb_s" in r:
            extra += f" {r['device_tb_s']:.2f} TB/s"
        if "device_speedup_vs_dense" in r:
            extra += f" ({r['device_speedup_vs_dense']:.2f}x)"
        bw = f"{r['tb_s']:.2f} TB/s" if r["tb_s"] else ""
        print(f"{r['name']:58s} {r['us']:10.1f} us {bw:>11s}{extra}")


if __name__ == "__main__":
    main()
