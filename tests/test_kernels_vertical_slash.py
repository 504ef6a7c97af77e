"""Vertical-slash attention: jnp reference vs a dense masked oracle, Pallas kernels vs the
reference (GPU kernel in Triton interpret mode, TPU kernel in TPU interpret mode)."""

from __future__ import annotations

import numpy as np
import pytest
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.block_sparse.reference import masked_attention
from pallas_kernels.common import TritonConfig
from pallas_kernels.vertical_slash import configs, gpu_triton, reference, tpu, vertical_slash_attention
from pallas_kernels.vertical_slash.configs import VerticalSlashConfig
from pallas_kernels.vertical_slash.index import VerticalSlashIndex
from pallas_kernels.vertical_slash.operands import kernel_operands
from pallas_kernels.vertical_slash.synthetic import random_vertical_slash_index
from kernel_test_utils import assert_close, random_qkv

SMALL_CHUNK = VerticalSlashConfig(column_chunk=16, launch=TritonConfig(num_warps=4, num_stages=2))


@pytest.mark.parametrize("t,h,g,n_ranges,n_cols,empty", [(77, 4, 2, 2, 9, 0.1), (64, 2, 2, 8, 0, 0.0)])
def test_reference_matches_masked_oracle(t, h, g, n_ranges, n_cols, empty):
    q, k, v = random_qkv(0, t, h, g, 16, b=2)
    index = random_vertical_slash_index(
        np.random.default_rng(1), 2, h, t, n_ranges, n_cols, block_m=16, block_n=8, empty_fraction=empty
    )
    out = reference.vertical_slash_attention(q, k, v, index, scale=0.3, key_chunk=24)
    mask = reference.index_to_mask(index, t)
    assert_close(out, masked_attention(q, k, v, mask, scale=0.3), jnp.float32)
    np.testing.assert_allclose(reference.attended_pairs(index, t), mask.sum((-1, -2)), rtol=0)


def test_hand_built_index():
    """Row block 1 (queries 8..15): range [6, 10) plus columns 1 and 3; row block 0 empty."""
    index = VerticalSlashIndex(
        block_starts=jnp.array([[[[0], [6]]]], jnp.int32),
        block_counts=jnp.array([[[0, 1]]], jnp.int32),
        columns=jnp.array([[[[0, 0], [1, 3]]]], jnp.int32),
        column_counts=jnp.array([[[0, 2]]], jnp.int32),
        block_m=8,
        block_n=4,
    )
    mask = np.asarray(reference.index_to_mask(index, 16))[0, 0]
    assert not mask[:8].any()
    np.testing.assert_array_equal(np.flatnonzero(mask[8]), [1, 3, 6, 7, 8])
    np.testing.assert_array_equal(np.flatnonzero(mask[15]), [1, 3, 6, 7, 8, 9])
    q, k, v = random_qkv(2, 16, 1, 1, 8)
    out = reference.vertical_slash_attention(q, k, v, index, scale=0.5)
    assert np.all(np.asarray(out[0, :8]) == 0)
    assert_close(out, masked_attention(q, k, v, mask[None, None], scale=0.5), jnp.float32)


def test_kernel_operands_mask_free_prefix_and_padding():
    index = random_vertical_slash_index(np.random.default_rng(3), 1, 2, 100, 3, 5, block_m=32, block_n=16)
    starts, columns, meta = kernel_operands(index, 4)
    assert columns.shape[-1] % 4 == 0 and starts is index.block_starts
    r = np.arange(starts.shape[2])[:, None]
    live = np.arange(starts.shape[-1]) < np.asarray(index.block_counts)[..., None]
    before = np.asarray(starts) + 15 <= r * 32
    np.testing.assert_array_equal(meta[..., 1], (live & before).sum(-1))
    np.testing.assert_array_equal(meta[..., 0], index.block_counts)
    np.testing.assert_array_equal(meta[..., 2], index.column_counts)


# GQA ratios 1/4/8, head dims 64/128/256, odd lengths, few to many ranges and columns, empty rows.
KERNEL_CASES = [
    (150, 4, 4, 64, 2, 20, 0.1, jnp.float32),
    (100, 8, 2, 64, 8, 3, 0.0, jnp.bfloat16),
    (70, 8, 1, 128, 1, 40, 0.2, jnp.float32),
    (50, 2, 1, 256, 3, 10, 0.0, jnp.bfloat16),
]


@pytest.mark.parametrize("t,h,g,d,n_ranges,n_cols,empty,dtype", KERNEL_CASES)
def test_gpu_kernel_matches_reference(t, h, g, d, n_ranges, n_cols, empty, dtype):
    q, k, v = random_qkv(4, t, h, g, d, dtype)
    index = random_vertical_slash_index(
        np.random.default_rng(5), 1, h, t, n_ranges, n_cols, block_m=32, block_n=16, empty_fraction=empty
    )
    out = gpu_triton.vertical_slash_attention(q, k, v, index, scale=d**-0.5, config=SMALL_CHUNK, interpret=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, reference.vertical_slash_attention(q, k, v, index, scale=d**-0.5), dtype)


@pytest.mark.parametrize(
    "t,h,g,d,n_ranges,n_cols,empty,dtype",
    [(50, 2, 1, 64, 2, 20, 0.2, jnp.float32), (40, 4, 1, 128, 1, 6, 0.0, jnp.bfloat16)],
)
def test_tpu_kernel_matches_reference(t, h, g, d, n_ranges, n_cols, empty, dtype):
    q, k, v = random_qkv(6, t, h, g, d, dtype)
    index = random_vertical_slash_index(
        np.random.default_rng(7), 1, h, t, n_ranges, n_cols, block_m=16, block_n=16, empty_fraction=empty
    )
    out = tpu.vertical_slash_attention(
        q, k, v, index, scale=d**-0.5, config=SMALL_CHUNK, interpret=pltpu.InterpretParams()
    )
    assert_close(out, reference.vertical_slash_attention(q, k, v, index, scale=d**-0.5), dtype)


def test_dispatch_xla_implementation_and_unknown_name():
    q, k, v = random_qkv(8, 40, 2, 1, 16)
    index = random_vertical_slash_index(np.random.default_rng(8), 1, 2, 40, 2, 4, block_m=16, block_n=8)
    out = vertical_slash_attention(q, k, v, index, scale=0.25, implementation="xla")
    assert_close(out, reference.vertical_slash_attention(q, k, v, index, scale=0.25), jnp.float32)
    valid = "'xla', 'triton', 'mosaic_tpu'"
    with pytest.raises(ValueError, match=f"vertical_slash_attention: unknown implementation 'cuda'; use one of {valid}"):
        vertical_slash_attention(q, k, v, index, scale=0.25, implementation="cuda")


def test_bad_inputs_raise_clear_errors():
    q, k, v = random_qkv(9, 40, 4, 2, 16)
    index = random_vertical_slash_index(np.random.default_rng(9), 1, 4, 70, 2, 4, block_m=32, block_n=8)
    with pytest.raises(ValueError, match="build the index for these inputs"):
        reference.vertical_slash_attention(q, k, v, index, scale=0.25)  # 3 row blocks for a 40-token prompt
    index = random_vertical_slash_index(np.random.default_rng(9), 1, 4, 40, 2, 4, block_m=32, block_n=8)
    with pytest.raises(ValueError, match="block_n 8 has no kernel config"):
        configs.config_for(64, 8, 128)
    with pytest.raises(ValueError, match="must have the same shape"):
        reference.vertical_slash_attention(q, k, v[:, :, :1], index, scale=0.25)
