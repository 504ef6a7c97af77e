"""The gather-free diagonal sums equal the gather-based definition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_jax.attention.methods.scoring import window_diagonal_sums


def diagonal_sums(probs, positions):
    """The definition, with a gather: ``out[delta] = sum_i probs[i, positions[i] - delta]``."""
    t = probs.shape[-1]
    key = positions[:, None] - jnp.arange(t)[None, :]
    gathered = jnp.take_along_axis(probs, jnp.maximum(key, 0), axis=-1)
    return jnp.where(key >= 0, gathered, 0.0).sum(axis=0)


@pytest.mark.parametrize("a,t,length", [(8, 40, 40), (8, 40, 23), (16, 64, 5), (1, 10, 10), (32, 32, 32)])
def test_window_diagonal_sums_match_the_gather(a, t, length):
    rng = np.random.default_rng(a * 1000 + t + length)
    positions = length - a + np.arange(a)  # query rows L - A .. L - 1 (negative rows are absent)
    probs = rng.random((a, t)).astype(np.float32)
    keys = np.arange(t)[None, :]
    probs = np.where((keys <= positions[:, None]) & (positions[:, None] >= 0), probs, 0.0)
    want = diagonal_sums(jnp.asarray(probs), jnp.asarray(positions))
    got = window_diagonal_sums(jnp.asarray(probs), jnp.int32(length))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    # Independent count: mass at distance delta, by brute force.
    brute = np.zeros(t)
    for i, p in enumerate(positions):
        for j in range(t):
            if 0 <= p - j < t and j <= p:
                brute[p - j] += probs[i, j]
    np.testing.assert_allclose(np.asarray(got), brute, rtol=1e-5, atol=1e-6)


def test_window_diagonal_sums_jit_with_traced_length():
    probs = jnp.ones((4, 12))
    f = jax.jit(window_diagonal_sums)
    assert f(probs, jnp.int32(12)).shape == (12,)
