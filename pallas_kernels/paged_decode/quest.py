"""Quest page selection (docs/reference_behaviour.md section 4.7) into the decode page table.

Each cached page keeps element-wise ``k_min`` / ``k_max`` of its keys. For a query ``q``
the largest possible ``q . k`` inside the page is
``sum_d max(q_d * min_d, q_d * max_d) = relu(q) . max + min(q, 0) . min``, so page scores
are two matrix products instead of a ``[pages, d]`` element-wise pass. Products are taken
in the inputs' dtype with fp32 accumulation (bf16 x bf16 products are exact in fp32);
with ``share_pages`` the group's relu parts are first summed in fp32.

Selection of one row (a KV head with ``share_pages``: group scores summed; else a query
head): ``n`` cached tokens (the newest included), current page ``c = (n - 1) // S``; the
``b = token_budget // S`` best complete pages ``p < c`` plus page ``c``, read with length
``b * S + (n - c * S)``. A row with ``c <= b`` has no more pages than the budget and
keeps all of them (the explicit dense fallback; the reference asserts instead).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def _dot(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)


def page_upper_bounds(
    q: jax.Array, k_min: jax.Array, k_max: jax.Array, page_table: jax.Array, *, share_pages: bool
) -> jax.Array:
    """Upper bound of ``q . k`` over each page of each row.

    Args:
      q: ``[B, H, d]`` query of the newest token.
      k_min, k_max: ``[G, N, d]`` per-page key summaries of each KV head's pool.
      page_table: ``[B, G, P]`` int32 pages of each (sequence, KV head).
      share_pages: sum the scores of each KV head's query group (one row per KV head)
        instead of scoring per query head.

    Returns:
      ``[B, G, P]`` (``share_pages``) or ``[B, H, P]`` fp32 scores; pages past a row's
      length hold meaningless values and must be masked by the caller.
    """
    b, h, d = q.shape
    g, num_pool_pages, _ = k_min.shape
    qg = jnp.swapaxes(q.reshape(b, g, h // g, d), 0, 1)  # [G, B, g, d]
    pos, neg = jnp.maximum(qg, 0), jnp.minimum(qg, 0)
    if share_pages:
        # Summed group scores are scores of the summed (fp32) relu parts: one row per KV head.
        pos = pos.astype(jnp.float32).sum(axis=2, keepdims=True)
        neg = neg.astype(jnp.float32).sum(axis=2, keepdims=True)
        k_min, k_max = k_min.astype(jnp.float32), k_max.astype(jnp.float32)
    else:
        pos, neg = pos.astype(k_max.dtype), neg.astype(k_min.dtype)
    if num_pool_pages <= b * page_table.shape[2]:
        # The tables cover the pool: score every pool page once per query head, then
        # pick each row's pages, instead of gathering summaries per row.
        spec = "jbnd,jpd->jbnp"
        scores = _dot(spec, pos, k_max) + _dot(spec, neg, k_min)  # [G, B, g or 1, N]
        idx = jnp.swapaxes(page_table, 0, 1)[:, :, None, :]  # [G, B, 1, P]
        rows = jnp.take_along_axis(scores, idx, axis=3)  # [G, B, g, P]
    else:
        heads = jnp.arange(g)[:, None, None]
        table = jnp.swapaxes(page_table, 0, 1)  # [G, B, P]
        spec = "jbnd,jbpd->jbnp"
        rows = _dot(spec, pos, k_max[heads, table]) + _dot(spec, neg, k_min[heads, table])
    rows = jnp.swapaxes(rows, 0, 1)  # [B, G, g or 1, P]
    return rows.reshape(b, -1, rows.shape[-1])


def select_pages(
    scores: jax.Array,
    page_table: jax.Array,
    lengths: jax.Array,
    *,
    page_size: int,
    token_budget: int,
    budget_pages: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The pages each row reads under the budget, as a page table for the decode kernels.

    Args:
      scores: ``[B, R, P]`` page scores (``R = G`` or ``H``), from :func:`page_upper_bounds`.
      page_table: ``[B, G, P]`` int32 cache page table.
      lengths: ``[B, G]`` int32 cached tokens per KV head, the newest included.
      page_size: tokens per page ``S``.
      token_budget: Quest's budget (the most tokens any row reads besides its current
        page); a multiple of ``page_size``.
      budget_pages: optional ``[B, R]`` int32 per-row earlier-page budgets
        (``<= token_budget // S``), e.g. from a target sparsity that scales with the
        cached length; default ``token_budget // S`` for every row.

    Returns:
      ``(table [B, R, b + 1], row_lengths [B, R])`` int32 with ``b = token_budget // S``:
      the chosen pool pages (best first, then the current page; later slots repeat it and
      are never read) and their valid tokens. If the cache table has no more than
      ``b + 1`` pages and no per-row budgets are given, it is returned unchanged (dense
      read; see :func:`reads_table_as_is`).
    """
    plan = plan_rows(page_table, lengths, scores.shape[1], page_size=page_size, token_budget=token_budget,
                     budget_pages=budget_pages)
    if plan.passthrough:
        return plan.table, plan.lengths
    eligible = jnp.arange(scores.shape[2])[None, None, :] < plan.current[..., None]
    _, best = jax.lax.top_k(jnp.where(eligible, scores, -jnp.inf), plan.max_pages)  # [B, R, b], best first
    return finish_rows(plan, best)


class RowPlan(NamedTuple):
    """What every selection of ``R`` rows shares (shapes ``[B, R]`` unless stated).

    Attributes:
      table: ``[B, R, P]`` the cache table row of each selection row.
      lengths: cached tokens per row, the newest included.
      current: the current (newest, maybe partial) page of each row.
      row_budget: earlier pages each row keeps.
      page_size: tokens per page ``S`` (static).
      max_pages: ``b = token_budget // S``, the widest row budget (static).
      passthrough: every row reads its whole table, as is (static; :func:`reads_table_as_is`).
    """

    table: jax.Array
    lengths: jax.Array
    current: jax.Array
    row_budget: jax.Array
    page_size: int
    max_pages: int
    passthrough: bool


def plan_rows(
    page_table: jax.Array,
    lengths: jax.Array,
    rows: int,
    *,
    page_size: int,
    token_budget: int,
    budget_pages: jax.Array | None = None,
) -> RowPlan:
    """Validate the budget and lay out the ``rows`` selection rows; arguments as in :func:`select_pages`."""
    if token_budget % page_size or token_budget <= 0:
        raise ValueError(f"token_budget ({token_budget}) must be a positive multiple of page_size ({page_size})")
    group = rows // page_table.shape[1]
    table = jnp.repeat(page_table, group, axis=1)  # [B, R, P]
    n = jnp.repeat(lengths, group, axis=1)
    max_pages = token_budget // page_size
    row_budget = jnp.full(n.shape, max_pages, jnp.int32) if budget_pages is None else budget_pages.astype(jnp.int32)
    current = current_page(n, page_size)
    passthrough = reads_table_as_is(page_table, page_size=page_size, token_budget=token_budget,
                                    budget_pages=budget_pages)
    return RowPlan(table, n, current, row_budget, page_size, max_pages, passthrough)


def reads_table_as_is(page_table: jax.Array, *, page_size: int, token_budget: int,
                      budget_pages: jax.Array | None) -> bool:
    """Whether every row reads its whole table (static): the budget covers every earlier
    page of the ``[B, G, P]`` table and no per-row budget can be smaller (a budget from a
    traced sparsity may be, while ``token_budget`` is its dense bound)."""
    return budget_pages is None and page_table.shape[2] <= token_budget // page_size + 1


def current_page(n: jax.Array, page_size: int) -> jax.Array:
    """The page holding the newest of ``n`` cached tokens (arrays or kernel scalars)."""
    return jnp.maximum(n - 1, 0) // page_size


def reads_all_pages(current: jax.Array, row_budget: jax.Array) -> jax.Array:
    """A row with no more earlier pages than its budget reads them all (the dense fallback)."""
    return current <= row_budget


def read_length(n: jax.Array, current: jax.Array, row_budget: jax.Array, page_size: int) -> jax.Array:
    """Tokens a row reads: all ``n`` when it reads every page, else ``row_budget`` whole
    earlier pages plus the current page's tokens."""
    return jnp.where(reads_all_pages(current, row_budget), n, (row_budget - current) * page_size + n)


def finish_rows(plan: RowPlan, best: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Turn each row's chosen earlier pages into the decode table.

    Args:
      plan: from :func:`plan_rows`.
      best: ``[B, R, b]`` table positions of earlier pages; slots ``>= row_budget`` are ignored.

    Returns:
      ``(table [B, R, b + 1], row_lengths [B, R])`` as :func:`select_pages` documents.
    """
    current, row_budget = plan.current, plan.row_budget
    slot = jnp.arange(plan.max_pages + 1)[None, None, :]
    best = jnp.concatenate([best, current[..., None]], axis=2)
    chosen = jnp.where(slot < row_budget[..., None], best, current[..., None])
    chosen = jnp.where(reads_all_pages(current, row_budget)[..., None], slot, chosen)
    row_lengths = read_length(plan.lengths, current, row_budget, plan.page_size)
    return jnp.take_along_axis(plan.table, chosen, axis=2), row_lengths.astype(jnp.int32)


def quest_page_table(
    q: jax.Array,
    k_min: jax.Array,
    k_max: jax.Array,
    page_table: jax.Array,
    lengths: jax.Array,
    *,
    page_size: int,
    token_budget: int,
    share_pages: bool,
    budget_pages: jax.Array | None = None,
    spare_columns: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """Score and select: ``(table [B, R, b + 1 + spare_columns], lengths [B, R])`` for the decode kernels.

    The base of the ``quest_page_table`` op (:mod:`pallas_kernels.paged_decode`); its
    kernel version (:func:`.quest_select.quest_page_table`) has this signature. Shapes as
    in :func:`page_upper_bounds` and :func:`select_pages`; ``R = G`` with ``share_pages``,
    else ``H``. ``spare_columns`` extra columns (the current page again, never read) follow
    the selected pages, so a decode kernel reading blocks of pages can take the table as it
    is; a table returned unchanged (no more pages than the budget) gets none.
    """
    scores = page_upper_bounds(q, k_min, k_max, page_table, share_pages=share_pages)
    table, row_lengths = select_pages(scores, page_table, lengths, page_size=page_size, token_budget=token_budget,
                                      budget_pages=budget_pages)
    if spare_columns and not reads_table_as_is(page_table, page_size=page_size, token_budget=token_budget,
                                               budget_pages=budget_pages):
        table = jnp.pad(table, ((0, 0), (0, 0), (0, spare_columns)), mode="edge")
    return table, row_lengths
