"""This project's selections on one layer's real q/k against the reference framework's, as element masks.

Shared by `tests/test_fidelity.py` (two layers, on the reference's own bf16 tensors) and
`tests/test_fidelity_layers.py` (every layer of three prompts, on this project's own q/k). The reference side
comes from the fixtures of `tests/fixtures/make_fidelity_fixtures.py`: per configuration
`<method>@<budget>.<part>` its selection and its near-tie masks (candidates the reference scores within two bf16
steps of its selection boundary, which its own bf16 arithmetic or summation order could break either way).

Every selection is compared as a bool mask over its candidates (key blocks of a query block, keys, diagonal
offsets, kept tokens of a KV head, pages of a decode step and row). A differing element is *explained* when it
is a near-tie.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.paged_decode import quest_page_table
from sparse_jax.attention.base import LayerSpec
from sparse_jax.attention.kv_cache import PagedKVCache
from sparse_jax.attention.methods.block_sparse import block_sparse_index
from sparse_jax.attention.methods.flexprefill import flexprefill_scores
from sparse_jax.attention.methods.vertical_and_slash import vertical_and_slash_scores
from sparse_jax.attention.methods.vertical_slash_index import select_from_scores
from sparse_jax.attention.registry import get_method

BUDGET_LABELS = ("0.5", "0.9", "default")
BLOCK = PAGE = 16
VS_WINDOW, FLEX_WINDOW, FLEX_ALPHA = 256, 512, 0.65


class Agreement(NamedTuple):
    """Selected elements of the reference, elements in one selection only, and those of them not near a tie."""

    selected: int
    differing: int
    unexplained: int

    def plus(self, other: Agreement) -> Agreement:
        return Agreement(*(a + b for a, b in zip(self, other)))


def agreement(ours: np.ndarray, reference: np.ndarray, near_tie: np.ndarray) -> Agreement:
    """Counts over bool masks of one shape (``near_tie`` may be wider on the last axis)."""
    differ = ours ^ reference
    return Agreement(int(reference.sum()), int(differ.sum()), int((differ & ~near_tie[..., : differ.shape[-1]]).sum()))


def index_mask(indices: np.ndarray, width: int) -> np.ndarray:
    """``[..., n]`` int indices, ``-1`` padded -> ``[..., width]`` bool membership mask."""
    indices = np.asarray(indices).astype(np.int64)
    slots = np.where(indices >= 0, indices, width)
    mask = np.zeros(indices.shape[:-1] + (width + 1,), bool)
    np.put_along_axis(mask, slots, True, axis=-1)
    return mask[..., :width]


def unpack(bits: np.ndarray, width: int) -> np.ndarray:
    """Numpy-packed bits (last axis) -> ``[..., width]`` bool."""
    return np.unpackbits(bits, axis=-1, count=width).astype(bool)


class LayerCase(NamedTuple):
    """One layer of one prompt: the bf16 tensors this project's selections read, and the reference's selections.

    Attributes:
      q: ``[L, H, d]`` prompt queries (only the last 512 rows are read, by the window estimates).
      q_blocks: ``[L, H, d]`` the queries block-sparse pools per 16-token block.
      k: ``[L + steps, G, d]`` keys of the prompt and the decode steps.
      q_decode: ``[steps, H, d]`` the decode steps' queries.
      reference: ``<method>@<budget>.<part>`` -> the reference's arrays.
      budgets: ``<method>@<budget>`` -> the budget the reference ran with.
    """

    q: jax.Array
    q_blocks: jax.Array
    k: jax.Array
    q_decode: jax.Array
    reference: Mapping[str, np.ndarray]
    budgets: Mapping[str, dict]

    @property
    def length(self) -> int:
        return self.q.shape[0]

    @property
    def scale(self) -> float:
        return self.q.shape[-1] ** -0.5


# ---------------------------------------------------------------------------------------------- block-sparse


def reference_mask(case: LayerCase, method: str, label: str, part: str, width: int) -> np.ndarray:
    """The reference's selection ``<method>@<label>.<part>`` as bool ``[..., width]``: from the per-layer
    fixtures' tiers (``<method>.<part>.tier >= min_tier``), else stored as indices (-1 padded) or packed bits."""
    tiers = case.reference.get(f"{method}.{part}.tier")
    if tiers is not None:
        return tiers[..., :width] >= case.budgets[f"{method}@{label}"]["min_tier"]
    stored = case.reference[f"{method}@{label}.{part}"]
    return unpack(stored, width) if stored.dtype == np.uint8 else index_mask(stored, width)


# The selections below are jitted once per configuration (shapes and budgets) and reused for every layer.


@functools.cache
def _block_index(top: int, max_chunks: int):
    return jax.jit(lambda q, k, lengths: block_sparse_index(q, k, lengths, jnp.asarray([top]), block_size=BLOCK,
                                                            max_chunks=max_chunks))


def block_sparse_agreement(case: LayerCase, label: str) -> Agreement:
    name = f"block_sparse@{label}"
    top = case.budgets[name]["top_chunks"]
    length = case.length
    if label != "default":  # our closed-form budget equals the reference's search
        method = get_method("block_sparse", sparsity=float(label))
        assert int(method.top_chunks_for(jnp.asarray([length]), length)[0][0]) == top
    blocks = -(-length // BLOCK)
    index = _block_index(top, min(top, blocks))(case.q_blocks[None], case.k[None, :length], jnp.asarray([length]))
    ids, counts = np.asarray(index.block_ids[0]), np.asarray(index.counts[0])  # [H, nb, top], [H, nb]
    ours = index_mask(np.where(np.arange(ids.shape[-1]) < counts[..., None], ids, -1), blocks)
    reference = reference_mask(case, "block_sparse", label, "ids", blocks)
    ties = unpack(case.reference[f"{name}.near_tie"], blocks)
    return agreement(ours, reference, ties)


# ------------------------------------------------------------------------------- vertical-and-slash, FlexPrefill


class VerticalSlashAgreement(NamedTuple):
    verticals: Agreement
    slashes: Agreement
    budget_heads: int  # FlexPrefill: heads whose vertical or slash budget differs from the reference's

    def plus(self, other: VerticalSlashAgreement) -> VerticalSlashAgreement:
        return VerticalSlashAgreement(self.verticals.plus(other.verticals), self.slashes.plus(other.slashes),
                                      self.budget_heads + other.budget_heads)


@functools.cache
def _vertical_slash_selector(method: str, length: int, scale: float, base_v: int, base_s: int, nv_max: int,
                             ns_max: int):
    if method == "vertical_and_slash":
        scores = vertical_and_slash_scores(VS_WINDOW, length, scale)
    else:
        scores = flexprefill_scores(FLEX_WINDOW, length, scale, alpha=FLEX_ALPHA, max_budget=length)
    return jax.jit(lambda q, k, lengths: select_from_scores(scores, q, k, lengths, jnp.asarray([base_v]),
                                                            jnp.asarray([base_s]), nv_max=nv_max, ns_max=ns_max))


def vertical_slash_agreement(case: LayerCase, label: str, method: str) -> VerticalSlashAgreement:
    name = f"{method}@{label}"
    budgets = case.budgets[name]
    length = case.length
    q, k = case.q[None], case.k[None, :length]
    lengths = jnp.asarray([length])
    if method == "vertical_and_slash":
        nv, ns = budgets["vertical_size"], budgets["slash_size"]
        if label != "default":
            got = get_method(method, sparsity=float(label)).budgets_for(lengths, length)
            assert (int(got[0][0]), int(got[1][0])) == (nv, ns)
        selector = _vertical_slash_selector(method, length, case.scale, nv, ns, nv, ns)
    else:
        min_budget = budgets["min_budget"]
        if label != "default":
            assert int(get_method(method, sparsity=float(label)).min_budgets_for(lengths, length)[0][0]) == min_budget
        selector = _vertical_slash_selector(method, length, case.scale, min_budget, min_budget, length, length)
    selection = selector(q, k, lengths)
    v, v_valid, s, s_valid = (np.asarray(a[0]) for a in selection)
    ours_v = index_mask(np.where(v_valid, v, -1), length)
    ours_s = index_mask(np.where(s_valid, s, -1), length)
    ref = case.reference
    ref_v = reference_mask(case, method, label, "verticals", length)
    ref_s = reference_mask(case, method, label, "slashes", length)
    budget_heads = 0
    if method == "flexprefill":
        budget_heads = int(np.sum((ours_v.sum(-1) != ref[f"{name}.vertical_budgets"])
                                  | (ours_s.sum(-1) != ref[f"{name}.slash_budgets"])))
    return VerticalSlashAgreement(agreement(ours_v, ref_v, unpack(ref[f"{name}.vertical_near_tie"], length)),
                                  agreement(ours_s, ref_s, unpack(ref[f"{name}.slash_near_tie"], length)),
                                  budget_heads)


# ---------------------------------------------------------------------------------------- SnapKV, Ada-SnapKV


@functools.cache
def _compressor(method: str, budget: tuple[str, float], scale: float):
    """The method's prompt compression (``budget``: one keyword argument of the method, as a pair)."""
    compress = get_method(method, **dict([budget])).compress
    return jax.jit(lambda q, k, lengths: compress(q, k, jnp.zeros_like(k), lengths=lengths,
                                                  layer=LayerSpec(index=0, scale=scale)))


def eviction_agreement(case: LayerCase, label: str, method: str) -> Agreement:
    name = f"{method}@{label}"
    length = case.length
    capacity = case.budgets[name]["token_capacity"]
    q, k = case.q[None], case.k[None, :length]
    budget = ("token_capacity", capacity) if label == "default" else ("sparsity", float(label))
    kept = _compressor(method, budget, case.scale)(q, k, jnp.asarray([length]))
    indices, counts = np.asarray(kept.indices[0]), np.asarray(kept.counts[0])
    ours = index_mask(np.where(np.arange(indices.shape[-1]) < counts[:, None], indices, -1), length)
    reference = reference_mask(case, method, label, "kept", length)
    return agreement(ours, reference, unpack(case.reference[f"{name}.near_tie"], length))


# ------------------------------------------------------------------------------------------------------ Quest


_quest_page_table = jax.jit(quest_page_table, static_argnames=("page_size", "token_budget", "share_pages",
                                                              "implementation", "interpret"))


def quest_tables(case: LayerCase, label: str, share: bool, path: str) -> list[np.ndarray]:
    """Per decode step, ``[R, b]`` the earlier pages Quest reads; ``path`` is ``"jnp"`` or ``"kernel"`` (the
    Triton selection kernel, interpreted).

    One page table over every token serves all steps: step ``t`` passes ``n = L + t + 1`` cached tokens, and
    only complete pages before the current one (``< (n - 1) // 16``, untouched by later tokens) are scored.
    """
    kwargs = dict(share_pages=share) if label == "default" else dict(share_pages=share, sparsity=float(label))
    method = get_method("quest", **kwargs)
    tokens, groups, dim = case.k.shape
    cache = PagedKVCache.allocate(batch=1, num_kv_heads=groups, head_dim=dim, pages_per_row=-(-tokens // PAGE) + 1,
                                  page_size=PAGE, dtype=case.k.dtype)
    cache = cache.write_prompt(case.k[None], case.k[None], jnp.asarray([tokens], jnp.int32))
    tables = []
    for step in range(case.q_decode.shape[0]):
        n = case.length + step + 1
        budget = int(method.budget_tokens(jnp.asarray(n), PAGE)) if method.sparsity is not None else method.token_budget
        table, _ = _quest_page_table(case.q_decode[step][None], cache.k_min, cache.k_max, cache.page_table,
                                     jnp.full((1, groups), n, jnp.int32), page_size=PAGE, token_budget=budget,
                                     share_pages=share, implementation="xla" if path == "jnp" else "triton",
                                     interpret=path == "kernel")
        tables.append(np.asarray(table[0, :, : budget // PAGE]))
    return tables


def quest_agreement(case: LayerCase, label: str, share: bool, path: str = "jnp") -> Agreement:
    method = f"quest_{'shared' if share else 'per_head'}"
    steps = case.q_decode.shape[0]
    pages = (case.length + steps - 1) // PAGE  # the last step's current page
    want = reference_mask(case, method, label, "pages", pages)  # [steps, rows, pages]
    ties = case.reference[f"{method}@{label}.near_tie"]  # [steps, rows, packed pages]
    total = Agreement(0, 0, 0)
    for step, table in enumerate(quest_tables(case, label, share, path)):
        current = (case.length + step) // PAGE  # pages before it are the candidates of this step
        total = total.plus(agreement(index_mask(table, current), want[step, :, :current],
                                     unpack(ties[step], current)))
    return total
