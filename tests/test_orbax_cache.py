"""Orbax parameter cache: identical round trip, cache hits, invalidation and atomicity."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from sparse_jax.checkpoints import hf, orbax_cache
from sparse_jax.models.loading import load_model

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def folder(tmp_path) -> Path:
    dst = tmp_path / "tiny_gemma3"
    shutil.copytree(FIXTURES / "tiny_gemma3", dst)
    return dst


def entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))


def assert_same_params(a, b):
    pa, pb = a.flat_params(), b.flat_params()
    assert pa.keys() == pb.keys()
    for name in pa:
        assert pa[name].dtype == pb[name].dtype, name
        np.testing.assert_array_equal(np.asarray(pa[name]), np.asarray(pb[name]), err_msg=name)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_round_trip_and_hit(folder, tmp_path, dtype):
    cache = tmp_path / "cache"
    first = load_model(folder, dtype=dtype, cache_dir=cache)
    assert not first.from_cache and len(entries(cache)) == 1
    second = load_model(folder, dtype=dtype, cache_dir=cache)
    assert second.from_cache
    assert second.config == first.config and second.stop_ids == first.stop_ids == (2, 106)
    assert_same_params(first.model, second.model)


def test_hit_does_not_read_weights(folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    load_model(folder, dtype=jnp.float32, cache_dir=cache)

    def fail(_):
        raise AssertionError("weights were read on a cache hit")

    monkeypatch.setattr(hf, "read_checkpoint", fail)
    assert load_model(folder, dtype=jnp.float32, cache_dir=cache).from_cache


def test_run_length_applies_on_hit(tmp_path):
    folder = tmp_path / "tiny_qwen2"
    shutil.copytree(FIXTURES / "tiny_qwen2", folder)
    cache = tmp_path / "cache"
    load_model(folder, dtype=jnp.float32, cache_dir=cache)
    hit = load_model(folder, dtype=jnp.float32, cache_dir=cache, max_length=65536)
    assert hit.from_cache and hit.config.rope.kind == "yarn" and hit.config.rope.factor == 2.0


def test_key_changes_with_dtype_and_files(folder, tmp_path):
    cache = tmp_path / "cache"
    load_model(folder, dtype=jnp.float32, cache_dir=cache)
    load_model(folder, dtype=jnp.bfloat16, cache_dir=cache)
    assert len(entries(cache)) == 2
    weights = folder / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert not load_model(folder, dtype=jnp.float32, cache_dir=cache).from_cache
    assert len(entries(cache)) == 3


def test_incomplete_entry_is_not_trusted(folder, tmp_path):
    """A leftover temporary folder (interrupted save) is ignored and never renamed into place."""
    cache = tmp_path / "cache"
    key = orbax_cache.cache_key(folder, hf.source_files(folder), jnp.float32)
    leftover = cache / f".{key}.tmp-1-deadbeef"
    (leftover / orbax_cache.PARAMS_DIR).mkdir(parents=True)
    (leftover / orbax_cache.META_FILE).write_text("{}")
    assert orbax_cache.load_meta(cache, key) is None
    loaded = load_model(folder, dtype=jnp.float32, cache_dir=cache)
    assert not loaded.from_cache
    assert entries(cache) == [key]
    assert load_model(folder, dtype=jnp.float32, cache_dir=cache).from_cache


def test_failed_save_leaves_nothing(folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(orbax_cache.ocp.StandardCheckpointer, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        load_model(folder, dtype=jnp.float32, cache_dir=cache)
    assert list(cache.iterdir()) == []
