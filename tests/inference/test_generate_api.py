"""`generate` driven the way an independent script drives it (issue 14, item 5): no stop id,
a config without `eos_token_id`, and the boxed params that `LoopCoder.init` returns."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from loopcoder_jax.config import ModelConfig
from loopcoder_jax.generate import generate
from loopcoder_jax.model import LoopCoder

from .helpers import random_params, random_prompts, tiny_cfg

N = 6


def test_empty_eos_ids_generates_exactly_max_new_tokens():
    cfg = tiny_cfg()
    params = random_params(cfg, seed=3)
    prompts = random_prompts([3, 5], seed=2)
    free = generate(cfg, params, prompts, N, eos_ids=[cfg.vocab_size - 1])
    # Make every row's first greedy token a stop id: with it, rows stop after one token ...
    firsts = sorted({row[0] for row in free})
    assert all(len(r) == 1 for r in generate(cfg, params, prompts, N, eos_ids=firsts))
    # ... with eos_ids=() nothing stops a row, and the tokens are the unconstrained ones.
    out = generate(cfg, params, prompts, N, eos_ids=())
    assert [len(r) for r in out] == [N, N]
    assert [r[:N] for r in out] == [r[:N] for r in free]


def test_config_without_eos_token_id_has_no_stop_ids_and_generates():
    raw = tiny_cfg().to_hf()
    del raw["eos_token_id"]
    cfg = ModelConfig.from_hf(raw)
    assert cfg.eos_token_id == ()  # never another model's ids (the 40B's 75864 > vocab 128)
    null = dict(raw, eos_token_id=None)
    assert ModelConfig.from_hf(null).eos_token_id == ()
    out = generate(cfg, random_params(cfg, seed=1), random_prompts([4], seed=5), N)
    assert len(out[0]) == N


def test_boxed_params_from_init_are_accepted():
    cfg = tiny_cfg()
    boxed = LoopCoder(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    assert any(isinstance(x, nn.Partitioned) for x in jax.tree.leaves(
        boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)))  # fmt: skip
    prompts = random_prompts([3], seed=7)
    want = generate(cfg, nn.unbox(boxed), prompts, N, eos_ids=())
    assert generate(cfg, boxed, prompts, N, eos_ids=()) == want
