"""kernels/cost_standin.py: the planner's attention stand-in computes attention (in the compute
dtype), is what `kernels.attention` traces inside `counting()` only, and keeps the reference's
masks and FLOPs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopcoder_jax import kernels
from loopcoder_jax.config import AttnImpl
from loopcoder_jax.kernels import cost_standin, reference


def qkv(b, t, n, k, h, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return tuple(
        jax.random.normal(kk, shape).astype(dtype)
        for kk, shape in zip(ks, [(b, t, n, h), (b, t, k, h), (b, t, k, h)], strict=True)
    )


@pytest.mark.parametrize(
    "mask", [reference.Causal(), reference.LocalWindow(4), reference.LocalWindow(64)]
)
def test_standin_is_attention_with_the_reference_masks(mask):
    q, k, v = qkv(2, 24, 4, 2, 16)
    segment_ids = jnp.asarray(np.repeat([[0, 1]], 12, axis=1).reshape(1, 24).repeat(2, 0))
    both = jax.jit(
        lambda q, k, v, s: (
            reference.attention(q, k, v, mask, s),
            cost_standin.attention(q, k, v, mask, s),
        )
    )
    want, got = both(q, k, v, segment_ids)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_standin_keeps_scores_in_the_compute_dtype_and_the_flops():
    q, k, v = qkv(1, 64, 4, 2, 32, jnp.bfloat16)
    ref_hlo = jax.jit(lambda *a: reference.attention(*a, reference.Causal())).lower(q, k, v)
    std_hlo = jax.jit(lambda *a: cost_standin.attention(*a, reference.Causal())).lower(q, k, v)

    # the reference's scores (a dot's [.., T, S] result) are float32; the stand-in's bf16
    def scores(lowered):  # element types of the dots with a [.., 64, 64] result
        dots = [x for x in lowered.as_text().splitlines() if "dot_general" in x]
        return {x.rsplit("x", 1)[-1] for x in dots if "64x64x" in x.rsplit("->", 1)[-1]}

    assert scores(ref_hlo) == {"f32>"} and scores(std_hlo) == {"bf16>"}
    flops = lambda lowered: lowered.compile().cost_analysis()["flops"]
    matmuls = 2 * 2 * 64 * 64 * 4 * 32  # QK and PV, every key per query: same as the reference
    assert flops(std_hlo) >= matmuls and flops(ref_hlo) >= matmuls
    assert flops(std_hlo) == pytest.approx(flops(ref_hlo), rel=0.1)  # + elementwise work
    want = reference.attention(q, k, v, reference.Causal()).astype(jnp.float32)
    got = cost_standin.attention(q, k, v, reference.Causal()).astype(jnp.float32)
    np.testing.assert_allclose(got, want, atol=0.05)


def test_kernels_attention_uses_the_standin_only_while_counting(monkeypatch):
    calls = []
    monkeypatch.setattr(cost_standin, "attention", lambda *a: calls.append(a) or a[0])
    q, k, v = qkv(1, 8, 2, 1, 8)
    kernels.attention(q, k, v, kernels.Causal(), None, AttnImpl.XLA)
    assert not calls and not cost_standin.active()
    with cost_standin.counting():
        assert cost_standin.active()
        kernels.attention(q, k, v, kernels.Causal(), None, AttnImpl.XLA)
    assert len(calls) == 1 and not cost_standin.active()


def test_context_parallel_counting_compiles_use_the_standin_too():
    """With the sequence sharded, the planner's counting compile costs the context-parallel
    XLA kernels (balanced causal blocks, the local halo) with compute-dtype scores, like the
    one-device stand-in; the values are still attention (bf16 tolerance), and outside
    `counting()` the scores stay float32 (the numerics path is unchanged)."""
    import flax.linen as nn
    from jax.sharding import Mesh

    from loopcoder_jax import sharding as sh
    from loopcoder_jax.kernels import context_parallel as cp

    devices = jax.devices()
    if len(devices) < 4:
        pytest.skip("needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    mesh = Mesh(np.array(devices[:4]).reshape(1, 1, 1, 4), sh.MESH_AXES)
    q, k, v = qkv(2, 64, 4, 2, 16, jnp.bfloat16)
    for mask in (reference.Causal(), reference.LocalWindow(6)):
        want = reference.attention(*(x.astype(jnp.float32) for x in (q, k, v)), mask)
        f = jax.jit(lambda q, k, v, m=mask: cp.attention(q, k, v, m, None))
        with jax.set_mesh(mesh), nn.logical_axis_rules(sh.FSDP_TP):
            plain = f.lower(q, k, v).as_text()
            with cost_standin.counting():
                counted = jax.jit(lambda q, k, v, m=mask: cp.attention(q, k, v, m, None))
                text = counted.lower(q, k, v).as_text()
                got = counted(q, k, v)
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.1, rtol=0.1)
        # the score einsums (outputs [..., queries, keys]; the PV products end in H = 16):
        # float32 on the plain path, the compute dtype in the counting compile
        def score_dtypes(hlo):
            outs = [ln.rsplit("->", 1)[-1] for ln in hlo.splitlines() if "dot_general" in ln]
            return {o.strip()[-5:] for o in outs if "x16x" not in o and "x16xf" not in o}

        assert score_dtypes(plain) == {"xf32>"}, score_dtypes(plain)
        assert score_dtypes(text) == {"bf16>"}, score_dtypes(text)
