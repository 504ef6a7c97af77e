"""Tokenizer wrapper with the reference's prompt semantics (docs/reference_behaviour.md §2.2).

* `text_to_tokens(text)`: encode without adding special tokens (special tokens written in the text are
  recognised).
* `encode_for_generation(text)`: render the chat template for one user message with the generation prompt,
  then encode the rendered string like `text_to_tokens`.
* `decode(ids)`: decode, dropping special tokens.
* pad := eos when the tokenizer has no pad token.

Two sources: a Hugging Face folder (`tokenizer.json` & co., chat template from `tokenizer_config.json` or
`chat_template.jinja`, stop ids from `generation_config.json`) and a GGUF file (no torch needed): byte-level BPE
rebuilt from the vocabulary and merges (`gpt2` GGUF tokenizers), or SentencePiece BPE rebuilt from the vocabulary
and piece scores (`llama` GGUF tokenizers, e.g. Gemma 3).

Prompt formats, chosen per model (`ExperimentConfig.prompt_format` in the model's gin file): `chat` renders the
chat template (instruction-tuned models); `completion` is for base models, which have no chat template: BOS, the
task text as is (it ends with the question) and an answer prefix the model continues.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as RustTokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

if TYPE_CHECKING:  # the `gguf` package is imported only when a GGUF file is read (absent on the GPU machine)
    from sparse_jax.checkpoints.gguf import GGUFTokenizerMetadata

# llama.cpp token types (gguf TokenType): CONTROL tokens are special, USER_DEFINED ones are added but not special.
_NORMAL_TOKEN = 1
_CONTROL_TOKEN = 3
_USER_DEFINED_TOKEN = 4

PROMPT_FORMATS = ("chat", "completion")
COMPLETION_ANSWER_PREFIX = "\n\nAnswer:"
"""What the `completion` format writes after the task text; the model's continuation is its answer."""
SPM_SPACE = "\u2581"  # SentencePiece's visible space


def _byte_level() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)


def _digits_then_byte_level() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level()])


# GGUF `tokenizer.ggml.pre` -> the pre-tokenizer the model was trained with. SmolLM / StarCoder split every digit
# on its own before the GPT-2 regex (llama.cpp: `\p{N}` then the GPT-2 pattern).
_PRE_TOKENIZERS = {
    "gpt2": _byte_level,
    "smollm": _digits_then_byte_level,
    "starcoder": _digits_then_byte_level,
}


def _bpe_from_gguf(meta: GGUFTokenizerMetadata, path: Path) -> RustTokenizer:
    """A `tokenizers` byte-level BPE equal to the GGUF vocabulary, merges and special tokens."""
    if meta.model != "gpt2":
        raise ValueError(
            f"{path}: GGUF tokenizer model {meta.model!r} is not supported (supported: byte-level BPE 'gpt2', "
            "SentencePiece 'llama'); "
            "load the tokenizer from the model's Hugging Face folder with Tokenizer.from_hf_folder"
        )
    if meta.pre not in _PRE_TOKENIZERS:
        raise ValueError(
            f"{path}: GGUF pre-tokenizer {meta.pre!r} is not supported (supported: {', '.join(_PRE_TOKENIZERS)}); "
            "load the tokenizer from the model's Hugging Face folder with Tokenizer.from_hf_folder"
        )
    vocab = {token: i for i, token in enumerate(meta.tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.merges]
    tok = RustTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = _PRE_TOKENIZERS[meta.pre]()
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    _add_gguf_added_tokens(tok, meta)
    return tok


def _add_gguf_added_tokens(tok: RustTokenizer, meta: GGUFTokenizerMetadata) -> None:
    """Control tokens as special tokens, user-defined ones as plain added tokens; both matched in the raw text
    before any normalization, as llama.cpp does."""
    tok.add_tokens([
        AddedToken(meta.tokens[i], special=int(t) == _CONTROL_TOKEN, normalized=False)
        for i, t in enumerate(meta.token_types)
        if int(t) in (_CONTROL_TOKEN, _USER_DEFINED_TOKEN)
    ])


def _spm_merges(meta: GGUFTokenizerMetadata) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece BPE encoding with the GGUF piece scores.

    SentencePiece BPE repeatedly joins the adjacent pair whose joined piece is a normal vocabulary piece with the
    highest score. As `tokenizers` merges: every split of a normal piece into two vocabulary pieces, ranked by the
    joined piece's score (highest first; ties by id, then by the left part's length).
    """
    vocab = {token: i for i, token in enumerate(meta.tokens)}
    scores = meta.scores.tolist()
    candidates = []
    for i, (piece, kind) in enumerate(zip(meta.tokens, meta.token_types.tolist())):
        if kind != _NORMAL_TOKEN:
            continue
        for cut in range(1, len(piece)):
            if piece[:cut] in vocab and piece[cut:] in vocab:
                candidates.append((-scores[i], i, cut, piece[:cut], piece[cut:]))
    candidates.sort()
    return [(left, right) for *_, left, right in candidates]


def _spm_bpe_from_gguf(meta: GGUFTokenizerMetadata, path: Path) -> RustTokenizer:
    """A `tokenizers` SentencePiece-style BPE equal to a `llama` GGUF tokenizer: spaces become U+2581 (plus a
    leading one when `add_space_prefix`), unknown characters fall back to `<0xNN>` byte tokens."""
    if meta.scores is None:
        raise ValueError(f"{path}: GGUF tokenizer 'llama' has no tokenizer.ggml.scores; the file is incomplete")
    unk = None if meta.unknown_token_id is None else meta.tokens[meta.unknown_token_id]
    vocab = {token: i for i, token in enumerate(meta.tokens)}
    tok = RustTokenizer(models.BPE(vocab=vocab, merges=_spm_merges(meta), unk_token=unk, fuse_unk=True,
                                   byte_fallback=True))
    steps = [normalizers.Prepend(SPM_SPACE)] if meta.add_space_prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPM_SPACE)])
    tok.decoder = decoders.Sequence([decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if meta.add_space_prefix else []))
    _add_gguf_added_tokens(tok, meta)
    return tok


def _tokenizer_from_gguf(meta: GGUFTokenizerMetadata, path: Path) -> RustTokenizer:
    if meta.model == "llama":
        return _spm_bpe_from_gguf(meta, path)
    return _bpe_from_gguf(meta, path)


def _token(meta: GGUFTokenizerMetadata, token_id: int | None) -> str | None:
    return None if token_id is None else meta.tokens[token_id]


def _generation_stop_ids(folder: Path) -> list[int] | None:
    """`eos_token_id` of `generation_config.json` (int or list), or None when absent."""
    gen = folder / "generation_config.json"
    if not gen.is_file():
        return None
    eos = json.loads(gen.read_text()).get("eos_token_id")
    if eos is None:
        return None
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


class Tokenizer:
    """A Hugging Face tokenizer with the reference's encode/decode conventions.

    Build it with `from_hf_folder`, `from_gguf` or `from_source`; the constructor takes an existing transformers
    tokenizer.
    """

    def __init__(self, hf_tokenizer: PreTrainedTokenizerBase, *, name: str, stop_ids: Sequence[int] | None = None,
                 prompt_format: str = "chat"):
        _check_prompt_format(prompt_format)
        if hf_tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {name!r} has no eos token; set `eos_token` in its tokenizer_config.json")
        if hf_tokenizer.pad_token_id is None:
            hf_tokenizer.pad_token = hf_tokenizer.eos_token
        # This wrapper never truncates; prompts of 128K+ tokens are expected, so silence the length warning.
        hf_tokenizer.model_max_length = sys.maxsize
        self._hf = hf_tokenizer
        self._backend: RustTokenizer = hf_tokenizer.backend_tokenizer
        self._name = name
        ids = list(stop_ids) if stop_ids else [hf_tokenizer.eos_token_id]
        self._stop_ids = tuple(dict.fromkeys(int(i) for i in ids))
        self._prompt_format = prompt_format

    def with_prompt_format(self, prompt_format: str) -> Tokenizer:
        """The same tokenizer (sharing its vocabulary) with another prompt format (`chat` or `completion`)."""
        _check_prompt_format(prompt_format)
        other = copy.copy(self)
        other._prompt_format = prompt_format
        return other

    @classmethod
    def from_hf_folder(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` (+ `tokenizer_config.json`, chat template, `generation_config.json`) from a folder."""
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such tokenizer folder; pass a Hugging Face model folder "
                                    "holding tokenizer.json and tokenizer_config.json")
        if not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{folder}: tokenizer.json is missing; save the tokenizer there with "
                                    "`tokenizer.save_pretrained(folder)` (fast tokenizers only)")
        hf = AutoTokenizer.from_pretrained(str(folder))
        return cls(hf, name=folder.name, stop_ids=_generation_stop_ids(folder))

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """Rebuild the tokenizer stored in a GGUF file's metadata (vocabulary, merges, special tokens, template)."""
        from sparse_jax.checkpoints.gguf import read_gguf_tokenizer

        path = Path(path)
        meta = read_gguf_tokenizer(path)
        eos = _token(meta, meta.eos_token_id)
        hf = PreTrainedTokenizerFast(
            tokenizer_object=_tokenizer_from_gguf(meta, path),
            bos_token=_token(meta, meta.bos_token_id),
            eos_token=eos,
            unk_token=_token(meta, meta.unknown_token_id),
            pad_token=_token(meta, meta.padding_token_id) or eos,
            chat_template=meta.chat_template,
            clean_up_tokenization_spaces=False,
        )
        stop = [i for i in (meta.eos_token_id, meta.eot_token_id) if i is not None]
        return cls(hf, name=path.stem, stop_ids=stop)

    @classmethod
    def from_source(cls, source: str | Path) -> Tokenizer:
        """A `.gguf` file -> `from_gguf`; anything else -> `from_hf_folder`."""
        source = Path(source)
        return cls.from_gguf(source) if source.suffix == ".gguf" else cls.from_hf_folder(source)

    @property
    def name(self) -> str:
        return self._name

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce (base vocabulary + added tokens)."""
        return len(self._hf)

    @property
    def eos_token_id(self) -> int:
        return int(self._hf.eos_token_id)

    @property
    def pad_token_id(self) -> int:
        return int(self._hf.pad_token_id)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Generation stop ids: `generation_config.json`'s eos ids (HF folder), eos + eot (GGUF), else eos."""
        return self._stop_ids

    @property
    def hf_tokenizer(self) -> PreTrainedTokenizerBase:
        return self._hf

    def text_to_tokens(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added (special tokens written in `text` are recognised)."""
        return self._hf.encode(text, add_special_tokens=False)

    def render_chat(self, text: str) -> str:
        """The chat template applied to one user message `text`, ending with the assistant generation prompt."""
        if not self._hf.chat_template:
            raise ValueError(f"tokenizer {self._name!r} has no chat template; add `chat_template` to "
                             "tokenizer_config.json or a chat_template.jinja file next to it")
        return self._hf.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )

    @property
    def prompt_format(self) -> str:
        return self._prompt_format

    def render_prompt(self, text: str) -> str:
        """The prompt text for `text` in this tokenizer's format: the chat template, or text + answer prefix."""
        if self._prompt_format == "completion":
            return text + COMPLETION_ANSWER_PREFIX
        return self.render_chat(text)

    def encode_for_generation(self, text: str) -> list[int]:
        """Token ids of the prompt for `text`: chat-templated (docs/reference_behaviour.md §2.2) or, in the `completion` format,
        BOS (when the tokenizer has one) + the text + the answer prefix."""
        return [*self._bos_prefix(), *self.text_to_tokens(self.render_prompt(text))]

    def _bos_prefix(self) -> list[int]:
        """What a generation prompt starts with before its text: BOS in the `completion` format (when the
        tokenizer has one), nothing for chat templates (they hold their own)."""
        bos = self._hf.bos_token_id
        return [bos] if self._prompt_format == "completion" and bos is not None else []

    def prompt_positions(self, text: str, spans: Sequence[tuple[int, int]]) -> list[int]:
        """Positions in `encode_for_generation(text)` of the tokens overlapping character `spans` of `text`.

        Args:
          text: the task text (before the chat template or answer prefix).
          spans: `(start, end)` character ranges of `text`, end exclusive.

        Returns:
          Sorted token positions; empty without spans.
        """
        if not spans:
            return []
        rendered = self.render_prompt(text)
        offset = rendered.find(text)
        if offset < 0:
            raise ValueError(f"tokenizer {self._name!r}: the prompt format rewrites the task text, so its "
                             "character spans cannot be mapped to tokens")
        encoding = self._backend.encode(rendered, add_special_tokens=False)
        shift = len(self._bos_prefix())
        hits = {
            shift + i
            for i, (start, end) in enumerate(encoding.offsets)
            for lo, hi in spans
            if start < offset + hi and end > offset + lo and end > start
        }
        return sorted(hits)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` with special tokens skipped."""
        return self._hf.decode(list(ids), skip_special_tokens=True)

    def count_tokens(self, text: str) -> int:
        """`len(text_to_tokens(text))`, computed without building Python id lists or offsets."""
        return self.count_tokens_batch([text])[0]

    def count_tokens_batch(self, texts: Sequence[str]) -> list[int]:
        """Token counts of many texts at once (parallel in the Rust tokenizer)."""
        encodings = self._backend.encode_batch_fast(list(texts), add_special_tokens=False)
        return [len(e.ids) for e in encodings]

    def __repr__(self) -> str:
        return (f"Tokenizer(name={self._name!r}, vocab_size={self.vocab_size}, stop_ids={self._stop_ids}, "
                f"prompt_format={self._prompt_format!r})")


def _check_prompt_format(prompt_format: str) -> None:
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {prompt_format!r} "
                         "(use 'completion' for base models without a chat template)")
