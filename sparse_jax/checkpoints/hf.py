"""Reads a Hugging Face checkpoint folder into numpy: config, weights and stop ids.

A folder holds ``config.json``, the weights as one ``model.safetensors`` or as shards
listed by ``model.safetensors.index.json``, and optionally ``generation_config.json``
(whose ``eos_token_id`` gives the stop ids; without it ``config.json``'s is used; a
checkpoint that names none loads with no stop ids).

Safetensors files are parsed directly (8-byte little-endian header length, JSON
header, raw little-endian data) and memory-mapped, so bf16 tensors come back as
``ml_dtypes.bfloat16`` arrays without copying or a PyTorch dependency.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype("<f8"),
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be loaded; the message names the file."""


class HFCheckpoint(NamedTuple):
    """A Hugging Face checkpoint read into memory.

    Attributes:
      config: the ``config.json`` dictionary.
      tensors: Hugging Face tensor name -> numpy array (memory-mapped, original dtype).
      stop_ids: generation stop token ids; empty when neither file names one.
      path: the folder.
    """

    config: dict[str, Any]
    tensors: dict[str, np.ndarray]
    stop_ids: tuple[int, ...]
    path: Path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def read_config(folder: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a Hugging Face checkpoint folder needs a config.json")
    return _read_json(path)


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, (list, tuple)) else [value]
    return tuple(dict.fromkeys(int(v) for v in values))


def read_stop_ids(folder: str | Path, config: dict[str, Any]) -> tuple[int, ...]:
    """Stop ids: ``generation_config.json``'s ``eos_token_id``, else ``config.json``'s, else none.

    A checkpoint that names none still loads (as in transformers, generation then runs to
    its length limit); :func:`sparse_jax.models.loading.load_model` warns about it once.
    """
    path = Path(folder) / GENERATION_CONFIG_FILE
    ids = _as_ids(_read_json(path).get("eos_token_id")) if path.is_file() else ()
    if ids:
        return ids
    declared = config.get("eos_token_id")
    if declared is None:
        declared = (config.get("text_config") or {}).get("eos_token_id")
    return _as_ids(declared)


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of one ``.safetensors`` file, memory-mapped and read-only.

    Raises:
      CheckpointError: truncated/corrupt file or a tensor dtype outside F32/F16/BF16/F64.
    """
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > _MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: not a safetensors file (header length {header_len})")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    data_start = 8 + header_len
    file_size = path.stat().st_size
    header.pop("__metadata__", None)
    buffer = np.memmap(path, dtype=np.uint8, mode="r") if file_size > data_start else np.zeros(0, np.uint8)
    tensors = {}
    for name, info in header.items():
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(
                f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}; supported: {sorted(_DTYPES)} "
                "(convert the checkpoint to bf16 or fp32)"
            )
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end - begin != int(np.prod(shape)) * dtype.itemsize or data_start + end > file_size:
            raise CheckpointError(f"{path}: tensor {name!r} data is truncated or inconsistent with its shape {shape}")
        tensors[name] = buffer[data_start + begin : data_start + end].view(dtype).reshape(shape)
    return tensors


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, in a stable order.

    Raises:
      CheckpointError: no weights, or an index naming a shard that is absent.
    """
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not weight_map:
            raise CheckpointError(f"{index}: has no 'weight_map'")
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not (folder / shard).is_file():
                tensor = next(t for t, s in weight_map.items() if s == shard)
                raise CheckpointError(
                    f"{index}: names shard {shard!r} (e.g. for {tensor!r}) but {folder / shard} is missing"
                )
        return [folder / s for s in shards]
    if (folder / SINGLE_WEIGHTS_FILE).is_file():
        return [folder / SINGLE_WEIGHTS_FILE]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"{folder}: no weights found (expected {SINGLE_WEIGHTS_FILE}, {INDEX_FILE} + shards, or *.safetensors)"
        )
    return files


def iter_tensors(folder: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, array)`` for every tensor of every weight file in the folder."""
    for path in weight_files(folder):
        yield from read_safetensors(path).items()


# Multimodal Gemma 3 checkpoints nest the text model; these prefixes map it to the text-only names.
_TEXT_MODEL_PREFIXES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)


def _text_model_name(name: str) -> str:
    for old, new in _TEXT_MODEL_PREFIXES:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def read_checkpoint(folder: str | Path) -> HFCheckpoint:
    """Reads config, tensors (memory-mapped) and stop ids of a Hugging Face folder."""
    folder = Path(folder)
    config = read_config(folder)
    tensors = {_text_model_name(name): array for name, array in iter_tensors(folder)}
    return HFCheckpoint(config=config, tensors=tensors, stop_ids=read_stop_ids(folder, config), path=folder)


def source_files(folder: str | Path) -> list[Path]:
    """Every file whose content decides the loaded model (for cache keys)."""
    folder = Path(folder)
    extra = [folder / n for n in (GENERATION_CONFIG_FILE, INDEX_FILE) if (folder / n).is_file()]
    return [folder / CONFIG_FILE, *extra, *weight_files(folder)]
