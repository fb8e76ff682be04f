"""Small ablations of the loop design: load `configs/ablations/*.yaml`, train, plot, tabulate.

Used by `notebooks/ablations.ipynb` and its tests; the notebook defines no model or training
code. Each YAML differs from `loop2.yaml` (the released design at tiny width) in one knob:
loop_num, the local window W, the gate variant, untied loops, the BPTT gradient scale, or a
dense-to-loop folded init. `BUDGETS` scale every run down to what a runtime affords.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence

# Run-size presets: train-section overrides applied on top of every ablation YAML.
# "tiny" is the CI budget (seconds per config on 2 CPU cores); "cpu" the dev-box write-up run;
# "accelerator" a Colab GPU/TPU runtime (minutes per config).
BUDGETS: dict[str, dict[str, int]] = {
    "tiny": {"steps": 3, "batch_size": 2, "seq_len": 64, "warmup_steps": 1},
    "cpu": {"steps": 100, "batch_size": 8, "seq_len": 128, "warmup_steps": 10},
    "accelerator": {"steps": 1000, "batch_size": 32, "seq_len": 256, "warmup_steps": 50},
}

# The configs the folded init depends on (trained first, then folded; see folded_init.yaml).
FOLD_SOURCE = "dense_4layer"
FOLDED = "folded_init"


def default_config_dir() -> str | None:
    """`configs/ablations` of the checkout this package was imported from, or of the cwd."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for root in (os.getcwd(), here):
        path = os.path.join(root, "configs", "ablations")
        if os.path.isdir(path):
            return path
    return None


def ablation_configs(config_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """{name: yaml path} of the ablation configs, sorted by name."""
    config_dir = os.fspath(config_dir) if config_dir is not None else default_config_dir()
    if config_dir is None or not os.path.isdir(config_dir):
        raise FileNotFoundError(
            f"No ablation configs at {config_dir!r}: pass the repository's configs/ablations "
            "directory (clone the repository to get it)."
        )
    names = sorted(f[: -len(".yaml")] for f in os.listdir(config_dir) if f.endswith(".yaml"))
    return {n: os.path.join(config_dir, n + ".yaml") for n in names}


def budget_overrides(budget: str, run_root: str | None = None, name: str = "") -> dict[str, str]:
    """`section.key -> value` overrides for a budget (and a run dir under `run_root`)."""
    try:
        train = BUDGETS[budget]
    except KeyError:
        raise ValueError(f"Unknown budget {budget!r}; choose one of {sorted(BUDGETS)}.") from None
    out = {f"train.{k}": str(v) for k, v in train.items()}
    out["train.checkpoint_every"] = str(train["steps"])
    out["train.log_every"] = "1"
    if run_root is not None:
        out["train.run_dir"] = os.path.join(run_root, name)
    return out


@dataclasses.dataclass
class AblationResult:
    """One trained ablation: its per-step losses and what it cost."""

    name: str
    steps: list[int]
    losses: list[float]
    num_params: int
    seconds_per_step: float  # median step time, step 1 (compilation) excluded
    tokens_per_step: int
    param_change: float = math.nan  # global L2 norm of (final params - initial params)

    @property
    def final_loss(self) -> float:
        """Mean loss of the last 10% of steps (at least one): less noisy than the last step."""
        k = max(1, len(self.losses) // 10)
        return float(sum(self.losses[-k:]) / k)


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average (window clipped at the start)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_curves(
    results: Sequence[AblationResult],
    path: str | os.PathLike,
    title: str = "",
    baseline: str = "loop2",
) -> str:
    """Loss curves into one PNG; returns the path.

    Left: every run (smoothed, solid; raw, faint). Right (when `baseline` is among the
    results): each run's smoothed loss minus the baseline's at the same step, where the small
    effects are visible.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    base = next((r for r in results if r.name == baseline), None)
    ncols = 2 if base is not None and len(results) > 1 else 1
    fig, axes = plt.subplots(1, ncols, figsize=(8 * ncols, 5.5), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    styles = ("-", "--", "-.", ":")
    window = max(1, max((len(r.losses) for r in results), default=1) // 15)
    smoothed = {r.name: smooth(r.losses, window) for r in results}
    ax = axes[0, 0]
    for i, r in enumerate(results):
        style = dict(color=colors[(2 * i) % 20 + (i // 10) % 2], linestyle=styles[i % 4])
        ax.plot(r.steps, smoothed[r.name], label=r.name, linewidth=1.6, **style)
        ax.plot(r.steps, r.losses, alpha=0.15, linewidth=0.8, color=style["color"])
    ax.set_xlabel("step")
    ax.set_ylabel(f"train loss (moving average over {window} steps)")
    ax.set_title(title or "LoopCoder ablations", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    if ncols == 2:
        ax = axes[0, 1]
        ref = dict(zip(base.steps, smoothed[baseline], strict=True))
        for i, r in enumerate(results):
            style = dict(color=colors[(2 * i) % 20 + (i // 10) % 2], linestyle=styles[i % 4])
            pts = [
                (s, v - ref[s]) for s, v in zip(r.steps, smoothed[r.name], strict=True) if s in ref
            ]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=r.name, linewidth=1.4, **style)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel(f"smoothed loss minus {baseline} (lower is better)")
        ax.set_title(f"difference to {baseline}", fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def results_table(
    results: Sequence[AblationResult], baseline: str = "loop2", notes: Mapping[str, str] = ()
) -> str:
    """Markdown table: params, steps, final loss, delta vs the baseline, time."""
    notes = dict(notes)
    base = next((r.final_loss for r in results if r.name == baseline), None)
    rows = [
        "| config | params | steps | first loss | final loss | vs " + baseline + " | s/step |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        delta = "" if base is None or r.name == baseline else f"{r.final_loss - base:+.3f}"
        name = r.name + (f" ({notes[r.name]})" if r.name in notes else "")
        first = r.losses[0] if r.losses else math.nan
        rows.append(
            f"| {name} | {r.num_params:,} | {len(r.steps)} | {first:.3f} | {r.final_loss:.3f} "
            f"| {delta} | {r.seconds_per_step:.3f} |"
        )
    return "\n".join(rows)


# ---------------------------------------------------------------------------- training
def load_ablation(config_path: str | os.PathLike, overrides: Mapping[str, str] | None = None):
    """`ExperimentConfig` of one ablation YAML with `section.key -> value` overrides."""
    from loopcoder_jax.config import ExperimentConfig

    return ExperimentConfig.from_yaml(config_path, dict(overrides or {}))


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """RUN/metrics.jsonl records (one per step), the last record of each step kept."""
    by_step = {}
    with open(os.path.join(os.fspath(run_dir), "metrics.jsonl")) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                by_step[rec["step"]] = rec
    return [by_step[k] for k in sorted(by_step)]


def _initial_params(exp):
    """The params `trainer.run` starts from (same key / same checkpoint), as numpy."""
    import jax
    import numpy as np

    from loopcoder_jax import checkpoint, training
    from loopcoder_jax import sharding as sh

    if exp.train.init_from:
        _, params = checkpoint.load_params(exp.train.init_from, dtype=exp.runtime.param_dtype)
    else:
        model = training.experiment_model(exp.model, exp.runtime)
        mesh, rules = sh.make_mesh(exp.mesh), sh.get_rules(exp.mesh.rules)
        init = training.make_init_fn(model, training.make_optimizer(exp.train), mesh, rules)
        params = init(jax.random.key(exp.train.seed)).params
    return jax.tree.map(np.asarray, params)


def run_ablation(
    name: str,
    config_path: str | os.PathLike,
    overrides: Mapping[str, str] | None = None,
    *,
    progress: bool = False,
    measure_param_change: bool = False,
) -> AblationResult:
    """Trains one ablation in-process with `trainer.run` (the loop behind `train.py`).

    The run dir (`train.run_dir`) gets everything a training run writes: config, metrics.jsonl,
    TensorBoard, the final checkpoint. A finished run dir is resumed, i.e. not retrained: its
    losses are read back from metrics.jsonl. `measure_param_change` also rebuilds the initial
    params (one extra init compile) to report how far training moved them.
    """
    import jax
    import numpy as np

    from loopcoder_jax import checkpoint, trainer

    exp = load_ablation(config_path, overrides)
    initial = _initial_params(exp) if measure_param_change else None
    summary = trainer.run(exp, progress=progress)
    records = read_metrics(summary.run_dir)
    change = math.nan
    if initial is not None:
        _, final = checkpoint.load_params(summary.run_dir)
        pairs = zip(jax.tree.leaves(final), jax.tree.leaves(initial), strict=True)
        change = math.sqrt(sum(float(np.sum((np.asarray(a) - b) ** 2)) for a, b in pairs))
    times = sorted(r["step_time_s"] for r in records[1:]) or [math.nan]
    abstract = checkpoint.abstract_params(exp.model, exp.runtime)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract))
    return AblationResult(
        name=name,
        steps=[r["step"] for r in records],
        losses=[r["loss"] for r in records],
        num_params=n_params,
        seconds_per_step=times[len(times) // 2],
        tokens_per_step=exp.train.batch_size * exp.train.seq_len,
        param_change=change,
    )


def make_folded_init(
    dense_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    loop_num: int = 2,
    strategy: str = "average",
    loop_window_size: int | None = None,
) -> str:
    """Folds a dense run / params checkpoint (2L layers) into an L-layer loop model's init.

    Uses `convert.fold_dense_to_loop` (the code behind `python -m loopcoder_jax.convert fold`):
    with "average", shared layer i is the mean of dense layers i, i + L, ... (the dense layers
    a looped stack runs at the same depths); gates start at g = 0.5.
    Writes a params-only checkpoint (`train.init_from` reads it) and returns its path.
    """
    import jax
    import numpy as np

    from loopcoder_jax import checkpoint, convert

    dense_cfg, dense_params = checkpoint.load_params(dense_dir)
    dense_params = jax.tree.map(np.asarray, dense_params)
    cfg, params = convert.fold_dense_to_loop(
        dense_cfg,
        dense_params,
        strategy,
        dense_cfg.num_hidden_layers // loop_num,
        loop_num=loop_num,
        loop_window_size=loop_window_size,
    )
    return checkpoint.save_params(out_dir, cfg, params, overwrite=True)


def run_all(
    names: Sequence[str],
    budget: str,
    out_dir: str | os.PathLike,
    *,
    config_dir: str | os.PathLike | None = None,
    extra_overrides: Mapping[str, str] | None = None,
    progress: bool = False,
    measure_param_change: bool = False,
) -> list[AblationResult]:
    """Trains `names` at `budget` under OUT/runs/<name>, folding the dense source when needed.

    `folded_init` needs `dense_4layer` trained first: it is added (and trained first) if
    missing; its folded params go to OUT/runs/dense_4layer_folded.
    """
    configs = ablation_configs(config_dir)
    unknown = sorted(set(names) - set(configs))
    if unknown:
        raise ValueError(f"Unknown ablations {unknown}; available: {sorted(configs)}.")
    names = list(names)
    if FOLDED in names and FOLD_SOURCE not in names:
        names.insert(0, FOLD_SOURCE)
    if FOLDED in names:  # the dense source must be trained before the fold
        names.remove(FOLD_SOURCE)
        names.insert(names.index(FOLDED), FOLD_SOURCE)
    run_root = os.path.join(os.path.abspath(os.fspath(out_dir)), "runs")
    results = []
    for name in names:
        overrides = budget_overrides(budget, run_root, name)
        overrides.update(extra_overrides or {})
        if name == FOLDED:
            target = load_ablation(configs[name], overrides)
            overrides["train.init_from"] = make_folded_init(
                os.path.join(run_root, FOLD_SOURCE),
                os.path.join(run_root, FOLD_SOURCE + "_folded"),
                loop_num=target.model.loop_num,
                loop_window_size=target.model.loop_window_size,
            )
        results.append(
            run_ablation(
                name,
                configs[name],
                overrides,
                progress=progress,
                measure_param_change=measure_param_change,
            )
        )
    return results


def save_results(results: Sequence[AblationResult], path: str | os.PathLike) -> None:
    with open(os.fspath(path), "w") as f:
        json.dump([dataclasses.asdict(r) for r in results], f, indent=1)


def load_results(path: str | os.PathLike) -> list[AblationResult]:
    with open(os.fspath(path)) as f:
        return [AblationResult(**r) for r in json.load(f)]


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m loopcoder_jax.ablations",
        description="Train ablation configs (configs/ablations) and plot/tabulate the results.",
    )
    p.add_argument("--budget", default="cpu", choices=sorted(BUDGETS))
    p.add_argument("--configs", default="all", help="comma-separated names, or 'all'")
    p.add_argument("--config-dir", default=None)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--measure-param-change", action="store_true")
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    names = list(ablation_configs(args.config_dir))
    if args.configs != "all":
        names = [n.strip() for n in args.configs.split(",") if n.strip()]
    extra = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--set {item!r}: expected SECTION.KEY=VALUE")
        extra[key] = value
    os.makedirs(args.out_dir, exist_ok=True)
    results = run_all(
        names,
        args.budget,
        args.out_dir,
        config_dir=args.config_dir,
        extra_overrides=extra,
        progress=True,
        measure_param_change=args.measure_param_change,
    )
    save_results(results, os.path.join(args.out_dir, "results.json"))
    plot_curves(results, os.path.join(args.out_dir, "ablation_curves.png"), title=args.title)
    table = results_table(results)
    with open(os.path.join(args.out_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
