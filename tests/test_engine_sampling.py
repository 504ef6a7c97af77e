"""Next-token sampling: greedy, temperature and nucleus (top-p)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_jax.engine.sampling import SamplingParams, sample_tokens


def test_greedy_is_argmax():
    logits = jax.random.normal(jax.random.PRNGKey(0), (5, 50))
    np.testing.assert_array_equal(sample_tokens(logits, jax.random.PRNGKey(1), SamplingParams()), logits.argmax(-1))


def test_tiny_nucleus_keeps_only_the_top_token():
    logits = jax.random.normal(jax.random.PRNGKey(0), (5, 50))
    params = SamplingParams(temperature=2.0, top_p=1e-6)
    for seed in range(3):
        np.testing.assert_array_equal(sample_tokens(logits, jax.random.PRNGKey(seed), params), logits.argmax(-1))


def test_nucleus_never_samples_outside_the_top_p_mass():
    # Probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.7 keeps the first two tokens only.
    probs = jnp.array([[0.5, 0.3, 0.15, 0.05]])
    logits = jnp.log(jnp.tile(probs, (4000, 1)))
    ids = np.asarray(sample_tokens(logits, jax.random.PRNGKey(0), SamplingParams(temperature=1.0, top_p=0.7)))
    assert set(ids.tolist()) == {0, 1}
    assert abs((ids == 0).mean() - 0.5 / 0.8) < 0.03


def test_temperature_sampling_follows_the_distribution():
    probs = jnp.array([0.6, 0.3, 0.1])
    logits = jnp.log(jnp.tile(probs, (6000, 1)))
    ids = np.asarray(sample_tokens(logits, jax.random.PRNGKey(1), SamplingParams(temperature=1.0)))
    np.testing.assert_allclose(np.bincount(ids, minlength=3) / ids.size, probs, atol=0.03)


@pytest.mark.parametrize("kwargs, message", [(dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p")])
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
