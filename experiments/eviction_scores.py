"""Why two KV-eviction methods keep different tokens: their importance scores on a run's own prompts.

    .venv/bin/python experiments/eviction_scores.py SWEEP_FILE [--gin_param ...] [--samples 0 1 2] [--out FILE.json]

For the eviction runs of a sweep file (SnapKV, Ada-SnapKV, each at its own sparsity), takes samples of their
task (the records the sweep wrote: run the sweep first), captures the model's post-RoPE q/k of each prompt under
dense attention (:func:`sparse_jax.diagnostics.capture.capture_qk`, the run's dtype) and, in every layer the
methods thin (global layers), recomputes each method's own importance (:meth:`EvictionMethod.importance`) and
selection (``compress``). Per sample, layer and KV head it prints and (``--out``) writes:

- ``kept``: needle tokens each method keeps; ``rank``: the best needle token's rank among the prompt tokens
  that are not force-kept, against the slots the ranking fills (``C`` minus the forced tokens); the needle's
  score against the lowest kept score ("cut");
- ``only``: the tokens one method keeps and the other drops, by zone (``far``: more than 512 tokens before the
  estimation window, ``near``: the 512 before it, ``win``: inside it), with the share whose largest window
  probability (over rows and the group's heads) comes from a row before the question (the prompt text after
  its last blank line) and the median of that largest probability;
- the needle's largest window probability, per needle token, the row it comes from (question or text), and
  the needle's rank under variants of the reductions: the max over the question's rows only, the max and the
  mean-sum without average pooling;
- where the text's peaks come from: for the keys before the window (the needle and 10 tokens around it left
  out), their median largest probability, which query head of the group holds it, and how many keys of that
  (row, head) get at least half of it, with their most common spacing (a repeated text read by a copying head
  shows one key per repetition, spaced by the repetition's length).

Ends with a summary per layer over the samples. Reads the run folders, never writes them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from sparse_jax.attention.methods.eviction import Reduction
from sparse_jax.attention.methods.scoring import average_pool, window_probabilities
from sparse_jax.attention.methods.snapkv import EvictionMethod
from sparse_jax.diagnostics.capture import capture_qk
from sparse_jax.pipeline.runner import make_method, make_task, prepare, run_bundle
from sparse_jax.pipeline.sweep import expand

NEAR = 512
"""Tokens this close before the estimation window count as ``near``."""


def _zones(positions: np.ndarray, window_start: int) -> dict[str, int]:
    return {"far": int((positions < window_start - NEAR).sum()),
            "near": int(((positions >= window_start - NEAR) & (positions < window_start)).sum()),
            "win": int((positions >= window_start).sum())}


def _needle_rank(scores: np.ndarray, free: np.ndarray, needles: np.ndarray) -> int:
    """Rank (0 = best) of the best needle token among the ``free`` tokens by ``scores [T]``."""
    return int((np.where(free, scores, -np.inf) > scores[needles].max()).sum())


def window_peaks(q, k, length: int, scale: float, window: int):
    """Window probabilities of one KV head's group and where each key's largest one comes from.

    Args:
      q: ``[T, g, d]`` the group's queries; k: ``[T, d]``.

    Returns:
      ``probs [g, A, T]`` float32, ``row_positions [A]`` and ``peak_row [T]`` (prompt position of the row
      holding each key's largest probability over rows and heads).
    """
    probs, pos, _ = window_probabilities(q, k, jnp.asarray(length), window=min(window, length), scale=scale,
                                         prescale=True, round_to_bf16=True)
    probs, pos = np.asarray(probs), np.asarray(pos)
    best = probs.reshape(-1, probs.shape[-1]).argmax(axis=0) % probs.shape[1]
    return probs, pos, pos[best]


def text_peak_sources(probs: np.ndarray, keys: np.ndarray) -> dict:
    """Where the largest window probability of each of ``keys`` comes from (``probs [g, A, T]``)."""
    flat = probs.reshape(-1, probs.shape[-1])
    best = flat.argmax(axis=0)[keys]  # (head, row) of each key's peak
    peak = flat[best, keys]
    spikes = flat[best] >= 0.5 * peak[:, None]  # [keys, T]
    gaps = np.concatenate([np.diff(np.flatnonzero(s)) for s in spikes])
    return {"peak_median": float(np.median(peak)), "peak_p10_p90": np.percentile(peak, [10, 90]).tolist(),
            "peak_heads": np.bincount(best // probs.shape[1], minlength=probs.shape[0]).tolist(),
            "spikes_median": float(np.median(spikes.sum(axis=1))),
            "spacing_mode": int(np.bincount(gaps).argmax()) if gaps.size else None}


def layer_report(methods: dict[str, EvictionMethod], q, k, length: int, spec, needles: np.ndarray,
                 question_start: int) -> list[dict]:
    """Every method on one layer, per KV head (``q [T, H, d]``, ``k [T, G, d]``, ``T = length``)."""
    lengths = jnp.asarray([length], jnp.int32)
    first = next(iter(methods.values()))
    window_start = length - min(first.approximation_window, length)
    group = q.shape[1] // k.shape[1]
    heads = []
    for g in range(k.shape[1]):
        probs, rows, peak_row = window_peaks(q[:, g * group:(g + 1) * group], k[:, g], length, spec.scale,
                                             first.approximation_window)
        peak = probs.max(axis=(0, 1))
        kept, entry, free_of = {}, {}, {}
        for name, method in methods.items():
            scores = np.asarray(method.importance(q[None], k[None], lengths, spec.scale))[0, g]  # [T]
            selection = method.compress(q[None], k[None], k[None], lengths=lengths, layer=spec)
            ids = np.asarray(selection.indices[0, g, : int(selection.counts[0, g])])
            free = free_of[name] = np.isfinite(scores)
            kept[name], free_kept = ids, ids[free[ids]]
            entry[name] = {"needle_kept": int(np.isin(needles, ids).sum()), "slots": int(free_kept.size),
                           "needle_rank": _needle_rank(scores, free, needles),
                           "needle_score": float(scores[needles].max()), "cut": float(scores[free_kept].min())}
        for name in methods:
            only = kept[name]
            for other in methods:
                if other != name:
                    only = np.setdiff1d(only, kept[other])
            entry[name] |= {"only": int(only.size), "only_zones": _zones(only, window_start),
                            "only_peak_from_text_rows": float((peak_row[only] < question_start).mean())
                            if only.size else None,
                            "only_peak_median": float(np.median(peak[only])) if only.size else None}
        # The max-reduction's variants, ranked against the same free tokens and slots as the method's own.
        free = next(iter(free_of.values()))  # the first method's, computed above
        question_rows = probs[:, rows >= question_start]
        variants = {
            "max_question_rows": np.asarray(average_pool(jnp.asarray(question_rows.max(axis=(0, 1))),
                                                         first.kernel_size)),
            "max_unpooled": peak,
            "sum_unpooled": Reduction.MEAN_HEADS_SUM_WINDOW(probs),
        }
        text = np.setdiff1d(np.arange(window_start), np.arange(needles.min() - 10, needles.max() + 11))
        heads.append({"kv_head": g, "methods": entry, "needle_peak": float(peak[needles].max()),
                      "needle_token_peaks": [round(float(p), 4) for p in peak[needles]],
                      "text_peaks": text_peak_sources(probs, text),
                      "needle_peak_from_question": bool(peak_row[needles[peak[needles].argmax()]] >= question_start),
                      "variant_needle_rank": {v: _needle_rank(np.asarray(s), free, needles)
                                              for v, s in variants.items()}})
    return heads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_file")
    parser.add_argument("--gin_param", action="append", default=[])
    parser.add_argument("--samples", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    runs = [c for c in expand(args.sweep_file, args.gin_param) if isinstance(make_method(c), EvictionMethod)]
    if not runs:
        raise SystemExit(f"{args.sweep_file}: no eviction method (snapkv, ada_snapkv) among its runs")
    cfg = runs[0]
    methods = {f"{c.method}@{c.sparsity}": make_method(c) for c in runs}
    bundle = run_bundle(cfg)
    tokenizer, model = bundle.tokenizer, bundle.loaded.model
    task = make_task(cfg, tokenizer)
    records = {r["index"]: r for r in prepare(cfg, progress=False)}
    out = []
    for index in args.samples:
        record = records[index]
        text = record["input_text"]
        tokens = tokenizer.encode_for_generation(text)
        needles = np.asarray(tokenizer.prompt_positions(text, task.needle_spans(record)))
        question_start = tokenizer.prompt_positions(text, [(text.rstrip().rfind("\n\n") + 2, len(text))])[0]
        length = len(tokens)
        captured = capture_qk(model, jnp.asarray(tokens, jnp.int32))
        print(f"sample {index}: {length} tokens, needle at {needles.min()}-{needles.max()} "
              f"(depth {needles.min() / length:.2f}), question from {question_start}, gold {record['gold_answer']!r}")
        for layer in range(model.config.num_layers):
            spec = model.config.layer_spec(layer)
            if spec.sliding_window is not None:
                continue
            heads = layer_report(methods, captured.q[layer], captured.k[layer], length, spec, needles,
                                 question_start)
            out.append({"sample": index, "layer": layer, "length": length, "needles": needles.tolist(),
                        "question_start": question_start, "heads": heads})
            for h in heads:
                for name, m in h["methods"].items():
                    print(f"  L{layer} G{h['kv_head']} {name:16s} kept {m['needle_kept']}/{needles.size} rank "
                          f"{m['needle_rank']}/{m['slots']} score {m['needle_score']:.4f} cut {m['cut']:.4f} | only "
                          f"{m['only']} {m['only_zones']} peak from text rows {m['only_peak_from_text_rows']} "
                          f"peak median {m['only_peak_median']}")
                print(f"  L{layer} G{h['kv_head']} needle peak {h['needle_peak']:.4f} (from the question: "
                      f"{h['needle_peak_from_question']}), per token {h['needle_token_peaks']}; needle rank under "
                      f"{h['variant_needle_rank']}")
                print(f"  L{layer} G{h['kv_head']} text peaks {h['text_peaks']}")
    print_summary(out)
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))


def print_summary(rows: list[dict]) -> None:
    """Per layer over the samples: needle tokens kept, median needle rank per method and variant, text peaks."""
    print("\nlayer | method or variant | needle kept (mean) | needle rank (median) | slots (median)")
    for layer in sorted({r["layer"] for r in rows}):
        heads = [h for r in rows if r["layer"] == layer for h in r["heads"]]
        sizes = [len(r["needles"]) for r in rows if r["layer"] == layer for _ in r["heads"]]
        for name in heads[0]["methods"]:
            m = [h["methods"][name] for h in heads]
            kept = np.mean([x["needle_kept"] / n for x, n in zip(m, sizes)])
            print(f"L{layer} | {name} | {kept:.3f} | {np.median([x['needle_rank'] for x in m]):.0f} | "
                  f"{np.median([x['slots'] for x in m]):.0f}")
        for variant in heads[0]["variant_needle_rank"]:
            print(f"L{layer} | {variant} | - | {np.median([h['variant_needle_rank'][variant] for h in heads]):.0f} | -")
        print(f"L{layer} | needle peak (median) {np.median([h['needle_peak'] for h in heads]):.4f}; text peak "
              f"(median of medians) {np.median([h['text_peaks']['peak_median'] for h in heads]):.4f}")


if __name__ == "__main__":
    main()
