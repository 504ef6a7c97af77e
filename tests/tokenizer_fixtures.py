"""Tokenizers for tests: a tiny byte-level BPE trained here in milliseconds, and the embedded SmolLM2 one.

    from tests.tokenizer_fixtures import tiny_tokenizer, smollm2_tokenizer

Both factories are cached (one instance per test process). `smollm2_tokenizer()` skips the calling test when
the embedded model package is not installed.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import pytest
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as RustTokenizer
from transformers import PreTrainedTokenizerFast

from sparse_jax.tokenizer import Tokenizer

TINY_EOS = "<|end|>"
TINY_TURN = "<|turn|>"
TINY_SPECIAL_TOKENS = (TINY_EOS, TINY_TURN)
TINY_VOCAB_SIZE = 400
# A plain turn format: "<|turn|>{role}\n{content}<|end|>\n" per message, then "<|turn|>assistant\n".
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|turn|>' + message['role'] + '\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|turn|>assistant\n' }}{% endif %}"
)

_TRAINING_TEXT = """
A lighthouse keeper counted 1024 waves before the storm reached the cliffs at 9:45 in the evening.
The orchard behind the mill grows pears, plums and three kinds of apples; the miller sells them every Tuesday.
Question: what number did the keeper count? Answer: <answer>1024</answer>
Rivers carry silt to the delta, where herons wait in the reeds and fishermen mend their nets.
The library opens at 08:00, closes at 17:30, and keeps 56,789 books on seven floors.
Variables: X1 = 42, X2 = X1, X3 = X2. Which variables hold the value 42?
She walked from the market to the harbour, bought a lantern made of brass, then sold it again for 15 coins.
"""


def _train_tiny_bpe() -> RustTokenizer:
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TRAINING_TEXT.strip().splitlines() * 4, trainer=trainer)
    return tok


def write_tiny_tokenizer_folder(folder: str | Path) -> Path:
    """Write a tiny HF tokenizer folder (tokenizer.json, tokenizer_config.json with chat template,
    generation_config.json) into `folder` and return it. It has no pad token (so pad falls back to eos)."""
    folder = Path(folder)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=_train_tiny_bpe(), eos_token=TINY_EOS, chat_template=TINY_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    hf.add_special_tokens({"additional_special_tokens": [TINY_TURN]})
    hf.save_pretrained(str(folder))
    eos_id = hf.convert_tokens_to_ids(TINY_EOS)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos_id]}))
    return folder


@functools.cache
def tiny_tokenizer() -> Tokenizer:
    """A ~400-token byte-level BPE with special tokens `<|end|>` (eos) and `<|turn|>` and a chat template."""
    return Tokenizer.from_hf_folder(write_tiny_tokenizer_folder(tempfile.mkdtemp(prefix="tiny_tokenizer_")))


@functools.cache
def _smollm2_tokenizer() -> Tokenizer:
    from sparse_jax.embedded import embedded_model_path

    return Tokenizer.from_gguf(embedded_model_path())


def smollm2_tokenizer() -> Tokenizer:
    """The embedded SmolLM2-135M-Instruct tokenizer (from the GGUF); skips the test if the model is absent."""
    from sparse_jax.embedded import embedded_model_path

    try:
        embedded_model_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return _smollm2_tokenizer()
