"""Model invariants that need no torch: scan == unrolled, cached == full, remat, BPTT scale,
the O(T*W) FLOP count, logical sharding, ablation variants."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from loopcoder_jax import LoopCoder, ModelConfig, Remat, RuntimeConfig, flops
from loopcoder_jax import sharding as sh
from loopcoder_jax.checkpoint import abstract_params


def init_params(cfg, seed=0, gate_noise=0.5):
    """Random params with non-zero gates (the zero init would hide gate bugs)."""
    ids = jnp.zeros((1, 4), jnp.int32)
    params = nn.unbox(LoopCoder(cfg).init(jax.random.key(seed), ids)["params"])
    if cfg.has_gate:
        gate = params["layers"]["self_attn"]["loop_gate"]
        keys = jax.random.split(jax.random.key(seed + 100), 2)
        gate["kernel"] = gate_noise * jax.random.normal(keys[0], gate["kernel"].shape)
        gate["bias"] = gate_noise * jax.random.normal(keys[1], gate["bias"].shape)
    return params


def ids_for(cfg, batch, seq, seed=1):
    return jax.random.randint(jax.random.key(seed), (batch, seq), 0, cfg.vocab_size)


def loss_fn(cfg, runtime):
    def f(params, ids):
        logits = LoopCoder(cfg, runtime).apply({"params": params}, ids)
        return jnp.mean(
            jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0]
        )

    return jax.jit(jax.value_and_grad(f))


def max_tree_diff(a, b):
    return max(
        float(jnp.abs(x - y).max())
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_scan_equals_unrolled_forward_and_grads(tiny_config):
    params = init_params(tiny_config)
    ids = ids_for(tiny_config, 2, 19)
    scan_loss, scan_grads = loss_fn(tiny_config, RuntimeConfig())(params, ids)
    unrolled_loss, unrolled_grads = loss_fn(tiny_config, RuntimeConfig(scan_layers=False))(
        params, ids
    )
    assert abs(float(scan_loss - unrolled_loss)) < 1e-6
    assert max_tree_diff(scan_grads, unrolled_grads) < 1e-6


@pytest.mark.parametrize("remat", [Remat.FULL, Remat.DOTS])
def test_remat_changes_memory_not_gradients(tiny_config, remat):
    params = init_params(tiny_config)
    ids = ids_for(tiny_config, 2, 13)
    _, base = loss_fn(tiny_config, RuntimeConfig())(params, ids)
    _, rematted = loss_fn(tiny_config, RuntimeConfig(remat=remat))(params, ids)
    assert max_tree_diff(base, rematted) < 1e-6


def test_bptt_grad_scale_is_identity_forward_and_scales_cross_loop_gradient(tiny_config):
    """Embeddings reach the loss only through loop 0 -> loop 1, so their gradient is scaled
    exactly by the factor (the backward through loop 0 is linear in the cotangent)."""
    params = init_params(tiny_config)
    ids = ids_for(tiny_config, 2, 11)
    loss1, g1 = loss_fn(tiny_config, RuntimeConfig())(params, ids)
    loss_half, g_half = loss_fn(tiny_config, RuntimeConfig(bptt_grad_scale=0.5))(params, ids)
    loss0, g0 = loss_fn(tiny_config, RuntimeConfig(bptt_grad_scale=0.0))(params, ids)
    assert float(loss1) == float(loss_half) == float(loss0)
    emb = lambda g: g["embed_tokens"]["embedding"]  # noqa: E731
    assert float(jnp.abs(emb(g1)).max()) > 0
    assert float(jnp.abs(emb(g0)).max()) == 0.0
    np.testing.assert_allclose(emb(g_half), 0.5 * emb(g1), rtol=1e-4, atol=1e-9)
    # The head sits after the loops: untouched by the factor.
    np.testing.assert_allclose(
        g0["lm_head"]["kernel"], g1["lm_head"]["kernel"], rtol=1e-5, atol=1e-8
    )


@pytest.mark.parametrize(
    "loop_num, scan_layers, decode_block", [(2, True, 0), (3, True, 8), (3, False, 8)]
)
def test_ragged_prefill_then_decode_equals_full_forward(
    tiny_config, loop_num, scan_layers, decode_block
):
    """Right-padded prompts of different lengths (shorter and longer than W = 4), then decoding
    far past W: every step's logits equal the full forward at that position. Covers the layer
    loop scanned and unrolled (they index the stacked cache differently) and decode attention
    in one block (auto: 64 does not divide the 24-long cache) and in blocks of 8."""
    cfg = tiny_config.replace(loop_num=loop_num)
    params = init_params(cfg, seed=loop_num)
    model = LoopCoder(cfg, RuntimeConfig(scan_layers=scan_layers, decode_block=decode_block))
    total, lengths = 24, np.array([2, 9])
    ids = np.asarray(ids_for(cfg, 2, total, seed=7))
    full = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
    prompt = np.where(np.arange(9)[None] < lengths[:, None], ids[:, :9], 0)  # pad with junk 0s
    prefill = jax.jit(
        lambda p, x, n: model.apply({"params": p}, x, n, max_length=total, method=LoopCoder.prefill)
    )
    step = jax.jit(lambda p, t, c: model.apply({"params": p}, t, c, method=LoopCoder.decode_step))
    logits, cache = prefill(params, jnp.asarray(prompt), jnp.asarray(lengths))
    rows = np.arange(2)
    np.testing.assert_allclose(logits, full[rows, lengths - 1], atol=1e-4)
    for k in range(total - 9):
        pos = lengths + k
        logits, cache = step(params, jnp.asarray(ids[rows, pos])[:, None], cache)
        np.testing.assert_allclose(logits, full[rows, pos], atol=1e-4)


def test_local_branch_costs_t_times_w_not_t_squared():
    """XLA's compiled FLOPs of a T=4096, W=64 forward are within 10% of the analytic count
    that charges the local branch W keys per query. An O(T^2) local branch would add ~40%."""
    cfg = ModelConfig(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, loop_num=2,
        loop_window_size=64, max_position_embeddings=8192,
    )  # fmt: skip
    runtime = RuntimeConfig(scan_layers=False)  # cost_analysis counts a scan body only once
    params = abstract_params(cfg, runtime)
    ids = jax.ShapeDtypeStruct((1, 4096), jnp.int32)
    compiled = (
        jax.jit(lambda p, i: LoopCoder(cfg, runtime).apply({"params": p}, i))
        .lower(params, ids)
        .compile()
    )
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    analytic = flops.forward_flops(cfg, 1, 4096, causal_dense=True)
    assert abs(cost["flops"] / analytic - 1) < 0.10
    quadratic_local = analytic + cfg.num_hidden_layers * 4 * 4096 * (4096 - 64) * 4 * 64
    assert cost["flops"] < 0.8 * quadratic_local


def test_every_logical_axis_has_a_rule_and_params_are_annotated(tiny_config):
    boxed = abstract_params(tiny_config, boxed=True)
    specs = jax.tree.leaves(
        nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, PartitionSpec)
    )
    used = {name for spec in specs for name in spec if name is not None}
    assert sh.LAYERS in used and sh.HEADS in used and sh.KV_HEADS in used
    for table in sh.RULES.values():
        ruled = {name for name, _ in table}
        assert set(sh.ALL_LOGICAL_AXES) <= ruled
    # Every stacked layer param leads with the layers axis.
    layer_specs = nn.get_partition_spec(boxed)["layers"]
    assert all(
        spec[0] == sh.LAYERS
        for spec in jax.tree.leaves(layer_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    )


def test_sharded_forward_equals_unsharded(tiny_config):
    """8 fake devices, (data=2, fsdp=2, tensor=2): same logits as one device."""
    params = init_params(tiny_config)
    ids = ids_for(tiny_config, 4, 16)
    expected = LoopCoder(tiny_config).apply({"params": params}, ids)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2, 1), sh.MESH_AXES)
    rules = sh.FSDP_TP
    boxed = abstract_params(tiny_config, boxed=True)
    shardings = sh.param_shardings(boxed, mesh, rules)
    sharded_params = jax.device_put(params, shardings)
    batch_sharding = NamedSharding(mesh, nn.logical_to_mesh_axes((sh.BATCH, sh.LENGTH), rules))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        fn = jax.jit(lambda p, i: LoopCoder(tiny_config).apply({"params": p}, i))
        got = fn(sharded_params, jax.device_put(ids, batch_sharding))
    assert sharded_params["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec == PartitionSpec(
        None, "fsdp", "tensor"
    )
    np.testing.assert_allclose(got, expected, atol=2e-5)


@pytest.mark.parametrize(
    "variant", [dict(gate_type="fixed"), dict(gate_type="hidden"), dict(untied_loops=True)]
)
def test_ablation_variants_decode_consistently_and_differ_from_released(tiny_config, variant):
    cfg = tiny_config.replace(**variant)
    params = init_params(cfg)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    assert n_params == cfg.num_params()
    model = LoopCoder(cfg)
    ids = ids_for(cfg, 1, 12)
    full = model.apply({"params": params}, ids)
    logits, cache = model.apply(
        {"params": params}, ids[:, :5], max_length=12, method=LoopCoder.prefill
    )
    for t in range(5, 12):
        np.testing.assert_allclose(logits, full[:, t - 1], atol=1e-4)
        logits, cache = model.apply(
            {"params": params}, ids[:, t : t + 1], cache, method=LoopCoder.decode_step
        )
    if variant.get("untied_loops"):
        assert "layers_loop1" in params
    elif variant["gate_type"] == "fixed":
        assert "loop_gate" not in params["layers"]["self_attn"]
    else:
        assert params["layers"]["self_attn"]["loop_gate"]["kernel"].shape[1:] == (
            cfg.hidden_size,
            cfg.num_attention_heads,
        )


def test_bf16_params_and_compute(tiny_config):
    runtime = RuntimeConfig(dtype="bfloat16", param_dtype="bfloat16")
    variables = LoopCoder(tiny_config, runtime).init(
        jax.random.key(0), jnp.zeros((1, 4), jnp.int32)
    )
    params = nn.unbox(variables["params"])
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    logits = LoopCoder(tiny_config, runtime).apply({"params": params}, ids_for(tiny_config, 1, 9))
    assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())
