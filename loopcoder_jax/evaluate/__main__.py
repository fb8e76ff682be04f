"""Evaluate a LoopCoder checkpoint: perplexity on JSONL records, or HumanEval pass@k.

    python -m loopcoder_jax.evaluate --task perplexity --data held_out.jsonl
    python -m loopcoder_jax.evaluate --task humaneval --limit 20 --samples 1
    python -m loopcoder_jax.evaluate --task humaneval --samples 10 --temperature 0.8 --top-p 0.95
    python -m loopcoder_jax.evaluate --task humaneval --completions samples.jsonl   # no model

The checkpoint defaults to runs/tiny (`python train.py`), its tokenizer to the tokenizer.model
inside it. HumanEval writes OUT/report.jsonl (one JSON object per problem, every sample with
its outcome), OUT/summary.json and OUT/completions.jsonl (re-scorable with --completions), and
prints a summary table. Every sample runs in the sandbox (docs/evaluation.md): its own
subprocess, wall-clock timeout, rlimits, a fresh temp dir, no network, a read-only file system.
Bad input exits with code 2 and a message.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from loopcoder_jax.cli import HelpFormatter

DEFAULT_RUN = os.path.join("runs", "tiny")


class EvalError(RuntimeError):
    """A user-facing error: printed without a traceback, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loopcoder_jax.evaluate",
        description="Evaluate a LoopCoder checkpoint (perplexity, HumanEval pass@k).",
        formatter_class=HelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument(
        "--task", required=True, choices=("perplexity", "humaneval"), help="what to evaluate"
    )
    p.add_argument("--checkpoint", help=f"params checkpoint or run dir (default: {DEFAULT_RUN})")
    p.add_argument("--tokenizer", help="tokenizer.model (default: the one in the checkpoint)")
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16"),
        help="compute/param dtype (default: the checkpoint's)",
    )  # fmt: skip
    p.add_argument("--output", help="output dir (default: runs/eval/<task>)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per model call")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    ppl = p.add_argument_group("perplexity")
    ppl.add_argument(
        "--data",
        help="JSONL records: {'text': ...} or {'messages': [...]} (default: none; "
        "required by --task perplexity)",
    )
    ppl.add_argument(
        "--seq-len",
        type=int,
        help="row length (default: the run's train.seq_len, else min(context, 2048))",
    )
    ppl.add_argument(
        "--record-format", default="auto", choices=("auto", "text", "chat"),
        help="how records are read (auto: 'messages' means chat, else text)",
    )  # fmt: skip
    he = p.add_argument_group("humaneval")
    he.add_argument("--limit", type=int, help="only the first N problems (default: all 164)")
    he.add_argument("--samples", type=int, default=1, help="samples per problem (n of pass@k)")
    he.add_argument(
        "--completions",
        help="score these (human-eval samples JSONL), no model (default: generate them)",
    )
    he.add_argument("--max-new-tokens", type=int, default=128, help="tokens per completion")
    he.add_argument("--temperature", type=float, help="default: 0 (greedy) with --samples 1, "
                    "else 0.8")  # fmt: skip
    he.add_argument("--top-k", type=int, help="top-k filter when sampling (default: off)")
    he.add_argument("--top-p", type=float, help="default: 0.95 when sampling")
    he.add_argument("--seed", type=int, default=0, help="sampling RNG seed")
    he.add_argument("--no-stop", action="store_true", help="do not cut completions at the "
                    "stop sequences (\\nclass, \\ndef, \\n#, \\nif, \\nprint)")  # fmt: skip
    sb = p.add_argument_group("sandbox (per sample)")
    sb.add_argument("--timeout", type=float, default=10.0, help="wall-clock seconds")
    sb.add_argument("--memory-mb", type=int, default=1024, help="address space per process")
    sb.add_argument("--max-procs", type=int, default=16, help="processes + threads")
    sb.add_argument("--workers", type=int, help="samples run at once (default: CPU count)")
    sb.add_argument(
        "--sandbox-mode", default="auto",
        choices=("auto", "namespaces", "userns", "uid", "rlimits"),
        help="isolation (auto: the strongest this machine allows; docs/evaluation.md)",
    )  # fmt: skip
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.task == "perplexity":
        if not args.data:
            p.error("--task perplexity needs --data FILE.jsonl")
        if args.completions:
            p.error("--completions belongs to --task humaneval")
    else:
        if args.data:
            p.error("--data belongs to --task perplexity")
        if args.samples < 1:
            p.error("--samples must be >= 1")
        if args.completions and (args.checkpoint or args.samples != 1):
            p.error(
                "--completions scores a file without a model: drop --checkpoint/--samples "
                "(n is the number of lines per task in the file)"
            )
        if args.limit is not None and args.limit < 1:
            p.error("--limit must be >= 1")
        if args.max_new_tokens < 1:
            p.error("--max-new-tokens must be >= 1")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.timeout <= 0 or args.memory_mb < 64 or args.max_procs < 1:
        p.error("--timeout must be > 0, --memory-mb >= 64, --max-procs >= 1")
    if args.workers is not None and args.workers < 1:
        p.error("--workers must be >= 1")
    return args


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_model(args):
    """(cfg, params, tokenizer) from --checkpoint/--tokenizer, with user-facing errors."""
    from loopcoder_jax import checkpoint
    from loopcoder_jax.config import ConfigError
    from loopcoder_jax.data.tokenizer import TokenizerError, load_tokenizer

    path = args.checkpoint or DEFAULT_RUN
    if not os.path.exists(path):
        if args.checkpoint is None:
            raise EvalError(
                f"No checkpoint at {DEFAULT_RUN}: run `python train.py` first (it trains the "
                "tiny default model there), or pass --checkpoint DIR."
            )
        raise EvalError(f"--checkpoint {path} does not exist.")
    try:
        cfg, params = checkpoint.load_params(path, dtype=args.dtype)
    except (checkpoint.CheckpointNotFoundError, ConfigError) as e:
        raise EvalError(str(e)) from None
    except (ValueError, KeyError, TypeError) as e:
        raise EvalError(
            f"The weights in {path} do not match its config.json ({type(e).__name__}: "
            f"{str(e)[:400]}). Was config.json replaced or edited?"
        ) from None
    tok_path = args.tokenizer or path
    if not args.tokenizer and not os.path.isfile(os.path.join(path, "tokenizer.model")):
        raise EvalError(f"No tokenizer.model in {path}; pass --tokenizer PATH/tokenizer.model.")
    try:
        tok = load_tokenizer(tok_path)
    except TokenizerError as e:
        raise EvalError(str(e)) from None
    if tok.vocab_size > cfg.vocab_size:
        raise EvalError(
            f"The tokenizer {tok.path} has {tok.vocab_size} pieces but the model only "
            f"{cfg.vocab_size} embeddings: pass the tokenizer.model the model was trained with."
        )
    return cfg, params, tok


def _runtime(args, cfg):
    from loopcoder_jax.config import RuntimeConfig

    stored = cfg.torch_dtype if cfg.torch_dtype in ("float32", "bfloat16") else "float32"
    dtype = args.dtype or stored
    return RuntimeConfig(dtype=dtype, param_dtype=dtype)


def _trained_seq_len(path: str) -> int | None:
    """train.seq_len of a training run dir (its experiment.json), else None."""
    try:
        with open(os.path.join(path, "experiment.json")) as f:
            return int(json.load(f)["train"]["seq_len"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_perplexity(args) -> dict:
    from loopcoder_jax.data.pipeline import DataError
    from loopcoder_jax.evaluate.perplexity import PerplexityError, evaluate_perplexity

    if not os.path.isfile(args.data):
        raise EvalError(f"--data {args.data} does not exist (a JSONL file of text/chat records).")
    cfg, params, tok = load_model(args)
    seq_len = args.seq_len or _trained_seq_len(args.checkpoint or DEFAULT_RUN)
    seq_len = seq_len or min(cfg.max_position_embeddings, 2048)
    try:
        result = evaluate_perplexity(
            cfg, params, tok, args.data, seq_len=seq_len, batch_size=args.batch_size,
            record_format=args.record_format, runtime=_runtime(args, cfg),
        )  # fmt: skip
    except (PerplexityError, DataError) as e:
        raise EvalError(str(e)) from None
    result["checkpoint"] = args.checkpoint or DEFAULT_RUN
    out_dir = args.output or os.path.join("runs", "eval", "perplexity")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(result, f, indent=2)
    if not args.json:
        print(
            f"perplexity on {args.data}: loss {result['loss']:.4f} nats/token, perplexity "
            f"{result['perplexity']:.3f}, {result['tokens']:,} scored tokens in "
            f"{result['records']} records ({result['records_skipped']} skipped), "
            f"{result['seconds']:.1f}s"
        )
    return result


def run_humaneval(args) -> dict:
    from loopcoder_jax.evaluate import humaneval as he
    from loopcoder_jax.evaluate.sandbox import Limits, Sandbox, SandboxError

    try:
        problems = he.load_problems(args.limit)
    except he.HumanEvalError as e:
        raise EvalError(str(e)) from None
    # The sandbox first: a machine that cannot run it should fail before any generation.
    try:
        limits = Limits(timeout_s=args.timeout, memory_mb=args.memory_mb, nproc=args.max_procs)
        sandbox = Sandbox(limits, mode=args.sandbox_mode)
    except (SandboxError, ValueError) as e:
        raise EvalError(str(e)) from None
    if sandbox.warning:
        _err(f"WARNING: {sandbox.warning}")
    t0 = time.perf_counter()
    gen_stats = None
    if args.completions:
        try:  # without --limit: the problems the file has
            wanted = problems if args.limit is not None else None
            completions = he.read_completions(args.completions, wanted)
        except he.HumanEvalError as e:
            raise EvalError(str(e)) from None
        problems = [p for p in problems if p["task_id"] in completions]
        source = args.completions
        raw = None
    else:
        from loopcoder_jax.generate import GenerationError

        cfg, params, tok = load_model(args)
        sampling = args.samples > 1 or args.temperature not in (None, 0.0)
        temperature = args.temperature if args.temperature is not None else (0.8 * sampling)
        settings = he.GenerationSettings(
            samples=args.samples, max_new_tokens=args.max_new_tokens, temperature=temperature,
            top_k=args.top_k, top_p=args.top_p if args.top_p or not sampling else 0.95,
            batch_size=args.batch_size, seed=args.seed,
        )  # fmt: skip
        try:
            engine = he.engine_for(cfg, _runtime(args, cfg))
            completions, gen_stats = he.generate_completions(
                engine, params, tok, problems, settings, log=_err
            )
        except (GenerationError, he.HumanEvalError) as e:
            raise EvalError(str(e)) from None
        source = args.checkpoint or DEFAULT_RUN
        raw = completions
    _err(f"running {sum(len(completions[p['task_id']]) for p in problems)} samples in the "
         f"sandbox ({sandbox.mode} mode)")  # fmt: skip
    reports, summary = he.score(problems, completions, sandbox, workers=args.workers,
                                stop=not args.no_stop)  # fmt: skip
    summary["source"] = source
    if gen_stats is not None:
        summary["generation"] = {k: round(v, 2) if isinstance(v, float) else v
                                 for k, v in gen_stats.items()}  # fmt: skip
        summary["sampling"] = dict(
            temperature=temperature,
            top_k=args.top_k,
            top_p=settings.top_p,
            max_new_tokens=args.max_new_tokens,
        )
    summary["total_s"] = round(time.perf_counter() - t0, 2)
    out_dir = args.output or os.path.join("runs", "eval", "humaneval")
    paths = he.write_reports(out_dir, reports, summary, raw)
    if args.json:
        return summary
    print(he.summary_table(summary))
    print(f"reports: {paths['report']}, {paths['summary']}"
          + (f", {paths['completions']}" if "completions" in paths else ""))  # fmt: skip
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        result = run_perplexity(args) if args.task == "perplexity" else run_humaneval(args)
    except EvalError as e:
        _err(f"error: {e}")
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
