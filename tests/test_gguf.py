"""GGUF reading: a tiny Llama GGUF written here (exact round trip, rotary un-permutation, Q8_0), the embedded
SmolLM2 file against transformers' state dict (tests/fixtures/smollm2_reference.npz), and the errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

from sparse_jax.checkpoints.gguf import GGUFError, read_gguf, read_gguf_header, read_gguf_tokenizer
from sparse_jax.embedded import embedded_model_path
from sparse_jax.tokenizer import Tokenizer
from tests.tokenizer_fixtures import tiny_tokenizer

REFERENCE = Path(__file__).parent / "fixtures" / "smollm2_reference.npz"

TINY = dict(layers=2, hidden=32, heads=4, kv_heads=2, ffn=48, context=256, theta=5000.0, eps=1e-6)
HEAD_DIM = TINY["hidden"] // TINY["heads"]
LAYER_TENSORS = {  # GGUF stem -> (HF module, HF shape)
    "attn_norm": ("input_layernorm", (TINY["hidden"],)),
    "ffn_norm": ("post_attention_layernorm", (TINY["hidden"],)),
    "attn_q": ("self_attn.q_proj", (TINY["heads"] * HEAD_DIM, TINY["hidden"])),
    "attn_k": ("self_attn.k_proj", (TINY["kv_heads"] * HEAD_DIM, TINY["hidden"])),
    "attn_v": ("self_attn.v_proj", (TINY["kv_heads"] * HEAD_DIM, TINY["hidden"])),
    "attn_output": ("self_attn.o_proj", (TINY["hidden"], TINY["heads"] * HEAD_DIM)),
    "ffn_gate": ("mlp.gate_proj", (TINY["ffn"], TINY["hidden"])),
    "ffn_up": ("mlp.up_proj", (TINY["ffn"], TINY["hidden"])),
    "ffn_down": ("mlp.down_proj", (TINY["hidden"], TINY["ffn"])),
}


def _llama_cpp_rotary_order(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order, written out index by index: GGUF row h*d + 2j + s = HF row h*d + s*d/2 + j."""
    d = w.shape[0] // n_heads
    out = np.empty_like(w)
    for h in range(n_heads):
        for j in range(d // 2):
            for s in range(2):
                out[h * d + 2 * j + s] = w[h * d + s * (d // 2) + j]
    return out


def _tiny_vocab() -> tuple[list[str], list[str], list[int]]:
    """Tokens (by id), merges and llama.cpp token types of the tiny test tokenizer."""
    backend = json.loads(tiny_tokenizer().hf_tokenizer.backend_tokenizer.to_str())
    vocab = backend["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    merges = [" ".join(m) if isinstance(m, list) else m for m in backend["model"]["merges"]]
    special = {t["id"] for t in backend["added_tokens"] if t["special"]}
    return tokens, merges, [3 if i in special else 1 for i in range(len(tokens))]


def write_tiny_gguf(path: Path, *, arch: str = "llama", tied: bool = True, drop: str | None = None,
                    tokenizer_model: str = "gpt2", pre: str = "gpt2", seed: int = 0) -> dict[str, np.ndarray]:
    """Write a 2-layer Llama GGUF the way llama.cpp's converter does; return the HF tensors it encodes.

    ffn_up is stored as Q8_0 (its returned HF value is the dequantized one); `drop` omits one GGUF tensor.
    """
    rng = np.random.default_rng(seed)
    tokens, merges, types = _tiny_vocab()
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(TINY["layers"])
    writer.add_context_length(TINY["context"])
    writer.add_embedding_length(TINY["hidden"])
    writer.add_feed_forward_length(TINY["ffn"])
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    writer.add_rope_freq_base(TINY["theta"])
    writer.add_layer_norm_rms_eps(TINY["eps"])
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types(types)
    writer.add_eos_token_id(tokens.index("<|end|>"))
    writer.add_chat_template("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                             "{% if add_generation_prompt %}[assistant] {% endif %}")

    hf: dict[str, np.ndarray] = {}

    def add(gguf_name: str, hf_name: str, w: np.ndarray, stored: np.ndarray | None = None) -> None:
        hf[hf_name] = w
        if gguf_name != drop:
            writer.add_tensor(gguf_name, w if stored is None else stored)

    vocab, hidden = len(tokens), TINY["hidden"]
    add("token_embd.weight", "model.embed_tokens.weight", rng.standard_normal((vocab, hidden), np.float32))
    add("output_norm.weight", "model.norm.weight", rng.standard_normal(hidden, np.float32))
    if not tied:
        add("output.weight", "lm_head.weight", rng.standard_normal((vocab, hidden), np.float32))
    for i in range(TINY["layers"]):
        for stem, (module, shape) in LAYER_TENSORS.items():
            w = rng.standard_normal(shape, np.float32)
            gguf_name, hf_name = f"blk.{i}.{stem}.weight", f"model.layers.{i}.{module}.weight"
            if stem in ("attn_q", "attn_k"):
                add(gguf_name, hf_name, w, _llama_cpp_rotary_order(w, shape[0] // HEAD_DIM))
            elif stem == "ffn_up":
                q = quantize(w, GGMLQuantizationType.Q8_0)
                hf[hf_name] = w  # compared with a quantization tolerance
                if gguf_name != drop:
                    writer.add_tensor(gguf_name, q, raw_shape=q.shape, raw_dtype=GGMLQuantizationType.Q8_0)
            else:
                add(gguf_name, hf_name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path)


def test_tiny_round_trip_restores_hf_tensors(tiny_gguf):
    path, expected = tiny_gguf
    contents = read_gguf(path)
    assert set(contents.tensors) == set(expected)
    for name, want in expected.items():
        got = contents.tensors[name]
        assert got.dtype == np.float32 and got.shape == want.shape, name
        if ".mlp.up_proj." in name:  # Q8_0: step absmax/127 per 32 values (fp16 scale): error <~ 0.52 step
            step = np.abs(want).reshape(want.shape[0], -1, 32).max(-1, keepdims=True) / 127
            err = np.abs(got - want).reshape(step.shape[0], -1, 32)
            assert np.all(err <= 0.6 * step), name
        else:  # F32, q/k rows un-permuted exactly
            np.testing.assert_array_equal(got, want, err_msg=name)


def test_tiny_hf_config(tiny_gguf):
    path, _ = tiny_gguf
    cfg = read_gguf(path).hf_config
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (2, 32, 48)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 8)
    assert cfg["rope_theta"] == 5000.0 and cfg["rms_norm_eps"] == 1e-6
    assert cfg["max_position_embeddings"] == 256 and cfg["tie_word_embeddings"] is True
    assert cfg["vocab_size"] == tiny_tokenizer().vocab_size
    assert cfg["eos_token_id"] == tiny_tokenizer().eos_token_id and cfg["bos_token_id"] is None


def test_untied_output_gives_lm_head(tmp_path):
    expected = write_tiny_gguf(tmp_path / "untied.gguf", tied=False)
    contents = read_gguf(tmp_path / "untied.gguf")
    assert contents.hf_config["tie_word_embeddings"] is False
    np.testing.assert_array_equal(contents.tensors["lm_head.weight"], expected["lm_head.weight"])


def test_gguf_tokenizer_equals_the_hf_tokenizer_it_was_built_from(tiny_gguf):
    path, _ = tiny_gguf
    ours, hf = Tokenizer.from_gguf(path), tiny_tokenizer()
    text = "The keeper counted 1024 waves, then 17 more.\n<|end|> after"
    assert ours.text_to_tokens(text) == hf.text_to_tokens(text)
    assert ours.decode(ours.text_to_tokens(text)) == hf.decode(hf.text_to_tokens(text))
    assert ours.render_chat("hi") == "[user] hi\n[assistant] "
    assert ours.stop_ids == (hf.eos_token_id,) and ours.pad_token_id == hf.eos_token_id


def test_tokenizer_metadata_without_tensors(tiny_gguf):
    path, _ = tiny_gguf
    meta = read_gguf_tokenizer(path)
    assert meta.model == "gpt2" and meta.pre == "gpt2" and len(meta.tokens) == tiny_tokenizer().vocab_size
    assert meta.token_types.dtype == np.int32 and int((meta.token_types == 3).sum()) == 2


# --- errors -------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(GGUFError, match="no such GGUF file.*missing.gguf|missing.gguf.*no such GGUF file"):
        read_gguf(tmp_path / "missing.gguf")


def test_not_a_gguf(tmp_path):
    path = tmp_path / "weights.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip, not a gguf")
    with pytest.raises(GGUFError, match=r"weights.gguf: not a GGUF file"):
        read_gguf(path)


def test_truncated_file(tiny_gguf, tmp_path):
    data = tiny_gguf[0].read_bytes()
    for cut in (30, len(data) - 100):  # inside the header; inside the tensor data
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(GGUFError, match=rf"cut{cut}.gguf: .*trunc"):
            read_gguf(path)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2arch.gguf"
    write_tiny_gguf(path, arch="gpt2")
    with pytest.raises(GGUFError, match=r"gpt2arch.gguf: architecture 'gpt2' is not supported"):
        read_gguf(path)


def test_missing_tensor(tmp_path):
    path = tmp_path / "holey.gguf"
    write_tiny_gguf(path, drop="blk.1.attn_v.weight")
    with pytest.raises(GGUFError, match=r"holey.gguf: missing tensor\(s\) model.layers.1.self_attn.v_proj.weight"):
        read_gguf(path)


@pytest.mark.parametrize("kwargs, match", [
    (dict(tokenizer_model="bert"), "tokenizer model 'bert' is not supported"),
    (dict(pre="qwen2"), "pre-tokenizer 'qwen2' is not supported"),
])
def test_unsupported_gguf_tokenizer(tmp_path, kwargs, match):
    path = tmp_path / "tok.gguf"
    write_tiny_gguf(path, **kwargs)
    with pytest.raises(ValueError, match=match + ".*from_hf_folder"):
        Tokenizer.from_gguf(path)


# --- the embedded SmolLM2 GGUF ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = embedded_model_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return read_gguf(path)


def test_smollm2_config(smollm2):
    cfg = smollm2.hf_config
    assert cfg["model_type"] == "llama"
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (30, 9, 3)
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"], cfg["vocab_size"]) == (576, 1536, 64, 49152)
    assert cfg["tie_word_embeddings"] is True and "lm_head.weight" not in smollm2.tensors
    assert cfg["rope_theta"] == 100000.0 and cfg["rms_norm_eps"] == 1e-5
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
    assert cfg["max_position_embeddings"] == 8192
    assert smollm2.tokenizer_metadata.pre == "smollm"


def test_smollm2_tensors_match_transformers(smollm2):
    """Sums, row-weighted sums and q/k slices of every tensor equal transformers' GGUF loading."""
    ref = np.load(REFERENCE)
    names = [str(n) for n in ref["tensor_names"]]
    assert set(names) == set(smollm2.tensors)
    for name, total, moment in zip(names, ref["tensor_sums"], ref["tensor_row_moments"]):
        w = smollm2.tensors[name].astype(np.float64)
        w2 = w.reshape(w.shape[0], -1)
        scale = np.abs(w2).sum()
        assert abs(w2.sum() - total) <= 1e-6 * scale, name
        assert abs((w2.sum(1) * np.arange(w2.shape[0])).sum() - moment) <= 1e-6 * scale * w2.shape[0], name
    head_rows = ref["q_proj0_slice"].shape[0]
    np.testing.assert_allclose(smollm2.tensors["model.layers.0.self_attn.q_proj.weight"][:head_rows, :16],
                               ref["q_proj0_slice"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(smollm2.tensors["model.layers.0.self_attn.k_proj.weight"][:head_rows, :16],
                               ref["k_proj0_slice"], rtol=0, atol=1e-6)


def test_header_is_fast_to_read():
    try:
        path = embedded_model_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    header = read_gguf_header(path)
    assert len(header.tensors) == 272
    assert header.tensors["token_embd.weight"].shape == (49152, 576)
    assert header.tensors["blk.0.attn_q.weight"].qtype == GGMLQuantizationType.Q4_1
