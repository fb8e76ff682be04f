"""Serving benchmark: continuous batching vs static batching, and the HTTP server's overhead.

A. Skewed batch job: `--requests` prompts of 16-512 tokens, max_new_tokens drawn from 8-256
   (numpy seed `--seed`), greedy, `--slots` rows at a time:
     static: today's `Engine.generate` over consecutive batches of `--slots` prompts, each
       batch generating its longest max_new_tokens (rows truncated to their own budget);
     continuous: `serving.Scheduler` with `--slots` slots (rows refilled as they finish;
       prompts of at most `--chunk` tokens prefilled up to `--prefill-rows` to a call).
   Generated tokens / wall time, compile excluded (a full warm-up pass of each first), median
   of `--repeats`; the greedy outputs must be identical, and nothing may compile after the
   warm-up (`compiles_after_warmup` counts XLA backend compiles during the timed runs).
B. Server overhead: `--requests` text prompts through the HTTP app (`serving.http`, uvicorn on
   127.0.0.1) with the `openai` client and `--streams` concurrent streaming requests, against
   the same requests submitted straight to the same `Scheduler` by `--streams` threads; the two
   alternate `--repeats` times in one process (see `part_b`).

The model: a random-weight stand-in (`--hidden`, `--layers`, loop_num 2, W 64, GQA 4:1).
Prints one JSON line per part.

    python bench/serving.py [--requests 64] [--slots 8] [--repeats 3] [--part ab]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from loopcoder_jax.config import ModelConfig, RuntimeConfig  # noqa: E402
from loopcoder_jax.generate import Engine  # noqa: E402
from loopcoder_jax.serving import Request, Scheduler, SlotConfig, SlotEngine  # noqa: E402
from tests.inference.helpers import random_params  # noqa: E402


def git_sha() -> str:
    if os.environ.get("BENCH_GIT_SHA"):  # a run from an exported snapshot of a commit
        return os.environ["BENCH_GIT_SHA"]
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True)
    return out.stdout.decode().strip() or "unknown"


def bench_config(args) -> ModelConfig:
    return ModelConfig(
        vocab_size=512,  # the shipped tokenizer's vocabulary (part B sends text)
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=args.hidden // 8,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        loop_num=2,
        loop_window_size=64,
        eos_token_id=(2,),
        torch_dtype="float32",
    )


def workload(args, vocab):
    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(16, 513, size=args.requests)
    news = rng.integers(8, 257, size=args.requests)
    prompts = [[1, *rng.integers(3, vocab, size=n - 1).tolist()] for n in lengths]
    return prompts, [int(n) for n in news]


def run_static(engine, params, prompts, news, slots, eos):
    out = []
    for i in range(0, len(prompts), slots):
        batch, budget = prompts[i : i + slots], news[i : i + slots]
        gen = engine.generate(params, batch, max(budget), eos_ids=eos)
        out += [t[:n] for t, n in zip(gen.tokens, budget, strict=True)]
    return out


def run_continuous(slot_engine, prompts, news, eos, stats=None):
    sched = Scheduler(slot_engine, eos)
    reqs = sched.generate([Request(p, n) for p, n in zip(prompts, news, strict=True)])
    if stats is not None:
        stats.clear()
        stats.update(sched.stats)
    return [r.tokens for r in reqs]


_COMPILES = [0]


def _count_compiles(event, duration_secs, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compiles)


def timed(fn, repeats):
    """(seconds of each run, last output, XLA compiles during the timed runs) after one warm-up."""
    fn()  # warm-up: every shape compiled
    times, out = [], None
    before = _COMPILES[0]
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return times, out, _COMPILES[0] - before


def part_a(args, cfg, params, engine, eos):
    prompts, news = workload(args, cfg.vocab_size)
    slot_engine = SlotEngine(
        engine,
        params,
        SlotConfig(
            slots=args.slots,
            max_length=512 + 256,
            chunk=args.chunk,
            steps_per_call=args.steps_per_call,
            prefill_rows=args.prefill_rows,
        ),
    )
    static_runs, static, c_static = timed(
        lambda: run_static(engine, params, prompts, news, args.slots, eos), args.repeats
    )
    stats = {}
    cont_runs, cont, c_cont = timed(
        lambda: run_continuous(slot_engine, prompts, news, eos, stats), args.repeats
    )
    t_static, t_cont = statistics.median(static_runs), statistics.median(cont_runs)
    new = sum(len(t) for t in cont)
    assert [len(t) for t in static] == [len(t) for t in cont]
    same = sum(a == b for a, b in zip(static, cont, strict=True))
    return dict(
        bench="serving.batch_job",
        requests=args.requests,
        slots=args.slots,
        steps_per_call=args.steps_per_call,
        prefill_rows=args.prefill_rows,
        prompt_tokens=sum(map(len, prompts)),
        prefill_positions=stats.get("prefill_positions"),
        prefill_calls=stats.get("prefill_calls"),
        decode_calls=stats.get("decode_calls"),
        new_tokens=new,
        static_s=round(t_static, 3),
        continuous_s=round(t_cont, 3),
        static_tok_s=round(new / t_static, 1),
        continuous_tok_s=round(new / t_cont, 1),
        speedup=round(t_static / t_cont, 2),
        identical_outputs=f"{same}/{len(cont)}",
        compiles_after_warmup=dict(static=c_static, continuous=c_cont),
        static_runs=[round(t, 2) for t in static_runs],
        continuous_runs=[round(t, 2) for t in cont_runs],
    )


def workload_b(args, cfg):
    """Text prompts (8-200 words) for the server, their ids, budgets 8-256, the stop ids."""
    from loopcoder_jax.data.tokenizer import load_tokenizer

    tok = load_tokenizer()
    rng = np.random.default_rng(args.seed + 1)
    words = ["def", "x", "return", "(", ")", ":", "for", "in", "range", "if", "else", "=", "1"]
    texts = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(8, 200, args.requests)]
    news = [int(n) for n in rng.integers(8, 257, size=args.requests)]
    prompts = [tok.encode(t) for t in texts]
    return texts, prompts, news, sorted({*cfg.eos_token_id, *tok.stop_ids})


def part_b(args, cfg, params, engine, eos):
    """Direct vs HTTP on one scheduler, alternating repeats in this process.

    uvicorn serves the app in a thread of this process and the `openai` client threads run here
    too, so the server side pays for the client's work as well (a conservative overhead); both
    sides share one process, hence one share of a loaded CPU, and alternate to cancel drift.
    """
    import openai
    import uvicorn

    from loopcoder_jax.data.tokenizer import load_tokenizer
    from loopcoder_jax.serving.http import create_app

    texts, prompts, news, stop_ids = workload_b(args, cfg)
    slot_engine = SlotEngine(
        engine, params, SlotConfig(slots=args.streams, max_length=1024, chunk=args.chunk)
    )
    sched = Scheduler(slot_engine, stop_ids)
    app = create_app(sched, load_tokenizer(), model_name="bench", stop_ids=stop_ids)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()  # its lifespan starts the scheduler thread
    deadline = time.monotonic() + 120
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.1)
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600
    )

    def direct_one(i):
        r = sched.submit(Request(prompts[i], news[i], ignore_eos=True))
        r.done.wait(600)
        return len(r.tokens)

    def http_one(i):
        stream = client.completions.create(
            model="bench",
            prompt=texts[i],
            max_tokens=news[i],
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        n = 0
        for chunk in stream:
            if chunk.usage is not None:
                n = chunk.usage.completion_tokens
        return n

    def run(one):
        t = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.streams) as pool:
            n = sum(pool.map(one, range(args.requests)))
        return time.perf_counter() - t, n

    try:
        run(direct_one), run(http_one)  # warm-up: every prefill bucket compiled
        times = {"direct": [], "server": []}
        for _ in range(args.repeats):
            for name, one in (("direct", direct_one), ("server", http_one)):
                t, n = run(one)
                assert n == sum(news), (name, n, sum(news))
                times[name].append(t)
    finally:
        server.should_exit = True
        thread.join(120)
    t_direct, t_http = statistics.median(times["direct"]), statistics.median(times["server"])
    n = sum(news)
    return dict(
        bench="serving.http_overhead",
        requests=args.requests,
        streams=args.streams,
        new_tokens=n,
        direct_s=round(t_direct, 3),
        server_s=round(t_http, 3),
        direct_tok_s=round(n / t_direct, 1),
        server_tok_s=round(n / t_http, 1),
        server_overhead=round(t_http / t_direct - 1, 3),
        direct_runs=[round(t, 2) for t in times["direct"]],
        server_runs=[round(t, 2) for t in times["server"]],
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--steps-per-call", type=int, default=4, help="continuous: decode steps/call")
    p.add_argument("--prefill-rows", type=int, default=8, help="continuous: prompts per prefill")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--part", default="ab", help="a, b or ab")
    args = p.parse_args()
    cfg = bench_config(args)
    params = random_params(cfg, seed=0, std=0.05)
    engine = Engine(cfg, RuntimeConfig())
    params = engine.shard_params(params)
    eos = list(cfg.eos_token_id)
    common = dict(
        git=git_sha(),
        device=jax.devices()[0].device_kind,
        hidden=args.hidden,
        layers=args.layers,
        date=time.strftime("%Y-%m-%d"),
    )
    if "a" in args.part:
        print(json.dumps({**part_a(args, cfg, params, engine, eos), **common}), flush=True)
    if "b" in args.part:
        print(json.dumps({**part_b(args, cfg, params, engine, eos), **common}), flush=True)


if __name__ == "__main__":
    main()
