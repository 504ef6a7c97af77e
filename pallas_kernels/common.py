"""Helpers shared by every kernel family of ``pallas_kernels`` (the families never import
each other; whatever two of them need lives here).

Shapes (B batch, T tokens, H query heads, G KV heads, d head dim, bq / bk query / key
rows of one tile): attention inputs are ``q [B, T, H, d]`` and ``k/v [B, T, G, d]``.

Contents, in order:

* input checks shared by the attention kernels and their references;
* implementation choice: the names every op's `implementation=` takes, the default per
  platform and the table lookup;
* the fp32 base-2 online softmax that the GPU and TPU sparse-attention kernels fold key
  tiles with, and its query pre-scaling and sequence padding;
* the TPU scratch helpers (online-softmax state in VMEM, head chunks whose scalar
  prefetch fits SMEM);
* the jnp reference core: attention of each query block over a gathered key list, and
  the closed-form count of causal pairs in a tile;
* host-side padding of id lists (synthetic indices for tests and benchmarks);
* launch configurations per device kind (:func:`launch_entry`) and the Triton
  launch shape they share.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------- checks


def check_attention_inputs(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    """Raises ``ValueError`` naming the problem when q/k/v shapes do not fit together."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"expected q [B, T, H, d] and k/v [B, T, G, d], got q {q.shape}, k {k.shape}, v {v.shape}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k {k.shape} and v {v.shape} must have the same shape")
    b, t, h, d = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (b, t, d):
        raise ValueError(f"k/v {k.shape} must share batch, length and head dim with q {q.shape}")
    if h % k.shape[2]:
        raise ValueError(f"query heads ({h}) must be a multiple of KV heads ({k.shape[2]}); fix the head counts")


def check_index_shape(name: str, array: jax.Array, b: int, h: int, blocks: int) -> None:
    """Checks that a per-(batch, head, query block) index array matches the inputs."""
    if tuple(array.shape[:3]) != (b, h, blocks):
        raise ValueError(
            f"{name} has shape {array.shape}, expected leading dims (B={b}, H={h}, blocks={blocks}); "
            "build the index for these inputs and this block size"
        )


# Tile sides and head dims that the sparse-attention kernels have launch configs for.
SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)
SUPPORTED_HEAD_DIMS = (64, 128, 256)


# ----------------------------------------------------------------------------- implementations
# Every public op of a kernel family (``block_sparse_attention``, ``vertical_slash_attention``,
# ``paged_decode_attention``, ``quest_page_table``) takes ``implementation``, one of
#
# * ``None``: the best implementation for ``jax.default_backend()`` that covers the inputs
#   (each family states its rule), else ``"xla"``;
# * ``"xla"``: the jnp reference, on any platform;
# * ``"triton"``: the GPU kernel lowered through Triton;
# * ``"mosaic_gpu"``: the GPU kernel lowered through Mosaic GPU (Hopper);
# * ``"mosaic_tpu"``: the TPU kernel;
#
# as far as the family has them: its ``IMPLEMENTATIONS`` table maps each name to a function
# with the reference's signature plus ``interpret``. ``interpret=True`` runs a kernel in the
# Pallas interpreter (CPU tests; the reference ignores it); with ``implementation=None`` on a
# CPU it picks the family's GPU kernel, interpreted.

XLA = "xla"
TRITON = "triton"
MOSAIC_GPU = "mosaic_gpu"
MOSAIC_TPU = "mosaic_tpu"

Impl = TypeVar("Impl")


def platform_default(kernels: Mapping[str, str], *, interpret: bool, fits: bool = True) -> str:
    """The implementation ``None`` stands for.

    Args:
      kernels: the family's kernel per platform, e.g. ``{"gpu": "triton", "tpu": "mosaic_tpu"}``.
      interpret: the caller will interpret the kernel; off a GPU/TPU this picks the GPU kernel.
      fits: whether a kernel config covers the inputs; if not, the reference.
    """
    if not fits:
        return XLA
    platform = jax.default_backend()
    if platform in kernels:
        return kernels[platform]
    if interpret and "gpu" in kernels:
        return kernels["gpu"]
    return XLA


def is_hopper() -> bool:
    """Whether the default device is a Hopper GPU (compute capability 9.x), where the
    Mosaic GPU kernels (TMA, wgmma) run."""
    device = jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9.")


def lookup(op: str, table: Mapping[str, Impl], implementation: str) -> Impl:
    """``table[implementation]``, or a ``ValueError`` naming ``op`` and the valid names."""
    if implementation not in table:
        valid = ", ".join(repr(name) for name in table)
        raise ValueError(
            f"{op}: unknown implementation {implementation!r}; use one of {valid}, "
            "or None for the best one on this backend"
        )
    return table[implementation]


# ----------------------------------------------------------------------------- online softmax

LOG2_E = math.log2(math.e)

# (acc [bq, d], m [bq], l [bq]) of the base-2 online softmax.
Carry = tuple[jax.Array, jax.Array, jax.Array]


def init_carry(block_q: int, head_dim: int) -> Carry:
    """Empty accumulators: no key seen yet."""
    return (
        jnp.zeros((block_q, head_dim), jnp.float32),
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )


def online_softmax_step(carry: Carry, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> Carry:
    """Folds one key tile into the accumulators (plain jnp on tiles, so it lowers through
    Triton and Mosaic TPU alike).

    Args:
      carry: accumulators from :func:`init_carry`.
      q: ``[bq, d]`` queries pre-scaled by :func:`prescale_queries`.
      k: ``[bk, d]`` keys.
      v: ``[bk, d]`` values.
      mask: ``[bq, bk]`` bool of visible pairs, or ``None`` when all are visible (then
        no row can stay at ``-inf`` and the guards are skipped).
    """
    acc, m_i, l_i = carry
    s = jnp.dot(q, k.T, preferred_element_type=jnp.float32)
    if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
    m_new = jnp.maximum(m_i, s.max(axis=-1))
    if mask is not None:
        m_new_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    else:
        m_new_safe = m_new
    alpha = jnp.exp2(m_i - m_new_safe)
    p = jnp.exp2(s - m_new_safe[:, None])
    l_i = l_i * alpha + p.sum(axis=-1)
    acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return acc, m_new, l_i


def finish(carry: Carry) -> jax.Array:
    """``[bq, d]`` normalised output; rows that saw no key are zero."""
    acc, _, l_i = carry
    return acc / jnp.where(l_i > 0, l_i, 1.0)[:, None]


def prescale_queries(q: jax.Array, scale: float) -> jax.Array:
    """``q * scale * log2(e)`` rounded back to the input dtype, so scores feed ``exp2``
    directly (as the reference flash kernels do)."""
    return (q.astype(jnp.float32) * (scale * LOG2_E)).astype(q.dtype)


def pad_sequence(x: jax.Array, length: int) -> jax.Array:
    """Zero-pads ``x [B, T, ...]`` along ``T`` to ``length``."""
    pad = length - x.shape[1]
    if pad == 0:
        return x
    return jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))


# ----------------------------------------------------------------------------- TPU scratch

# Largest scalar-prefetched list (int32 entries) per TPU call; SMEM holds a few hundred KiB.
SMEM_LIST_INTS = 1 << 16


def head_chunks(num_heads: int, ints_per_head: int, group: int) -> list[tuple[int, int]]:
    """``[start, stop)`` query-head ranges whose lists fit ``SMEM_LIST_INTS``.

    Chunks are whole KV-head groups when possible so each call reads few KV heads.
    """
    per_call = max(1, SMEM_LIST_INTS // max(ints_per_head, 1))
    if per_call >= group:
        per_call -= per_call % group
    return [(h, min(h + per_call, num_heads)) for h in range(0, num_heads, per_call)]


def init_state(acc_ref, m_ref, l_ref) -> None:
    """Empty online-softmax state in VMEM scratch (``acc [bq, d]``, ``m/l [bq, 1]``)."""
    acc_ref[...] = jnp.zeros_like(acc_ref)
    m_ref[...] = jnp.full_like(m_ref, -jnp.inf)
    l_ref[...] = jnp.zeros_like(l_ref)


def load_state(acc_ref, m_ref, l_ref) -> Carry:
    """Online-softmax state from VMEM scratch (``m``/``l`` stored as ``[bq, 1]``)."""
    return acc_ref[...], m_ref[...][:, 0], l_ref[...][:, 0]


def store_state(state: Carry, acc_ref, m_ref, l_ref) -> None:
    """Writes ``state`` back to the VMEM scratch read by :func:`load_state`."""
    acc, m_i, l_i = state
    acc_ref[...] = acc
    m_ref[...] = m_i[:, None]
    l_ref[...] = l_i[:, None]


# ----------------------------------------------------------------------------- jnp reference core

# Key positions gathered per online-softmax step of the references.
KEY_CHUNK = 512

# ``keys_for_block(m) -> (key_pos [B, H, n], key_valid [B, H, n])`` for query block m.
KeyLister = Callable[[jax.Array], tuple[jax.Array, jax.Array]]


def gathered_key_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    keys_for_block: KeyLister,
    *,
    block_q: int,
    scale: float,
    key_chunk: int = KEY_CHUNK,
) -> jax.Array:
    """Causal attention of each query block over its own list of key positions.

    Memory stays bounded for long prompts: query blocks are visited one at a time
    (``lax.map``) and the listed keys are gathered ``key_chunk`` at a time into an fp32
    online softmax, so no ``[T, T]`` score matrix is built.

    Args:
      q: ``[B, T, H, d]`` queries.
      k: ``[B, T, G, d]`` keys; query head ``h`` reads KV head ``h // (H // G)``.
      v: ``[B, T, G, d]`` values.
      keys_for_block: maps a query-block number to ``(key_pos, key_valid)``, both
        ``[B, H, n]``; invalid entries are ignored. Each key is listed at most once.
      block_q: queries per block.
      scale: multiplier applied to ``q . k``.
      key_chunk: keys gathered per online-softmax step.

    Returns:
      ``[B, T, H, d]`` in ``q.dtype``. Query ``i`` sees the listed valid keys ``j`` with
      ``j <= i``; a row that sees none is zero.
    """
    b, t, h, d = q.shape
    g = k.shape[2]
    nq = -(-t // block_q)
    qb = jnp.pad(q, ((0, 0), (0, nq * block_q - t), (0, 0), (0, 0)))
    qb = qb.reshape(b, nq, block_q, h, d).transpose(1, 0, 3, 2, 4)  # [nq, B, H, bq, d]
    kt = k.transpose(0, 2, 1, 3)  # [B, G, T, d]
    vt = v.transpose(0, 2, 1, 3)
    batch_ix = jnp.arange(b)[:, None, None]
    head_ix = (jnp.arange(h) // (h // g))[None, :, None]

    def one_block(m):
        qm = qb[m].astype(jnp.float32) * scale  # [B, H, bq, d]
        q_pos = m * block_q + jnp.arange(block_q)
        pos, valid = keys_for_block(m)
        n = pos.shape[-1]
        n_chunks = -(-n // key_chunk)
        pad = ((0, 0), (0, 0), (0, n_chunks * key_chunk - n))
        pos = jnp.pad(pos, pad).reshape(b, h, n_chunks, key_chunk)
        valid = jnp.pad(valid, pad).reshape(b, h, n_chunks, key_chunk)
        valid &= pos < t
        pos = jnp.clip(pos, 0, t - 1)

        def step(carry, c):
            m_i, l_i, acc = carry
            pc = pos[:, :, c]  # [B, H, C]
            kc = kt[batch_ix, head_ix, pc].astype(jnp.float32)  # [B, H, C, d]
            vc = vt[batch_ix, head_ix, pc].astype(jnp.float32)
            s = jnp.einsum("bhqd,bhkd->bhqk", qm, kc)
            seen = valid[:, :, c][:, :, None, :] & (pc[:, :, None, :] <= q_pos[None, None, :, None])
            s = jnp.where(seen, s, -jnp.inf)
            m_new = jnp.maximum(m_i, s.max(-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(jnp.where(jnp.isfinite(m_i), m_i - m_safe, -jnp.inf))
            l_i = l_i * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + jnp.einsum("bhqk,bhkd->bhqd", p, vc)
            return (m_new, l_i, acc), None

        shape = (b, h, block_q)
        init = (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros(shape + (d,)))
        (_, l_i, acc), _ = jax.lax.scan(step, init, jnp.arange(n_chunks))
        return acc / jnp.where(l_i > 0, l_i, 1.0)[..., None]

    out = jax.lax.map(one_block, jnp.arange(nq))  # [nq, B, H, bq, d]
    out = out.transpose(1, 0, 3, 2, 4).reshape(b, nq * block_q, h, d)
    return out[:, :t].astype(q.dtype)


def causal_tile_pairs(q_lo: jax.Array, q_hi: jax.Array, k_lo: jax.Array, k_hi: jax.Array) -> jax.Array:
    """Number of pairs ``(i, j)`` with ``q_lo <= i < q_hi``, ``k_lo <= j < k_hi``, ``j <= i``.

    Closed form (no tile is materialised); inputs broadcast, result float32.
    """
    q_lo, q_hi, k_lo, k_hi = (jnp.asarray(x, jnp.float32) for x in (q_lo, q_hi, k_lo, k_hi))
    width = jnp.maximum(k_hi - k_lo, 0.0)
    # Rows k_lo <= i < k_hi - 1 see i + 1 - k_lo keys; rows i >= k_hi - 1 see all `width`.
    a_lo = jnp.maximum(q_lo, k_lo)
    n_a = jnp.maximum(jnp.minimum(q_hi, k_hi - 1.0) - a_lo, 0.0)
    ramp = n_a * (a_lo + 1.0 - k_lo) + n_a * (n_a - 1.0) / 2.0
    n_b = jnp.maximum(q_hi - jnp.maximum(q_lo, k_hi - 1.0), 0.0)
    return jnp.where(width > 0, ramp + n_b * width, 0.0)


# ----------------------------------------------------------------------------- synthetic indices


def pad_sorted_lists(ids: list[list[int]] | np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Ascending id lists -> ``([n, width]`` padded ids, ``[n]`` counts).

    Padding repeats each list's last id (0 for an empty list), as the index formats ask.
    """
    out = np.zeros((len(ids), width), np.int32)
    counts = np.zeros(len(ids), np.int32)
    for row, lst in enumerate(ids):
        lst = np.asarray(lst, np.int32)
        counts[row] = len(lst)
        if len(lst):
            out[row, : len(lst)] = lst
            out[row, len(lst) :] = lst[-1]
    return out, counts


# ----------------------------------------------------------------------------- launch configurations
#
# Each family's ``configs.py`` keeps a table {device kind: launch entry} (a frozen
# dataclass of that family's knobs) and reads it through :func:`launch_entry`. Keys are
# ``jax.devices()[0].device_kind`` strings. Entries come from measurements recorded in
# experiments/results/; a kind with no measurement yet repeats the H100 entry and says so.


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """Launch parameters of a Pallas-Triton kernel.

    Attributes:
      num_warps: warps per program.
      num_stages: software-pipelining depth of the key-tile loop.
    """

    num_warps: int
    num_stages: int


# Tiles above 64 queries x 64 keys x 128 dims need more warps to keep their fp32
# accumulators in registers.
LARGE_TILE_VOLUME = 64 * 64 * 128


@dataclasses.dataclass(frozen=True)
class TritonTileLaunch:
    """How a Triton attention kernel runs one ``rows x cols`` tile of ``head_dim``.

    Attributes:
      num_warps: warps for tiles of at most ``LARGE_TILE_VOLUME``.
      num_warps_large_tile: warps for larger tiles.
      num_stages: pipelining depth for head dims below 256.
      num_stages_d256: pipelining depth for head dim 256 (the tiles fill shared memory).
    """

    num_warps: int = 4
    num_warps_large_tile: int = 8
    num_stages: int = 3
    num_stages_d256: int = 2

    def for_tile(self, rows: int, cols: int, head_dim: int) -> TritonConfig:
        """The warps and stages of one tile."""
        large = rows * cols * head_dim > LARGE_TILE_VOLUME
        return TritonConfig(
            num_warps=self.num_warps_large_tile if large else self.num_warps,
            num_stages=self.num_stages_d256 if head_dim >= 256 else self.num_stages,
        )


# Device kinds as jax names them.
H100 = "NVIDIA H100 80GB HBM3"
H200 = "NVIDIA H200"
# Kinds missing from a table (other GPUs, TPUs, the CPU interpreter) use this entry:
# the H100 one, the only kind whose launches have all been measured.
FALLBACK_DEVICE_KIND = H100
# JSON {family: {field: value}} replacing fields of the looked-up entries, e.g.
# '{"paged_decode": {"target_programs": 1056}, "block_sparse": {"triton": {"num_warps": 8}}}'
# (a nested dataclass takes a nested object): lets a benchmark sweep launches through
# the whole engine and record the best as a new table entry.
LAUNCH_OVERRIDES_ENV = "PALLAS_KERNELS_LAUNCH"

Entry = TypeVar("Entry")


def device_kind() -> str:
    """``device_kind`` of the default device (``"cpu"`` on the CPU backend)."""
    return jax.devices()[0].device_kind


def launch_entry(
    table: Mapping[str, Entry],
    family: str,
    *,
    kind: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Entry:
    """The launch entry of ``family`` for a device kind.

    Args:
      table: entries keyed by device kind; must hold ``FALLBACK_DEVICE_KIND``.
      family: the family's name in ``$PALLAS_KERNELS_LAUNCH`` (e.g. ``"paged_decode"``).
      kind: device kind; default :func:`device_kind`. An exact key, else the fallback.
      overrides: fields to replace; default the family's part of
        ``$PALLAS_KERNELS_LAUNCH`` (none when unset).
    """
    entry = table.get(kind or device_kind(), table[FALLBACK_DEVICE_KIND])
    if overrides is None:
        overrides = _env_overrides().get(family, {})
    return _replace_fields(entry, overrides, family)


def _env_overrides() -> dict[str, Any]:
    text = os.environ.get(LAUNCH_OVERRIDES_ENV, "").strip()
    if not text:
        return {}
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"${LAUNCH_OVERRIDES_ENV} is not valid JSON ({err}); set it to an object such as "
            '\'{"paged_decode": {"num_warps": 8}}\' or unset it'
        ) from None
    if not isinstance(parsed, dict) or not all(isinstance(v, dict) for v in parsed.values()):
        raise ValueError(f"${LAUNCH_OVERRIDES_ENV} must map family names to objects of fields; got {text!r}")
    return parsed


def _replace_fields(entry: Entry, overrides: Mapping[str, Any], where: str) -> Entry:
    known = {f.name for f in dataclasses.fields(entry)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"launch override {where}.{unknown[0]} is not a field; choose from {sorted(known)}")
    changes = {}
    for name, value in overrides.items():
        current = getattr(entry, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ValueError(f"launch override {where}.{name} must be an object of fields; got {value!r}")
            value = _replace_fields(current, value, f"{where}.{name}")
        changes[name] = value
    return dataclasses.replace(entry, **changes)
