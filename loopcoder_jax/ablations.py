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
# "accelerator" a Colab GPU/TPU runtime (minutes per config). eval_every / eval_batches: the
# held-out evaluation (EVAL_FRACTION of the records, or --set data.eval_sources=[...]).
BUDGETS: dict[str, dict[str, int]] = {
    "tiny": {
        "steps": 3, "batch_size": 2, "seq_len": 64, "warmup_steps": 1,
        "eval_every": 1, "eval_batches": 1,
    },
    "cpu": {
        "steps": 100, "batch_size": 8, "seq_len": 128, "warmup_steps": 10,
        "eval_every": 10, "eval_batches": 4,
    },
    "accelerator": {
        "steps": 1000, "batch_size": 32, "seq_len": 256, "warmup_steps": 50,
        "eval_every": 50, "eval_batches": 8,
    },
}  # fmt: skip

# Records held out for evaluation when no eval files are given: the same records for every
# config and seed (`data.pipeline.held_out_indices`), never trained on.
EVAL_FRACTION = 0.05

# One config per question the ablations answer (does looping / the window / the gate / folding
# help?) plus the reference: the notebook's default set (`--configs core`).
CORE_CONFIGS = (
    "loop2", "loop1_dense", "window16", "gate_fixed", "dense_4layer", "folded_init",
)  # fmt: skip

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
    out["data.eval_fraction"] = str(EVAL_FRACTION)
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
    eval_steps: list[int] = dataclasses.field(default_factory=list)  # steps evaluated at
    eval_losses: list[float] = dataclasses.field(default_factory=list)  # held-out loss there
    flops_per_step: int = 0  # training FLOPs of one step (flops.train_flops)

    @property
    def final_loss(self) -> float:
        """Mean TRAIN loss of the last 10% of steps (at least one): less noisy than the last."""
        k = max(1, len(self.losses) // 10)
        return float(sum(self.losses[-k:]) / k)

    @property
    def final_eval_loss(self) -> float:
        """Held-out loss after the last step (all configs of a budget: the same tokens)."""
        if not self.eval_steps or self.eval_steps[-1] != self.steps[-1]:
            return math.nan
        return self.eval_losses[-1]

    def eval_loss_at_flops(self, budget: float) -> float:
        """Held-out loss after `budget` training FLOPs, linear between evaluations; NaN outside.

        Loop models spend loop_num times the layer FLOPs per token, so at equal FLOPs they
        have seen fewer tokens than the dense model.
        """
        pairs = zip(self.eval_steps, self.eval_losses, strict=True)
        pts = [(s * self.flops_per_step, v) for s, v in pairs]
        for (f0, v0), (f1, v1) in zip(pts, pts[1:], strict=False):
            if f0 <= budget <= f1:
                return v0 + (v1 - v0) * (budget - f0) / (f1 - f0)
        return next((v for f, v in pts if math.isclose(f, budget)), math.nan)


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average (window clipped at the start)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def smoothing_window(num_steps: int) -> int:
    """Steps in the trailing average of the train-loss curve: ~1/15 of the run, at least 1."""
    return max(1, num_steps // 15)


def smoothing_label(window: int, tokens_per_step: int) -> str:
    """What the smoothing of a curve is, in words that hold at any budget."""
    if window <= 1:
        return "raw, one point per step"
    return f"trailing mean of {window} steps = {window * tokens_per_step:,} tokens"


def equal_flops_budget(results: Sequence[AblationResult]) -> float:
    """The FLOPs every run reached: the smallest total training FLOPs among them."""
    totals = [r.steps[-1] * r.flops_per_step for r in results if r.steps and r.flops_per_step]
    return float(min(totals)) if totals else math.nan


def plot_curves(
    results: Sequence[AblationResult],
    path: str | os.PathLike,
    title: str = "",
    baseline: str = "loop2",
) -> str:
    """One panel per metric, in one PNG; returns the path.

    1. training loss against training tokens (smoothed; raw, faint);
    2. held-out loss against training tokens (equal tokens = same x);
    3. held-out loss against training FLOPs (a loop model pays loop_num x per token), with the
       equal-FLOPs budget of the table marked.
    Token axes have integer ticks. `baseline` is drawn thicker.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    has_eval = any(r.eval_steps for r in results)
    ncols = 3 if has_eval else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.5 * ncols, 5.5), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    styles = ("-", "--", "-.", ":")
    window = smoothing_window(max((len(r.losses) for r in results), default=1))
    tps = {r.tokens_per_step for r in results}
    label = (
        smoothing_label(window, tps.pop()) if len(tps) == 1 else f"trailing mean of {window} steps"
    )

    def style(i, r):
        wide = 2.6 if r.name == baseline else 1.5
        return dict(color=colors[(2 * i) % 20 + (i // 10) % 2], linestyle=styles[i % 4], lw=wide)

    def token_axis(ax):
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{int(round(x)):,}"))
        ax.set_xlabel("training tokens")

    ax = axes[0, 0]
    for i, r in enumerate(results):
        tokens = [s * r.tokens_per_step for s in r.steps]
        ax.plot(tokens, smooth(r.losses, window), label=r.name, **style(i, r))
        if window > 1:
            ax.plot(tokens, r.losses, alpha=0.15, linewidth=0.8, color=style(i, r)["color"])
    token_axis(ax)
    ax.set_ylabel("training loss")
    ax.set_title(f"training loss ({label})", fontsize=10)
    if has_eval:
        budget = equal_flops_budget(results)
        for col, (xname, per_step) in enumerate(
            (("tokens", "tokens_per_step"), ("FLOPs", "flops_per_step")), start=1
        ):
            ax = axes[0, col]
            for i, r in enumerate(results):
                xs = [s * getattr(r, per_step) for s in r.eval_steps]
                ax.plot(xs, r.eval_losses, marker="o", markersize=3, label=r.name, **style(i, r))
            ax.set_ylabel("held-out loss")
            if xname == "tokens":
                token_axis(ax)
                ax.set_title("held-out loss at equal tokens (no smoothing)", fontsize=10)
            else:
                ax.set_xlabel("training FLOPs (analytic, flops.train_flops)")
                if math.isfinite(budget):
                    ax.axvline(budget, color="black", linewidth=0.8, linestyle=":")
                ax.set_title("held-out loss at equal FLOPs (dotted: table budget)", fontsize=10)
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=8, ncol=2)
    fig.suptitle(title or "LoopCoder ablations", fontsize=11)
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
    """Markdown table: held-out loss at equal tokens and at equal FLOPs, deltas vs `baseline`.

    Equal tokens: after the last step (every config of a budget trains the same tokens).
    Equal FLOPs: at the smallest total training FLOPs among the runs, interpolated between
    evaluations (`AblationResult.eval_loss_at_flops`). Train loss = mean of the last 10% of steps.
    """
    notes = dict(notes)
    budget = equal_flops_budget(results)
    base = next((r for r in results if r.name == baseline), None)

    def delta(value, ref):
        if base is None or not (math.isfinite(value) and math.isfinite(ref)):
            return ""
        return f"{value - ref:+.3f}"

    def fmt(value):
        return f"{value:.3f}" if math.isfinite(value) else "n/a"

    rows = [
        "| config | params | GFLOPs/step | train loss | held-out loss, equal tokens | vs "
        f"{baseline} | held-out loss, equal FLOPs | vs {baseline} | s/step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        tok, flp = r.final_eval_loss, r.eval_loss_at_flops(budget)
        is_base = r.name == baseline
        d_tok = "" if is_base or base is None else delta(tok, base.final_eval_loss)
        d_flp = "" if is_base or base is None else delta(flp, base.eval_loss_at_flops(budget))
        name = r.name + (f" ({notes[r.name]})" if r.name in notes else "")
        rows.append(
            f"| {name} | {r.num_params:,} | {r.flops_per_step / 1e9:.2f} | {fmt(r.final_loss)} "
            f"| {fmt(tok)} | {d_tok} | {fmt(flp)} | {d_flp} | {r.seconds_per_step:.3f} |"
        )
    if results and results[0].steps:
        r = results[0]
        rows.append("")
        rows.append(
            f"Equal tokens: {r.steps[-1] * r.tokens_per_step:,} training tokens "
            f"({r.steps[-1]} steps x {r.tokens_per_step:,}). Equal FLOPs: {budget:.3g} training "
            "FLOPs (the smallest run's total), interpolated between evaluations; n/a = that "
            "run's first evaluation came later."
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

    from loopcoder_jax import checkpoint, flops, trainer

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
    evals = [r for r in records if r.get("eval_loss") is not None]
    return AblationResult(
        name=name,
        steps=[r["step"] for r in records],
        losses=[r["loss"] for r in records],
        num_params=n_params,
        seconds_per_step=times[len(times) // 2],
        tokens_per_step=exp.train.batch_size * exp.train.seq_len,
        param_change=change,
        eval_steps=[r["step"] for r in evals],
        eval_losses=[r["eval_loss"] for r in evals],
        flops_per_step=flops.train_flops(exp.model, exp.train.batch_size, exp.train.seq_len),
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
    from loopcoder_jax.config import ConfigError

    configs = ablation_configs(config_dir)
    unknown = sorted(set(names) - set(configs))
    if unknown:
        raise ConfigError(f"Unknown ablations {unknown}; available: {sorted(configs)}.")
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
        if overrides.get("data.eval_sources", "[]").strip() not in ("", "[]", "null"):
            overrides.pop("data.eval_fraction")  # eval files given: hold nothing out
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


def build_parser():
    """The `python -m loopcoder_jax.ablations` command line (every option shows its default)."""
    import argparse

    from loopcoder_jax.cli import HelpFormatter

    p = argparse.ArgumentParser(
        prog="python -m loopcoder_jax.ablations",
        description="Train ablation configs (configs/ablations), then plot and tabulate their "
        "held-out loss at equal tokens and at equal FLOPs (docs/ablations.md).",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--budget", default="cpu", choices=sorted(BUDGETS),
        help="run size of every config: tiny (CI smoke), cpu (dev box), accelerator (GPU/TPU)",
    )  # fmt: skip
    p.add_argument(
        "--configs",
        default="all",
        help="comma-separated config names, 'core' (CORE_CONFIGS) or 'all'",
    )
    p.add_argument(
        "--config-dir", default=None,
        help="directory of the ablation YAMLs (default: configs/ablations of this checkout)",
    )  # fmt: skip
    p.add_argument(
        "--out-dir", required=True,
        help="where runs/<name>/, results.json, results.md and ablation_curves.png go",
    )  # fmt: skip
    p.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="config override applied to every run, e.g. --set 'data.sources=[\"x.jsonl\"]' "
        "(repeatable; default: none)",
    )  # fmt: skip
    p.add_argument(
        "--measure-param-change", action="store_true",
        help="also report how far training moved the params (one extra init compile per config)",
    )  # fmt: skip
    p.add_argument("--title", default="", help="plot title (default: 'LoopCoder ablations')")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    import sys

    from loopcoder_jax.config import ConfigError
    from loopcoder_jax.data.pipeline import DataError
    from loopcoder_jax.data.tokenizer import TokenizerError
    from loopcoder_jax.sharding import MeshError

    p = build_parser()
    args = p.parse_args(argv)
    try:
        names = list(ablation_configs(args.config_dir))
    except FileNotFoundError as e:
        p.exit(2, f"error: {e}\n")
    if args.configs == "core":
        names = list(CORE_CONFIGS)
    elif args.configs != "all":
        names = [n.strip() for n in args.configs.split(",") if n.strip()]
    extra = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--set {item!r}: expected SECTION.KEY=VALUE")
        extra[key.strip()] = value
    os.makedirs(args.out_dir, exist_ok=True)
    try:
        results = run_all(
            names,
            args.budget,
            args.out_dir,
            config_dir=args.config_dir,
            extra_overrides=extra,
            progress=True,
            measure_param_change=args.measure_param_change,
        )
    except (ConfigError, DataError, MeshError, TokenizerError) as e:  # messages name the fix
        print(f"error: {e}", file=sys.stderr)
        return 2
    save_results(results, os.path.join(args.out_dir, "results.json"))
    plot_curves(results, os.path.join(args.out_dir, "ablation_curves.png"), title=args.title)
    table = results_table(results)
    with open(os.path.join(args.out_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
