"""Greedy answer from a model to one prompt: the quickest end-to-end check of a setup."""

from __future__ import annotations

from sparse_jax.attention.registry import get_method
from sparse_jax.engine.generate import Engine, EngineConfig
from sparse_jax.pipeline.errors import ConfigError
from sparse_jax.pipeline.resources import load_bundle


def generate_answer(
    prompt: str, *, model: str = "smollm2", method: str = "dense", max_new_tokens: int = 64, dtype: str = "float32"
) -> str:
    """The model's greedy reply to ``prompt`` (one user message, chat template applied).

    Args:
      prompt: the user message.
      model: ``"smollm2"`` (embedded) or a Hugging Face checkpoint folder.
      method: attention method name (default arguments).
      max_new_tokens: generation limit.
      dtype: ``"float32"`` or ``"bfloat16"``.
    """
    if not prompt.strip():
        raise ConfigError("the prompt is empty; pass some text with --prompt")
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    try:
        attention = get_method(method)
    except ValueError as e:
        raise ConfigError(f"--method: {e}") from e
    ids_budget = max_new_tokens + 4096
    bundle = load_bundle(model, dtype, ids_budget)
    ids = bundle.tokenizer.encode_for_generation(prompt)
    engine = Engine(bundle.loaded.model, attention, EngineConfig())
    (result,) = engine.generate(
        [ids], max_new_tokens=max_new_tokens, stop_ids=bundle.loaded.stop_ids, tokenizer=bundle.tokenizer, progress=False
    )
    return result.text.strip()
