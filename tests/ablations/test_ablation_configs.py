"""Every `configs/ablations/*.yaml` loads, differs from the reference in its one knob, and trains.

All configs train in ONE subprocess (one CPU device, one jax import) through the ablation CLI,
which calls `trainer.run` (the loop behind train.py) per config at the tiny budget, with a
checkpoint after every step. Compile time per config is the cost of this module.
"""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from loopcoder_jax import ablations, checkpoint

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_DIR = os.path.join(REPO_ROOT, "configs", "ablations")
CONFIGS = ablations.ablation_configs(CONFIG_DIR)

# One CPU device (not the 8 fake ones of the test session), and cheaper LLVM codegen: compiling
# 12 programs dominates this module, the few steps run in milliseconds either way.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

# What each config must differ in from loop2.yaml (the reference design), and nothing else.
EXPECTED_DIFF = {
    "loop2": {},
    "loop1_dense": {"model.loop_num": 1},
    "loop3": {"model.loop_num": 3},
    "window16": {"model.loop_window_size": 16},
    "window256": {"model.loop_window_size": 256},
    "gate_fixed": {"model.gate_type": "fixed"},
    "gate_hidden": {"model.gate_type": "hidden"},
    "untied_loops": {"model.untied_loops": True},
    "bptt_scaled": {"runtime.bptt_grad_scale": 0.5},
    "dense_4layer": {"model.num_hidden_layers": 4, "model.loop_num": 1},
    "folded_init": {"train.init_from": "runs/ablations/dense_4layer_folded"},
}


def _flat(exp) -> dict:
    d = exp.to_dict()
    out = {f"{s}.{k}": v for s, sec in d.items() if sec for k, v in sec.items()}
    out.pop("train.run_dir")
    return out


def test_configs_differ_from_the_reference_in_one_knob():
    assert sorted(CONFIGS) == sorted(EXPECTED_DIFF)
    ref = _flat(ablations.load_ablation(CONFIGS["loop2"]))
    assert ref["model.loop_num"] == 2 and ref["model.loop_window_size"] == 64
    assert ref["model.gate_type"] == "query" and ref["model.untied_loops"] is False
    assert ref["runtime.bptt_grad_scale"] == 1.0 and ref["train.init_from"] is None
    for name, path in CONFIGS.items():
        exp = ablations.load_ablation(path)
        diff = {k: v for k, v in _flat(exp).items() if ref.get(k) != v}
        assert diff == EXPECTED_DIFF[name], name
        assert exp.train.run_dir == f"runs/ablations/{name}"
    # The no-window control really sees every earlier key: W >= the training length.
    w256 = ablations.load_ablation(CONFIGS["window256"])
    assert w256.model.loop_window_size >= w256.train.seq_len


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Trains every config at the tiny budget in one subprocess; returns (out dir, results)."""
    out = tmp_path_factory.mktemp("ablations")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT)
    env["XLA_FLAGS"] = FAST_COMPILE_FLAGS
    cmd = [sys.executable, "-m", "loopcoder_jax.ablations", "--budget", "tiny"]
    cmd += ["--config-dir", CONFIG_DIR, "--out-dir", str(out), "--configs", "all"]
    cmd += ["--set", "train.checkpoint_every=1", "--set", "train.async_checkpointing=false"]
    cmd += ["--set", "data.startup_check_records=0"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = {r.name: r for r in ablations.load_results(out / "results.json")}
    return out, results


def _params_at(run_dir, step):
    tree = ocp.StandardCheckpointer().restore(
        os.path.join(run_dir, "checkpoints", str(step), "params")
    )
    return {
        "/".join(str(k.key) for k in path): np.asarray(x)
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


@pytest.mark.parametrize("name", sorted(EXPECTED_DIFF))
def test_every_ablation_config_trains(trained, name):
    out, results = trained
    r = results[name]
    steps = ablations.BUDGETS["tiny"]["steps"]
    assert r.steps == list(range(1, steps + 1))
    assert all(math.isfinite(x) for x in r.losses), r.losses
    # held out (eval_every 1), on the records the budget holds out of training
    assert r.eval_steps == r.steps and all(math.isfinite(x) for x in r.eval_losses)
    assert r.final_eval_loss == r.eval_losses[-1] and r.flops_per_step > 0
    assert min(r.losses[1:]) < r.losses[0]  # the few steps already lower the loss
    run_dir = out / "runs" / name
    # Warmup starts at lr = 0, so the step-1 checkpoint holds the initial params.
    first, last = _params_at(run_dir, 1), _params_at(run_dir, steps)
    assert first.keys() == last.keys()
    moved = [k for k in first if not np.array_equal(first[k], last[k])]
    assert "embed_tokens/embedding" in moved and any(k.startswith("layers/") for k in moved)
    cfg, _ = checkpoint.load_params(run_dir)
    exp = ablations.load_ablation(CONFIGS[name])
    for field in ("loop_num", "loop_window_size", "gate_type", "untied_loops"):
        assert getattr(cfg, field) == getattr(exp.model, field), field


def test_folded_init_starts_from_the_folded_dense_model(trained):
    out, results = trained
    _, folded = checkpoint.load_params(out / "runs" / "dense_4layer_folded")
    start = _params_at(out / "runs" / "folded_init", 1)
    flat = {
        "/".join(str(k.key) for k in p): np.asarray(x)
        for p, x in jax.tree_util.tree_flatten_with_path(folded)[0]
    }
    assert flat.keys() == start.keys()
    for k in flat:
        np.testing.assert_array_equal(flat[k], start[k], err_msg=k)
    # Shared layer i = mean of dense layers i and i + L (depth-matched "average" fold, L = 2).
    _, dense = checkpoint.load_params(out / "runs" / "dense_4layer")
    w = np.asarray(dense["layers"]["mlp"]["up_proj"]["kernel"])
    np.testing.assert_allclose(
        flat["layers/mlp/up_proj/kernel"], (w[:2] + w[2:]) / 2, rtol=1e-6, atol=1e-7
    )
    assert results["folded_init"].losses[0] < results["loop2"].losses[0]


def test_results_plot_and_table(trained):
    out, results = trained
    png = out / "ablation_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    assert all(f"| {name} |" in table for name in EXPECTED_DIFF)
    assert "held-out loss, equal tokens" in table and "held-out loss, equal FLOPs" in table
    row = next(ln for ln in table.splitlines() if ln.startswith("| loop1_dense |"))
    assert f"{results['loop1_dense'].final_eval_loss:.3f}" in row
    assert json.loads((out / "results.json").read_text())[0]["steps"]


def _result(name, flops_per_step, eval_losses, eval_every=10, steps=100):
    return ablations.AblationResult(
        name=name, steps=list(range(1, steps + 1)), losses=[5.0] * steps, num_params=1,
        seconds_per_step=0.1, tokens_per_step=1024, flops_per_step=flops_per_step,
        eval_steps=list(range(eval_every, steps + 1, eval_every)), eval_losses=eval_losses,
    )  # fmt: skip


def test_equal_tokens_and_equal_flops_comparison_by_hand():
    dense = _result("loop1_dense", 100, [6.0 - 0.1 * i for i in range(10)])  # 6.0 .. 5.1
    loop = _result("loop2", 200, [6.0 - 0.2 * i for i in range(10)])  # 6.0 .. 4.2
    budget = ablations.equal_flops_budget([dense, loop])
    assert budget == 100 * 100  # the dense run's total: the loop model reaches it at step 50
    assert loop.eval_loss_at_flops(budget) == pytest.approx(6.0 - 0.2 * 4)  # step 50 = eval 5
    assert dense.eval_loss_at_flops(budget) == pytest.approx(5.1)
    assert loop.eval_loss_at_flops(200 * 55) == pytest.approx((5.2 + 5.0) / 2)  # interpolated
    assert math.isnan(loop.eval_loss_at_flops(200 * 5))  # before the first evaluation
    table = ablations.results_table([loop, dense])
    row = next(ln for ln in table.splitlines() if ln.startswith("| loop1_dense |"))
    # equal tokens: 5.1 vs 4.2 (+0.900); equal FLOPs: 5.1 vs 5.2 (-0.100)
    assert "| 5.100 | +0.900 | 5.100 | -0.100 |" in row
    assert "102,400 training tokens" in table


def test_smoothing_label_makes_sense_at_any_budget():
    assert ablations.smoothing_window(3) == 1
    assert ablations.smoothing_label(1, 128) == "raw, one point per step"
    assert ablations.smoothing_window(100) == 6
    assert ablations.smoothing_label(6, 1024) == "trailing mean of 6 steps = 6,144 tokens"


def test_cli_errors_exit_2_naming_the_fix(tmp_path, capsys):
    base = ["--out-dir", str(tmp_path), "--config-dir", CONFIG_DIR]
    assert ablations.main([*base, "--configs", "loop2", "--set", "train.lrr=1"]) == 2
    assert "did you mean 'train.lr'?" in capsys.readouterr().err
    assert ablations.main([*base, "--configs", "loop9"]) == 2
    assert "Unknown ablations ['loop9']" in capsys.readouterr().err
