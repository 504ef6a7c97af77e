"""RoPE frequency builders against the formulas of docs/reference_behaviour.md section 2.1, and rotation properties."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from sparse_jax.models.config import RopeScaling
from sparse_jax.models.rope import apply_rope, default_inv_freq, llama3_inv_freq, rope_frequencies, yarn_inv_freq


def spec_yarn(theta: float, d: int, factor: float, orig: int = 32768) -> tuple[np.ndarray, float]:
    """docs/reference_behaviour.md section 2.1 written out in float64, independently of the implementation."""
    f = theta ** (-2.0 * np.arange(d // 2) / d)
    low = math.floor(d * math.log(orig / (2 * math.pi * 32)) / (2 * math.log(theta)))
    high = math.ceil(d * math.log(orig / (2 * math.pi * 1)) / (2 * math.log(theta)))
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(d // 2) - low) / (high - low), 0, 1)
    m = 1 - ramp
    return f / factor * (1 - m) + f * m, 0.1 * math.log(factor) + 1


@pytest.mark.parametrize("factor", [1.03125, 2.03125, 4.0])
@pytest.mark.parametrize("d", [16, 128])
def test_yarn_matches_spec(factor, d):
    rope = RopeScaling(theta=1e6, kind="yarn", factor=factor, original_max_position_embeddings=32768)
    inv_freq, mscale = rope_frequencies(rope, d)
    want, want_mscale = spec_yarn(1e6, d, factor)
    np.testing.assert_allclose(inv_freq, want, rtol=1e-6)
    assert mscale == pytest.approx(want_mscale, rel=1e-12)
    assert inv_freq.dtype == np.float32


def test_yarn_bands():
    """High frequencies are kept (extrapolated), low ones divided by the factor."""
    d, factor = 128, 2.0
    base = default_inv_freq(1e6, d)
    rope = RopeScaling(theta=1e6, kind="yarn", factor=factor, original_max_position_embeddings=32768)
    yarn = yarn_inv_freq(rope, d)
    np.testing.assert_allclose(yarn[:10], base[:10], rtol=1e-6)
    np.testing.assert_allclose(yarn[-10:], base[-10:] / factor, rtol=1e-6)


def test_default_inv_freq():
    np.testing.assert_allclose(default_inv_freq(10000.0, 8), [1.0, 0.1, 0.01, 0.001], rtol=1e-6)


def test_llama3_three_bands():
    rope = RopeScaling(
        theta=10000.0,
        kind="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=256,
    )
    base = default_inv_freq(10000.0, 16)
    got = llama3_inv_freq(rope, 16)
    wavelen = 2 * np.pi / base
    short, long_ = wavelen < 64, wavelen > 256
    assert short.any() and long_.any() and (~short & ~long_).any()
    np.testing.assert_allclose(got[short], base[short], rtol=1e-6)
    np.testing.assert_allclose(got[long_], base[long_] / 8, rtol=1e-6)
    mid = ~short & ~long_
    assert np.all(got[mid] < base[mid]) and np.all(got[mid] > base[mid] / 8)


def test_linear_divides_frequencies():
    inv, mscale = rope_frequencies(RopeScaling(theta=1e4, kind="linear", factor=4.0), 8)
    np.testing.assert_allclose(inv, default_inv_freq(1e4, 8) / 4, rtol=1e-6)
    assert mscale == 1.0


def test_rotation_properties():
    rng = np.random.default_rng(0)
    d = 16
    inv = default_inv_freq(10000.0, d)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, d)), jnp.float32)

    def rot(x, p):
        return apply_rope(x, jnp.full((1, 1), p, jnp.int32), inv)

    np.testing.assert_allclose(rot(q, 0), q, atol=1e-7)  # position 0 is the identity
    np.testing.assert_allclose(jnp.linalg.norm(rot(q, 37)), jnp.linalg.norm(q), rtol=1e-6)
    # q(m) . k(n) depends only on m - n.
    a = float(jnp.sum(rot(q, 50) * rot(k, 45)))
    b = float(jnp.sum(rot(q, 1005) * rot(k, 1000)))
    assert a == pytest.approx(b, rel=1e-4)
    # mscale multiplies the rotated vector.
    np.testing.assert_allclose(apply_rope(q, jnp.full((1, 1), 9), inv, 1.5), 1.5 * rot(q, 9), rtol=1e-6)


def test_rotate_half_convention():
    """Pair (x[i], x[i + d/2]) rotates by angle p * inv_freq[i]."""
    inv = np.array([0.5, 0.25], np.float32)
    x = jnp.asarray([[[[1.0, 2.0, 3.0, 4.0]]]])
    p = 3
    got = np.asarray(apply_rope(x, jnp.full((1, 1), p), inv))[0, 0, 0]
    a = p * inv
    want = [
        1 * math.cos(a[0]) - 3 * math.sin(a[0]),
        2 * math.cos(a[1]) - 4 * math.sin(a[1]),
        3 * math.cos(a[0]) + 1 * math.sin(a[0]),
        4 * math.cos(a[1]) + 2 * math.sin(a[1]),
    ]
    np.testing.assert_allclose(got, want, rtol=1e-6)
