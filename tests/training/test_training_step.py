"""The train step: chunked loss, accumulation, optimizer pieces, sharding equivalence."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopcoder_jax import sharding as sh
from loopcoder_jax import training as tr
from loopcoder_jax.config import MeshConfig, RuntimeConfig, TrainConfig
from loopcoder_jax.model import LoopCoder
from tests.training._util import synthetic_batch

RULES = sh.get_rules("fsdp_tp")


def _nonzero_gate(params, seed=1):
    """Tests must see the gate: give it non-zero weights (the official init is zeros)."""
    rng = np.random.default_rng(seed)
    layers = dict(params["layers"])
    attn = dict(layers["self_attn"])
    gate = {
        k: jnp.asarray(rng.normal(0, 0.5, v.shape), v.dtype) for k, v in attn["loop_gate"].items()
    }
    attn["loop_gate"] = gate
    layers["self_attn"] = attn
    return {**params, "layers": layers}


@pytest.fixture(scope="module")
def cfg(tiny_config):
    return tiny_config


@pytest.fixture(scope="module")
def params(cfg):
    model = LoopCoder(cfg)
    p = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    return _nonzero_gate(jax.tree.map(np.asarray, __import__("flax").linen.unbox(p)))


def _full_loss(model, params, batch, z_loss=0.0):
    logits = model.apply({"params": params}, batch["input_ids"], batch["segment_ids"],
                         batch["positions"])  # fmt: skip
    lse = jax.nn.logsumexp(logits, -1)
    tgt = jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    m = batch["loss_mask"]
    return jnp.sum((lse - tgt) * m) + jnp.sum(z_loss * lse**2 * m)


@pytest.mark.parametrize("tied", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_chunked_loss_and_grads_equal_full_logits(cfg, params, tied):
    cfg = cfg.replace(tie_word_embeddings=tied)
    model = LoopCoder(cfg)
    p = {k: v for k, v in params.items() if not (tied and k == "lm_head")}
    batch = synthetic_batch(np.random.default_rng(0), 2, 24, cfg.vocab_size)
    tc = TrainConfig(loss_chunk=8, z_loss=1e-3)  # 3 chunks of 8

    def chunked(p):
        total, _ = tr.loss_sums(model, p, batch, tc)
        return total

    full = lambda p: _full_loss(model, p, batch, z_loss=1e-3)
    lc, gc = jax.jit(jax.value_and_grad(chunked))(p)
    lf, gf = jax.jit(jax.value_and_grad(full))(p)
    np.testing.assert_allclose(lc, lf, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(gc), jax.tree.leaves(gf), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_chunked_loss_never_builds_full_logits(cfg):
    """The jaxpr of loss + grad holds [B, C, V] logits, never [B, T, V]."""
    cfg = cfg.replace(vocab_size=97)  # a V no other dim has
    model = LoopCoder(cfg)
    params = __import__("flax").linen.unbox(tr.abstract_boxed_params(model))
    batch = synthetic_batch(np.random.default_rng(0), 2, 32, cfg.vocab_size)
    tc = TrainConfig(loss_chunk=8)
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: tr.loss_sums(model, p, batch, tc)[0]))(params)
    shapes = set()

    def walk(jp):
        for eqn in jp.eqns:
            for v in eqn.outvars:
                shapes.add(tuple(getattr(v.aval, "shape", ())))
            for p in eqn.params.values():
                if hasattr(p, "jaxpr"):
                    walk(p.jaxpr if hasattr(p.jaxpr, "eqns") else p.jaxpr.jaxpr)

    walk(jaxpr.jaxpr)
    assert (2, 8, cfg.vocab_size) in shapes
    assert (2, 32, cfg.vocab_size) not in shapes


def test_decay_mask_excludes_norms_gate_bias_and_embedding(params):
    mask = tr.decay_mask(params)
    assert mask["embed_tokens"]["embedding"] is False
    assert mask["norm"]["scale"] is False
    assert mask["layers"]["input_layernorm"]["scale"] is False
    assert mask["layers"]["self_attn"]["loop_gate"]["bias"] is False
    assert mask["layers"]["self_attn"]["loop_gate"]["kernel"] is True
    assert mask["layers"]["self_attn"]["q_proj"]["kernel"] is True
    assert mask["layers"]["mlp"]["down_proj"]["kernel"] is True
    assert mask["lm_head"]["kernel"] is True
    assert tr.decay_mask(params, decay_embeddings=True)["embed_tokens"]["embedding"] is True


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_warmup_then_decay(kind):
    tc = TrainConfig(lr=1.0, steps=110, warmup_steps=10, min_lr_ratio=0.1, schedule=kind)
    s = tr.make_schedule(tc)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(float(s(5)), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(s(10)), 1.0, rtol=1e-6)
    end = {"cosine": 0.1, "linear": 0.1, "constant": 1.0}[kind]
    np.testing.assert_allclose(float(s(110)), end, rtol=1e-5)
    if kind == "cosine":  # cosine is above linear at the midpoint of the decay
        np.testing.assert_allclose(float(s(60)), 0.1 + 0.9 * 0.5, rtol=1e-5)


def _run_steps(cfg, params, batches, mesh_cfg, devices, tc):
    model = LoopCoder(cfg)
    mesh = sh.make_mesh(mesh_cfg, devices)
    opt = tr.make_optimizer(tc)
    tr.validate(model, mesh, RULES, tc)
    _, shard = tr.state_shardings(model, opt, mesh, RULES)
    placed = jax.device_put(params, shard.params)
    state = tr.make_state_from_params(model, opt, mesh, RULES)(placed)
    step = tr.make_train_step(model, opt, mesh, RULES, train_cfg=tc)
    out = []
    for b in batches:
        state, m = step(state, tr.shard_batch(b, mesh, RULES))
        out.append({k: float(v) for k, v in m.items()})
    return state, out


@pytest.fixture(scope="module")
def batches(cfg):
    rng = np.random.default_rng(42)
    return [synthetic_batch(rng, 8, 32, cfg.vocab_size) for _ in range(5)]


TC = TrainConfig(batch_size=8, seq_len=32, steps=20, warmup_steps=2, lr=3e-3, loss_chunk=16)


@pytest.fixture(scope="module")
def one_device_run(cfg, params, batches):
    return _run_steps(cfg, params, batches, MeshConfig(fsdp=1), jax.devices()[:1], TC)


@pytest.mark.parametrize(
    "mesh_cfg",
    [
        MeshConfig(data=1, fsdp=4, tensor=2),
        MeshConfig(data=2, fsdp=2, tensor=2),
        MeshConfig(data=1, fsdp=4, tensor=1, sequence=2),  # context parallel
    ],
    ids=["fsdp4_tensor2", "data2_fsdp2_tensor2", "fsdp4_sequence2"],
)
def test_sharded_losses_equal_one_device(cfg, params, batches, one_device_run, mesh_cfg):
    assert len(jax.devices()) >= 8
    _, ref = one_device_run
    state, got = _run_steps(cfg, params, batches, mesh_cfg, jax.devices()[:8], TC)
    np.testing.assert_allclose([m["loss"] for m in got], [m["loss"] for m in ref], atol=1e-5)
    # the state really is sharded the way the rules say
    q = state.params["layers"]["self_attn"]["q_proj"]["kernel"]  # [L, D, N, H]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape[1:3] == (
        cfg.hidden_size // mesh_cfg.fsdp,
        cfg.num_attention_heads // mesh_cfg.tensor,
    )


def test_grad_accumulation_matches_one_big_batch(cfg, params, batches, one_device_run):
    _, ref = one_device_run
    tc = TrainConfig(**{**TC.__dict__, "grad_accum": 4})
    _, got = _run_steps(cfg, params, batches[:3], MeshConfig(fsdp=1), jax.devices()[:1], tc)
    np.testing.assert_allclose(
        [m["loss"] for m in got], [m["loss"] for m in ref[:3]], rtol=2e-6, atol=2e-6
    )
    np.testing.assert_allclose(
        [m["grad_norm"] for m in got], [m["grad_norm"] for m in ref[:3]], rtol=1e-5
    )


def test_bptt_grad_scale_changes_grads_not_loss(cfg, params, batches):
    model = LoopCoder(cfg)
    scaled = LoopCoder(cfg, RuntimeConfig(bptt_grad_scale=0.0))
    b = batches[0]
    f = lambda m: jax.jit(jax.value_and_grad(lambda p: tr.loss_sums(m, p, b, TC)[0]))(params)
    (l1, g1), (l0, g0) = f(model), f(scaled)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)  # identity in the forward pass
    q1 = g1["layers"]["self_attn"]["q_proj"]["kernel"]
    q0 = g0["layers"]["self_attn"]["q_proj"]["kernel"]
    assert np.max(np.abs(q1 - q0)) > 1e-3 * np.max(np.abs(q1))
    # the embedding only gets gradient through loop 0's input: truncation changes it too
    e1, e0 = g1["embed_tokens"]["embedding"], g0["embed_tokens"]["embedding"]
    assert not np.allclose(e1, e0)


@pytest.mark.parametrize(
    "remat",
    ["full", *(pytest.param(r, marks=pytest.mark.slow) for r in ("dots", "save_qkv_out_mlp_in"))],
)
def test_remat_policy_same_grads(cfg, params, batches, remat):
    b = batches[0]
    grads = {}
    for r in ("none", remat):
        m = LoopCoder(cfg, RuntimeConfig(remat=r))
        grads[r] = jax.jit(jax.grad(lambda p, m=m: tr.loss_sums(m, p, b, TC)[0]))(params)
    # Remat only reorders float32 arithmetic, so differences are rounding noise. XLA:CPU picks
    # different kernels on different CPUs, so an absolute 1e-6 floor flaked on elements whose
    # gradient is ~1e-2; scale the floor to each leaf's own magnitude instead.
    for a, c in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads[remat]), strict=True):
        a, c = np.asarray(a), np.asarray(c)
        scale = float(np.max(np.abs(a))) or 1.0
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-4 * scale)


def test_nan_skip_policy_keeps_state(cfg, params, batches):
    bad = jax.tree.map(lambda x: x, params)
    bad["norm"] = {"scale": np.full_like(params["norm"]["scale"], np.nan)}
    tc = TrainConfig(**{**TC.__dict__, "nan_policy": "skip"})
    state, m = _run_steps(cfg, bad, batches[:1], MeshConfig(fsdp=1), jax.devices()[:1], tc)
    assert m[0]["skipped"] == 1.0 and not np.isfinite(m[0]["loss"])
    q = np.asarray(state.params["layers"]["mlp"]["up_proj"]["kernel"])
    np.testing.assert_array_equal(q, params["layers"]["mlp"]["up_proj"]["kernel"])
    assert int(state.step) == 1
    assert np.all(np.asarray(state.opt_state[1][0].mu["lm_head"]["kernel"]) == 0)


def test_abstract_lowering_for_aot(cfg):
    """The AOT planner path: lower the step from eval_shape'd state + ShapeDtypeStruct batch."""
    model = LoopCoder(cfg)
    mesh = sh.make_mesh(MeshConfig(fsdp=4, tensor=2), jax.devices()[:8])
    opt = tr.make_optimizer(TC)
    abstract, shard = tr.state_shardings(model, opt, mesh, RULES)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shard
    )
    step = tr.make_train_step(model, opt, mesh, RULES, train_cfg=TC)
    lowered = step.lower(abstract, tr.abstract_batch(8, 32, mesh, RULES))
    assert "loss" in lowered.out_info[1]
