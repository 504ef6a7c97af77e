"""Block-sparse causal attention for Hopper GPUs: Pallas Mosaic GPU (wgmma + TMA).

The structure follows the FlashAttention-3 kernel of
``jax/experimental/pallas/ops/gpu/attention_mgpu.py``: per program one 128-query block
of one (batch, query head), split between two compute warpgroups (64 rows each) that
share one K/V stream, plus a memory warpgroup that issues TMA copies of K/V tiles into a
ring of shared-memory slots. Here the memory warpgroup reads the key-block list, so only
listed blocks are copied, and both compute warpgroups walk the same list (the first
``n_full`` entries without a mask, the rest with the causal mask).

Only ``block_size == 128`` (two 64-row warpgroups, 128-key tiles), ``d`` in {64, 128} and
16-bit inputs are covered (:func:`pallas_kernels.block_sparse.configs.mosaic_config`);
:mod:`.gpu_triton` serves everything else. Mosaic GPU has no CPU interpreter here, so
this kernel is checked on the device (``experiments/benchmarks/prefill_kernels.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.block_sparse.configs import MOSAIC_BLOCK_SIZE, MosaicConfig, mosaic_config
from pallas_kernels.block_sparse.index import BlockSparseIndex
from pallas_kernels.block_sparse.reference import check_index
from pallas_kernels.common import check_attention_inputs, pad_sequence, prescale_queries

BLOCK = MOSAIC_BLOCK_SIZE  # Query block = key block = index block size.
ROWS = BLOCK // 2  # Query rows per compute warpgroup.


def supports(block_size: int, head_dim: int, dtype) -> bool:
    """Whether this kernel covers the shape class (else use the Triton kernel)."""
    is_16bit = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return is_16bit and mosaic_config(block_size, head_dim) is not None


def causal_prefix(block_ids: jax.Array, counts: jax.Array) -> jax.Array:
    """``[B, H, nq, 2]`` int32: listed causal blocks (ids <= the query block) and, among
    them, those strictly before it (no mask needed). Lists are ascending."""
    m = jnp.arange(block_ids.shape[2])[:, None]
    live = jnp.arange(block_ids.shape[-1]) < counts[..., None]
    causal = jnp.sum(live & (block_ids <= m), axis=-1, dtype=jnp.int32)
    before = jnp.sum(live & (block_ids < m), axis=-1, dtype=jnp.int32)
    return jnp.stack([causal, before], axis=-1)


def _forward(ids, meta, q, k, v, *, group: int, stages: int):
    b, t, h, d = q.shape
    nq = t // BLOCK
    dtype = q.dtype

    def kernel(ids_ref, meta_ref, q_ref, k_ref, v_ref, out_ref, scoped):
        batch, q_head = lax.axis_index("batch"), lax.axis_index("heads")
        m = nq - 1 - lax.axis_index("q_seq")  # Longest rows first.
        (qo_smem2, k_smem, v_smem), (k_bars, v_bars, q_bars), (k_used, v_used), schedule = scoped
        wg = lax.axis_index("wg")
        n_steps = meta_ref[batch, q_head, m, 0]
        n_full = meta_ref[batch, q_head, m, 1]

        def schedule_barrier():
            plgpu.barrier_arrive(schedule)
            plgpu.barrier_wait(schedule)

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            qo_smem = qo_smem2.at[wg]
            q_base = m * BLOCK + wg * ROWS
            plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q_base, ROWS), q_head], qo_smem, q_bars.at[wg])
            plgpu.barrier_wait(q_bars.at[wg])
            m_i = plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            l_i = plgpu.layout_cast(jnp.full((ROWS,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            acc = plgpu.layout_cast(jnp.full((ROWS, d), 0, jnp.float32), plgpu.Layout.WGMMA)

            @pl.when(n_steps > 0)
            def _():
                plgpu.barrier_wait(k_bars.at[0])

            pl.when(wg == 1)(schedule_barrier)

            def step(j, carry, masked):
                acc, m_i, l_i = carry
                slot = lax.rem(j, jnp.array(stages, j.dtype))

                def qk_scope(acc_ref):
                    plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
                    schedule_barrier()
                    return acc_ref[...]

                s = pl.run_scoped(qk_scope, plgpu.ACC((ROWS, BLOCK), jnp.float32))
                plgpu.barrier_arrive(k_used.at[slot])
                if masked:
                    rows = plgpu.broadcasted_iota(jnp.int32, (ROWS, BLOCK), 0, layout=plgpu.Layout.WGMMA)
                    cols = plgpu.broadcasted_iota(jnp.int32, (ROWS, BLOCK), 1, layout=plgpu.Layout.WGMMA)
                    s = jnp.where(rows + q_base >= cols + ids_ref[batch, q_head, m, j] * BLOCK, s, -jnp.inf)
                # Queries are pre-scaled by scale * log2(e): scores feed exp2 directly.
                m_new = jnp.maximum(m_i, s.max(axis=1))
                alpha = jnp.exp2(m_i - m_new)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
                acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
                l_i = l_i * alpha + p.sum(axis=1)
                p16 = p.astype(dtype)
                acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
                plgpu.barrier_arrive(schedule)
                plgpu.barrier_wait(v_bars.at[slot])
                plgpu.barrier_wait(schedule)

                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                    nxt = j + 1
                    nxt_slot = lax.rem(nxt, jnp.array(stages, j.dtype))

                    @pl.when(nxt < n_steps)
                    def _():
                        plgpu.barrier_wait(k_bars.at[nxt_slot])

                acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_used.at[slot])
                return acc, m_new, l_i

            carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), (acc, m_i, l_i))
            acc, m_i, l_i = lax.fori_loop(n_full, n_steps, functools.partial(step, masked=True), carry)
            pl.when(wg == 0)(schedule_barrier)
            # Rows that saw a key have l >= 1; rows with an empty list keep acc = 0.
            acc /= lax.broadcast_in_dim(jnp.maximum(l_i, 1e-30), (ROWS, d), [0])
            qo_smem[...] = acc.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[batch, pl.ds(q_base, ROWS), q_head])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")
            kv_head = lax.div(q_head, jnp.array(group, q_head.dtype))

            def fetch(j, slot):
                rows = (batch, pl.ds(ids_ref[batch, q_head, m, j] * BLOCK, BLOCK), kv_head)
                plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_bars.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_bars.at[slot])

            for i in range(stages):
                pl.when(i < n_steps)(functools.partial(fetch, i, i))

            @pl.loop(0, jnp.maximum(n_steps - stages, 0))
            def _(j):
                slot = lax.rem(j, jnp.array(stages, j.dtype))
                plgpu.barrier_wait(k_used.at[slot])
                plgpu.barrier_wait(v_used.at[slot])
                fetch(j + stages, slot)

    def entry(ids_ref, meta_ref, q_ref, k_ref, v_ref, out_ref):
        layout = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        smem = (
            plgpu.SMEM((2, ROWS, d), dtype, transforms=layout),
            plgpu.SMEM((stages, BLOCK, d), dtype, transforms=layout),
            plgpu.SMEM((stages, BLOCK, d), dtype, transforms=layout),
        )
        loaded = (
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=2),
        )
        used = (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2
        pl.run_scoped(
            lambda *scoped: kernel(ids_ref, meta_ref, q_ref, k_ref, v_ref, out_ref, scoped),
            smem, loaded, used, plgpu.Barrier(num_arrivals=2),
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        grid=(h, nq, b),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(ids, meta, q, k, v)


@functools.partial(jax.jit, static_argnames=("scale", "config"))
def _call(q, k, v, block_ids, counts, *, scale: float, config: MosaicConfig):
    t = q.shape[1]
    padded = block_ids.shape[2] * BLOCK
    q = prescale_queries(q, scale)
    q, k, v = (pad_sequence(x, padded) for x in (q, k, v))
    meta = causal_prefix(block_ids, counts)
    out = _forward(block_ids, meta, q, k, v, group=q.shape[2] // k.shape[2], stages=config.stages)
    return out[:, :t]


def block_sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    index: BlockSparseIndex,
    *,
    scale: float,
    config: MosaicConfig | None = None,
) -> jax.Array:
    """Block-sparse causal attention (Mosaic GPU, Hopper); same contract as
    :func:`pallas_kernels.block_sparse.gpu_triton.block_sparse_attention`."""
    check_attention_inputs(q, k, v)
    check_index(q, index)
    if not supports(int(index.block_size), q.shape[-1], q.dtype):
        raise ValueError(
            f"the Mosaic GPU kernel needs block_size {BLOCK}, head_dim 64 or 128 and bf16/f16 inputs; "
            f"got {index.block_size}, {q.shape[-1]}, {q.dtype}: use gpu_triton instead"
        )
    config = config or mosaic_config(int(index.block_size), q.shape[-1])
    return _call(q, k, v, index.block_ids, index.counts, scale=scale, config=config)
