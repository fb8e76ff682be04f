"""The OpenAI-compatible HTTP layer (FastAPI) over a running `Scheduler`.

Routes: `GET /health`, `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`
(ChatML through the tokenizer's `apply_chat_template`). Both POST routes take `max_tokens`,
`temperature`, `top_p`, `top_k` (extension), `stop` (up to 4 strings), `seed`, `stream`
(server-sent events, `stream_options.include_usage`), `ignore_eos` (extension) and report
`usage`. Sampling defaults: chat requests that give none of temperature/top_p/top_k get the
model card's instruct values (DESIGN.md §5); completions are greedy; a request that sets some
of them gets the missing ones from those defaults (temperature 1.0 for completions).

Every bad request gets a 4xx with an OpenAI-style body `{"error": {"message", "type", "param",
"code"}}`, before any work. A client that disconnects cancels its request (its slot frees at
the next scheduler step); stop strings cancel it the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
import uuid
from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loopcoder_jax.generate import INSTRUCT_SAMPLING, GenerationError, Sampling
from loopcoder_jax.serving.scheduler import Request as GenRequest
from loopcoder_jax.serving.scheduler import Scheduler
from loopcoder_jax.serving.text import TextStream

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 8 << 20
MAX_STOP = 4


class APIError(Exception):
    """An error answered as OpenAI does: HTTP status + {"error": {...}}."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status,
            message,
            param,
            code,
            kind,
        )

    def response(self) -> JSONResponse:
        body = dict(message=self.message, type=self.kind, param=self.param, code=self.code)
        return JSONResponse({"error": body}, status_code=self.status)


# ------------------------------------------------------------------------------ validation
def _get(body: dict, name: str, types, *, required=False, default=None):
    value = body.get(name)
    if value is None:
        if required:
            raise APIError(400, f"Missing required parameter: '{name}'.", name, "missing")
        return default
    # bool is an int in Python: accept it only where bool is asked for.
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise APIError(400, f"'{name}' must be {_names(types)}, got {value!r}.", name)
    if not isinstance(value, types):
        raise APIError(400, f"'{name}' must be {_names(types)}, got {value!r}.", name)
    return value


def _names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(
        {
            int: "an integer",
            float: "a number",
            str: "a string",
            bool: "a boolean",
            list: "an array",
            dict: "an object",
        }[t]
        for t in types
    )


def _sampling(body: dict, defaults: Sampling, greedy_default: bool) -> Sampling:
    temperature = _get(body, "temperature", (int, float))
    top_p = _get(body, "top_p", (int, float))
    top_k = _get(body, "top_k", int)
    if temperature is not None and not 0 <= temperature <= 2:
        raise APIError(400, f"'temperature' must lie in [0, 2], got {temperature}.", "temperature")
    if top_p is not None and not 0 < top_p <= 1:
        raise APIError(400, f"'top_p' must lie in (0, 1], got {top_p}.", "top_p")
    if top_k is not None and top_k < -1:
        raise APIError(400, f"'top_k' must be >= 1 (or -1/0 for all), got {top_k}.", "top_k")
    if top_k is not None and top_k <= 0:
        top_k = None
    if temperature is None and top_p is None and "top_k" not in body:
        return Sampling() if greedy_default else defaults
    if temperature is None:
        temperature = 1.0 if greedy_default else defaults.temperature
    if not greedy_default:
        top_p = defaults.top_p if top_p is None else top_p
        top_k = defaults.top_k if "top_k" not in body else top_k
    return Sampling(float(temperature), top_k, None if top_p is None else float(top_p))


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise APIError(400, "'stop' must be a string or an array of strings.", "stop")
    if len(stop) > MAX_STOP:
        raise APIError(400, f"'stop' takes at most {MAX_STOP} strings.", "stop")
    return stop


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not (
                isinstance(part, dict)
                and part.get("type") == "text"
                and isinstance(part.get("text"), str)
            ):
                raise APIError(
                    400, f"messages[{i}].content: only text parts are supported.", "messages"
                )
            parts.append(part["text"])
        return "".join(parts)
    if content is None and message.get("role") == "assistant":
        return ""
    raise APIError(400, f"messages[{i}].content must be a string.", "messages")


# ------------------------------------------------------------------------------ the app
class _Server:
    def __init__(
        self, scheduler: Scheduler, tokenizer, *, model_name: str, stop_ids, max_pending: int
    ):
        self.scheduler, self.tok, self.model_name = scheduler, tokenizer, model_name
        self.stop_ids = sorted({int(i) for i in stop_ids})
        self.max_pending = max_pending
        self.context = scheduler.slots.capacity()
        self.draining = False

    def _encode_chat(self, messages) -> list[int]:
        # `Tokenizer.encode_chat` (the checkpoint's own template, no doubled BOS) where the
        # tokenizer has it; otherwise render ChatML and encode it.
        encode_chat = getattr(self.tok, "encode_chat", None)
        if encode_chat is not None:
            return list(encode_chat(messages))
        return self.tok.encode(self.tok.apply_chat_template(messages))

    def parse(self, body: dict, chat: bool) -> tuple[list[int], dict]:
        """Validates a request body; returns (prompt ids, options)."""
        model = _get(body, "model", str, required=True)
        if model != self.model_name:
            raise APIError(
                404,
                f"The model '{model}' does not exist; this server serves "
                f"'{self.model_name}' (GET /v1/models).",
                "model",
                "model_not_found",
            )
        n = _get(body, "n", int, default=1)
        if n != 1:
            raise APIError(400, f"Only n=1 is supported, got n={n}.", "n")
        for name in ("echo", "logprobs", "best_of", "suffix", "tools", "functions"):
            if body.get(name) not in (None, False, 1 if name == "best_of" else None, [], {}):
                raise APIError(400, f"'{name}' is not supported by this server.", name)
        if chat:
            messages = _get(body, "messages", list, required=True)
            if not messages:
                raise APIError(400, "'messages' must hold at least one message.", "messages")
            msgs = []
            for i, m in enumerate(messages):
                if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                    raise APIError(
                        400, f"messages[{i}] must be an object with a string 'role'.", "messages"
                    )
                msgs.append({"role": m["role"], "content": _content(m, i)})
            try:
                prompt = self._encode_chat(msgs)
            except ValueError as e:  # the chat template refused the messages
                raise APIError(400, f"chat template: {e}", "messages") from None
        else:
            raw = _get(body, "prompt", (str, list), required=True)
            if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], str | list):
                raw = raw[0]  # a batch of one
            if isinstance(raw, str):
                prompt = self.tok.encode(raw)
            elif raw and all(isinstance(t, int) and not isinstance(t, bool) for t in raw):
                prompt = list(raw)  # token ids
            else:
                raise APIError(
                    400,
                    "'prompt' must be a string, one string in an array, or an "
                    "array of token ids (one prompt per request).",
                    "prompt",
                )
        key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
        max_tokens = _get(body, key, int, default=None)
        if max_tokens is None:
            # Chat: the rest of the context; completions: OpenAI's default of 16.
            max_tokens = max(self.context - len(prompt), 1) if chat else 16
        if max_tokens < 1:
            raise APIError(400, f"'{key}' must be >= 1, got {max_tokens}.", key)
        seed = _get(body, "seed", int)
        if seed is None:
            seed = secrets.randbits(31)
        stream = _get(body, "stream", bool, default=False)
        options = _get(body, "stream_options", dict, default={})
        sampling = _sampling(body, INSTRUCT_SAMPLING, greedy_default=not chat)
        try:
            self.scheduler.validate(prompt, max_tokens)
        except GenerationError as e:
            msg = str(e)
            over = "context" in msg
            param = key if over and len(prompt) < self.context else "prompt"
            raise APIError(400, msg, param, "context_length_exceeded" if over else None) from None
        return prompt, dict(
            max_tokens=max_tokens,
            seed=seed & 0xFFFFFFFF,
            stream=stream,
            sampling=sampling,
            stop=_stop(body),
            ignore_eos=bool(_get(body, "ignore_eos", bool, default=False)),
            include_usage=bool(options.get("include_usage", False)),
        )

    def submit(
        self, prompt, opt, loop: asyncio.AbstractEventLoop
    ) -> tuple[GenRequest, asyncio.Queue]:
        """Starts a generation; its tokens arrive on the returned queue (None = finished)."""
        if self.draining:
            raise APIError(503, "The server is shutting down.", kind="server_error")
        if self.scheduler.failed:
            raise APIError(
                503, f"The engine has stopped: {self.scheduler.failed}", kind="server_error"
            )
        if self.scheduler.load()["pending"] >= self.max_pending:
            raise APIError(
                429,
                "Too many requests are waiting; retry later.",
                code="rate_limit_exceeded",
                kind="rate_limit_error",
            )
        queue: asyncio.Queue = asyncio.Queue()

        def on_tokens(_req, new):
            loop.call_soon_threadsafe(queue.put_nowait, list(new))

        def on_finish(_req):
            loop.call_soon_threadsafe(queue.put_nowait, None)

        request = GenRequest(
            prompt,
            opt["max_tokens"],
            opt["sampling"],
            seed=opt["seed"],
            ignore_eos=opt["ignore_eos"],
            on_tokens=on_tokens,
            on_finish=on_finish,
        )
        try:
            self.scheduler.submit(request)
        except GenerationError as e:
            raise APIError(400, str(e)) from None
        return request, queue

    async def events(self, request: GenRequest, queue: asyncio.Queue, opt: dict):
        """Yields (text delta, finish_reason or None) as tokens arrive; cancels on exit."""
        text = TextStream(self.tok, self.stop_ids, opt["stop"])
        try:
            while True:
                new = await queue.get()
                if new is None:
                    break
                delta = text.feed(new)
                if text.stopped:
                    self.scheduler.cancel(request)
                    yield delta, "stop"
                    return
                if delta:
                    yield delta, None
            if request.finish_reason == "error":
                raise APIError(500, f"Generation failed: {request.error}", kind="server_error")
            reason = "stop" if request.finish_reason in ("stop", "cancelled") else "length"
            yield text.flush(), reason
        finally:
            if not request.done.is_set():
                self.scheduler.cancel(request)  # a client that went away frees its slot

    def usage(self, prompt, request: GenRequest) -> dict:
        n = len(request.tokens)
        return dict(prompt_tokens=len(prompt), completion_tokens=n, total_tokens=len(prompt) + n)


def create_app(
    scheduler: Scheduler,
    tokenizer,
    *,
    model_name: str,
    stop_ids: Sequence[int],
    max_pending: int = 256,
) -> FastAPI:
    """The FastAPI app. The scheduler is started with the app and drained when it stops."""
    server = _Server(
        scheduler, tokenizer, model_name=model_name, stop_ids=stop_ids, max_pending=max_pending
    )

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            server.draining = True
            await asyncio.to_thread(scheduler.stop, 60.0)

    app = FastAPI(title="loopcoder-jax", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(_request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return APIError(exc.status_code, str(exc.detail), kind=kind).response()

    @app.exception_handler(Exception)
    async def internal_error(_request, exc: Exception):
        log.exception("unhandled error")
        return APIError(
            500, f"Internal error: {type(exc).__name__}", kind="server_error"
        ).response()

    @app.get("/health")
    async def health():
        load = scheduler.load()
        ok = not scheduler.failed and not server.draining
        body = dict(
            status="ok" if ok else "unavailable", **load, cancelled=scheduler.stats["cancelled"]
        )
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models():
        card = dict(
            id=model_name,
            object="model",
            created=0,
            owned_by="loopcoder-jax",
            max_model_len=server.context,
        )
        return {"object": "list", "data": [card]}

    async def read_body(request: Request) -> dict:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
            raise APIError(413, f"The request body is over {MAX_BODY_BYTES} bytes.")
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise APIError(413, f"The request body is over {MAX_BODY_BYTES} bytes.")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"The request body is not valid JSON ({e}).") from None
        if not isinstance(body, dict):
            raise APIError(400, "The request body must be a JSON object.")
        return body

    async def handle(request: Request, chat: bool):
        body = await read_body(request)
        # Tokenizing a long prompt takes a while: off the event loop, which serves the streams.
        prompt, opt = await asyncio.to_thread(server.parse, body, chat)
        gen, queue = server.submit(prompt, opt, asyncio.get_running_loop())
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        head = dict(id=rid, created=created, model=model_name)
        if opt["stream"]:
            return StreamingResponse(
                _sse(server, gen, queue, opt, prompt, head, chat),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        parts, reason = [], None
        events = server.events(gen, queue, opt)
        try:
            async for delta, fin in _watch(events, request, server, gen):
                parts.append(delta)
                reason = fin or reason
        finally:
            await events.aclose()
        text = "".join(parts)
        if chat:
            choice = dict(
                index=0,
                message=dict(role="assistant", content=text),
                finish_reason=reason,
                logprobs=None,
            )
            obj = "chat.completion"
        else:
            choice = dict(index=0, text=text, finish_reason=reason, logprobs=None)
            obj = "text_completion"
        return dict(**head, object=obj, choices=[choice], usage=server.usage(prompt, gen))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return app


async def _watch(events, request: Request, server: _Server, gen: GenRequest):
    """Passes `events` through, cancelling the generation if the client disconnects."""
    it = events.__aiter__()
    while True:
        nxt = asyncio.ensure_future(it.__anext__())
        while True:
            done, _ = await asyncio.wait({nxt}, timeout=0.5)
            if done:
                break
            if await request.is_disconnected():
                nxt.cancel()
                server.scheduler.cancel(gen)
                return
        try:
            yield nxt.result()
        except StopAsyncIteration:
            return


async def _sse(server: _Server, gen: GenRequest, queue, opt, prompt, head, chat: bool):
    """Server-sent events in the OpenAI chunk format, then `data: [DONE]`."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: str | None, reason, first=False) -> str:
        if chat:
            d = {} if delta is None else {"content": delta}
            if first:
                d = {"role": "assistant", "content": ""}
            choice = dict(index=0, delta=d, finish_reason=reason, logprobs=None)
        else:
            choice = dict(index=0, text=delta or "", finish_reason=reason, logprobs=None)
        return "data: " + json.dumps(dict(**head, object=obj, choices=[choice])) + "\n\n"

    events = server.events(gen, queue, opt)
    try:
        if chat:
            yield chunk(None, None, first=True)
        async for delta, reason in events:
            if reason is None:
                yield chunk(delta, None)
            else:
                if delta:
                    yield chunk(delta, None)
                yield chunk(None if chat else "", reason)
        if opt["include_usage"]:
            usage = dict(**head, object=obj, choices=[], usage=server.usage(prompt, gen))
            yield "data: " + json.dumps(usage) + "\n\n"
        yield "data: [DONE]\n\n"
    except APIError as e:
        err = dict(message=e.message, type=e.kind, param=e.param, code=e.code)
        yield "data: " + json.dumps({"error": err}) + "\n\n"
    finally:
        if not gen.done.is_set():
            server.scheduler.cancel(gen)  # the client went away: free its slot
        await events.aclose()
