"""The helpers shared by all kernel families (pallas_kernels/common.py): the causal pair
count, TPU head chunks, and the per-device-kind launch tables with their fallback and
override (looked up here with fake device kinds, on CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pallas_kernels import common
from pallas_kernels.block_sparse import configs as block_sparse_configs
from pallas_kernels.paged_decode import configs as decode_configs
from pallas_kernels.vertical_slash import configs as vertical_slash_configs

UNLISTED_KINDS = ("NVIDIA A100-SXM4-80GB", "TPU v5 lite", "cpu")

# The Triton launches measured on the H100 (experiments/results/prefill_kernels_h100.md),
# (block_size, head_dim) -> (num_warps, num_stages).
H100_BLOCK_SPARSE_TRITON = {
    (16, 64): (4, 3), (16, 128): (4, 3), (16, 256): (4, 2),
    (32, 64): (4, 3), (32, 128): (4, 3), (32, 256): (4, 2),
    (64, 64): (4, 3), (64, 128): (4, 3), (64, 256): (8, 2),
    (128, 64): (8, 3), (128, 128): (8, 3), (128, 256): (8, 2),
}


def test_causal_tile_pairs_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(50):
        q_lo, k_lo = rng.integers(0, 40, 2)
        q_hi, k_hi = q_lo + rng.integers(0, 20), k_lo + rng.integers(0, 20)
        brute = sum(1 for i in range(q_lo, q_hi) for j in range(k_lo, k_hi) if j <= i)
        assert float(common.causal_tile_pairs(q_lo, q_hi, k_lo, k_hi)) == brute


def test_tpu_head_chunks_cover_heads_in_whole_groups():
    chunks = common.head_chunks(32, common.SMEM_LIST_INTS // 10, group=4)
    assert chunks[0] == (0, 8) and chunks[-1][1] == 32
    assert all(b - a == 8 for a, b in chunks)
    assert common.head_chunks(4, common.SMEM_LIST_INTS * 2, group=4) == [(0, 1), (1, 2), (2, 3), (3, 4)]


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch):
    monkeypatch.delenv(common.LAUNCH_OVERRIDES_ENV, raising=False)


def test_h100_entries_keep_the_measured_launches():
    for (bs, d), (warps, stages) in H100_BLOCK_SPARSE_TRITON.items():
        assert block_sparse_configs.triton_config(bs, d, kind=common.H100) == common.TritonConfig(warps, stages)
    assert block_sparse_configs.mosaic_config(128, 128, kind=common.H100).stages == 2
    assert block_sparse_configs.tpu_config(64, 128, kind=common.H100).kv_buffers == 3
    assert block_sparse_configs.tpu_config(128, 128, kind=common.H100).kv_buffers == 2
    vs = vertical_slash_configs.config_for(64, 64, 128, kind=common.H100)
    assert (vs.column_chunk, vs.launch, vs.kv_buffers) == (32, common.TritonConfig(4, 3), 2)
    assert vertical_slash_configs.config_for(128, 64, 128, kind=common.H100).launch.num_warps == 8
    assert vertical_slash_configs.config_for(64, 16, 256, kind=common.H100).launch == common.TritonConfig(8, 2)
    cfg = decode_configs.default_config(1, 8, 8192, kind=common.H100)
    assert (cfg.num_splits, cfg.pages_per_block, cfg.num_warps, cfg.num_stages) == (66, 4, 4, 3)


@pytest.mark.parametrize("table", [block_sparse_configs.LAUNCH, vertical_slash_configs.LAUNCH, decode_configs.LAUNCH])
def test_every_table_lists_h100_and_h200(table):
    assert common.FALLBACK_DEVICE_KIND in table and common.H200 in table


def test_the_h200_decode_entry_is_its_measured_launch():
    # experiments/results/speed_h200.md: the fastest batch-8 launch at 128K in two runs; the prefill tables
    # have no H200 measurement yet and repeat the H100 entries.
    assert decode_configs.LAUNCH[common.H200] == decode_configs.DecodeLaunch(pages_per_block=2, num_warps=4,
                                                                             num_stages=4)
    assert decode_configs.LAUNCH[common.H200] != decode_configs.LAUNCH[common.H100]
    for table in (block_sparse_configs.LAUNCH, vertical_slash_configs.LAUNCH):
        assert table[common.H200] == table[common.H100]
    cfg = decode_configs.default_config(8, 8, 8192, kind=common.H200)
    assert (cfg.pages_per_block, cfg.num_warps, cfg.num_stages) == (2, 4, 4)


@pytest.mark.parametrize("kind", UNLISTED_KINDS)
def test_unlisted_kinds_fall_back_to_the_h100_entry(kind):
    for table, family in ((block_sparse_configs.LAUNCH, "block_sparse"), (decode_configs.LAUNCH, "paged_decode")):
        assert common.launch_entry(table, family, kind=kind) == table[common.H100]


def test_lookup_uses_the_default_devices_kind(monkeypatch):
    fake = decode_configs.DecodeLaunch(target_programs=8, pages_per_block=2, num_warps=8, num_stages=2)
    monkeypatch.setitem(decode_configs.LAUNCH, "Fake GPU", fake)
    monkeypatch.setattr(common, "device_kind", lambda: "Fake GPU")
    cfg = decode_configs.default_config(1, 2, 100)
    assert (cfg.num_splits, cfg.pages_per_block, cfg.num_warps, cfg.num_stages) == (4, 2, 8, 2)
    monkeypatch.setattr(common, "device_kind", lambda: "Another GPU")
    assert decode_configs.default_config(1, 2, 100).pages_per_block == 4


def test_env_override_replaces_fields_nested_included(monkeypatch):
    override = {"paged_decode": {"num_warps": 8, "target_programs": 64}, "block_sparse": {"triton": {"num_stages": 4}}}
    monkeypatch.setenv(common.LAUNCH_OVERRIDES_ENV, json.dumps(override))
    cfg = decode_configs.default_config(1, 8, 8192, kind=common.H100)
    assert (cfg.num_warps, cfg.num_splits) == (8, 8)
    assert block_sparse_configs.triton_config(64, 128, kind=common.H100) == common.TritonConfig(4, 4)
    assert vertical_slash_configs.config_for(64, 64, 128, kind=common.H100).launch == common.TritonConfig(4, 3)


def test_argument_override_wins_over_env(monkeypatch):
    monkeypatch.setenv(common.LAUNCH_OVERRIDES_ENV, json.dumps({"paged_decode": {"num_warps": 8}}))
    entry = common.launch_entry(decode_configs.LAUNCH, "paged_decode", kind=common.H100, overrides={"num_stages": 1})
    assert (entry.num_warps, entry.num_stages) == (4, 1)


@pytest.mark.parametrize(
    "value,family,message",
    [
        ("{not json", "paged_decode", "is not valid JSON"),
        ('["paged_decode"]', "paged_decode", "must map family names"),
        ('{"paged_decode": {"warps": 8}}', "paged_decode", r"paged_decode.warps is not a field; choose from"),
        ('{"block_sparse": {"triton": 8}}', "block_sparse", "block_sparse.triton must be an object of fields"),
    ],
)
def test_bad_env_override_is_one_clear_error(monkeypatch, value, family, message):
    table = {"paged_decode": decode_configs.LAUNCH, "block_sparse": block_sparse_configs.LAUNCH}[family]
    monkeypatch.setenv(common.LAUNCH_OVERRIDES_ENV, value)
    with pytest.raises(ValueError, match=message):
        common.launch_entry(table, family, kind=common.H100)
