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
# Every test uses one config and two prompts, so all share one compiled engine.
PROMPTS = random_prompts([3, 5], seed=2)


def _cfg_without_eos() -> ModelConfig:
    raw = tiny_cfg().to_hf()
    del raw["eos_token_id"]
    return ModelConfig.from_hf(raw)


def test_empty_eos_ids_generates_exactly_max_new_tokens():
    cfg = _cfg_without_eos()
    params = random_params(cfg, seed=3)
    free = generate(cfg, params, PROMPTS, N, eos_ids=[cfg.vocab_size - 1])
    # Make row 0's first greedy token a stop id: with it, row 0 stops after one token ...
    assert len(generate(cfg, params, PROMPTS, N, eos_ids=[free[0][0]])[0]) == 1
    # ... with eos_ids=() nothing stops a row, and the tokens are the unconstrained ones.
    out = generate(cfg, params, PROMPTS, N, eos_ids=())
    assert [len(r) for r in out] == [N, N]
    assert [r[:N] for r in out] == [r[:N] for r in free]


def test_config_without_eos_token_id_has_no_stop_ids_and_generates():
    cfg = _cfg_without_eos()
    assert cfg.eos_token_id == ()  # never another model's ids (the 40B's 75864 > vocab 128)
    null = dict(cfg.to_hf(), eos_token_id=None)
    assert ModelConfig.from_hf(null).eos_token_id == ()
    out = generate(cfg, random_params(cfg, seed=1), PROMPTS, N)  # default stop ids: none
    assert [len(r) for r in out] == [N, N]


def test_boxed_params_from_init_are_accepted():
    cfg = _cfg_without_eos()
    params = random_params(cfg, seed=4)
    # The tree `LoopCoder(cfg).init(...)["params"]` returns: every leaf in an nn.Partitioned box
    # (built by eval_shape of that init, then filled, to skip compiling the init itself).
    shape = jax.eval_shape(
        lambda: LoopCoder(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    )
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    boxed = jax.tree.map(lambda b, x: b.replace_boxed(x), shape, params, is_leaf=is_box)
    assert all(is_box(x) for x in jax.tree.leaves(boxed, is_leaf=is_box))
    want = generate(cfg, params, PROMPTS, N, eos_ids=())
    assert generate(cfg, boxed, PROMPTS, N, eos_ids=()) == want
