"""Code-flow builder throughput on a synthetic repository (or a real one with --repo).

    python bench/bench_codeflow.py [--commits 200] [--files 30] [--repo PATH] [--repeats 3]

Builds the repository once (synthetic: `--files` Python modules, `--commits` first-parent
commits editing 1-3 of them, a merge every 25 commits), then times `build_documents` (all three
kinds, default caps) `--repeats` times after one warm-up and prints one JSON line with the
median: documents/s, MB of text/s, and git calls per document.
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import tempfile
import time

from loopcoder_jax.data import codeflow

_ENV = {
    "GIT_AUTHOR_NAME": "b",
    "GIT_AUTHOR_EMAIL": "b@example.com",
    "GIT_COMMITTER_NAME": "b",
    "GIT_COMMITTER_EMAIL": "b@example.com",
    "GIT_CONFIG_NOSYSTEM": "1",
}


def _git(repo, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")} | _ENV
    cmd = ["git", "-c", "commit.gpgsign=false", "-c", "init.defaultBranch=main", *args]
    subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)


def _module(rng: random.Random, i: int, version: int) -> str:
    lines = [f'"""Module {i}, version {version}."""', "", "import math", ""]
    for f in range(rng.randint(5, 15)):
        lines += [
            f"def f{i}_{f}(x, y={rng.randint(0, 9)}):",
            f"    return math.sqrt(x * x + y) * {f}",
            "",
        ]
    return "\n".join(lines) + "\n"


def synthetic_repo(root: str, commits: int, files: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    repo = os.path.join(root, "synthetic")
    os.makedirs(os.path.join(repo, "pkg"))
    _git(repo, "init", "-q")
    for i in range(files):
        with open(os.path.join(repo, "pkg", f"m{i}.py"), "w") as f:
            f.write(_module(rng, i, 0))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "c0")
    for c in range(1, commits):
        if c % 25 == 0:  # a side branch merged back
            _git(repo, "checkout", "-q", "-b", f"side{c}")
            with open(os.path.join(repo, "pkg", f"side{c}.py"), "w") as f:
                f.write(_module(rng, c, 0))
            _git(repo, "add", "-A")
            _git(repo, "commit", "-q", "-m", f"side {c}")
            _git(repo, "checkout", "-q", "main")
            _git(repo, "merge", "-q", "--no-ff", "-m", f"merge {c}", f"side{c}")
            continue
        for i in rng.sample(range(files), rng.randint(1, 3)):
            with open(os.path.join(repo, "pkg", f"m{i}.py"), "w") as f:
                f.write(_module(rng, i, c))
        _git(repo, "add", "-A")
        _git(repo, "commit", "-q", "-m", f"c{c}")
    return repo


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repo", default=None)
    p.add_argument("--commits", type=int, default=200)
    p.add_argument("--files", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repo = args.repo or synthetic_repo(tmp, args.commits, args.files)
        cfg = codeflow.CodeFlowConfig()
        calls = {"n": 0}
        run = codeflow.Git.run

        def counting(self, *a, **kw):
            calls["n"] += 1
            return run(self, *a, **kw)

        codeflow.Git.run = counting
        times, docs, chars = [], 0, 0
        for r in range(args.repeats + 1):
            calls["n"] = 0
            t0 = time.perf_counter()
            out = list(codeflow.build_documents([repo], cfg))
            dt = time.perf_counter() - t0
            if r:  # the first pass warms the OS page cache and imports
                times.append(dt)
            docs, chars = len(out), sum(len(d["text"]) for d in out)
        med = statistics.median(times)
        print(
            json.dumps(
                {
                    "bench": "codeflow",
                    "repo": "synthetic" if args.repo is None else os.path.basename(args.repo),
                    "commits": args.commits if args.repo is None else None,
                    "docs": docs,
                    "seconds": round(med, 3),
                    "docs_per_s": round(docs / med, 1),
                    "mb_text_per_s": round(chars / med / 1e6, 3),
                    "git_calls_per_doc": round(calls["n"] / max(docs, 1), 2),
                }
            )
        )


if __name__ == "__main__":
    main()
