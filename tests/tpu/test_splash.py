"""Splash attention (Pallas TPU kernel) against the XLA reference.

On CPU the kernel runs through the Pallas interpreter: the same kernel code, block-sparsity
tables and shard_map plumbing as on TPU, only executed slowly. The `tpu`-marked twin compiles
it for a real TPU.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from loopcoder_jax import kernels
from loopcoder_jax import sharding as sh
from loopcoder_jax.config import AttnImpl, RuntimeConfig
from loopcoder_jax.kernels import reference, splash
from loopcoder_jax.model.loopcoder import LoopCoder

B, T, N, K, H = 4, 256, 4, 2, 32


def _qkv(dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (B, T, N, H), dtype)
    k = jax.random.normal(kk, (B, T, K, H), dtype)
    v = jax.random.normal(kv, (B, T, K, H), dtype)
    return q, k, v


def _packed_segments():
    # Rows with 1, 2 and 3 segments and trailing padding (segment 0), boundaries off-block.
    seg = np.zeros((B, T), np.int32)
    seg[0, :] = 1
    seg[1, :100], seg[1, 100:] = 1, 2
    seg[2, :37], seg[2, 37:190], seg[2, 190:240] = 1, 2, 3
    seg[3, :131], seg[3, 131:200] = 1, 2
    return jnp.asarray(seg)


def _mesh():
    return Mesh(np.array(jax.devices()[:8]).reshape(1, 4, 2, 1), sh.MESH_AXES)


MASKS = [reference.Causal(), reference.LocalWindow(8), reference.LocalWindow(200)]


@pytest.mark.parametrize(
    "mask",
    [
        pytest.param(MASKS[0], id="causal"),
        pytest.param(MASKS[1], id="local8"),
        pytest.param(MASKS[2], id="local200", marks=pytest.mark.slow),  # window spans blocks
    ],
)
def test_splash_matches_reference_on_packed_rows(mask):
    q, k, v = _qkv()
    seg = _packed_segments()
    got = jax.jit(lambda *a: splash.attention(*a, mask, seg))(q, k, v)
    want = reference.attention(q, k, v, mask, seg)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)


def test_splash_gradients_match_reference():
    q, k, v = _qkv()
    seg = _packed_segments()
    mask = reference.LocalWindow(8)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, mask, seg) ** 2)

    got = jax.jit(jax.grad(loss(splash.attention), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(reference.attention), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4, rtol=1e-4)


def test_splash_inside_shard_map_on_fake_mesh():
    """Batch over fsdp (4), heads over tensor (2): each shard gets 1 kv head + its 2 queries."""
    q, k, v = _qkv()
    seg = _packed_segments()
    mesh = _mesh()
    with jax.set_mesh(mesh), nn.logical_axis_rules(sh.FSDP_TP):
        fn = jax.jit(lambda q, k, v, s: splash.attention(q, k, v, reference.Causal(), s))
        text = fn.lower(q, k, v, seg).as_text()
        got = fn(q, k, v, seg)
    assert "shard_map" in text or "sdy.manual_computation" in text
    want = reference.attention(q, k, v, reference.Causal(), seg)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)


def test_unsupported_shapes_are_named_and_auto_falls_back():
    mesh = _mesh()
    assert "multiple of 128" in splash.unsupported_reason((B, 100, N, H), (B, 100, K, H))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sh.FSDP_TP):
        # 3 rows cannot split over fsdp=4; 3 kv heads cannot split over tensor=2.
        assert "batch 3" in splash.unsupported_reason((3, T, N, H), (3, T, K, H))
        assert "kv heads" in splash.unsupported_reason((B, T, 6, H), (B, T, 3, H))
        with pytest.raises(splash.SplashUnsupported, match="Use attn_impl=xla"):
            splash.attention(*(jnp.zeros((3, T, n, H)) for n in (N, K, K)), reference.Causal())
        # AUTO on a CPU mesh is XLA; an explicit SPLASH request on bad shapes falls back.
        assert kernels.resolve_impl(AttnImpl.AUTO) == AttnImpl.XLA
        assert kernels.resolve_impl(AttnImpl.SPLASH, (3, T, N, H), (3, T, K, H)) == AttnImpl.XLA
        assert kernels.resolve_impl(AttnImpl.SPLASH, (B, T, N, H), (B, T, K, H)) == (
            AttnImpl.SPLASH
        )


def test_model_with_splash_matches_xla(tiny_config):
    """Both loops (causal, causal-global + local window, gate) through the kernel dispatch."""
    cfg = tiny_config.replace(loop_window_size=8)
    ids = jax.random.randint(jax.random.key(1), (B, 128), 0, cfg.vocab_size)
    seg = _packed_segments()[:, :128]
    xla = LoopCoder(cfg, RuntimeConfig(attn_impl=AttnImpl.XLA))
    params = nn.unbox(xla.init(jax.random.key(2), ids[:, :8])["params"])
    # Non-zero gate parameters, or a gate bug would be invisible (DESIGN.md §1).
    gate = params["layers"]["self_attn"]["loop_gate"]
    gate["kernel"] = 0.3 * jax.random.normal(jax.random.key(3), gate["kernel"].shape)
    gate["bias"] = jnp.linspace(-1.0, 1.0, gate["bias"].size).reshape(gate["bias"].shape)
    spl = LoopCoder(cfg, RuntimeConfig(attn_impl=AttnImpl.SPLASH))
    with jax.set_mesh(_mesh()), nn.logical_axis_rules(sh.FSDP_TP):
        fn = jax.jit(lambda p: spl.apply({"params": p}, ids, segment_ids=seg))
        text = fn.lower(params).as_text()
        got = fn(params)
    # 2 layers are scanned: the kernel is traced once per branch (causal, global, local).
    assert text.count("sdy.manual_computation") + text.count("shard_map") >= 3, "no splash"
    want = xla.apply({"params": params}, ids, segment_ids=seg)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)


@pytest.mark.tpu
def test_splash_compiled_on_tpu_matches_reference():
    q, k, v = _qkv(jnp.bfloat16)
    seg = _packed_segments()
    for mask in MASKS:
        got = jax.jit(lambda *a, m=mask: splash.attention(*a, m, seg, interpret=False))(q, k, v)
        want = reference.attention(q, k, v, mask, seg)
        np.testing.assert_allclose(
            np.asarray(got, np.float32), np.asarray(want, np.float32), atol=3e-2, rtol=3e-2
        )
