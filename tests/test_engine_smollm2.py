"""The engine on the embedded SmolLM2-135M-Instruct: greedy output equals full recomputation (slow)."""

import jax.numpy as jnp
import pytest

from sparse_jax.engine.generate import generate
from sparse_jax.engine.reference import reference_greedy


@pytest.fixture(scope="module")
def smollm2():
    from sparse_jax.embedded import embedded_model_path
    from sparse_jax.models.loading import load_model
    from sparse_jax.tokenizer import Tokenizer

    try:
        path = embedded_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return load_model(path, dtype=jnp.float32), Tokenizer.from_gguf(path)


@pytest.mark.slow
def test_smollm2_batch_of_short_and_long_prompts_matches_full_recompute(smollm2):
    loaded, tokenizer = smollm2
    texts = [
        "Name a colour.",
        "Here is a list of fruits: apple, banana, cherry, date, elderberry, fig, grape, honeydew, kiwi, lemon, "
        "mango, nectarine, orange, papaya, quince, raspberry. Which fruit in the list starts with the letter m?",
    ]
    prompts = [tokenizer.encode_for_generation(t) for t in texts]
    max_new = 12
    results = generate(loaded.model, prompts, "dense", max_new_tokens=max_new, stop_ids=loaded.stop_ids,
                       tokenizer=tokenizer)
    for prompt, result in zip(prompts, results):
        expected = reference_greedy(loaded.model, prompt, max_new_tokens=max_new, stop_ids=loaded.stop_ids)
        assert result.token_ids == expected
        assert result.text == tokenizer.decode(expected)
