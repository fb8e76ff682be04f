"""The optimizer and the train step against a few lines of numpy (float64).

Checks what comparing one mesh with another cannot: global-norm clipping (not element-wise),
the AdamW decay mask reaching the optimizer (norm scales, the gate bias and the embedding are
not decayed), and the loss and gradients divided by the number of LOSS tokens.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopcoder_jax import sharding as sh
from loopcoder_jax import training as tr
from loopcoder_jax.config import MeshConfig, TrainConfig
from loopcoder_jax.model import LoopCoder
from tests.training._util import synthetic_batch

RULES = sh.get_rules("fsdp_tp")
DECAYED = ("kernel",)  # leaf names AdamW decays (embedding: only with decay_embeddings)


def _leaf_name(path) -> str:
    return [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]


def numpy_adamw(params, grads_per_step, tc: TrainConfig):
    """Global-norm clip, then AdamW (decoupled decay on kernels only), constant lr, float64."""
    flat_p, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [_leaf_name(path) for path, _ in flat_p]
    p = [np.asarray(x, np.float64) for _, x in flat_p]
    m = [np.zeros_like(x) for x in p]
    v = [np.zeros_like(x) for x in p]
    for t, grads in enumerate(grads_per_step, start=1):
        g = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads)]
        norm = np.sqrt(sum(np.sum(x * x) for x in g))
        if tc.clip_grad_norm > 0:
            g = [x * min(1.0, tc.clip_grad_norm / norm) for x in g]
        for i, name in enumerate(names):
            m[i] = tc.b1 * m[i] + (1 - tc.b1) * g[i]
            v[i] = tc.b2 * v[i] + (1 - tc.b2) * g[i] ** 2
            mhat, vhat = m[i] / (1 - tc.b1**t), v[i] / (1 - tc.b2**t)
            decay = name in DECAYED or (name == "embedding" and tc.decay_embeddings)
            p[i] = p[i] - tc.lr * (mhat / (np.sqrt(vhat) + tc.eps) + tc.weight_decay * decay * p[i])
    return jax.tree_util.tree_unflatten(treedef, p)


# A param tree with the model's leaf names; grads of very different norms per step, so that
# clipping (to norm 1) changes Adam's moments, and large weights, so that decay shows.
TREE = {
    "embed_tokens": {"embedding": (6, 4)},
    "layers": {
        "input_layernorm": {"scale": (2, 4)},
        "self_attn": {"q_proj": {"kernel": (2, 4, 3)}, "loop_gate": {"kernel": (2, 3),
                                                                      "bias": (2, 3)}},
    },
    "norm": {"scale": (4,)},
    "lm_head": {"kernel": (4, 6)},
}  # fmt: skip


def _random_tree(rng, scale):
    return jax.tree.map(
        lambda shape: (rng.normal(0, 1, shape) * scale).astype(np.float32),
        TREE,
        is_leaf=lambda x: isinstance(x, tuple),
    )


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_optimizer_is_global_norm_clip_then_masked_adamw(decay_embeddings):
    tc = TrainConfig(lr=0.05, schedule="constant", warmup_steps=0, weight_decay=0.5,
                     clip_grad_norm=1.0, b1=0.9, b2=0.95, eps=1e-8,
                     decay_embeddings=decay_embeddings)  # fmt: skip
    rng = np.random.default_rng(0)
    params = _random_tree(rng, 3.0)
    grads = [_random_tree(rng, s) for s in (10.0, 0.05, 40.0, 0.5)]  # norms ~ 80, 0.4, 300, 4
    opt = tr.make_optimizer(tc)
    state, p = opt.init(params), params
    for g in grads:
        upd, state = jax.jit(opt.update)(g, state, p)
        p = jax.tree.map(lambda a, u: a + u, p, upd)
    want = numpy_adamw(params, grads, tc)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(p), jax.tree.leaves(want),
                            strict=True):  # fmt: skip
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6, err_msg=jax.tree_util.keystr(path))


def _reference_loss_and_grads(model, params, batch):
    """Full-logits CE in numpy, and the gradient of the plain CE SUM (jax.grad of a loss
    written here, not the package's chunked loss)."""

    def ce(p):
        lg = model.apply({"params": p}, batch["input_ids"], batch["segment_ids"],
                         batch["positions"])  # fmt: skip
        ls = jax.nn.logsumexp(lg, -1)
        t = jnp.take_along_axis(lg, batch["targets"][..., None], -1)[..., 0]
        return jnp.sum((ls - t) * batch["loss_mask"]), lg

    grads, logits = jax.jit(jax.grad(ce, has_aux=True))(params)
    logits = np.asarray(logits, np.float64)
    mx = logits.max(-1, keepdims=True)
    lse = (mx + np.log(np.exp(logits - mx).sum(-1, keepdims=True)))[..., 0]
    tgt = np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    return np.sum((lse - tgt) * batch["loss_mask"]), grads


def test_train_step_loss_grads_and_update_against_numpy(tiny_config):
    """One real train step (1 device): loss = CE sum / loss tokens, grad_norm = |grad of the
    CE sum| / loss tokens, and the new params = numpy clip + AdamW applied to those grads."""
    cfg = tiny_config
    model = LoopCoder(cfg)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    params = jax.tree.map(np.asarray, params["params"])
    gate = params["layers"]["self_attn"]["loop_gate"]  # non-zero: tests must see the gate
    gate["kernel"] = np.random.default_rng(1).normal(0, 0.5, gate["kernel"].shape).astype(
        np.float32
    )
    batch = synthetic_batch(np.random.default_rng(2), 4, 32, cfg.vocab_size, docs=3)
    n_tok = batch["loss_mask"].sum()
    assert 0 < n_tok < batch["loss_mask"].size  # padding and document ends carry no loss
    # Clip below the gradient norm (so clipping is active), and eps of the size of the clipped
    # gradient elements: a first Adam step is lr * g / (|g| + eps), blind to g's scale if eps
    # were negligible.
    tc = TrainConfig(batch_size=4, seq_len=32, lr=1e-2, schedule="constant", warmup_steps=0,
                     weight_decay=0.3, clip_grad_norm=0.05, eps=1e-4, loss_chunk=8)  # fmt: skip
    ce_sum, g_sum = _reference_loss_and_grads(model, params, batch)
    g_mean = jax.tree.map(lambda g: np.asarray(g, np.float64) / n_tok, g_sum)
    want_norm = np.sqrt(sum(np.sum(g**2) for g in jax.tree.leaves(g_mean)))
    assert want_norm > 2 * tc.clip_grad_norm

    mesh = sh.make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    opt = tr.make_optimizer(tc)
    state = tr.make_state_from_params(model, opt, mesh, RULES)(params)
    step = tr.make_train_step(model, opt, mesh, RULES, train_cfg=tc)
    new_state, metrics = step(state, tr.shard_batch(batch, mesh, RULES))

    np.testing.assert_allclose(float(metrics["tokens"]), n_tok)
    np.testing.assert_allclose(float(metrics["loss"]), ce_sum / n_tok, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["grad_norm"]), want_norm, rtol=1e-4)
    want = numpy_adamw(params, [g_mean], tc)
    got = jax.tree.map(np.asarray, new_state.params)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                            strict=True):  # fmt: skip
        # atol: 1e-3 of the largest step (lr); float32 gradients vs float64 arithmetic
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
