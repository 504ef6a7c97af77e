"""Inputs, tolerances and lowering helpers shared by the kernel tests.

fp32 paths differ from the references only in exp vs exp2 and summation order; bf16
kernels round the pre-scaled queries and the probabilities to bf16, as the reference
kernels do.
"""

import contextlib

import jax.numpy as jnp
import numpy as np
import pytest

TOL = {jnp.float32: dict(max_abs=2e-5, rel=1e-5), jnp.bfloat16: dict(max_abs=6e-2, rel=1.5e-2)}


def random_qkv(seed, t, h, g, d, dtype=jnp.float32, b=1):
    """``q [b, t, h, d]``, ``k, v [b, t, g, d]`` standard normal."""
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((b, t, n, d)), dtype) for n in (h, g, g))


def assert_close(out, ref, dtype):
    """Finite, max-abs and relative-norm error within ``TOL[dtype]``."""
    out = np.asarray(out, np.float32)
    ref = np.asarray(ref, np.float32)
    assert np.all(np.isfinite(out))
    tol = TOL[dtype]
    assert np.max(np.abs(out - ref)) <= tol["max_abs"]
    assert np.linalg.norm(out - ref) <= tol["rel"] * np.linalg.norm(ref)


@contextlib.contextmanager
def lowering_for_h100():
    """Lower Pallas Triton kernels as for an H100 on a machine without a GPU (Python-side
    lowering to Triton IR only); skips the test if this jax has no Triton lowering."""
    gpu_info = pytest.importorskip("jax._src.pallas.triton.gpu_info")
    registration = pytest.importorskip("jax._src.pallas.triton.pallas_call_registration")
    h100 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(registration.gpu_info_lib, "get_gpu_info", lambda: h100)
        yield
