"""The LM head's GPU row padding (``transformer._MIN_GPU_HEAD_ROWS``) changes no logit."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_jax.models import transformer
from sparse_jax.models.loading import load_model

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.mark.parametrize("lead", [(1,), (3,), (1, 1), (2, 5), (9,)])
def test_padded_head_rows_give_the_same_logits(monkeypatch, lead):
    model = load_model(str(FIXTURES / "tiny_llama"), dtype=jnp.float32).model
    x = jnp.asarray(np.random.default_rng(0).standard_normal((*lead, model.config.hidden_size)), jnp.float32)
    want = np.asarray(model._logits(x))  # the CPU path: no padding
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    got = np.asarray(model._logits(x))
    assert got.shape == (*lead, model.config.vocab_size) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_only_few_rows_are_padded_and_only_on_gpus(monkeypatch):
    model = load_model(str(FIXTURES / "tiny_llama"), dtype=jnp.float32).model
    hidden = model.config.hidden_size
    program = lambda rows: str(jax.make_jaxpr(model._logits)(jnp.zeros((rows, hidden), jnp.float32)))
    assert "pad" not in program(1)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert "pad" in program(1) and "pad" in program(transformer._MIN_GPU_HEAD_ROWS - 1)
    assert "pad" not in program(transformer._MIN_GPU_HEAD_ROWS)
