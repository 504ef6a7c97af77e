"""Read a GGUF checkpoint into a Hugging Face style config, HF-named fp32 tensors and tokenizer metadata.

GGUF (llama.cpp's file format) is a header of typed key/value metadata, a table of tensor descriptors and an
aligned data section. The header is parsed here directly (the `gguf` package's reader builds one memory map per
string and takes seconds on a 49K-token vocabulary); the block formats are decoded with `gguf.quants.dequantize`.

Two architectures are read, `llama` (Llama / SmolLM2) and `gemma3` (Gemma 3 text). The conventions of
llama.cpp's converter are undone so that the result looks like a HF checkpoint:
  * names: `blk.{i}.attn_q.weight` -> `model.layers.{i}.self_attn.q_proj.weight`, and so on;
  * rotary layout (`llama` only): llama.cpp stores the rows of the q/k projections of each head interleaved
    (pairs (x_j, x_{j+d/2}) adjacent) for its "normal" RoPE, while HF rotates halves.
    `_unpermute_rotary_rows` restores the HF order. Gemma uses llama.cpp's NeoX RoPE, which rotates halves too,
    so its rows are stored in HF order;
  * Gemma norms (`gemma3` only): HF's Gemma RMSNorm multiplies by `1 + weight`; llama.cpp's converter stores
    `1 + weight` so that its plain RMSNorm can multiply by the stored value. 1 is subtracted again here.
Facts a `gemma3` GGUF does not store are taken from Gemma 3's published defaults (the same ones HF's
`Gemma3TextConfig` uses and llama.cpp hard-codes): every 6th layer global, the others sliding-window; local RoPE
base 10000; softmax scale `head_dim**-0.5` (`query_pre_attn_scalar = head_dim`; the 62-layer 27B model uses
`hidden / heads`); GELU-tanh GeGLU MLP; tied embeddings scaled by `sqrt(hidden)` (done by the model).
Shapes: a GGUF tensor with dims [ne0, ne1] is row-major [ne1, ne0], i.e. already HF's [out_features, in_features].
"""

from __future__ import annotations

import dataclasses
import mmap
import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize

_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32

_SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}

# GGUF per-layer tensor stem -> HF per-layer module path (Llama family).
_LLAMA_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3 names the norm before the MLP `ffn_norm` as Llama does, but HF calls it `pre_feedforward_layernorm`
# and uses `post_attention_layernorm` for the norm of the attention output.
_GEMMA3_LAYER_NAMES = {
    **_LLAMA_LAYER_NAMES,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
_LAYER_NAMES = {"llama": _LLAMA_LAYER_NAMES, "gemma3": _GEMMA3_LAYER_NAMES}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
SUPPORTED_ARCHITECTURES = tuple(_LAYER_NAMES)

# Gemma 3 facts a GGUF file does not store (see the module docstring).
GEMMA3_SLIDING_WINDOW_PATTERN = 6
GEMMA3_LOCAL_ROPE_THETA = 10_000.0
_GEMMA3_27B_LAYERS = 62


class GGUFError(ValueError):
    """A GGUF file that cannot be read or is not supported; the message names the file."""


@dataclasses.dataclass(frozen=True)
class GGUFTensorInfo:
    """One entry of the tensor table. `shape` is row-major (GGUF dims reversed); `offset` is absolute."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    offset: int
    nbytes: int


@dataclasses.dataclass(frozen=True)
class GGUFHeader:
    """Metadata key/values (strings, numbers, lists, numpy arrays for numeric arrays) and the tensor table."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]


@dataclasses.dataclass(frozen=True)
class GGUFTokenizerMetadata:
    """The `tokenizer.*` metadata of a GGUF file (ids are None when the file does not set them).

    token_types: int32[vocab] llama.cpp token types (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
    6 byte).
    scores: float32[vocab] SentencePiece piece scores (`llama` tokenizers; higher merges first), or None.
    add_space_prefix: SentencePiece adds a space before the text (llama.cpp's default when the key is absent).
    """

    model: str
    pre: str
    tokens: list[str]
    token_types: np.ndarray
    merges: list[str]
    scores: np.ndarray | None
    bos_token_id: int | None
    eos_token_id: int | None
    unknown_token_id: int | None
    padding_token_id: int | None
    eot_token_id: int | None
    add_bos_token: bool
    add_eos_token: bool
    add_space_prefix: bool
    chat_template: str | None


@dataclasses.dataclass(frozen=True)
class GGUFContents:
    """What `read_gguf` returns.

    hf_config: a dict in the form of a HF `config.json`.
    tensors: HF name -> fp32 array in HF shape, e.g. `model.embed_tokens.weight` [vocab, hidden],
      `model.layers.{i}.self_attn.q_proj.weight` [heads * head_dim, hidden] (rotary rows in HF order).
    """

    path: Path
    hf_config: dict[str, Any]
    tensors: dict[str, np.ndarray]
    tokenizer_metadata: GGUFTokenizerMetadata


class _Cursor:
    """Little-endian reader over a byte buffer; running past the end raises GGUFError naming the file."""

    def __init__(self, buf: mmap.mmap | bytes, path: Path):
        self.buf = buf
        self.pos = 0
        self.path = path

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise GGUFError(f"{self.path}: truncated GGUF header (needs byte {self.pos + size}, file has "
                            f"{len(self.buf)}); the file is corrupted or incompletely downloaded")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        length = self.take("<Q")
        if self.pos + length > len(self.buf):
            raise GGUFError(f"{self.path}: truncated GGUF header (string of {length} bytes at byte {self.pos}); "
                            "the file is corrupted or incompletely downloaded")
        raw = bytes(self.buf[self.pos:self.pos + length])
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        vtype = self._value_type(vtype)
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            item_type = self._value_type(self.take("<I"))
            count = self.take("<Q")
            if item_type in (GGUFValueType.STRING, GGUFValueType.ARRAY):
                return [self.value(item_type) for _ in range(count)]
            dtype = np.dtype(_SCALAR_FORMATS[item_type])
            end = self.pos + count * dtype.itemsize
            if end > len(self.buf):
                raise GGUFError(f"{self.path}: truncated GGUF header (array of {count} items at byte {self.pos}); "
                                "the file is corrupted or incompletely downloaded")
            arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
            self.pos = end
            return arr
        return self.take(_SCALAR_FORMATS[vtype])

    def _value_type(self, vtype: int) -> GGUFValueType:
        try:
            return GGUFValueType(vtype)
        except ValueError:
            raise GGUFError(f"{self.path}: unknown GGUF value type {vtype} at byte {self.pos}; "
                            "the file is corrupted or from an unsupported GGUF revision") from None


def _open(path: str | Path) -> tuple[Path, mmap.mmap]:
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such GGUF file; pass the path of a .gguf checkpoint "
                        "(for the embedded model use sparse_jax.embedded.embedded_model_path())")
    with open(path, "rb") as f:
        if f.read(4) != _MAGIC:
            raise GGUFError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")
        return path, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _parse_header(path: Path, buf: mmap.mmap) -> GGUFHeader:
    cur = _Cursor(buf, path)
    cur.pos = 4
    version = cur.take("<I")
    if version not in _SUPPORTED_VERSIONS:
        raise GGUFError(f"{path}: GGUF version {version} is not supported (supported: {_SUPPORTED_VERSIONS}); "
                        "re-convert the checkpoint with a current llama.cpp")
    n_tensors = cur.take("<Q")
    n_kv = cur.take("<Q")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.take("<I"))
    raw_infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.take("<I")
        dims = [cur.take("<Q") for _ in range(n_dims)]
        qtype_id = cur.take("<I")
        rel_offset = cur.take("<Q")
        raw_infos.append((name, dims, qtype_id, rel_offset))
    alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
    data_start = -(-cur.pos // alignment) * alignment
    tensors = {}
    for name, dims, qtype_id, rel_offset in raw_infos:
        try:
            qtype = GGMLQuantizationType(qtype_id)
        except ValueError:
            raise GGUFError(f"{path}: tensor {name!r} has unknown GGML type id {qtype_id}; "
                            "the file is corrupted or needs a newer `gguf` package") from None
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        n_elements = int(np.prod(dims, dtype=np.int64))
        if dims and dims[0] % block_size:
            raise GGUFError(f"{path}: tensor {name!r} row length {dims[0]} is not a multiple of the "
                            f"{qtype.name} block size {block_size}; the file is corrupted")
        nbytes = n_elements // block_size * type_size
        offset = data_start + rel_offset
        if offset + nbytes > len(buf):
            raise GGUFError(f"{path}: tensor {name!r} ends at byte {offset + nbytes} but the file has {len(buf)} "
                            "bytes; the file is truncated (re-download it)")
        tensors[name] = GGUFTensorInfo(name, tuple(reversed(dims)), qtype, offset, nbytes)
    return GGUFHeader(path, version, metadata, tensors)


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Parse metadata and the tensor table without reading tensor data (fast: ~0.1 s for SmolLM2)."""
    path, buf = _open(path)
    with buf:
        return _parse_header(path, buf)


def _float32_value(value: Any) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def _optional_int(metadata: dict[str, Any], key: str) -> int | None:
    value = metadata.get(key)
    return None if value is None else int(value)


def _tokenizer_metadata(header: GGUFHeader) -> GGUFTokenizerMetadata:
    md = header.metadata
    missing = [k for k in ("tokenizer.ggml.model", "tokenizer.ggml.tokens") if k not in md]
    if missing:
        raise GGUFError(f"{header.path}: no tokenizer in this GGUF file (missing {', '.join(missing)}); "
                        "load the tokenizer from the model's Hugging Face folder instead")
    tokens = md["tokenizer.ggml.tokens"]
    token_types = md.get("tokenizer.ggml.token_type")
    return GGUFTokenizerMetadata(
        model=md["tokenizer.ggml.model"],
        pre=md.get("tokenizer.ggml.pre", "default"),
        tokens=tokens,
        token_types=(np.ones(len(tokens), np.int32) if token_types is None else np.asarray(token_types, np.int32)),
        merges=md.get("tokenizer.ggml.merges", []),
        scores=None if "tokenizer.ggml.scores" not in md else np.asarray(md["tokenizer.ggml.scores"], np.float32),
        bos_token_id=_optional_int(md, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_optional_int(md, "tokenizer.ggml.eos_token_id"),
        unknown_token_id=_optional_int(md, "tokenizer.ggml.unknown_token_id"),
        padding_token_id=_optional_int(md, "tokenizer.ggml.padding_token_id"),
        eot_token_id=_optional_int(md, "tokenizer.ggml.eot_token_id"),
        add_bos_token=bool(md.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(md.get("tokenizer.ggml.add_eos_token", False)),
        add_space_prefix=bool(md.get("tokenizer.ggml.add_space_prefix", True)),
        chat_template=md.get("tokenizer.chat_template"),
    )


def read_gguf_tokenizer(path: str | Path) -> GGUFTokenizerMetadata:
    """The tokenizer metadata of a GGUF file, without touching tensor data."""
    return _tokenizer_metadata(read_gguf_header(path))


def _architecture(header: GGUFHeader) -> str:
    arch = header.metadata.get("general.architecture")
    if arch is None:
        raise GGUFError(f"{header.path}: metadata key 'general.architecture' is missing; the file is corrupted")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"{header.path}: architecture {arch!r} is not supported for GGUF loading (supported: "
                        f"{', '.join(SUPPORTED_ARCHITECTURES)}); load the model from its Hugging Face folder")
    return arch


def _hf_config(header: GGUFHeader, arch: str, tok: GGUFTokenizerMetadata) -> dict[str, Any]:
    """A HF `config.json` dict for `arch` (`llama` or `gemma3`) from the `{arch}.*` metadata."""
    md = header.metadata

    def need(key: str) -> Any:
        full = f"{arch}.{key}"
        if full not in md:
            raise GGUFError(f"{header.path}: metadata key {full!r} is missing; the file is corrupted or was "
                            "written by an incompatible converter")
        return md[full]

    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    head_dim = int(md.get(f"{arch}.attention.key_length", hidden // heads))
    rotary_dim = int(md.get(f"{arch}.rope.dimension_count", head_dim))
    if rotary_dim != head_dim:
        raise GGUFError(f"{header.path}: partial rotary embedding (rope.dimension_count={rotary_dim}, head_dim="
                        f"{head_dim}) is not supported")
    config = {
        "vocab_size": int(md.get(f"{arch}.vocab_size", len(tok.tokens))),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(md.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": _float32_value(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_value(md.get(f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(header, arch),
        "max_position_embeddings": int(need("context_length")),
        "tie_word_embeddings": "output.weight" not in header.tensors,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.padding_token_id,
        "torch_dtype": "float32",
    }
    if arch == "gemma3":
        return {**config, **_gemma3_fields(config, int(need("attention.sliding_window")))}
    return {**config, "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False}


def _rope_scaling(header: GGUFHeader, arch: str) -> dict[str, Any] | None:
    """`rope_scaling` of the HF config: none, or linear (Gemma 3 4B+ global layers); others are refused."""
    md = header.metadata
    scaling = md.get(f"{arch}.rope.scaling.type", "none")
    if scaling == "none" and "rope_freqs.weight" not in header.tensors:
        return None
    if scaling == "linear" and arch == "gemma3":
        return {"rope_type": "linear", "factor": _float32_value(md[f"{arch}.rope.scaling.factor"])}
    raise GGUFError(f"{header.path}: RoPE scaling in GGUF files (type {scaling!r}"
                    f"{', rope_freqs.weight' if 'rope_freqs.weight' in header.tensors else ''}) is not "
                    "supported; load this model from its Hugging Face folder")


def _gemma3_fields(config: dict[str, Any], sliding_window: int) -> dict[str, Any]:
    """Gemma 3 fields: the stored sliding window plus the defaults the file does not store (module docstring)."""
    layers = config["num_hidden_layers"]
    scalar = config["hidden_size"] // config["num_attention_heads"] if layers == _GEMMA3_27B_LAYERS else (
        config["head_dim"])
    return {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "hidden_activation": "gelu_pytorch_tanh",
        "sliding_window": sliding_window,
        "layer_types": [
            "full_attention" if (i + 1) % GEMMA3_SLIDING_WINDOW_PATTERN == 0 else "sliding_attention"
            for i in range(layers)
        ],
        "rope_local_base_freq": GEMMA3_LOCAL_ROPE_THETA,
        "query_pre_attn_scalar": scalar,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
    }


def _hf_name(path: Path, arch: str, gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts, layer_names = gguf_name.split("."), _LAYER_NAMES[arch]
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in layer_names:
        return f"model.layers.{parts[1]}.{layer_names[parts[2]]}.{parts[3]}"
    raise GGUFError(f"{path}: tensor {gguf_name!r} has no Hugging Face {arch} counterpart; "
                    "this GGUF variant is not supported")


def _unpermute_rotary_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation.

    w: [n_heads * head_dim, in] with rows of each head ordered (x_0, x_{d/2}, x_1, x_{d/2+1}, ...) ->
    [n_heads * head_dim, in] with each head's rows in HF "rotate_half" order (x_0 .. x_{d-1}).
    """
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _dequantize(path: Path, buf: mmap.mmap, info: GGUFTensorInfo) -> np.ndarray:
    raw = np.frombuffer(buf, dtype=np.uint8, count=info.nbytes, offset=info.offset)
    block_size, type_size = GGML_QUANT_SIZES[info.qtype]
    byte_shape = (*info.shape[:-1], info.shape[-1] // block_size * type_size)
    try:
        out = dequantize(raw.reshape(byte_shape), info.qtype)
    except NotImplementedError:
        raise GGUFError(f"{path}: tensor {info.name!r} uses quantization type {info.qtype.name}, which the "
                        "installed `gguf` package cannot dequantize; re-quantize the model (e.g. Q8_0, Q4_K) or "
                        "upgrade `gguf`") from None
    return np.array(out, dtype=np.float32, copy=True).reshape(info.shape)


def _to_hf_layout(arch: str, config: dict[str, Any], gguf_name: str, w: np.ndarray) -> np.ndarray:
    """Undo llama.cpp's storage conventions for one tensor (module docstring): rotary rows, Gemma's `1 + w`."""
    if arch == "gemma3":
        return w - np.float32(1.0) if gguf_name.endswith("norm.weight") else w
    stem = gguf_name.split(".")[-2] if gguf_name.startswith("blk.") else ""
    rotary_heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    return _unpermute_rotary_rows(w, rotary_heads[stem]) if stem in rotary_heads else w


def read_gguf(path: str | Path) -> GGUFContents:
    """Read a GGUF checkpoint: HF config dict, HF-named fp32 tensors in HF shapes, tokenizer metadata.

    Raises:
      GGUFError: missing file, not a GGUF file, truncated/corrupted file, unsupported architecture,
        quantization type or tensor; the message names the file.
    """
    path, buf = _open(path)
    with buf:
        header = _parse_header(path, buf)
        arch = _architecture(header)
        tok = _tokenizer_metadata(header)
        config = _hf_config(header, arch, tok)
        tensors = {
            _hf_name(path, arch, info.name): _to_hf_layout(arch, config, info.name, _dequantize(path, buf, info))
            for info in header.tensors.values()
        }
    _check_complete(path, arch, config, tensors)
    return GGUFContents(path=path, hf_config=config, tensors=tensors, tokenizer_metadata=tok)


def _check_complete(path: Path, arch: str, config: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config["tie_word_embeddings"]:
        expected.add("lm_head.weight")
    for i in range(config["num_hidden_layers"]):
        expected.update(f"model.layers.{i}.{module}.weight" for module in _LAYER_NAMES[arch].values())
    missing = sorted(expected - set(tensors))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise GGUFError(f"{path}: missing tensor(s) {shown} (GGUF names per llama.cpp: token_embd, blk.N.attn_q, "
                        f"...); the file is incomplete or not a decoder-only {arch} checkpoint")
