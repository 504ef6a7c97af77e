"""Gemma 3 from GGUF: a tiny `gemma3` GGUF written here the way llama.cpp's converter writes one (names, norms
stored as 1 + w, metadata), the packaged Gemma 3 270M (`make setup-gemma`; skipped without it) against
sentencepiece (tests/fixtures/gemma3_270m_reference.npz, made by tests/fixtures/make_gemma3_reference.py), its
install, and the completion prompt format."""

from __future__ import annotations

import functools
import json
import types
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

import sparse_jax.embedded as embedded
from sparse_jax.checkpoints import hf
from sparse_jax.checkpoints.gguf import read_gguf, read_gguf_header
from sparse_jax.models.config import ModelConfig
from sparse_jax.tokenizer import COMPLETION_ANSWER_PREFIX, Tokenizer
from tests.tokenizer_fixtures import tiny_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = FIXTURES / "gemma3_270m_reference.npz"
TINY_GEMMA3 = FIXTURES / "tiny_gemma3"

# HF per-layer name -> llama.cpp name, as llama.cpp's Gemma 3 converter writes them.
_GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_GGUF_LAYER_NAMES[rest.removesuffix('.weight')]}.weight"


def write_tiny_gemma3_gguf(path: Path) -> dict[str, np.ndarray]:
    """tests/fixtures/tiny_gemma3 as a `gemma3` GGUF (norms written as 1 + w); returns its HF tensors."""
    cfg = json.loads((TINY_GEMMA3 / "config.json").read_text())
    tensors = hf.read_checkpoint(TINY_GEMMA3).tensors
    writer = GGUFWriter(str(path), "gemma3")
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(4096)
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_key_length(cfg["head_dim"])
    writer.add_value_length(cfg["head_dim"])
    writer.add_rope_freq_base(1e6)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_sliding_window(cfg["sliding_window"])
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"<t{i}>" for i in range(cfg["vocab_size"])])
    writer.add_token_scores([-float(i) for i in range(cfg["vocab_size"])])
    writer.add_token_types([1] * cfg["vocab_size"])
    writer.add_eos_token_id(cfg["eos_token_id"])
    for name, w in tensors.items():
        writer.add_tensor(_gguf_name(name), w + np.float32(1) if name.endswith("norm.weight") else w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def test_tiny_gemma3_gguf_restores_hf_tensors_and_config(tmp_path):
    expected = write_tiny_gemma3_gguf(tmp_path / "tiny_gemma3.gguf")
    contents = read_gguf(tmp_path / "tiny_gemma3.gguf")
    assert set(contents.tensors) == set(expected)
    for name, want in expected.items():  # (w + 1) - 1 in float32: within one ulp of 1
        np.testing.assert_allclose(contents.tensors[name], want, rtol=0, atol=2.4e-7, err_msg=name)
    config = ModelConfig.from_hf_dict(contents.hf_config)
    assert config.family == "gemma3" and config.qk_norm and config.sandwich_norm and config.norm_plus_one
    assert config.layer_types == ("sliding_attention",) * 3  # pattern 6: layer 6 would be the first global one
    assert (config.sliding_window, config.rope.theta, config.local_rope.theta) == (8, 1e6, 10_000.0)
    assert config.attention_scale == 16**-0.5 and config.hidden_act == "gelu_pytorch_tanh"
    assert config.tie_word_embeddings and config.eos_token_ids == (2,)


# --- the packaged Gemma 3 270M ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma_path() -> Path:
    try:
        return embedded.gemma3_270m_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))


@functools.cache
def _tokenizer(path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(path)


@functools.cache
def reference() -> dict[str, np.ndarray]:
    with np.load(REFERENCE) as z:
        return {k: z[k] for k in z.files}


def _reference_token_cases() -> list[tuple[str, list[int]]]:
    ref = reference()
    texts = json.loads(str(ref["token_texts_json"]))
    flat, offsets = ref["token_ids_flat"].tolist(), ref["token_ids_offsets"].tolist()
    return [(t, flat[a:b]) for t, a, b in zip(texts, offsets[:-1], offsets[1:])]


def test_gemma3_270m_config(gemma_path):
    header = read_gguf_header(gemma_path)
    assert header.metadata["general.architecture"] == "gemma3"
    assert "gemma3.rope.local_freq_base" not in header.metadata  # hence Gemma 3's documented 10000
    kinds = {info.qtype.name for info in header.tensors.values()}
    assert kinds == {"F32", "Q5_0", "Q4_K", "Q8_0", "Q6_K"}


def test_gemma3_270m_tokenizer_equals_sentencepiece(gemma_path):
    """Same ids as sentencepiece on ~3.9K characters, except control tokens written in the text: sentencepiece
    never reads them from text, this project's tokenizer does (as llama.cpp does), so `<start_of_turn>` is one
    token here and seven pieces there."""
    tok = _tokenizer(gemma_path)
    cases = _reference_token_cases()
    assert sum(len(text) for text, _ in cases) >= 3000
    for text, ids in cases:
        if "<start_of_turn>" in text:
            pieces = tok.hf_tokenizer.convert_ids_to_tokens(ids)
            assert pieces[:7] == ["<", "start", "_", "of", "_", "turn", ">"]
            assert tok.text_to_tokens(text)[:2] == [105, tok.text_to_tokens("user")[0]]
            continue
        assert tok.text_to_tokens(text) == ids, text
        assert tok.decode(ids) == text, text


def test_gemma3_270m_tokenizer_properties(gemma_path):
    tok = _tokenizer(gemma_path)
    assert tok.vocab_size == 262144 and tok.eos_token_id == 1 and tok.stop_ids == (1,) and tok.pad_token_id == 0
    pieces = tok.hf_tokenizer.convert_ids_to_tokens(tok.text_to_tokens("Hello world 42"))
    assert pieces == ["Hello", "\u2581world", "\u2581", "4", "2"]  # no space prefix; digits one by one
    assert tok.text_to_tokens("<start_of_turn>") == [105]  # control tokens written in the text are recognised


def test_gemma3_270m_completion_prompt(gemma_path):
    tok = _tokenizer(gemma_path).with_prompt_format("completion")
    text = "Read this.\n\nWhat is the number?"
    assert tok.render_prompt(text) == text + COMPLETION_ANSWER_PREFIX
    assert tok.encode_for_generation(text) == [2, *tok.text_to_tokens(text + COMPLETION_ANSWER_PREFIX)]
    with pytest.raises(ValueError, match="has no chat template"):
        tok.with_prompt_format("chat").encode_for_generation(text)


# --- prompt formats and install -----------------------------------------------------------------------------


def test_chat_models_keep_their_template():
    tok = tiny_tokenizer()
    assert tok.prompt_format == "chat"
    assert tok.encode_for_generation("hi") == tok.text_to_tokens(tok.render_chat("hi"))
    completion = tok.with_prompt_format("completion")
    assert completion.encode_for_generation("hi") == tok.text_to_tokens("hi" + COMPLETION_ANSWER_PREFIX)
    assert tok.prompt_format == "chat"  # the original is unchanged


def test_unknown_prompt_format():
    with pytest.raises(ValueError, match="prompt_format must be one of chat, completion, got 'base'"):
        tiny_tokenizer().with_prompt_format("base")


def test_gemma3_270m_missing_package_names_the_setup_command(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSE_JAX_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded, "GEMMA3_270M_PACKAGE", "no_such_package_for_sparse_jax_tests")
    with pytest.raises(FileNotFoundError, match="make setup-gemma"):
        embedded.gemma3_270m_path()


def _fake_chunk_package(monkeypatch, tmp_path: Path, contents: list[bytes]) -> None:
    parts = []
    for i, data in enumerate(contents):
        parts.append(tmp_path / f"part{i}")
        parts[-1].write_bytes(data)
    package = types.ModuleType("fake_gemma_chunks")
    package.chunk_paths = lambda: parts
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(embedded.importlib, "import_module", lambda name: package)


def test_gemma3_270m_assembled_once_and_sha256_checked(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSE_JAX_CACHE", str(tmp_path / "cache"))
    _fake_chunk_package(monkeypatch, tmp_path, [b"GGUF", b"-rest"])
    monkeypatch.setattr(embedded, "GEMMA3_270M_SHA256", embedded.hashlib.sha256(b"GGUF-rest").hexdigest())
    path = embedded.gemma3_270m_path()
    assert path == tmp_path / "cache" / "models" / embedded.GEMMA3_270M_FILE and path.read_bytes() == b"GGUF-rest"
    monkeypatch.setattr(embedded.importlib, "import_module", lambda name: pytest.fail("assembled twice"))
    assert embedded.gemma3_270m_path() == path


def test_gemma3_270m_bad_chunks(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSE_JAX_CACHE", str(tmp_path / "cache"))
    _fake_chunk_package(monkeypatch, tmp_path, [b"GGUF", b"-corrupted"])
    with pytest.raises(ValueError, match="wrong sha256.*make setup-gemma"):
        embedded.gemma3_270m_path()
    assert not list((tmp_path / "cache" / "models").iterdir())  # no partial file left behind


def test_gemma3_270m_gin_selects_the_completion_format():
    import gin

    from sparse_jax.pipeline.errors import ConfigError
    from sparse_jax.pipeline.experiment import ExperimentConfig, current_config, parse_gin

    parse_gin([Path(__file__).resolve().parent.parent / "configs" / "models" / "gemma3_270m.gin"], [])
    cfg = current_config()
    gin.clear_config()  # leave no bindings behind for other tests
    assert (cfg.model, cfg.prompt_format, cfg.dtype) == ("gemma3_270m", "completion", "float32")
    chat = ExperimentConfig(**(cfg.__dict__ | {"prompt_format": "chat"}))
    assert "prompt_format" not in chat.key_fields()  # chat models keep the run keys they had
    assert cfg.run_key() != chat.run_key() and cfg.data_key() != chat.data_key()
    with pytest.raises(ConfigError, match="prompt_format must be one of chat, completion, got 'plain'"):
        ExperimentConfig(prompt_format="plain")
