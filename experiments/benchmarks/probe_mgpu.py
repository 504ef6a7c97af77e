"""Throwaway probe: can a Mosaic-GPU kernel read block ids (dynamic scalar loads), and how
fast is the stock Hopper FA3 kernel here (the ceiling a Mosaic block-sparse port would reach)."""
import math, statistics, time, traceback
import jax, jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

def probe(mode):
    n = 8
    ids = jnp.array([3, 1, 4, 1, 5, 2, 6, 0], jnp.int32)
    x = jax.random.normal(jax.random.key(0), (n * 128, 64), jnp.float32).astype(jnp.bfloat16)
    def body(ids_ref, x_ref, o_ref):
        i = lax.axis_index("x")
        def scoped(smem, ids_smem, bar):
            if mode == "gmem":
                j = ids_ref[i]
            else:
                plgpu.copy_gmem_to_smem(ids_ref, ids_smem, bar.at[1])
                plgpu.barrier_wait(bar.at[1])
                j = ids_smem[i]
            plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(j * 128, 128)], smem, bar.at[0])
            plgpu.barrier_wait(bar.at[0])
            plgpu.copy_smem_to_gmem(smem, o_ref.at[pl.ds(i * 128, 128)])
            plgpu.wait_smem_to_gmem(0)
        pl.run_scoped(scoped, plgpu.SMEM((128, 64), jnp.bfloat16), plgpu.SMEM((n,), jnp.int32),
                      plgpu.Barrier(num_barriers=2))
    out = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(n,), grid_names=("x",))(ids, x)
    want = x.reshape(n, 128, 64)[ids].reshape(x.shape)
    print(mode, "ok" if bool(jnp.all(out == want)) else "WRONG")

for mode in ("gmem", "smem"):
    try:
        probe(mode)
    except Exception as e:
        print(mode, "FAILED", type(e).__name__, str(e)[:400])

from jax.experimental.pallas.ops.gpu import attention_mgpu as fa3
for t in (32768, 131072):
    ks = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(ks[0], (1, t, 32, 128), jnp.bfloat16)
    k = jax.random.normal(ks[1], (1, t, 8, 128), jnp.bfloat16)
    v = jax.random.normal(ks[2], (1, t, 8, 128), jnp.bfloat16)
    for bq, bkv, steps in ((64, 128, 2), (64, 64, 3), (64, 128, 3)):
        try:
            cfg = fa3.TuningConfig(block_q=bq, block_kv=bkv, max_concurrent_steps=steps, causal=True)
            f = lambda: fa3.attention(q, k, v, cfg)
            jax.block_until_ready(f())
            ts = []
            for _ in range(3):
                t0 = time.perf_counter(); jax.block_until_ready(f()); ts.append(time.perf_counter() - t0)
            s = statistics.median(ts)
            print(t, bq, bkv, steps, f"{s*1e3:.2f} ms", f"{4*32*128*t*(t+1)/2/s/1e12:.0f} TFLOP/s causal")
        except Exception as e:
            print(t, bq, bkv, steps, "FAILED", type(e).__name__, str(e)[:300])
