"""A cache of converted model parameters in Orbax format.

Converting a checkpoint (parsing safetensors or dequantizing a GGUF, transposing,
casting) happens once; later runs restore the flat parameter dictionary with Orbax.
An entry is keyed by the source's resolved path, the size and mtime of every file
that decides the weights, the parameter dtype and a format version, so editing or
replacing the checkpoint misses the cache instead of returning stale weights.

Entries are written into a private temporary folder and renamed into place only
once complete; a folder without the final name is never read, so an interrupted
save cannot be trusted later.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

# 2: decoder-layer parameters stacked [num_layers, ...] under layers.* (version 1 held one entry per layer).
FORMAT_VERSION = 2
PARAMS_DIR = "params"
META_FILE = "meta.json"


def cache_key(source: str | Path, files: Iterable[str | Path], dtype: Any, *, fused_qkv: bool = False) -> str:
    """Hex key of ``source`` + (name, size, mtime) of ``files`` + ``dtype`` + the q/k/v layout.

    ``fused_qkv`` entries hold the fused q/k/v projections (``ModelConfig.fused_qkv``), under
    other parameter names; keys of the separate layout are those of earlier versions.
    """
    h = hashlib.sha256()
    layout = "|fused_qkv" if fused_qkv else ""
    h.update(f"v{FORMAT_VERSION}|{Path(source).resolve()}|{jnp.dtype(dtype).name}{layout}".encode())
    for f in sorted(Path(p).resolve() for p in files):
        st = f.stat()
        h.update(f"|{f}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


def _json_value(value: Any) -> Any:
    """numpy scalars/arrays (e.g. in a GGUF-derived config) as plain JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in the cache metadata")


def entry_dir(cache_dir: str | Path, key: str) -> Path:
    """Folder of a complete cache entry (it exists only once the entry is complete)."""
    return Path(cache_dir).resolve() / key


def save_entry(cache_dir: str | Path, key: str, params: Mapping[str, jax.Array], meta: Mapping[str, Any]) -> Path:
    """Writes ``params`` (flat name -> array) and JSON ``meta`` under ``key``, atomically.

    If another process completed the same entry first, its copy is kept.
    """
    final = entry_dir(cache_dir, key)
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / PARAMS_DIR, dict(params))
            ckptr.wait_until_finished()
        (tmp / META_FILE).write_text(json.dumps(dict(meta), indent=2, sort_keys=True, default=_json_value))
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_meta(cache_dir: str | Path, key: str) -> dict[str, Any] | None:
    """The metadata of a complete entry, or ``None`` on a miss."""
    path = entry_dir(cache_dir, key) / META_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def restore_params(
    cache_dir: str | Path, key: str, abstract: Mapping[str, jax.ShapeDtypeStruct]
) -> dict[str, jax.Array]:
    """Restores the flat parameters of entry ``key`` with the shapes/dtypes of ``abstract``."""
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(entry_dir(cache_dir, key) / PARAMS_DIR, dict(abstract))
