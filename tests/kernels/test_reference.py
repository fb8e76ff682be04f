"""The blockwise local kernel equals dense attention with an explicit band mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopcoder_jax import kernels


def dense_with_mask(q, k, v, allowed):
    """Plain attention with a [B, T, S] mask and repeated kv heads: the obvious version."""
    g = q.shape[2] // k.shape[2]
    k = jnp.repeat(k, g, axis=2)
    v = jnp.repeat(v, g, axis=2)
    s = jnp.einsum("btnh,bsnh->bnts", q, k) * q.shape[-1] ** -0.5
    s = jnp.where(allowed[:, None], s, -jnp.inf)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s, -1), v)


def qkv(b, t, n, k, h, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(ks[0], (b, t, n, h)),
        jax.random.normal(ks[1], (b, t, k, h)),
        jax.random.normal(ks[2], (b, t, k, h)),
    )


def band(t, window, segment_ids=None):
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    allowed = (j <= i) & (j > i - window)
    allowed = np.broadcast_to(allowed, (1, t, t))
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return jnp.asarray(allowed)


@pytest.mark.parametrize("t,window", [(37, 4), (32, 8), (9, 16), (50, 7), (8, 1)])
def test_local_window_matches_dense_band(t, window):
    q, k, v = qkv(2, t, 4, 2, 8)
    got = kernels.attention(q, k, v, kernels.LocalWindow(window))
    want = dense_with_mask(q, k, v, band(t, window))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_local_window_with_segments():
    t, window = 30, 4
    seg = np.repeat(np.array([[1, 2, 3]]), [7, 15, 8], axis=1).astype(np.int32)
    q, k, v = qkv(1, t, 4, 4, 8, seed=3)
    got = kernels.attention(q, k, v, kernels.LocalWindow(window), jnp.asarray(seg))
    want = dense_with_mask(q, k, v, band(t, window, seg))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_causal_with_segments():
    t = 21
    seg = np.repeat(np.array([[5, 6]]), [11, 10], axis=1).astype(np.int32)
    q, k, v = qkv(1, t, 4, 1, 8, seed=4)
    got = kernels.attention(q, k, v, kernels.Causal(), jnp.asarray(seg))
    want = dense_with_mask(q, k, v, band(t, t, seg))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_window_excludes_exactly_the_key_w_back():
    """Perturbing key i-W must not change query i; perturbing key i-W+1 must."""
    t, window, i = 20, 4, 13
    q, k, v = qkv(1, t, 2, 2, 8, seed=5)
    base = kernels.attention(q, k, v, kernels.LocalWindow(window))[0, i]
    out_of_window = kernels.attention(
        q, k, v.at[0, i - window].add(10.0), kernels.LocalWindow(window)
    )[0, i]
    in_window = kernels.attention(
        q, k, v.at[0, i - window + 1].add(10.0), kernels.LocalWindow(window)
    )[0, i]
    np.testing.assert_allclose(out_of_window, base, atol=1e-6)
    assert float(jnp.abs(in_window - base).max()) > 1e-2


def test_masked_decode_attention_matches_dense():
    q, k, v = qkv(2, 1, 4, 2, 8, seed=6)
    _, kc, vc = qkv(2, 12, 4, 2, 8, seed=7)
    mask = jnp.asarray(np.arange(12)[None, None, :] <= np.array([5, 9])[:, None, None])
    # the cache is heads-major: [B, K, S, H]
    got = kernels.cached_attention(q, kc.swapaxes(1, 2), vc.swapaxes(1, 2), mask)
    want = dense_with_mask(q, kc, vc, mask)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("block", [4, 8, 24])
def test_prefix_attention_matches_masked_dense_and_skips_unused_blocks(block):
    """Ragged rows (one at a block edge, one shorter than a block), GQA, a stacked cache
    indexed by a traced layer: equal to dense attention over each row's prefix. Blocks past
    the longest row hold NaN, so reading one would poison the output."""
    layers, b, s, n, kh, h = 3, 3, 24, 4, 2, 8
    q, _, _ = qkv(b, 1, n, kh, h, seed=8)
    _, k, v = qkv(b * layers, s, n, kh, h, seed=9)  # [L*B, S, K, H] -> stacked heads-major
    k = k.reshape(layers, b, s, kh, h).swapaxes(2, 3)
    v = v.reshape(layers, b, s, kh, h).swapaxes(2, 3)
    lengths = np.array([3, 8, 13])
    used = -(-lengths.max() // block) * block  # blocks up to the longest row
    k_bad, v_bad = k.at[:, :, :, used:].set(jnp.nan), v.at[:, :, :, used:].set(jnp.nan)
    layer = 1
    got = jax.jit(
        lambda q, k, v, n, i: kernels.prefix_attention(q, k, v, n, block=block, index=(i,))
    )(q, k_bad, v_bad, jnp.asarray(lengths), jnp.int32(layer))
    mask = jnp.asarray(np.arange(s)[None, None, :] < lengths[:, None, None])
    want = dense_with_mask(q, k[layer].swapaxes(1, 2), v[layer].swapaxes(1, 2), mask)
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_prefix_attention_rejects_a_block_that_does_not_divide_the_cache():
    q, k, v = qkv(1, 1, 2, 2, 8, seed=1)
    cache = jnp.zeros((1, 2, 12, 8))
    with pytest.raises(ValueError, match="not a multiple of the decode block 8"):
        kernels.prefix_attention(q, cache, cache, jnp.array([3]), block=8)


def test_decode_block_auto_and_fallback():
    assert kernels.decode_block(0, platform="cpu") == kernels.DECODE_BLOCK_CPU
    assert kernels.decode_block(0, platform="tpu") == kernels.DECODE_BLOCK_ACCELERATOR
    assert kernels.decode_block(16, 64) == 16
    assert kernels.decode_block(16, 72) == 72  # does not divide: the whole cache, one block
