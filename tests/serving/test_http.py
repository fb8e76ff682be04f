"""The server end to end: `python -m loopcoder_jax.serve` on 127.0.0.1 and the `openai` client.

One server process for the module (tiny preset, random weights, the shipped tokenizer). Every
request loop is bounded in count and time. The last test sends SIGTERM while a stream is in
flight: the stream must complete and the process exit 0.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from loopcoder_jax import checkpoint
from loopcoder_jax.config import preset
from loopcoder_jax.data.tokenizer import load_tokenizer, shipped_model_path
from loopcoder_jax.generate import generate
from tests.inference.helpers import random_params

CONTEXT = 1024
STARTUP_S = 240  # the first start compiles; CI boxes are slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = preset("tiny")
    params = random_params(cfg, seed=4, std=0.05)
    path = str(tmp_path_factory.mktemp("serve") / "tiny")
    checkpoint.save_params(path, cfg, params)
    shutil.copy(shipped_model_path(), os.path.join(path, "tokenizer.model"))
    port = _free_port()
    log = open(os.path.join(os.path.dirname(path), "server.log"), "w+")  # noqa: SIM115
    cmd = [
        sys.executable,
        "-m",
        "loopcoder_jax.serve",
        "--checkpoint",
        path,
        "--port",
        str(port),
        "--slots",
        "4",
        "--max-context",
        str(CONTEXT),
        "--prefill-chunk",
        "32",
        "--log-level",
        "warning",
        "--drain-timeout",
        "60",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_S
    while True:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read()[-3000:]}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("server did not come up in time")
        time.sleep(0.3)
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
    yield dict(proc=proc, base=base, client=client, cfg=cfg, params=params, path=path)
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)
    log.close()


def _greedy_reference(cfg, params, prompt_text: str, n: int) -> tuple[str, int, int]:
    """The plain static path: (text, prompt tokens, new tokens) of greedy generation."""
    tok = load_tokenizer()
    stop = sorted({*cfg.eos_token_id, *tok.stop_ids})
    ids = tok.encode(prompt_text)
    out = generate(cfg, params, [ids], n, eos_ids=stop)[0]
    new = len(out)
    if out and out[-1] in stop:
        out = out[:-1]
    return tok.decode(out), len(ids), new


def test_models_and_health(server):
    models = server["client"].models.list()
    assert [m.id for m in models.data] == ["tiny"]
    health = httpx.get(server["base"] + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["slots"] == 4


def test_completion_equals_plain_greedy_generate(server):
    prompt = "def fibonacci(n):"
    r = server["client"].completions.create(
        model="tiny", prompt=prompt, max_tokens=24, temperature=0
    )
    text, n_prompt, n_new = _greedy_reference(server["cfg"], server["params"], prompt, 24)
    assert r.choices[0].text == text
    assert r.choices[0].finish_reason == ("length" if n_new == 24 else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, n_new)
    assert r.usage.total_tokens == n_prompt + n_new


def test_streamed_chat_equals_non_streamed(server):
    client = server["client"]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort a list"}]
    # No sampling parameters: the model card's instruct defaults, made repeatable by `seed`.
    full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=20, seed=7)
    stream = client.chat.completions.create(
        model="tiny",
        messages=msgs,
        max_tokens=20,
        seed=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, reasons, usage = [], [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            reasons.append(c.finish_reason)
    assert "".join(parts) == full.choices[0].message.content
    assert full.choices[0].message.role == "assistant"
    assert reasons[-1] == full.choices[0].finish_reason and reasons[:-1] == [None] * (
        len(reasons) - 1
    )
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens > 5
    other = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=20, seed=8)
    assert other.choices[0].message.content != full.choices[0].message.content


def test_eight_concurrent_requests_of_different_lengths(server):
    client = server["client"]
    prompts = [("x = " * (1 + 7 * i)) + f"f{i}(" for i in range(8)]  # 8 slots' worth, 4 slots
    news = [5 + 9 * i for i in range(8)]

    def one(i):
        r = client.completions.create(
            model="tiny",
            prompt=prompts[i],
            max_tokens=news[i],
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        return r.choices[0].text, r.usage.completion_tokens

    alone = [one(i) for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(one, range(8), timeout=300))
    assert together == alone
    assert [n for _, n in together] == news


def test_stop_string_cuts_the_text(server):
    client = server["client"]
    base = (
        client.completions.create(
            model="tiny",
            prompt="import os\n",
            max_tokens=30,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .text
    )
    assert len(base) > 6
    stop = base[len(base) // 2 : len(base) // 2 + 2]
    r = client.completions.create(
        model="tiny",
        prompt="import os\n",
        max_tokens=30,
        temperature=0,
        stop=[stop, "@@@"],
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].text == base[: base.index(stop)]
    assert r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "path,body,status,param",
    [
        ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
        ("/v1/completions", {"model": "tiny"}, 400, "prompt"),
        ("/v1/completions", {"prompt": "x"}, 400, "model"),
        ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model"),
        (
            "/v1/completions",
            {"model": "tiny", "prompt": "x", "max_tokens": CONTEXT},
            400,
            "max_tokens",
        ),
        (
            "/v1/completions",
            {"model": "tiny", "prompt": "x", "temperature": -0.5},
            400,
            "temperature",
        ),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 2}, 400, "n"),
        ("/v1/completions", {"model": "tiny", "prompt": [1, 99999]}, 400, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": 5}, 400, "stop"),
        ("/v1/chat/completions", {"model": "tiny", "messages": "hi"}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"content": "hi"}]},
            400,
            "messages",
        ),
        ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "user", "content": 3}]},
            400,
            "messages",
        ),
    ],
)
def test_bad_requests_get_openai_style_4xx(server, path, body, status, param):
    r = httpx.post(server["base"] + path, json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["param"] == param


def test_malformed_json_and_unknown_routes(server):
    base = server["base"]
    for data in (b"{bad", b"[1, 2]", b"\xff\xfe"):
        r = httpx.post(base + "/v1/completions", content=data, timeout=30)
        assert r.status_code == 400 and "error" in r.json()
    assert httpx.get(base + "/v1/nothing", timeout=30).status_code == 404
    assert httpx.get(base + "/v1/completions", timeout=30).status_code == 405
    with pytest.raises(openai.NotFoundError):
        server["client"].completions.create(model="other", prompt="x")
    with pytest.raises(openai.BadRequestError, match="context"):
        server["client"].completions.create(model="tiny", prompt="x " * 600, max_tokens=600)
    assert httpx.get(base + "/health", timeout=10).json()["status"] == "ok"


def _health(base):
    return httpx.get(base + "/health", timeout=10).json()


def test_disconnect_mid_stream_frees_the_slot(server):
    base = server["base"]
    before = _health(base)["cancelled"]
    body = {
        "model": "tiny",
        "prompt": "def f(x):",
        "max_tokens": CONTEXT - 20,
        "stream": True,
        "temperature": 0,
        "ignore_eos": True,
    }
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", base + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(3)]  # a few events, then hang up
    assert any(line.startswith("data: {") for line in got)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        h = _health(base)
        if h["running"] == 0 and h["pending"] == 0 and h["cancelled"] > before:
            break
        time.sleep(0.1)
    assert h["cancelled"] > before and h["running"] == 0, h


def test_sigterm_drains_in_flight_requests_and_exits(server):
    """Runs last (the module's server goes down): the in-flight stream completes, exit 0."""
    proc, base = server["proc"], server["base"]
    first, result = threading.Event(), {}

    def stream():
        body = {
            "model": "tiny",
            "prompt": "class A:",
            "max_tokens": 300,
            "stream": True,
            "temperature": 0,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
        }
        events = []
        with httpx.Client(timeout=120) as c:
            with c.stream("POST", base + "/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        first.set()
        result["events"] = events

    t = threading.Thread(target=stream)
    t.start()
    assert first.wait(60)
    proc.send_signal(signal.SIGTERM)
    t.join(120)
    assert not t.is_alive()
    events = result["events"]
    assert events[-1] == "[DONE]"
    final = json.loads(events[-2])
    assert final["usage"]["completion_tokens"] == 300
    assert proc.wait(60) == 0
