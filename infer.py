"""Generate text with a LoopCoder checkpoint (thin CLI over `loopcoder_jax.generate`).

    python infer.py                                   # runs/tiny (from `python train.py`), greedy
    python infer.py --checkpoint DIR --prompt "def quicksort(arr):" --max-new-tokens 128
    python infer.py --hf /path/IQuest-Coder-V1-40B-Loop-Instruct --chat --prompt "Write ..."
    python infer.py --checkpoint DIR --prompts-file in.jsonl --output out.jsonl --batch-size 16
    python infer.py ... --mesh data=2,fsdp=1,tensor=4  # shard over 8 devices

`--checkpoint` takes a params checkpoint (converter output, `checkpoint.save_params`) or a
training run dir (its latest step). `--hf` converts a Hugging Face safetensors directory on the
fly. The tokenizer defaults to `tokenizer.model` inside the checkpoint / HF directory.

Sampling: greedy by default; with `--chat` the model card's instruct defaults (temperature 0.6,
top_p 0.85, top_k 20). Any of --temperature/--top-k/--top-p overrides them; --greedy forces
argmax. Generation stops at any of the config's `eos_token_id`s or the tokenizer's stop ids
(`</s>`, `<|im_end|>`, `<|endoftext|>`), per prompt.

--prompts-file: JSONL, one object per line with "prompt" (text) or "messages" (a chat, always
formatted with the chat template). Every other key is copied to the output line, which adds
"completion", "finish_reason" ("stop" | "length") and "num_tokens". The output is written
atomically (temp file + rename) after every prompt has been generated, in the input's order.
Prompts run through continuous batching (`loopcoder_jax.serving`): --batch-size decode slots,
each refilled as soon as its row finishes; prompts are prefilled --prefill-chunk tokens at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import uuid

DEFAULT_RUN = os.path.join("runs", "tiny")
DEFAULT_PROMPT = "def fibonacci(n):"


class InferError(RuntimeError):
    """A user-facing error: printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    from loopcoder_jax.cli import HelpFormatter

    p = argparse.ArgumentParser(
        description="Generate with a LoopCoder checkpoint.",
        formatter_class=HelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--checkpoint",
        help=f"params checkpoint or training run dir (default: {DEFAULT_RUN})",
    )
    src.add_argument(
        "--hf",
        help="Hugging Face checkpoint dir (safetensors), converted on the fly (default: use "
        "--checkpoint)",
    )
    p.add_argument(
        "--tokenizer",
        help="SentencePiece tokenizer.model, or a directory holding it with its Hugging Face "
        "tokenizer files (default: the checkpoint / HF directory)",
    )
    inp = p.add_mutually_exclusive_group()
    inp.add_argument("--prompt", help=f"prompt text (default: {DEFAULT_PROMPT!r})")
    inp.add_argument(
        "--prompts-file",
        help="JSONL with {'prompt': ...} or {'messages': [...]} per line (default: one --prompt)",
    )
    p.add_argument(
        "--output",
        help="JSONL to write completions to; needed with --prompts-file (default: none, stdout)",
    )
    p.add_argument(
        "--chat",
        action="store_true",
        help="apply the chat template (the checkpoint's own when it ships one, else ChatML)",
    )
    p.add_argument("--system", help="system message for --chat (default: none)")
    p.add_argument(
        "--max-new-tokens", type=int, default=64, help="tokens generated per prompt at most"
    )
    p.add_argument("--greedy", action="store_true", help="argmax decoding")
    sampling = "(default: greedy; with --chat the model card's {})"
    p.add_argument("--temperature", type=float, help=f"sampling temperature {sampling.format(0.6)}")
    p.add_argument("--top-k", type=int, help=f"keep the k most likely tokens {sampling.format(20)}")
    p.add_argument("--top-p", type=float, help=f"nucleus sampling mass {sampling.format(0.85)}")
    p.add_argument("--seed", type=int, default=0, help="sampling RNG seed")
    p.add_argument(
        "--batch-size", type=int, default=8, help="decode slots (prompts at once; prompts-file)"
    )
    p.add_argument(
        "--prefill-chunk", type=int, default=512,
        help="prompt tokens per prefill chunk (prompts-file; bounds prefill activation memory)",
    )  # fmt: skip
    p.add_argument(
        "--mesh",
        default="",
        help="mesh axis sizes, e.g. data=2,fsdp=1,tensor=4 (-1 = the rest; default: 1 device)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        help="compute/param dtype (default: the checkpoint's stored dtype)",
    )
    p.add_argument(
        "--unroll-layers",
        action="store_true",
        help="unroll the layer loop instead of lax.scan: faster decode steps (per-layer weight "
        "slices are hoisted out of the decode loop), longer compiles for deep models",
    )
    p.add_argument("--no-stream", action="store_true", help="do not stream a single prompt")
    dist = p.add_argument_group("multi-process (a multi-host TPU slice, or CPU processes)")
    dist.add_argument("--distributed", action="store_true", help="jax.distributed.initialize()")
    dist.add_argument("--coordinator", help="HOST:PORT of process 0 (default: single process)")
    dist.add_argument(
        "--num-processes", type=int, help="processes, with --coordinator (default: single process)"
    )
    dist.add_argument(
        "--process-id", type=int, help="this process's index, with --coordinator (default: 0)"
    )
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.output and not args.prompts_file:
        p.error("--output needs --prompts-file")
    if args.prompts_file and not args.output:
        p.error("--prompts-file needs --output")
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be >= 1")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.prefill_chunk < 1:
        p.error("--prefill-chunk must be >= 1")
    if args.greedy and any(x is not None for x in (args.temperature, args.top_k, args.top_p)):
        p.error("--greedy cannot be combined with --temperature/--top-k/--top-p")
    # Sampling and output checks run here, before a model is loaded or a token generated.
    if args.prompt == "":
        p.error("--prompt is empty; give the text to continue (or leave --prompt out)")
    t = args.temperature
    if t is not None and not (math.isfinite(t) and t >= 0):
        p.error(f"--temperature must be a finite number >= 0 (0 = greedy), got {t}")
    if args.top_k is not None and args.top_k < 1:
        p.error(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        p.error(f"--top-p must lie in (0, 1], got {args.top_p}")
    if args.output:
        if os.path.isdir(args.output):
            p.error(f"--output {args.output} is a directory; give a file path (e.g. out.jsonl)")
        parent = os.path.dirname(os.path.abspath(args.output))
        if os.path.lexists(parent) and not os.path.isdir(parent):
            p.error(f"--output {args.output}: {parent} is not a directory")
    return args


def make_mesh(spec: str):
    """'data=2,tensor=4' -> a Mesh over all devices (fsdp fills the rest unless given);
    '' -> None (one device)."""
    from loopcoder_jax import sharding as sh

    try:
        return sh.mesh_from_spec(spec)
    except sh.MeshError as e:
        raise InferError(str(e)) from None


def choose_sampling(args):
    from loopcoder_jax.generate import INSTRUCT_SAMPLING, Sampling

    if args.greedy:
        return Sampling()
    base = INSTRUCT_SAMPLING if args.chat else Sampling()
    if all(x is None for x in (args.temperature, args.top_k, args.top_p)):
        return base
    temperature = args.temperature
    if temperature is None:
        temperature = base.temperature if not base.greedy else 1.0
    return Sampling(temperature, args.top_k, args.top_p)


def read_prompts(path: str) -> list[dict]:
    """Validates every line before anything runs, so a bad line costs no generation."""
    if not os.path.isfile(path):
        raise InferError(f"--prompts-file {path} does not exist.")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InferError(f"{path}:{n} is not valid JSON ({e}).") from None
            ok_prompt = isinstance(row, dict) and isinstance(row.get("prompt"), str)
            ok_msgs = isinstance(row, dict) and isinstance(row.get("messages"), list)
            if not (ok_prompt or ok_msgs):
                raise InferError(
                    f"{path}:{n}: each line needs a string 'prompt' or a list 'messages' "
                    '(e.g. {"prompt": "def f(x):"} or {"messages": [{"role": "user", '
                    '"content": "..."}]}).'
                )
            if row.get("prompt") == "" or row.get("messages") == []:
                raise InferError(
                    f"{path}:{n}: the prompt is empty; give the text to continue (or a chat)."
                )
            rows.append(row)
    if not rows:
        raise InferError(f"--prompts-file {path} has no prompts.")
    return rows


def load_model(args, engine_for):
    """Returns (cfg, params, engine, default tokenizer path)."""
    from loopcoder_jax import checkpoint
    from loopcoder_jax.config import ConfigError

    if args.hf:
        try:
            from loopcoder_jax.convert import load_hf_checkpoint
        except ImportError:
            raise InferError("--hf needs loopcoder_jax.convert.load_hf_checkpoint.") from None
        if not os.path.isdir(args.hf):
            raise InferError(f"--hf {args.hf} is not a directory.")
        cfg, params = load_hf_checkpoint(args.hf, dtype=args.dtype)
        engine = engine_for(cfg)
        return cfg, engine.shard_params(params), engine, args.hf

    from loopcoder_jax import storage

    path = args.checkpoint or DEFAULT_RUN
    if not storage.exists(path):
        if args.checkpoint is None:
            raise InferError(
                f"No checkpoint at {DEFAULT_RUN}: run `python train.py` first (it trains the "
                "tiny default model there), or pass --checkpoint DIR / --hf DIR."
            )
        raise InferError(f"--checkpoint {path} does not exist.")
    try:
        cfg = checkpoint.load_config(path)
    except (checkpoint.CheckpointNotFoundError, ConfigError) as e:
        raise InferError(str(e)) from None
    engine = engine_for(cfg)
    try:
        _, params = checkpoint.load_params(path, dtype=args.dtype, shardings=engine.param_shardings)
    except checkpoint.CheckpointNotFoundError as e:
        raise InferError(str(e)) from None
    except (ValueError, KeyError, TypeError) as e:
        raise InferError(
            f"The weights in {path} do not match its config.json ({type(e).__name__}: "
            f"{str(e)[:400]}). Was config.json replaced or edited?"
        ) from None
    return cfg, params, engine, path


def load_tok(args, default_dir: str, cfg):
    from loopcoder_jax import storage
    from loopcoder_jax.data.tokenizer import TokenizerError, load_tokenizer

    path = args.tokenizer or default_dir
    in_dir = storage.join(default_dir, "tokenizer.model")
    if not args.tokenizer and not storage.isfile(in_dir):
        raise InferError(
            f"No tokenizer.model in {default_dir}; pass --tokenizer PATH/tokenizer.model."
        )
    try:
        if storage.is_remote(path):  # SentencePiece reads local files: a temporary copy
            if not args.tokenizer:
                path = in_dir
            with storage.local_copy(path) as local:
                tok = load_tokenizer(local)
        else:
            tok = load_tokenizer(path)
    except TokenizerError as e:
        raise InferError(str(e)) from None
    except FileNotFoundError:
        raise InferError(f"Tokenizer {path} does not exist; pass --tokenizer.") from None
    if tok.vocab_size > cfg.vocab_size:
        raise InferError(
            f"The tokenizer {tok.path} has {tok.vocab_size} pieces but the model only "
            f"{cfg.vocab_size} embeddings: it is not this model's tokenizer. Pass the "
            "tokenizer.model the model was trained with (--tokenizer)."
        )
    return tok


def write_jsonl_atomic(path: str, rows) -> None:
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class _Streamer:
    """Prints the text of row 0 as tokens arrive (decoding the whole prefix each time keeps
    SentencePiece's word-boundary spaces right)."""

    def __init__(self, tok, stop_ids, out=None):
        self.tok, self.stop, self.out = tok, set(stop_ids), out or sys.stdout
        self.ids, self.printed, self.done = [], "", False

    def __call__(self, step, tokens, active):
        if self.done or not active[0]:
            return
        t = int(tokens[0])
        if t in self.stop:
            self.done = True
            return
        self.ids.append(t)
        text = self.tok.decode(self.ids)
        if text.startswith(self.printed):
            self.out.write(text[len(self.printed) :])
            self.out.flush()
            self.printed = text


def completion_text(tok, tokens, stop_ids) -> str:
    if tokens and tokens[-1] in stop_ids:
        tokens = tokens[:-1]
    return tok.decode(tokens)


def run(args) -> int:
    from loopcoder_jax.config import RuntimeConfig
    from loopcoder_jax.generate import GenerationError, get_engine

    mesh = make_mesh(args.mesh)

    def engine_for(cfg):
        # float32 checkpoints compute in float32, bf16 ones in bf16, unless --dtype says.
        stored = cfg.torch_dtype if cfg.torch_dtype in ("float32", "bfloat16") else "float32"
        dtype = args.dtype or stored
        try:
            runtime = RuntimeConfig(
                dtype=dtype, param_dtype=dtype, scan_layers=not args.unroll_layers
            )
            return get_engine(cfg, runtime, mesh)
        except GenerationError as e:
            raise InferError(str(e)) from None

    import jax

    primary = jax.process_index() == 0
    cfg, params, engine, default_dir = load_model(args, engine_for)
    tok = load_tok(args, args.tokenizer or default_dir, cfg)
    sampling = choose_sampling(args)
    stop_ids = sorted(
        {int(e) for e in cfg.eos_token_id}
        | {int(e) for e in tok.stop_ids if 0 <= int(e) < cfg.vocab_size}
    )

    def render(row: dict) -> str:
        if "messages" in row:
            return tok.apply_chat_template(row["messages"])
        if args.chat:
            msgs = ([{"role": "system", "content": args.system}] if args.system else []) + [
                {"role": "user", "content": row["prompt"]}
            ]
            return tok.apply_chat_template(msgs)
        return row["prompt"]

    if args.prompts_file:
        rows = read_prompts(args.prompts_file)
    else:
        rows = [{"prompt": DEFAULT_PROMPT if args.prompt is None else args.prompt}]
    from loopcoder_jax.data.chat_template import ChatTemplateError

    try:
        texts = [render(r) for r in rows]
    except ChatTemplateError as e:
        raise InferError(f"chat template: {e}") from None
    # A checkpoint's own chat template may start with the BOS text itself: no second BOS.
    prompts = [tok.encode(t, add_bos=False if tok.starts_with_bos(t) else None) for t in texts]

    print(
        f"model: {cfg.num_hidden_layers} layers x loop_num {cfg.loop_num} "
        f"(W={cfg.loop_window_size}), {cfg.num_params():,} params; "
        f"mesh {dict(engine.mesh.shape)}; {sampling}",
        file=sys.stderr,
    )
    single = len(rows) == 1 and not args.prompts_file
    streamer = _Streamer(tok, stop_ids) if single and not args.no_stream else None
    totals = dict(prompt_tokens=0, new_tokens=0, prefill_s=0.0, decode_s=0.0, compile_s=0.0)
    results = []
    try:
        if args.prompts_file:
            results = run_continuous(args, engine, params, prompts, sampling, stop_ids, totals)
        else:
            plan = engine.plan(prompts, args.max_new_tokens)
            print(
                f"KV cache: {plan['cache_bytes']:,} bytes (batch {plan['batch']} x "
                f"{plan['cache_length']} positions: the dense model's + {cfg.loop_num - 1}"
                f" x W={cfg.loop_window_size} per layer)",
                file=sys.stderr,
            )
            if streamer is not None and not args.chat:
                sys.stdout.write(texts[0])  # a code prefix: show what the model continues
                sys.stdout.flush()
            out = engine.generate(
                params, prompts, args.max_new_tokens, sampling=sampling, eos_ids=stop_ids,
                seed=[args.seed], stream=streamer,
            )  # fmt: skip
            for k in totals:
                totals[k] += out.stats[k]
            results.extend(zip(out.tokens, out.finish_reasons, strict=True))
    except GenerationError as e:
        raise InferError(str(e)) from None

    if single:
        tokens, reason = results[0]
        text = completion_text(tok, tokens, set(stop_ids))
        if streamer is None:
            print(texts[0] + text)
        else:
            rest = text[len(streamer.printed) :] if text.startswith(streamer.printed) else ""
            print(rest)
        print(f"[finish_reason: {reason}]", file=sys.stderr)
    else:
        out_rows = []
        for row, (tokens, reason) in zip(rows, results, strict=True):
            out_rows.append(
                {
                    **row,
                    "completion": completion_text(tok, tokens, set(stop_ids)),
                    "finish_reason": reason,
                    "num_tokens": len(tokens),
                }
            )
        if primary:
            write_jsonl_atomic(args.output, out_rows)
        print(f"wrote {len(out_rows)} completions to {args.output}", file=sys.stderr)

    if args.prompts_file:
        print(
            f"continuous batching ({args.batch_size} slots): {totals['prompt_tokens']} prompt + "
            f"{totals['new_tokens']} new tokens in {totals['wall_s']:.2f}s, "
            f"{totals['new_tokens'] / max(totals['wall_s'], 1e-9):,.1f} new tok/s "
            "(wall time, compiles included)",
            file=sys.stderr,
        )
        return 0
    prefill = totals["prompt_tokens"] / max(totals["prefill_s"], 1e-9)
    decode = totals["new_tokens"] / max(totals["decode_s"], 1e-9)
    print(
        f"prefill: {totals['prompt_tokens']} tokens, {prefill:,.1f} tok/s | decode: "
        f"{totals['new_tokens']} tokens, {decode:,.1f} tok/s | compile {totals['compile_s']:.1f}s",
        file=sys.stderr,
    )
    return 0


def run_continuous(args, engine, params, prompts, sampling, stop_ids, totals):
    """The prompts through continuous batching; (tokens, finish_reason) per prompt, in order."""
    import time

    from loopcoder_jax.generate import GenerationError
    from loopcoder_jax.serving import Request, Scheduler, SlotConfig, SlotEngine

    for i, p in enumerate(prompts):  # the static engine's checks and messages, per prompt
        try:
            engine.plan([p], args.max_new_tokens)
        except GenerationError as e:
            raise InferError(str(e).replace("Prompt 0", f"Prompt {i}", 1)) from None
    longest = max(len(p) for p in prompts)
    t = time.perf_counter()
    dp = engine.data_parallel  # slots are split over the data axes
    config = SlotConfig(
        slots=-(-args.batch_size // dp) * dp,
        max_length=longest + args.max_new_tokens,
        chunk=args.prefill_chunk,
    )
    slots = SlotEngine(engine, params, config)
    sched = Scheduler(slots, stop_ids)
    requests = [
        Request(p, args.max_new_tokens, sampling, seed=args.seed + i) for i, p in enumerate(prompts)
    ]
    for r in requests:
        sched.validate(r.prompt, r.max_new_tokens)
    sched.generate(requests)
    totals["wall_s"] = time.perf_counter() - t
    totals["prompt_tokens"] = sched.stats["prompt_tokens"]
    totals["new_tokens"] = sched.stats["new_tokens"]
    return [(r.tokens, r.finish_reason) for r in requests]


def main(argv=None) -> int:
    from loopcoder_jax.storage import RemoteStorageError  # light: no jax

    args = parse_args(argv)
    try:
        if args.distributed or args.coordinator or args.num_processes:
            from loopcoder_jax import distributed

            distributed.initialize(args)
            import jax

            if jax.process_index() != 0:  # the others compute in lockstep, silently
                with open(os.devnull, "w") as null:
                    with contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
                        return run(args)
        return run(args)
    except (InferError, RemoteStorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
