"""Continuous batching (SlotEngine + Scheduler) against the plain static `generate.Engine`.

More requests than slots (slots are refilled), prompts longer than W and than the prefill chunk
(several chunks, the last one a smaller bucket), per-request budgets and stop ids, non-zero
gates, GQA. One SlotEngine per module: its programs compile once and every test reuses them.
"""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from loopcoder_jax.config import RuntimeConfig
from loopcoder_jax.generate import Engine, GenerationError, Sampling
from loopcoder_jax.serving import Request, Scheduler, SlotConfig, SlotEngine, sample_rows
from tests.inference.helpers import random_params, random_prompts, tiny_cfg

RUNTIME = RuntimeConfig(decode_block=8)
LENGTHS = [3, 9, 40, 6, 17, 25, 2]  # W = 4; chunk 16: 40 = 16 + 16 + 8
NEWS = [5, 30, 12, 40, 1, 20, 9]
SLOTS = SlotConfig(slots=4, max_length=96, chunk=16, steps_per_call=3)


def _setup(loop_num):
    cfg = tiny_cfg(loop_num=loop_num)
    params = random_params(cfg, seed=20 + loop_num)
    engine = Engine(cfg, RUNTIME)
    return cfg, params, engine, SlotEngine(engine, params, SLOTS)


@pytest.fixture(scope="module")
def setup2():
    return _setup(2)


def _static(engine, params, prompts, news, eos):
    return [
        engine.generate(params, [p], n, eos_ids=eos).tokens[0]
        for p, n in zip(prompts, news, strict=True)
    ]


def _check_greedy_equals_static(cfg, params, engine, slots):
    prompts = random_prompts(LENGTHS, seed=5)
    never = [cfg.vocab_size - 1]
    free = _static(engine, params, prompts, NEWS, never)
    # A stop id one row generates midway: that row must stop there, the others not care.
    eos = [free[1][6]]
    want = _static(engine, params, prompts, NEWS, eos)
    assert any(len(w) < n for w, n in zip(want, NEWS, strict=True))
    got = Scheduler(slots, eos).generate(
        [Request(p, n) for p, n in zip(prompts, NEWS, strict=True)]
    )
    assert [r.tokens for r in got] == want
    for r, w, n in zip(got, want, NEWS, strict=True):
        assert r.finish_reason == ("stop" if w[-1] in eos else "length")
        assert len(r.tokens) <= n


def test_greedy_continuous_batching_equals_static(setup2):
    _check_greedy_equals_static(*setup2)


@pytest.mark.slow
@pytest.mark.parametrize("loop_num", [1, 3])
def test_greedy_continuous_batching_equals_static_loops(loop_num):
    _check_greedy_equals_static(*_setup(loop_num))


def test_seeded_sampling_is_independent_of_slot_and_neighbours(setup2):
    cfg, params, engine, slots = setup2
    prompts = random_prompts([7, 12, 4], seed=9)
    sampling = Sampling(temperature=0.8, top_k=20, top_p=0.9)
    never = [cfg.vocab_size - 1]
    alone = Scheduler(slots, never).generate([Request(prompts[0], 16, sampling, seed=3)])[0]
    crowd = Scheduler(slots, never).generate(
        [Request(p, 16, Sampling(), seed=0) for p in prompts[1:]]
        + [Request(prompts[0], 16, sampling, seed=3), Request(prompts[0], 16, sampling, seed=4)]
    )
    assert crowd[2].tokens == alone.tokens  # another slot, other neighbours: same tokens
    assert crowd[3].tokens != alone.tokens  # another seed


def test_cancel_frees_the_slot(setup2):
    cfg, params, engine, slots = setup2
    sched = Scheduler(slots, [cfg.vocab_size - 1])
    prompts = random_prompts([5] * 6, seed=3)
    seen = threading.Event()

    def cancel_after_three(req, new):
        if len(req.tokens) >= 3:
            sched.cancel(req)
            seen.set()

    long = [Request(p, 80, on_tokens=cancel_after_three) for p in prompts[:4]]  # every slot
    late = [Request(p, 4) for p in prompts[4:]]
    sched.generate(long + late)
    assert seen.is_set()
    assert all(r.finish_reason == "cancelled" and len(r.tokens) < 80 for r in long), [
        (r.finish_reason, len(r.tokens)) for r in long
    ]
    assert all(r.finish_reason == "length" and len(r.tokens) == 4 for r in late)
    assert not sched.busy()


def test_background_thread_serves_concurrent_submissions(setup2):
    cfg, params, engine, slots = setup2
    prompts = random_prompts([6, 11, 3], seed=4)
    want = _static(engine, params, prompts, [7, 7, 7], [cfg.vocab_size - 1])
    sched = Scheduler(slots, [cfg.vocab_size - 1])
    sched.start()
    try:
        reqs = [sched.submit(Request(p, 7)) for p in prompts]
        assert all(r.done.wait(60) for r in reqs)
    finally:
        sched.stop(timeout=60)
    assert [r.tokens for r in reqs] == want


def test_sharded_slots_equal_one_device(setup2):
    """Slots over data=2 x fsdp=2 and kv heads over tensor=2 (8 fake devices) == 1 device."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices; tests/conftest.py sets them up")
    cfg, params, engine, slots = setup2
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    sharded = SlotEngine(Engine(cfg, RUNTIME, mesh=mesh), params, SLOTS)
    cache = sharded.state.cache.global_k  # [L, B, K, S, H]: slots and kv heads split
    assert cache.addressable_shards[0].data.shape[1:3] == (SLOTS.slots // 4, 1)
    prompts = random_prompts(LENGTHS[:5], seed=6)
    never = [cfg.vocab_size - 1]
    sampling = Sampling(temperature=0.7, top_k=10)
    reqs = [Request(p, n, sampling if i % 2 else Sampling(), seed=i)
            for i, (p, n) in enumerate(zip(prompts, NEWS, strict=False))]  # fmt: skip
    want = [r.tokens for r in Scheduler(slots, never).generate(reqs)]
    again = [Request(r.prompt, r.max_new_tokens, r.sampling, seed=r.seed) for r in reqs]
    assert [r.tokens for r in Scheduler(sharded, never).generate(again)] == want


@pytest.mark.parametrize(
    "prompt,new,match",
    [
        ([], 4, "empty"),
        ([1, 2], 0, "max_new_tokens"),
        ([1, 999], 4, "vocabulary"),
        ([1] * 90, 10, "exceeds the context of 96"),
    ],
)
def test_bad_requests_are_refused_before_any_work(setup2, prompt, new, match):
    cfg, params, engine, slots = setup2
    with pytest.raises(GenerationError, match=match):
        Scheduler(slots).submit(Request(prompt, new))


def test_sample_rows_mixes_greedy_and_sampled_rows():
    logits = jax.random.normal(jax.random.key(0), (4, 50)) * 3
    keys = jax.random.split(jax.random.key(1), 4)
    temp = jnp.asarray([0.0, 1.0, 1.0, 0.7])
    top_k = jnp.asarray([50, 1, 50, 5])
    top_p = jnp.asarray([1.0, 1.0, 1e-6, 0.9])
    tok = np.asarray(sample_rows(keys, logits, temp, top_k, top_p))
    argmax = np.asarray(jnp.argmax(logits, -1))
    assert tok[0] == argmax[0]  # greedy
    assert tok[1] == argmax[1]  # top_k = 1
    assert tok[2] == argmax[2]  # top_p -> 0 keeps only the top token
    assert tok[3] in np.argsort(-np.asarray(logits[3]))[:5]
