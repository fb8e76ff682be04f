"""Chunked prefill (`LoopCoder.prefill_chunk`) == one full forward at every position.

A prompt longer than several windows runs through an empty cache in chunks of C tokens (C
that does and does not divide the prompt, and C larger than it), then decode steps continue
from that cache; every logit is compared with one full forward over prompt + continuation,
and the cache with the one-shot `prefill`'s. Gates are non-zero, heads GQA (4 query / 2 kv).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopcoder_jax.cache import init_cache
from loopcoder_jax.config import RuntimeConfig
from loopcoder_jax.model import LoopCoder

from .helpers import W, random_params, random_prompts, tiny_cfg

PROMPT = 4 * W + 2  # 18 tokens: several windows
DECODE = 2 * W + 1  # forced decode steps after the prompt
S = 40  # cache length: a multiple of the decode block
RUNTIME = RuntimeConfig(decode_block=8)


def _scaled_err(got, want):
    return float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))


@functools.cache
def _setup(loop_num):
    cfg = tiny_cfg(loop_num=loop_num)
    model = LoopCoder(cfg, RUNTIME)
    chunk = jax.jit(
        lambda p, ids, cache, n: model.apply(
            {"params": p}, ids, cache, n, all_logits=True, method=LoopCoder.prefill_chunk
        )
    )
    step = jax.jit(
        lambda p, ids, cache: model.apply({"params": p}, ids, cache, method=LoopCoder.decode_step)
    )
    return cfg, model, random_params(cfg, seed=10 + loop_num), chunk, step


def _chunked(cfg, params, chunk_fn, prompts, c):
    """Feeds right-padded ragged prompts C tokens at a time; returns (logits per row, cache)."""
    b = len(prompts)
    cache = init_cache(cfg, b, S)
    longest = max(map(len, prompts))
    logits = [[] for _ in range(b)]
    for off in range(0, longest, c):
        ids = np.zeros((b, c), np.int32)
        n = np.zeros((b,), np.int32)
        for i, p in enumerate(prompts):
            part = p[off : off + c]
            ids[i, : len(part)] = part
            n[i] = len(part)
        out, cache = chunk_fn(params, jnp.asarray(ids), cache, jnp.asarray(n))
        for i in range(b):
            logits[i].append(np.asarray(out[i, : n[i]]))
    return [np.concatenate(x) for x in logits], cache


# C = 3 divides the 18-token prompt, 5 does not, 32 is longer than it. The default run keeps
# one case (compiles dominate); `-m slow` runs the whole grid.
_FAST = {(2, 5)}
_GRID = [
    pytest.param(n, c, marks=() if (n, c) in _FAST else pytest.mark.slow)
    for n in (1, 2, 3)
    for c in (3, 5, 32)
]


@pytest.mark.parametrize("loop_num,c", _GRID)
def test_chunked_prefill_then_decode_equals_full_forward(loop_num, c):
    cfg, model, params, chunk_fn, step_fn = _setup(loop_num)
    prompts = random_prompts([PROMPT, PROMPT - 7], seed=loop_num)  # ragged: per-row offsets
    rng = np.random.default_rng(c)
    conts = rng.integers(3, cfg.vocab_size, size=(2, DECODE)).astype(np.int32)
    got, cache = _chunked(cfg, params, chunk_fn, prompts, c)
    assert np.asarray(cache.lengths).tolist() == [len(p) for p in prompts]
    steps = []
    for j in range(DECODE):
        out, cache = step_fn(params, jnp.asarray(conts[:, j : j + 1]), cache)
        steps.append(np.asarray(out))
    for i, prompt in enumerate(prompts):
        full = np.asarray(
            model.apply({"params": params}, jnp.asarray([prompt + conts[i].tolist()]))
        )[0]
        n = len(prompt)
        assert _scaled_err(got[i], full[:n]) <= 1e-4, f"prompt positions, row {i}"
        dec = np.stack([s[i] for s in steps])
        assert _scaled_err(dec, full[n : n + DECODE]) <= 1e-4, f"decode after chunks, row {i}"


@pytest.mark.slow  # the full-forward test above already checks what this cache feeds
@pytest.mark.parametrize("loop_num", [2, 3])
def test_chunked_cache_equals_one_shot_prefill(loop_num):
    cfg, model, params, chunk_fn, _ = _setup(loop_num)
    prompts = random_prompts([PROMPT, PROMPT - 7], seed=7)
    _, chunked = _chunked(cfg, params, chunk_fn, prompts, 5)
    ids = np.zeros((2, PROMPT), np.int32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    _, oneshot = model.apply(
        {"params": params}, jnp.asarray(ids), lengths, max_length=S, method=LoopCoder.prefill
    )
    for i, p in enumerate(prompts):
        n = len(p)
        for name in ("global_k", "global_v"):
            a = np.asarray(getattr(chunked, name))[:, i, :, :n]
            b = np.asarray(getattr(oneshot, name))[:, i, :, :n]
            assert _scaled_err(a, b) <= 1e-5, name
        for name in ("local_k", "local_v"):  # every slot holds one of the last W positions
            a, b = np.asarray(getattr(chunked, name))[:, :, i], np.asarray(getattr(oneshot, name))
            assert _scaled_err(a, b[:, :, i]) <= 1e-5, name


@pytest.mark.parametrize("t,starts", [(9, [0, 6]), (37, [0, 5]), (64, [3, 40])])
def test_long_chunk_kernels_equal_the_dense_ones(monkeypatch, t, starts):
    """A chunk longer than 2W runs its local branch in W-query blocks and its global branch in
    query blocks that stop at their own last key block: same values as attending at once."""
    from loopcoder_jax.kernels import chunked
    from loopcoder_jax.kernels.reference import cached_attention, causal_cache_attention

    b, n, kh, h, s = len(starts), 4, 2, 8, 128
    rng = np.random.default_rng(t)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    q, k, v = normal(b, t, n, h), normal(b, kh, t, h), normal(b, kh, t, h)
    ring_k, ring_v = normal(b, kh, W, h), normal(b, kh, W, h)
    start = jnp.asarray(starts, jnp.int32)
    positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
    ring_pos = chunked.ring_positions(start, W)
    got = chunked.chunk_window_attention(q, ring_k, ring_v, ring_pos, k, v, positions, W)
    key_pos = jnp.concatenate([ring_pos, positions], axis=1)[:, None, :]
    p = positions[:, :, None]
    mask = (key_pos >= 0) & (key_pos <= p) & (key_pos > p - W)
    dense = cached_attention(
        q, jnp.concatenate([ring_k, k], 2), jnp.concatenate([ring_v, v], 2), mask
    )
    assert _scaled_err(np.asarray(got), np.asarray(dense)) <= 1e-6

    monkeypatch.setattr(chunked, "QUERY_BLOCK", 8)  # several query blocks at this size
    cache_k, cache_v = normal(2, b, kh, s, h), normal(2, b, kh, s, h)
    got = chunked.chunk_prefix_attention(q, cache_k, cache_v, positions, block=8, index=(1,))
    whole = causal_cache_attention(q, cache_k, cache_v, positions, block=8, index=(1,))
    assert _scaled_err(np.asarray(got), np.asarray(whole)) <= 1e-6
