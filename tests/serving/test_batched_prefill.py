"""Batched prefill (`SlotEngine.prefill_insert_async`) == the one-request path.

The one-request path prefills each prompt alone in a batch-1 cache (`new_prefill` +
`prefill_chunk`) and inserts it (`insert`). The batched path runs several prompts of one
length bucket as the rows of one `LoopCoder.prefill_chunk` call on a fresh cache and writes
each row straight into its slot. After either, every slot must hold the same K/V (loop-0 cache
up to its length, ring buffers), length, first token and per-slot settings, and greedy decoding
must continue with the same tokens. loop_num 1, 2 and 3; GQA (4 query / 2 kv heads); prompts
longer than the window W = 4; non-zero gates; rows sent to slots out of order; a group of 3
padded to 4 rows.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from loopcoder_jax.config import RuntimeConfig
from loopcoder_jax.generate import Engine, Sampling
from loopcoder_jax.serving import SlotConfig, SlotEngine, SlotRequest
from loopcoder_jax.serving.engine import chunk_buckets
from tests.inference.helpers import W, random_params, random_prompts, tiny_cfg

RUNTIME = RuntimeConfig(decode_block=8)
CONFIG = SlotConfig(slots=4, max_length=64, chunk=16, steps_per_call=3, prefill_rows=4)
NEVER = [127]  # a stop id these runs never reach (vocab 128)


def _err(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    if not want.size:  # loop_num 1 has no ring buffers
        return 0.0
    return float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))


def _slot_view(slots: SlotEngine, slot: int):
    """Host copy of what a slot holds that later decoding reads."""
    st = jax.device_get(slots.state)
    c = st.cache
    n = int(c.lengths[slot])
    return dict(
        length=n,
        global_k=c.global_k[:, slot, :, :n],
        global_v=c.global_v[:, slot, :, :n],
        local_k=c.local_k[:, :, slot],
        local_v=c.local_v[:, :, slot],
        **{
            f: np.asarray(getattr(st, f)[slot])
            for f in ("tokens", "keys", "steps", "remaining", "active")
            + ("temperature", "top_k", "top_p", "use_eos")
        },
    )


@pytest.mark.parametrize("loop_num", [1, 2, 3])
def test_batched_prefill_equals_one_request_path(loop_num):
    cfg = tiny_cfg(loop_num=loop_num)
    params = random_params(cfg, seed=40 + loop_num)
    engine = Engine(cfg, RUNTIME)
    batched, single = SlotEngine(engine, params, CONFIG), SlotEngine(engine, params, CONFIG)
    prompts = random_prompts([13, 5, 16, 9, 7, 11, 3], seed=loop_num)
    assert sum(len(p) > W for p in prompts) == 6  # the local window is full: rings wrap
    samplings = [Sampling(), Sampling(temperature=0.7, top_k=9), Sampling(0.9, None, 0.8)]
    # Group 1: four prompts into slots 2, 0, 3, 1. Group 2 (after those finish): three
    # prompts, padded to four rows, into slots 1, 3, 0.
    for group, slot_order in ((prompts[:4], [2, 0, 3, 1]), (prompts[4:], [1, 3, 0])):
        reqs = [
            SlotRequest(p, slot, seed=7 * i, sampling=samplings[i % 3], max_new_tokens=20 + i)
            for i, (p, slot) in enumerate(zip(group, slot_order, strict=True))
        ]
        for s in range(CONFIG.slots):  # a clean start: both engines' slots free
            batched.release(s)
            single.release(s)
        first = np.asarray(jax.device_get(batched.prefill_insert_async(reqs, NEVER)))
        assert first.shape == (batched.prefill_rows(len(reqs)), 2)
        for i, r in enumerate(reqs):
            cache1 = single.new_prefill()
            logits, cache1 = single.prefill_chunk(cache1, list(r.prompt))
            tok, done = single.insert(
                cache1, logits, r.slot, seed=r.seed, sampling=r.sampling,
                max_new_tokens=r.max_new_tokens, eos_ids=NEVER,
            )  # fmt: skip
            assert (int(first[i, 0]), bool(first[i, 1])) == (tok, done), f"first token, row {i}"
            got, want = _slot_view(batched, r.slot), _slot_view(single, r.slot)
            assert got.pop("length") == want.pop("length") == len(r.prompt)
            for name in ("global_k", "global_v", "local_k", "local_v"):
                assert _err(got.pop(name), want.pop(name)) <= 1e-5, (name, i)
            for name in got:
                np.testing.assert_array_equal(got[name], want[name], err_msg=f"{name}, row {i}")
        # Greedy rows decode on with the same tokens (sampled rows too: same keys and steps).
        for _ in range(4):
            a, ea = batched.decode(NEVER)
            b, eb = single.decode(NEVER)
            np.testing.assert_array_equal(ea, eb)
            np.testing.assert_array_equal(np.where(ea, a, -1), np.where(eb, b, -1))


def test_chunk_buckets_are_few_and_fine():
    assert chunk_buckets(512) == [16, 32, 64, 128, 192, 256, 320, 384, 448, 512]
    assert chunk_buckets(16) == [16]
    assert chunk_buckets(100) == [16, 32, 64, 100]
    big = chunk_buckets(8192)  # step 1024: at most 8 multiples above the powers of two
    assert big[-1] == 8192 and len(big) <= 7 + 8
    for c in (16, 100, 512, 2048, 8192):
        b = chunk_buckets(c)
        assert b == sorted(set(b)) and b[-1] == c and b[0] == min(16, c)
