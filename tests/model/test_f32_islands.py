"""The float32 islands (DESIGN.md §1) checked against numpy float64, with bf16 activations.

A norm or softmax computed in bf16 still gives plausible numbers, so comparing one bf16 path
with another cannot see it. These tests round numpy's float64 answer to bf16 once and
demand the kernels' bf16 outputs be that close: computing the statistics or the scores in
bf16 adds roundings of its own that push them out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from loopcoder_jax.kernels import reference as ref
from loopcoder_jax.model.layers import RMSNorm

BF16 = ml_dtypes.bfloat16


def _bf16(x):
    return np.asarray(x, np.float64).astype(BF16)


def test_rmsnorm_in_f32_rounds_like_numpy():
    """Scale 1, bf16 in and out: the only rounding allowed is the final one."""
    rng = np.random.default_rng(0)
    d = 512
    # Rows of different magnitudes, one with an offset: mean(x^2) spans several binades.
    x = _bf16(rng.normal(0, 1, (64, d)) * rng.uniform(0.01, 30, (64, 1)) + 0.3)
    norm = RMSNorm(eps=1e-5, dtype=jnp.bfloat16)
    params = norm.init(jax.random.key(0), jnp.asarray(x))
    got = np.asarray(norm.apply(params, jnp.asarray(x)), np.float64)
    x64 = x.astype(np.float64)
    want = _bf16(x64 / np.sqrt(np.mean(x64 * x64, -1, keepdims=True) + 1e-5)).astype(np.float64)
    # float32 statistics differ from float64 by ~1e-7 relative: the bf16 result is the same
    # except at the rare values that sit next to a rounding boundary.
    exact = np.mean(got == want)
    assert exact > 0.99, f"only {exact:.1%} of elements round like float64"
    ulp = np.abs(want) * 2.0**-7
    assert np.all(np.abs(got - want) <= ulp)


def _attention64(q, k, v, allowed):
    """numpy float64 attention; q [B, T, N, H], k/v [B, S, K, H], allowed [T, S]."""
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    s = np.where(allowed, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


@pytest.mark.parametrize("mask", [ref.Causal(), ref.LocalWindow(8)], ids=["causal", "window"])
def test_softmax_in_f32_with_bf16_inputs(mask):
    """Scores of magnitude ~100: in bf16 they round by up to 0.5, which moves every softmax
    weight by up to ~40%; in float32 the error is the bf16 rounding of the weights (2^-9):
    measured max error 0.010 (f32) vs 0.17 (bf16 softmax) against the 0.027 bound."""
    rng = np.random.default_rng(1)
    b, t, n, kh, h = 2, 32, 4, 2, 16
    q = _bf16(rng.normal(0, 5.0, (b, t, n, h)))
    k = _bf16(rng.normal(0, 5.0, (b, t, kh, h)))
    v = _bf16(rng.normal(0, 1, (b, t, kh, h)))
    got = np.asarray(ref.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask))
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    allowed = (j <= i) if isinstance(mask, ref.Causal) else ((j <= i) & (j > i - mask.window))
    want = _attention64(q, k, v, allowed)
    scores = np.einsum("btnh,bsnh->bnts", q.astype(np.float64),
                       np.repeat(k, n // kh, 2).astype(np.float64)) / 4  # fmt: skip
    assert np.percentile(np.abs(scores), 90) > 20  # the regime where bf16 scores break
    err = np.abs(got.astype(np.float64) - want)
    assert err.max() <= 2**-7 * np.abs(v.astype(np.float64)).max(), err.max()


def test_cached_attention_softmax_in_f32():
    """The decode path (ring-buffer kernel) too: [B, K, S, H] cache layout."""
    rng = np.random.default_rng(2)
    b, t, n, kh, s, h = 2, 1, 4, 2, 24, 16
    q = _bf16(rng.normal(0, 5.0, (b, t, n, h)))
    k = _bf16(rng.normal(0, 5.0, (b, kh, s, h)))
    v = _bf16(rng.normal(0, 1, (b, kh, s, h)))
    allowed = np.ones((b, t, s), bool)
    allowed[0, :, 20:] = False
    got = np.asarray(ref.cached_attention(*map(jnp.asarray, (q, k, v, allowed))))
    want = np.stack(
        [_attention64(q[i : i + 1], k[i].transpose(1, 0, 2)[None], v[i].transpose(1, 0, 2)[None],
                      allowed[i])[0] for i in range(b)]
    )  # fmt: skip
    err = np.abs(got.astype(np.float64) - want)
    assert err.max() <= 2**-7 * np.abs(v.astype(np.float64)).max(), err.max()


def test_prefix_attention_online_softmax_in_f32():
    """The loop-0 decode kernel: blocks of keys, running max and sums (flash decoding)."""
    rng = np.random.default_rng(3)
    b, t, n, kh, s, h = 2, 1, 4, 2, 32, 16
    q = _bf16(rng.normal(0, 5.0, (b, t, n, h)))
    k = _bf16(rng.normal(0, 5.0, (b, kh, s, h)))
    v = _bf16(rng.normal(0, 1, (b, kh, s, h)))
    lengths = np.array([32, 21], np.int32)
    got = np.asarray(ref.prefix_attention(*map(jnp.asarray, (q, k, v, lengths)), block=8))
    want = np.stack(
        [_attention64(q[i : i + 1], k[i].transpose(1, 0, 2)[None], v[i].transpose(1, 0, 2)[None],
                      np.arange(s)[None] < lengths[i])[0] for i in range(b)]
    )  # fmt: skip
    err = np.abs(got.astype(np.float64) - want)
    assert err.max() <= 2**-7 * np.abs(v.astype(np.float64)).max(), err.max()
