"""The decoding engine: cached == full forward, batching, stopping, streaming, sharding, errors.

Every check runs through `Engine` (the same prefill + on-device decode loop as `generate`).
Engines and their compiled programs are module-scoped: compilation dominates the runtime.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from loopcoder_jax import sharding as sh
from loopcoder_jax.config import RuntimeConfig
from loopcoder_jax.generate import INSTRUCT_SAMPLING, Engine, GenerationError, Sampling
from loopcoder_jax.model import LoopCoder

from .helpers import W, random_params, random_prompts, tiny_cfg

NEW = 40  # new tokens per prompt: 10 windows past the prompt
# Decode attention reads the cache in blocks of keys, skipping blocks past the longest row.
# Blocks of 8 keys make the generations here span several blocks, with ragged rows at
# different block counts (the auto block on CPU is 64, longer than these runs).
RUNTIME = RuntimeConfig(decode_block=8)


@pytest.fixture(scope="module")
def setup2():
    cfg = tiny_cfg(loop_num=2)
    return cfg, random_params(cfg, seed=0), Engine(cfg, RUNTIME)


@pytest.fixture(scope="module")
def greedy_batch(setup2):
    """Unconstrained greedy generations of ragged prompts (shorter and longer than W)."""
    cfg, params, engine = setup2
    prompts = random_prompts([3, 9, 6], seed=11)
    out = engine.generate(params, prompts, NEW, eos_ids=[cfg.vocab_size - 1])
    return prompts, out


def _full_logits(cfg, params, rows: list[list[int]]) -> list[np.ndarray]:
    """One full forward over right-padded rows (causal: padding never reaches real positions)."""
    ids = np.zeros((len(rows), max(map(len, rows))), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    out = np.asarray(LoopCoder(cfg).apply({"params": params}, jnp.asarray(ids)))
    return [out[i, : len(r)] for i, r in enumerate(rows)]


@pytest.mark.parametrize("loop_num", [2, 3])
def test_cached_decode_logits_equal_full_forward_everywhere(loop_num):
    """Teacher-forced prefill + decode steps vs one full forward, at every new position."""
    cfg = tiny_cfg(loop_num=loop_num)
    params = random_params(cfg, seed=loop_num)
    engine = Engine(cfg, RUNTIME)
    prompts = random_prompts([3, 2 * W + 1], seed=loop_num)  # shorter and longer than W
    rng = np.random.default_rng(5)
    conts = [rng.integers(3, cfg.vocab_size, size=n).tolist() for n in (NEW, NEW - 7)]
    cached = engine.teacher_forced_logits(params, prompts, conts)
    fulls = _full_logits(cfg, params, [p + c for p, c in zip(prompts, conts, strict=True)])
    for prompt, cont, got, full in zip(prompts, conts, cached, fulls, strict=True):
        # Logit i of the cache predicts continuation token i: full-forward position T - 1 + i.
        want = full[len(prompt) - 1 : len(prompt) - 1 + len(cont)]
        assert got.shape == want.shape
        err = np.abs(got - want).max() / max(1.0, np.abs(want).max())
        assert err <= 1e-4, f"loop_num={loop_num}, prompt {len(prompt)}: scaled error {err}"
        # The comparison can fail: the forced tokens change the later logits.
        assert np.abs(want[-1] - full[len(prompt) - 1]).max() > 1e-3


def test_batched_ragged_prompts_equal_one_by_one_greedy(setup2, greedy_batch):
    cfg, params, engine = setup2
    prompts, batched = greedy_batch
    for prompt, tokens in zip(prompts, batched.tokens, strict=True):
        single = engine.generate(params, [prompt], NEW, eos_ids=[cfg.vocab_size - 1])
        assert single.tokens[0] == tokens
    assert all(len(t) == NEW for t in batched.tokens)
    assert batched.finish_reasons == ["length"] * 3
    # Different prompts give different generations (the comparison above can fail).
    assert len({tuple(t) for t in batched.tokens}) == 3


def test_batched_sampling_with_per_row_seeds_equals_one_by_one(setup2):
    cfg, params, engine = setup2
    prompts = random_prompts([5, 2, 11], seed=3)
    seeds = [10, 20, 30]
    kw = dict(sampling=INSTRUCT_SAMPLING, eos_ids=[cfg.vocab_size - 1])
    batched = engine.generate(params, prompts, NEW, seed=seeds, **kw).tokens
    for prompt, seed, tokens in zip(prompts, seeds, batched, strict=True):
        assert engine.generate(params, [prompt], NEW, seed=[seed], **kw).tokens[0] == tokens
    # Another seed gives another sample; the same seed the same one.
    again = engine.generate(params, prompts, NEW, seed=seeds, **kw).tokens
    other = engine.generate(params, prompts, NEW, seed=[11, 21, 31], **kw).tokens
    assert again == batched and other != batched


def test_each_row_stops_at_its_own_first_eos(setup2, greedy_batch):
    cfg, params, engine = setup2
    prompts, free = greedy_batch
    # Stop id: a token row 0 first produces mid-way, so row 0 must stop there.
    row0 = free.tokens[0]
    step = next(i for i in range(5, NEW) if row0[i] not in row0[:i])
    eos = row0[step]
    out = engine.generate(params, prompts, NEW, eos_ids=[eos])
    for tokens, want_full, reason in zip(out.tokens, free.tokens, out.finish_reasons, strict=True):
        if eos in want_full:
            cut = want_full.index(eos) + 1
            assert tokens == want_full[:cut] and reason == "stop"
        else:
            assert tokens == want_full and reason == "length"
    assert len(out.tokens[0]) == step + 1


def test_stream_callback_delivers_every_token_in_order(setup2, greedy_batch):
    cfg, params, engine = setup2
    prompts, free = greedy_batch
    seen = []
    out = engine.generate(
        params, prompts, NEW, eos_ids=[cfg.vocab_size - 1],
        stream=lambda step, toks, active: seen.append((step, toks.copy(), active.copy())),
    )  # fmt: skip
    assert out.tokens == free.tokens
    assert [s for s, _, _ in seen] == list(range(NEW))
    streamed = np.stack([t for _, t, _ in seen], axis=1)  # [B', NEW]
    assert streamed[:3].tolist() == free.tokens
    assert not any(a[3] for _, _, a in seen)  # the batch padding row is never active


def test_sharded_8_devices_equals_1_device(setup2, greedy_batch):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices; tests/conftest.py sets them up")
    cfg, params, engine = setup2
    prompts, free = greedy_batch
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    sharded = Engine(cfg, RUNTIME, mesh=mesh)
    placed = sharded.shard_params(params)
    # The weights really are split: a kv-head-sharded k_proj holds half the heads per device.
    k_proj = placed["layers"]["self_attn"]["k_proj"]["kernel"]
    assert k_proj.addressable_shards[0].data.shape[2] == cfg.num_key_value_heads // 2
    out = sharded.generate(placed, prompts, NEW, eos_ids=[cfg.vocab_size - 1])
    assert out.tokens == free.tokens
    assert out.stats["batch"] % 4 == 0  # batch padded to the 2 x 2 data-parallel shards
    kw = dict(sampling=INSTRUCT_SAMPLING, seed=[1, 2, 3], eos_ids=[cfg.vocab_size - 1])
    assert (
        sharded.generate(placed, prompts, NEW, **kw).tokens
        == engine.generate(params, prompts, NEW, **kw).tokens
    )


def test_cache_bytes_is_dense_plus_local_windows(setup2):
    cfg, params, engine = setup2
    out = engine.generate(params, [[1, 5, 6]], 3)
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
    s = out.stats["cache_length"]
    assert out.stats["cache_bytes"] == out.stats["batch"] * (s + W) * per_token
    assert len(out.tokens[0]) == 3


# ---------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "prompts, new, match",
    [
        ([[]], 4, "empty"),
        ([[1, 2]] * 0, 4, "No prompts"),
        ([[1, 500]], 4, "outside the model's vocabulary"),
        ([[1] * 300], 4, "context is 256"),
        ([[1] * 250], 10, "max_new_tokens <= 6"),
        ([[1, 2]], 0, "max_new_tokens must be >= 1"),
        ([1, 2, 3], 4, "list of prompts"),
    ],
)
def test_bad_prompts_get_clear_errors(setup2, prompts, new, match):
    cfg, params, engine = setup2
    with pytest.raises(GenerationError, match=match):
        engine.generate(params, prompts, new)


def test_params_that_do_not_match_the_config_are_rejected(setup2):
    cfg, params, engine = setup2
    other = random_params(tiny_cfg(loop_num=2, intermediate_size=96))
    with pytest.raises(GenerationError, match="mlp.*checkpoint .*96.*config .*128"):
        engine.generate(other, [[1, 2]], 2)
    dense = random_params(tiny_cfg(loop_num=1))
    with pytest.raises(GenerationError, match="missing .*loop_gate"):
        engine.generate(dense, [[1, 2]], 2)


def test_mesh_that_does_not_divide_kv_heads_is_rejected():
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 (fake) devices")
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(1, 1, 4), ("data", "fsdp", "tensor"))
    with pytest.raises(GenerationError, match="num_key_value_heads=2.*one of \\[1, 2\\]"):
        Engine(tiny_cfg(), mesh=mesh)


def test_rules_table_names_only_known_mesh_axes():
    # The engine drops rule targets the mesh lacks (e.g. `sequence`); the table must not
    # contain a typo that would silently be dropped the same way.
    for _, target in sh.FSDP_TP:
        names = () if target is None else (target,) if isinstance(target, str) else target
        assert set(names) <= set(sh.MESH_AXES)


def test_greedy_is_sampling_default():
    assert Sampling().greedy
