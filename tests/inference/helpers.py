"""Shared pieces of the inference tests: tiny configs and random params with live gates."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from loopcoder_jax.config import ModelConfig
from loopcoder_jax.model import LoopCoder

W = 4  # local window of the test configs: prompts and generations run far past it


def tiny_cfg(loop_num: int = 2, **overrides) -> ModelConfig:
    kw = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rope_theta=10000.0,
        loop_num=loop_num,
        loop_window_size=W,
        eos_token_id=(2,),
        torch_dtype="float32",
    )
    kw.update(overrides)
    return ModelConfig(**kw)


def random_params(cfg: ModelConfig, seed: int = 0, std: float = 0.08):
    """Params whose every leaf matters: norms 1 + 0.1 N(0,1), gates 0.5 N(0,1), weights std N.

    A wider std than the init's 0.02 makes the logits peaked, so greedy decoding is not a
    coin toss between near-ties (which would make token-equality tests flaky).
    """
    abstract = nn.unbox(
        jax.eval_shape(
            lambda: LoopCoder(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
        )["params"]
    )
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    rng = np.random.default_rng(seed)
    out = []
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if "scale" in name:
            value = 1.0 + 0.1 * noise
        elif "loop_gate" in name:
            value = 0.5 * noise
        else:
            value = std * noise
        out.append(jnp.asarray(value))
    return jax.tree_util.tree_unflatten(treedef, out)


def random_prompts(lengths, vocab: int = 128, seed: int = 1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[1, *rng.integers(3, vocab, size=n - 1).tolist()] for n in lengths]
