"""Device-memory plan of a generation run, checked before anything is allocated.

The KV cache is exact (pages x page size x head dim x layers); weights are counted
from the parameter pytree; activations are an estimate of the largest live set of
one prefill micro-batch (residual stream, attention projections, MLP) or of one decode
step of the jnp paged reference (which gathers a layer's whole cache in fp32).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from sparse_jax.models.config import ModelConfig

# Dense prefills up to this many tokens build the full [T, T] fp32 score matrix per head
# (sparse_jax.attention.dense._DIRECT_MAX_TOKENS); longer ones work in chunks.
_DIRECT_ATTENTION_TOKENS = 1024


class InsufficientMemoryError(MemoryError):
    """The planned run does not fit; raised before any cache is allocated."""


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says a batch did not fit: the plan's :class:`InsufficientMemoryError`, a
    host :class:`MemoryError`, or XLA's ``RESOURCE_EXHAUSTED`` from the device allocator (which
    the plan can miss: it estimates activations, and a shared or fragmented device can fail a
    request the plan counted as free)."""
    if isinstance(error, MemoryError):
        return True
    return isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error)


def gib_text(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes a run needs against what the device offers.

    Attributes:
      cache_bytes: K/V pages plus page summaries of every layer (exact).
      activation_bytes: estimated peak working set of a prefill micro-batch or decode step.
      weight_bytes: model parameters (already resident, counted in ``in_use_bytes``
        when the limit comes from device statistics).
      limit_bytes: usable device memory.
      in_use_bytes: memory already taken before the run.
      source: where ``limit_bytes`` came from.
    """

    cache_bytes: int
    activation_bytes: int
    weight_bytes: int
    limit_bytes: int
    in_use_bytes: int
    source: str

    @property
    def required_bytes(self) -> int:
        return self.cache_bytes + self.activation_bytes

    @property
    def free_bytes(self) -> int:
        return self.limit_bytes - self.in_use_bytes

    @property
    def fits(self) -> bool:
        return self.required_bytes <= self.free_bytes

    def describe(self) -> str:
        return (
            f"KV cache {gib_text(self.cache_bytes)} + activations ~{gib_text(self.activation_bytes)} "
            f"= {gib_text(self.required_bytes)} needed; free {gib_text(self.free_bytes)} "
            f"(limit {gib_text(self.limit_bytes)} from {self.source}, in use {gib_text(self.in_use_bytes)}, "
            f"weights {gib_text(self.weight_bytes)})"
        )

    def check(self) -> None:
        """Raise :class:`InsufficientMemoryError` with the numbers when the run does not fit."""
        if not self.fits:
            raise InsufficientMemoryError(
                f"generation run does not fit in memory: {self.describe()}. Reduce the batch size, "
                "max_new_tokens or the prompt-length bucket, use a smaller prefill micro-batch, "
                "or raise EngineConfig.memory_limit_bytes if the limit is wrong."
            )


def cache_bytes(config: ModelConfig, *, batch: int, pages_per_row: int, page_size: int, dtype: jnp.dtype) -> int:
    """Exact bytes of the per-layer page pools (K, V) and key summaries (min, max)."""
    item = jnp.dtype(dtype).itemsize
    pages = batch * pages_per_row * config.num_kv_heads
    per_layer = pages * config.head_dim * item * (2 * page_size + 2)
    return config.num_layers * per_layer


def activation_bytes(
    config: ModelConfig, *, prefill_rows: int, bucket: int, batch: int, capacity: int, dtype: jnp.dtype
) -> int:
    """Estimated peak live activations: max of one prefill micro-batch and one decode step."""
    item = jnp.dtype(dtype).itemsize
    q_dim = config.num_heads * config.head_dim
    kv_dim = config.num_kv_heads * config.head_dim
    per_token = item * (3 * config.hidden_size + 2 * q_dim + 2 * kv_dim + 3 * config.intermediate_size)
    direct = min(bucket, _DIRECT_ATTENTION_TOKENS)
    scores = 4 * config.num_heads * direct * direct
    prefill = prefill_rows * (bucket * per_token + scores + 4 * config.vocab_size)
    decode_gather = 2 * 4 * batch * config.num_kv_heads * capacity * config.head_dim
    decode = batch * (per_token + 4 * config.vocab_size) + decode_gather
    return max(prefill, decode)


def pytree_bytes(tree) -> int:
    """Total bytes of the arrays in ``tree``."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def device_budget(weight_bytes: int, limit_bytes: int | None = None) -> tuple[int, int, str]:
    """``(limit, in_use, source)`` of the default device.

    A configured ``limit_bytes`` wins (weights count as in use); otherwise the device's
    memory statistics (GPU/TPU); otherwise the host's memory (CPU): what the kernel reports
    available now (``MemAvailable``: other processes' memory is not ours to plan with) plus
    the weights this process already holds.
    """
    if limit_bytes is not None:
        return limit_bytes, weight_bytes, "EngineConfig.memory_limit_bytes"
    stats = jax.local_devices()[0].memory_stats() or {}  # jax.devices()[0] may belong to another process
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]), int(stats.get("bytes_in_use", 0)), "device memory stats"
    available = host_available_bytes()
    if available is None:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), weight_bytes, "host physical memory"
    return available + weight_bytes, weight_bytes, "host available memory"


def host_available_bytes() -> int | None:
    """The kernel's estimate of memory available without swapping (Linux ``MemAvailable``), if known."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def plan_memory(
    config: ModelConfig,
    *,
    batch: int,
    bucket: int,
    pages_per_row: int,
    page_size: int,
    prefill_rows: int,
    cache_dtype: jnp.dtype,
    weight_bytes: int,
    limit_bytes: int | None = None,
) -> MemoryPlan:
    """The :class:`MemoryPlan` of one batch (call :meth:`MemoryPlan.check` before allocating)."""
    limit, in_use, source = device_budget(weight_bytes, limit_bytes)
    return MemoryPlan(
        cache_bytes=cache_bytes(config, batch=batch, pages_per_row=pages_per_row, page_size=page_size, dtype=cache_dtype),
        activation_bytes=activation_bytes(
            config,
            prefill_rows=prefill_rows,
            bucket=bucket,
            batch=batch,
            capacity=pages_per_row * page_size,
            dtype=cache_dtype,
        ),
        weight_bytes=weight_bytes,
        limit_bytes=limit,
        in_use_bytes=in_use,
        source=source,
    )
