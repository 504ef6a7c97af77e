"""Block-sparse attention: jnp reference vs a dense masked oracle, Pallas kernels vs the
reference (GPU kernel in Triton interpret mode, TPU kernel in TPU interpret mode)."""

from __future__ import annotations

import numpy as np
import pytest
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.block_sparse import (
    block_sparse_attention,
    configs,
    default_implementation,
    gpu_mosaic,
    gpu_triton,
    reference,
    tpu,
)
from pallas_kernels.block_sparse.index import BlockSparseIndex
from pallas_kernels.block_sparse.synthetic import random_block_sparse_index
from sparse_jax.attention.dense import dense_causal_attention
from kernel_test_utils import assert_close, random_qkv



@pytest.mark.parametrize(
    "t,h,g,bs,density,empty",
    [(77, 4, 4, 8, 0.4, 0.1), (50, 8, 2, 16, 0.01, 0.3)],
)
def test_reference_matches_masked_oracle(t, h, g, bs, density, empty):
    q, k, v = random_qkv(0, t, h, g, 16, b=2)
    index = random_block_sparse_index(np.random.default_rng(1), 2, h, t, bs, density, empty_fraction=empty)
    out = reference.block_sparse_attention(q, k, v, index, scale=0.3, key_chunk=32)
    mask = reference.index_to_mask(index, t)
    assert_close(out, reference.masked_attention(q, k, v, mask, scale=0.3), jnp.float32)
    np.testing.assert_allclose(reference.attended_pairs(index, t), mask.sum((-1, -2)), rtol=0)


def test_empty_rows_are_zero():
    q, k, v = random_qkv(2, 40, 2, 1, 16)
    index = random_block_sparse_index(np.random.default_rng(2), 1, 2, 40, 8, 0.5)
    index = index._replace(counts=index.counts.at[0, 1, 2].set(0))
    out = reference.block_sparse_attention(q, k, v, index, scale=0.25)
    assert np.all(np.asarray(out[0, 16:24, 1]) == 0)
    assert np.any(np.asarray(out[0, 16:24, 0]) != 0)


def test_all_blocks_equals_dense_causal():
    q, k, v = random_qkv(3, 90, 4, 2, 32)
    nq = 6
    ids = jnp.minimum(jnp.arange(nq)[None, :], jnp.arange(nq)[:, None])
    index = BlockSparseIndex(
        jnp.broadcast_to(ids, (1, 4, nq, nq)).astype(jnp.int32),
        jnp.broadcast_to(jnp.arange(1, nq + 1), (1, 4, nq)).astype(jnp.int32),
        16,
    )
    out = reference.block_sparse_attention(q, k, v, index, scale=0.2)
    assert_close(out, dense_causal_attention(q, k, v, scale=0.2), jnp.float32)


# GQA ratios 1/4/8, head dims 64/128/256, odd lengths, one block to all blocks, empty rows.
KERNEL_CASES = [
    (77, 4, 4, 64, 16, 0.5, 0.1, jnp.float32),
    (100, 8, 2, 64, 32, 1.0, 0.0, jnp.bfloat16),
    (40, 8, 1, 128, 16, 0.01, 0.2, jnp.float32),
    (33, 2, 1, 256, 16, 0.6, 0.0, jnp.bfloat16),
]


@pytest.mark.parametrize("t,h,g,d,bs,density,empty,dtype", KERNEL_CASES)
def test_gpu_kernel_matches_reference(t, h, g, d, bs, density, empty, dtype):
    q, k, v = random_qkv(4, t, h, g, d, dtype)
    index = random_block_sparse_index(np.random.default_rng(5), 1, h, t, bs, density, empty_fraction=empty)
    out = gpu_triton.block_sparse_attention(q, k, v, index, scale=d**-0.5, interpret=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, reference.block_sparse_attention(q, k, v, index, scale=d**-0.5), dtype)


@pytest.mark.parametrize(
    "t,h,g,d,density,empty,dtype",
    [(40, 2, 1, 64, 0.5, 0.3, jnp.float32), (45, 4, 1, 128, 1.0, 0.0, jnp.bfloat16)],
)
def test_tpu_kernel_matches_reference(t, h, g, d, density, empty, dtype):
    q, k, v = random_qkv(6, t, h, g, d, dtype)
    index = random_block_sparse_index(np.random.default_rng(7), 1, h, t, 16, density, empty_fraction=empty)
    out = tpu.block_sparse_attention(q, k, v, index, scale=d**-0.5, interpret=pltpu.InterpretParams())
    assert_close(out, reference.block_sparse_attention(q, k, v, index, scale=d**-0.5), dtype)


def test_dispatch_xla_implementation_and_unknown_name():
    q, k, v = random_qkv(8, 30, 2, 1, 16)
    index = random_block_sparse_index(np.random.default_rng(8), 1, 2, 30, 8, 0.5)
    out = block_sparse_attention(q, k, v, index, scale=0.25, implementation="xla")
    assert_close(out, reference.block_sparse_attention(q, k, v, index, scale=0.25), jnp.float32)
    valid = "'xla', 'triton', 'mosaic_gpu', 'mosaic_tpu'"
    with pytest.raises(ValueError, match=f"block_sparse_attention: unknown implementation 'cuda'; use one of {valid}"):
        block_sparse_attention(q, k, v, index, scale=0.25, implementation="cuda")


def test_default_implementation_on_cpu():
    """``None`` on a CPU: the reference, or the Triton kernel when interpreted and a config fits."""
    fitting = random_block_sparse_index(np.random.default_rng(9), 1, 2, 64, 16, 0.5)
    q, k, v = random_qkv(9, 64, 2, 1, 64)
    assert default_implementation(q, fitting, interpret=False) == "xla"
    assert default_implementation(q, fitting, interpret=True) == "triton"
    odd_block = random_block_sparse_index(np.random.default_rng(9), 1, 2, 64, 8, 0.5)
    assert default_implementation(q, odd_block, interpret=True) == "xla"
    with pytest.raises(ValueError, match="Mosaic GPU kernel has no interpreter"):
        block_sparse_attention(q, k, v, fitting, scale=0.1, implementation="mosaic_gpu", interpret=True)


def test_bad_inputs_raise_clear_errors():
    q, k, v = random_qkv(9, 32, 6, 4, 16)
    index = random_block_sparse_index(np.random.default_rng(9), 1, 6, 32, 8, 0.5)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        reference.block_sparse_attention(q, k, v, index, scale=0.25)
    q, k, v = random_qkv(9, 32, 4, 2, 16)
    with pytest.raises(ValueError, match="build the index for these inputs"):
        reference.block_sparse_attention(q, k, v, index, scale=0.25)
    with pytest.raises(ValueError, match="block_size 8 has no kernel config"):
        configs.triton_config(8, 128)
    with pytest.raises(ValueError, match="head_dim 96 has no kernel config"):
        configs.tpu_config(64, 96)


def test_mosaic_operands_and_coverage():
    """The Mosaic-GPU kernel only runs on Hopper (checked by the device benchmark); here its
    operands, its shape coverage and its refusal of other shapes."""
    ids = jnp.array([[[[0, 0, 0], [0, 1, 1], [0, 1, 2], [1, 3, 4]]]], jnp.int32)  # row 3 lists block 4
    counts = jnp.array([[[1, 2, 3, 3]]], jnp.int32)
    np.testing.assert_array_equal(gpu_mosaic.causal_prefix(ids, counts)[0, 0], [[1, 0], [2, 1], [3, 2], [2, 1]])
    assert gpu_mosaic.supports(128, 128, jnp.bfloat16) and gpu_mosaic.supports(128, 64, jnp.float16)
    assert not gpu_mosaic.supports(64, 128, jnp.bfloat16)
    assert not gpu_mosaic.supports(128, 256, jnp.bfloat16)
    assert not gpu_mosaic.supports(128, 128, jnp.float32)
    q, k, v = random_qkv(10, 40, 2, 1, 64)
    index = random_block_sparse_index(np.random.default_rng(10), 1, 2, 40, 16, 0.5)
    with pytest.raises(ValueError, match="use gpu_triton instead"):
        gpu_mosaic.block_sparse_attention(q, k, v, index, scale=0.125)
