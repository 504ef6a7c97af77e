"""Vertical-slash estimation + index construction, stage by stage, and end to end vs cuDNN.

Run on the device machine (no gin/datasets needed):

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 experiments/benchmarks/vs_estimation.py \
        --lengths 32768 65536 131072

Shapes: batch 1, 32 query heads, 8 KV heads, d = 128, bf16; the default budgets of
``vertical_and_slash`` (512 verticals, 512 slashes, window 256). Stages, each jitted
alone (median of ``--reps`` after a warm-up, ``jax.block_until_ready``):

* ``scores_none_hpsN``: window probabilities and their column sums, as the method runs
  them (N query heads vectorised per step; the method: 1); ``scores_skew_hpsN``: plus the
  diagonal (slash) sums (:func:`scoring.window_diagonal_sums`, the method's); at
  ``--sweep-length`` also N in {1, 8, 32} and the gather (:func:`gather_diagonal_sums`);
* ``top_k``: the two top-512 selections over ``[H, T]`` scores;
* ``walk``, ``walk_columns``: the first stages of the index construction (range walk,
  blocks written into their slots; + the gap columns);
* ``build``: the whole index construction (:func:`build_index`) from the selections;
* ``index``: the method's whole index (:func:`vertical_and_slash_index`);
* ``index_sS`` for each ``--targets`` sparsity ``S``: the method's whole index with its counts
  fitted to ``S`` (``VerticalAndSlash(sparsity=S).index``, ``S`` baked in), and
  ``index_sS_traced``, the same with ``S`` a traced argument as the engine passes it when
  the program fits (shapes at their dense bound); beside each, ``column_slots_sS[_traced]``
  (the static width of its column array) and ``max_columns_sS[_traced]`` (the most columns
  a row block kept);
* ``flexprefill_index``: FlexPrefill's (window 512, min budget 512, budget cap 2048).

End to end (``--skip-e2e`` skips): cuDNN dense causal attention; the Triton
vertical-slash kernel on the method's own index (random and banded inputs from
``prefill_kernels.make_qkv``), and on a strongly local head's index (512 nearest
diagonals); totals = index + kernel, timed together for random and banded inputs.

Results go to ``$OUT/vs_estimation.json``; a table is printed last.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
from tqdm import tqdm

from experiments.benchmarks.prefill_kernels import (
    HEAD_DIM,
    HEADS,
    SCALE,
    cudnn_attention,
    local_vertical_slash_index,
    make_qkv,
    median_seconds,
)
from pallas_kernels.vertical_slash import reference as vs_ref
from pallas_kernels.vertical_slash import vertical_slash_attention
from pallas_kernels.vertical_slash.index import VerticalSlashIndex
from sparse_jax.attention.base import LayerSpec
from sparse_jax.attention.methods import scoring
from sparse_jax.attention.methods import vertical_slash_index as vsi
from sparse_jax.attention.methods.flexprefill import flexprefill_index
from sparse_jax.attention.methods.vertical_and_slash import VerticalAndSlash, vertical_and_slash_index

BUDGET, WINDOW = 512, 256


def gather_diagonal_sums(probs, positions):
    """Slash sums by a gather (the replaced implementation): ``sum_i probs[..., i, positions[i] - delta]``."""
    t = probs.shape[-1]
    key = positions[:, None] - jnp.arange(t)[None, :]
    gathered = jnp.take_along_axis(probs, jnp.broadcast_to(jnp.maximum(key, 0), probs.shape), axis=-1)
    return jnp.where(key >= 0, gathered.astype(jnp.float32), 0.0).sum(axis=-2)


def method_scores(q, k, *, diagonals: str, heads_per_step: int = 1):
    """Column sums (and diagonal sums) as ``vertical_and_slash`` computes them: ``[H, 1, T]`` each.

    Args:
      diagonals: ``"none"``, ``"skew"`` (:func:`scoring.window_diagonal_sums`, the method's)
        or ``"gather"`` (:func:`gather_diagonal_sums`, the method's before this benchmark).
      heads_per_step: query heads vectorised per step (the method: 1).
    """
    b, t, h = q.shape[:3]
    length = jnp.full((b,), t, jnp.int32)
    group = h // k.shape[2]

    def one_sequence(qs, ks, n):
        probs, pos, _ = scoring.window_probabilities(
            qs[:, None], ks, n, window=WINDOW, scale=SCALE, prescale=False, round_to_bf16=True
        )
        probs = probs[0].astype(jnp.bfloat16)
        columns = probs.sum(axis=0, dtype=jnp.float32)
        if diagonals == "none":
            return columns
        diag = gather_diagonal_sums(probs, pos) if diagonals == "gather" else scoring.window_diagonal_sums(probs, n)
        return columns, diag

    def one_head(i):
        return jax.vmap(one_sequence)(q[:, :, i], k[:, :, i // group], length)

    return jax.lax.map(one_head, jnp.arange(h), batch_size=heads_per_step if heads_per_step > 1 else None)


def selections(v_score, s_score):
    """Forced top-512 verticals and slashes of ``[H, T]`` scores -> build_index inputs ``[H, 512]``."""
    v_score = v_score.at[:, : vsi.FORCED_VERTICALS].set(jnp.inf)
    s_score = s_score.at[:, : vsi.LOCAL_DIAGONALS].set(jnp.inf)
    verticals = jax.lax.top_k(v_score, BUDGET)[1].astype(jnp.int32)
    offsets = jax.lax.top_k(s_score, BUDGET)[1].astype(jnp.int32)
    return verticals, jnp.ones_like(verticals, bool), offsets, jnp.ones_like(offsets, bool)


def walk_prefix(offsets, verticals=None, *, num_rows: int, stage: int):
    """The first stages of :func:`build_index` for ``[H, ns]`` offsets (``[H, nv]`` verticals):
    0: range walk (blocks written into their slots); 1: + the gap columns."""
    row_end = vsi.TILE * (jnp.arange(num_rows, dtype=jnp.int32) + 1)
    last_end, starts, counts = vsi._walk_ranges(
        -jnp.sort(-offsets, axis=-1), row_end, vsi.TILE, min(offsets.shape[-1], num_rows)
    )
    if stage == 0:
        return last_end, starts, counts
    gap_columns = functools.partial(vsi._gap_columns, block_n=vsi.TILE)
    return jax.vmap(gap_columns)(jnp.sort(verticals, axis=-1), starts, counts, last_end)


def method_index(q, k):
    """``vertical_and_slash_index`` with the default budgets on full-length prompts."""
    n = jnp.full((q.shape[0],), BUDGET, jnp.int32)
    lengths = jnp.full((q.shape[0],), q.shape[1], jnp.int32)
    return vertical_and_slash_index(
        q, k, lengths, n, n, approximation_size=WINDOW, max_verticals=BUDGET, max_slashes=BUDGET, scale=SCALE
    )


def flex_index(q, k):
    """``flexprefill_index`` with the reference defaults and a budget cap of 2048."""
    lengths = jnp.full((q.shape[0],), q.shape[1], jnp.int32)
    min_budgets = jnp.full((q.shape[0],), 512, jnp.int32)
    return flexprefill_index(
        q, k, lengths, min_budgets, alpha=0.65, approximation_size=512, max_budget=min(2048, q.shape[1]), scale=SCALE
    )


def target_index(q, k, values, *, method):
    """``method.bind(values).index`` on full-length prompts (``values`` empty: the method's own)."""
    lengths = jnp.full((q.shape[0],), q.shape[1], jnp.int32)
    return method.bind(values).index(q, k, lengths, LayerSpec(0, SCALE))


def time_stages(q, k, reps: int, r: dict, sweep: bool, targets: tuple[float, ...] = ()) -> None:
    """Per-stage medians (ms) of the estimation and index construction at one length.

    ``sweep`` also times the candidate score layouts: diagonal sums by gather or skew,
    1, 8 or 32 heads per step."""
    t = q.shape[1]
    num_rows = -(-t // vsi.TILE)
    scores_diag = jax.jit(functools.partial(method_scores, diagonals="skew"))
    v_score, s_score = (x[:, 0] for x in scores_diag(q, k))  # [H, T] each
    select = jax.jit(selections)
    sel = select(v_score, s_score)
    walk = jax.jit(functools.partial(walk_prefix, num_rows=num_rows, stage=0))
    walk_columns = jax.jit(functools.partial(walk_prefix, num_rows=num_rows, stage=1))
    build = functools.partial(vsi.build_index, num_row_blocks=num_rows)
    index, flex = jax.jit(method_index), jax.jit(flex_index)
    variants = [(d, s) for d in ("none", "gather", "skew") for s in (1, 8, 32)]
    stages = {}
    for diag, steps in variants if sweep else [("none", 1), ("skew", 1)]:
        fn = jax.jit(functools.partial(method_scores, diagonals=diag, heads_per_step=steps))
        stages[f"scores_{diag}_hps{steps}"] = functools.partial(fn, q, k)
    stages.update({
        "top_k": lambda: select(v_score, s_score),
        "walk": lambda: walk(sel[2]),
        "walk_columns": lambda: walk_columns(sel[2], sel[0]),
        "build": lambda: build(*sel),
        "index": lambda: index(q, k),
        "flexprefill_index": lambda: flex(q, k),
    })
    for s in targets:
        method = VerticalAndSlash(sparsity=s)
        for label, (static, values) in (("", (method, {})), ("_traced", method.split())):
            fitted = jax.jit(functools.partial(target_index, method=static))
            built = fitted(q, k, values)
            r[f"column_slots_s{s}{label}"] = built.columns.shape[-1]
            r[f"max_columns_s{s}{label}"] = int(jnp.max(built.column_counts))
            del built  # at 128K the traced index alone is 32 GiB
            stages[f"index_s{s}{label}"] = functools.partial(fitted, q, k, values)
    for name, fn in tqdm(stages.items(), desc=f"stages T={t}", leave=False):
        r[f"{name}_ms"] = median_seconds(fn, reps) * 1e3


def time_end_to_end(q, k, v, reps: int, r: dict) -> None:
    """cuDNN vs index + Triton vertical-slash kernel (ms and speed-ups)."""
    t = q.shape[1]
    dense = median_seconds(lambda: cudnn_attention(q, k, v), reps)
    r["cudnn_ms"] = dense * 1e3
    index_fn = jax.jit(method_index)
    kernel = functools.partial(vertical_slash_attention, scale=SCALE, implementation="triton")
    whole = jax.jit(lambda q, k, v: kernel(q, k, v, method_index(q, k)))
    for kind in ("random", "banded"):
        qi, ki, vi = (q, k, v) if kind == "random" else make_qkv(4, t, banded=True)
        index = VerticalSlashIndex(*index_fn(qi, ki)[:4], vsi.TILE, vsi.TILE)  # block sizes back to ints
        r[f"{kind}_kernel_ms"] = median_seconds(lambda: kernel(qi, ki, vi, index), reps) * 1e3
        r[f"{kind}_total_ms"] = median_seconds(lambda: whole(qi, ki, vi), reps) * 1e3
        r[f"{kind}_speedup"] = dense * 1e3 / r[f"{kind}_total_ms"]
        r[f"{kind}_density"] = float(jnp.mean(vs_ref.attended_pairs(index, t))) / (t * (t + 1) / 2)
    local = local_vertical_slash_index(t)
    r["local_kernel_ms"] = median_seconds(lambda: kernel(q, k, v, local), reps) * 1e3
    r["local_total_ms"] = r["local_kernel_ms"] + r["index_ms"]
    r["local_speedup"] = dense * 1e3 / r["local_total_ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=[32768, 65536, 131072])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--targets", type=float, nargs="*", default=[], help="sparsity targets of the fitted index")
    parser.add_argument("--sweep-length", type=int, default=131072, help="time the score-layout candidates here")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "vs_estimation.json"))
    args = parser.parse_args()

    results: dict = {"device": str(jax.devices()[0]), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for t in tqdm(args.lengths, desc="lengths"):
        r = results.setdefault(str(t), {})
        q, k, v = make_qkv(3, t)
        time_stages(q, k, args.reps, r, sweep=t == args.sweep_length, targets=tuple(args.targets))
        if not args.skip_e2e:
            time_end_to_end(q, k, v, args.reps, r)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    for t in args.lengths:
        print(f"--- T={t}  ({HEADS} heads, d={HEAD_DIM})")
        for key, val in results[str(t)].items():
            print(f"  {key:24s} {val:10.3f}")


if __name__ == "__main__":
    main()
