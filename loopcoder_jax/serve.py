"""OpenAI-compatible server: `python -m loopcoder_jax.serve` (console script `loopcoder-serve`).

    python -m loopcoder_jax.serve --checkpoint DIR                  # 127.0.0.1:8000, 8 slots
    python -m loopcoder_jax.serve --hf /data/IQuest-Coder-V1-40B-Loop-Instruct --dtype bfloat16 \\
        --mesh tensor=4 --slots 16 --max-context 8192 --host 0.0.0.0 --port 8000

Then any OpenAI client: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")`.
Routes: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (see
`loopcoder_jax/serving/http.py`). Requests run through continuous batching
(`loopcoder_jax/serving/`): --slots decode rows, prompts prefilled --prefill-chunk tokens at a
time, each slot holding up to --max-context tokens (prompt + completion). SIGTERM / Ctrl-C
stop accepting connections, let the requests in flight finish (up to --drain-timeout s), exit 0.
Bad flags, a missing checkpoint or tokenizer: exit 2 with a message.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from loopcoder_jax.cli import HelpFormatter


class ServeError(RuntimeError):
    """A user-facing start-up error: printed without a traceback, exit 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="loopcoder-serve",
        description="Serve a LoopCoder checkpoint over an OpenAI-compatible HTTP API.",
        formatter_class=HelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--checkpoint", help="params checkpoint or training run dir (default: none; or --hf)"
    )
    src.add_argument(
        "--hf",
        help="Hugging Face checkpoint dir (safetensors), converted on load (default: none; "
        "or --checkpoint)",
    )
    p.add_argument("--tokenizer", help="tokenizer.model (default: in the checkpoint dir)")
    p.add_argument("--model-name", help="the model id clients send (default: the dir's name)")
    p.add_argument(
        "--mesh", default="", help="mesh axis sizes, e.g. data=2,tensor=4 (default: one device)"
    )
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16"),
        help="compute/param dtype (default: the checkpoint's)",
    )  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--slots", type=int, default=8, help="decode slots (concurrent requests)")
    p.add_argument(
        "--max-context",
        type=int,
        help="tokens per slot, prompt + completion (default: min(model context, 8192))",
    )
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per chunk")
    p.add_argument("--steps-per-call", type=int, default=4, help="decode steps per device call")
    p.add_argument(
        "--prefill-rows", type=int, default=8,
        help="most prompts (of at most --prefill-chunk tokens) prefilled in one call",
    )  # fmt: skip
    p.add_argument("--max-pending", type=int, default=256, help="queued requests before 429")
    p.add_argument("--drain-timeout", type=float, default=60.0, help="seconds to drain on exit")
    p.add_argument("--unroll-layers", action="store_true", help="see infer.py --unroll-layers")
    p.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error"),
        help="server log verbosity",
    )  # fmt: skip
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    for name in ("slots", "prefill_chunk", "steps_per_call", "prefill_rows", "max_pending"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_context is not None and args.max_context < 2:
        p.error("--max-context must be >= 2")
    if not 0 <= args.port < 65536:
        p.error("--port must lie in [0, 65535]")
    return args


def _mesh(spec: str):
    from loopcoder_jax import sharding as sh

    try:
        return sh.mesh_from_spec(spec)
    except sh.MeshError as e:
        raise ServeError(str(e)) from None


def load(args):
    """Returns (cfg, params, engine, tokenizer, model directory)."""
    from loopcoder_jax import checkpoint
    from loopcoder_jax.config import ConfigError, RuntimeConfig
    from loopcoder_jax.data.tokenizer import TokenizerError, load_tokenizer
    from loopcoder_jax.generate import Engine, GenerationError

    mesh = _mesh(args.mesh)

    def engine_for(cfg):
        stored = cfg.torch_dtype if cfg.torch_dtype in ("float32", "bfloat16") else "float32"
        dtype = args.dtype or stored
        runtime = RuntimeConfig(dtype=dtype, param_dtype=dtype, scan_layers=not args.unroll_layers)
        try:
            return Engine(cfg, runtime, mesh)
        except GenerationError as e:
            raise ServeError(str(e)) from None

    path = args.hf or args.checkpoint
    if not os.path.exists(path):
        raise ServeError(f"{'--hf' if args.hf else '--checkpoint'} {path} does not exist.")
    try:
        if args.hf:
            from loopcoder_jax.convert import load_hf_checkpoint

            cfg, params = load_hf_checkpoint(path, dtype=args.dtype)
            engine = engine_for(cfg)
            params = engine.shard_params(params)
        else:
            cfg = checkpoint.load_config(path)
            engine = engine_for(cfg)
            _, params = checkpoint.load_params(
                path, dtype=args.dtype, shardings=engine.param_shardings
            )
    except (checkpoint.CheckpointNotFoundError, ConfigError, GenerationError) as e:
        raise ServeError(str(e)) from None
    except (ValueError, KeyError, TypeError) as e:
        raise ServeError(f"Could not load {path} ({type(e).__name__}: {str(e)[:400]}).") from None
    tok_path = args.tokenizer or path
    try:
        tok = load_tokenizer(tok_path)
    except TokenizerError as e:
        raise ServeError(f"{e} (pass --tokenizer PATH/tokenizer.model)") from None
    if tok.vocab_size > cfg.vocab_size:
        raise ServeError(
            f"The tokenizer {tok.path} has {tok.vocab_size} pieces but the model only "
            f"{cfg.vocab_size} embeddings: pass the model's tokenizer.model (--tokenizer)."
        )
    return cfg, params, engine, tok, path


def build(args):
    """(app, scheduler) for the parsed flags: loads the model and compiles the programs."""
    from loopcoder_jax.generate import GenerationError
    from loopcoder_jax.serving import Request, Scheduler, SlotConfig, SlotEngine

    try:
        import uvicorn  # noqa: F401

        from loopcoder_jax.serving.http import create_app
    except ImportError as e:
        raise ServeError(
            f"{e}: install the server's dependencies with pip install 'loopcoder-jax[serve]'."
        ) from None

    cfg, params, engine, tok, path = load(args)
    context = args.max_context or min(cfg.max_position_embeddings, 8192)
    if context > cfg.max_position_embeddings:
        raise ServeError(
            f"--max-context {context} exceeds the model's context of "
            f"{cfg.max_position_embeddings} (max_position_embeddings)."
        )
    dp = engine.data_parallel
    try:
        slots = SlotEngine(
            engine,
            params,
            SlotConfig(
                slots=-(-args.slots // dp) * dp,
                max_length=context,
                chunk=args.prefill_chunk,
                steps_per_call=args.steps_per_call,
                prefill_rows=args.prefill_rows,
            ),
        )
    except GenerationError as e:
        raise ServeError(str(e)) from None
    stop_ids = sorted(
        {int(e) for e in cfg.eos_token_id}
        | {int(e) for e in tok.stop_ids if 0 <= int(e) < cfg.vocab_size}
    )
    scheduler = Scheduler(slots, stop_ids)
    # Warm-up: compile the prefill (smallest chunk), insert and decode programs before serving.
    scheduler.generate([Request([tok.bos_id], 2, ignore_eos=True)])
    name = args.model_name or os.path.basename(os.path.normpath(path))
    app = create_app(
        scheduler, tok, model_name=name, stop_ids=stop_ids, max_pending=args.max_pending
    )
    print(
        f"loopcoder-serve: model {name!r} ({cfg.num_hidden_layers} layers x loop_num "
        f"{cfg.loop_num}), {slots.slots} slots x {slots.max_length} tokens, prefill chunk "
        f"{slots.chunk}, mesh {dict(engine.mesh.shape)}",
        file=sys.stderr,
    )
    return app, scheduler


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    try:
        app, _ = build(args)
    except ServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=args.drain_timeout,
    )
    server = uvicorn.Server(config)
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal under the handlers found at
    # start; these no-ops turn that into a normal return, so a drained server exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        server.run()  # SIGTERM/SIGINT: stop accepting, finish in-flight requests, shut down
    except OSError as e:  # e.g. the port is taken
        print(f"error: cannot serve on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    return 0 if server.started else 2


if __name__ == "__main__":
    sys.exit(main())
