"""Small ablations of the loop design: load `configs/ablations/*.yaml`, train, plot, tabulate.

Used by `notebooks/ablations.ipynb` and its tests; the notebook defines no model or training
code. Each YAML differs from `loop2.yaml` (the released design at tiny width) in one knob:
loop_num, the local window W, the gate variant, untied loops, the BPTT gradient scale, or a
dense-to-loop folded init. `BUDGETS` scale every run down to what a runtime affords.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence

# Run-size presets: train-section overrides applied on top of every ablation YAML.
# "tiny" is the CI budget (seconds per config on 2 CPU cores); "cpu" the dev-box write-up run;
# "accelerator" a Colab GPU/TPU runtime (minutes per config).
BUDGETS: dict[str, dict[str, int]] = {
    "tiny": {"steps": 3, "batch_size": 2, "seq_len": 64, "warmup_steps": 1},
    "cpu": {"steps": 150, "batch_size": 8, "seq_len": 128, "warmup_steps": 15},
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
    seconds: float  # wall time of steps 2..N (step 1 compiles)
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


def plot_curves(results: Sequence[AblationResult], path: str | os.PathLike, title: str = "") -> str:
    """Loss curves (raw, faint; smoothed, solid) of all results into one PNG; returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    window = max(1, max((len(r.losses) for r in results), default=1) // 15)
    for r in results:
        (line,) = ax.plot(r.steps, smooth(r.losses, window), label=r.name, linewidth=1.6)
        ax.plot(r.steps, r.losses, color=line.get_color(), alpha=0.2, linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel(f"train loss (moving average over {window} steps)")
    ax.set_title(title or "LoopCoder ablations")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
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
        per_step = r.seconds / max(len(r.steps) - 1, 1)
        name = r.name + (f" ({notes[r.name]})" if r.name in notes else "")
        first = r.losses[0] if r.losses else math.nan
        rows.append(
            f"| {name} | {r.num_params:,} | {len(r.steps)} | {first:.3f} | {r.final_loss:.3f} "
            f"| {delta} | {per_step:.3f} |"
        )
    return "\n".join(rows)


# ---------------------------------------------------------------------------- training
def load_ablation(config_path: str | os.PathLike, overrides: Mapping[str, str] | None = None):
    """`ExperimentConfig` of one ablation YAML with `section.key -> value` overrides."""
    from loopcoder_jax.config import ExperimentConfig

    return ExperimentConfig.from_yaml(config_path, dict(overrides or {}))


def run_ablation(
    name: str,
    config_path: str | os.PathLike,
    overrides: Mapping[str, str] | None = None,
    *,
    save_params: bool = True,
    devices=None,
) -> AblationResult:
    """Trains one ablation in-process and returns its per-step losses.

    The same pieces as `train.py` (mesh, rules, `training.make_train_step`, the grain pipeline,
    `train.init_from`), without the run-loop extras (periodic checkpoints, TensorBoard): an
    ablation needs the loss of every step, not a resumable run. With `save_params` the final
    params are written as a params-only checkpoint to `train.run_dir` (the dense source of the
    folded init is read back from there). `devices` restricts the mesh to some devices
    (default: all).
    """
    import time

    import jax
    import numpy as np

    from loopcoder_jax import checkpoint, training
    from loopcoder_jax import sharding as sh
    from loopcoder_jax.data import load_tokenizer, make_train_iterator

    exp = load_ablation(config_path, overrides)
    tc = exp.train
    model = training.experiment_model(exp.model, exp.runtime)
    mesh = sh.make_mesh(exp.mesh, devices)
    rules = sh.get_rules(exp.mesh.rules)
    training.validate(model, mesh, rules, tc)
    optimizer = training.make_optimizer(tc)
    if tc.init_from:
        src_cfg, params = checkpoint.load_params(tc.init_from)
        if src_cfg != exp.model:
            raise ValueError(
                f"{name}: train.init_from={tc.init_from} holds a model config that differs from "
                f"this ablation's model section:\n  checkpoint: {src_cfg}\n  ablation:   "
                f"{exp.model}\nFold / convert the source to the ablation's architecture."
            )
        _, state_sh = training.state_shardings(model, optimizer, mesh, rules)
        params = jax.device_put(params, state_sh.params)
        state = training.make_state_from_params(model, optimizer, mesh, rules)(params)
    else:
        state = training.make_init_fn(model, optimizer, mesh, rules)(jax.random.key(tc.seed))
    initial = jax.tree.map(np.asarray, state.params)
    tokenizer = load_tokenizer(exp.data.tokenizer)
    batches = make_train_iterator(
        exp.data,
        tokenizer=tokenizer,
        seq_len=tc.seq_len,
        batch_size=tc.batch_size // jax.process_count(),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        seed=tc.seed,
    )
    step_fn = training.make_train_step(model, optimizer, mesh, rules, train_cfg=tc)
    steps, losses = [], []
    start = time.perf_counter()
    for i in range(tc.steps):
        if i == 1:  # step 1 includes compilation; time the steady state
            start = time.perf_counter()
        state, metrics = step_fn(state, training.shard_batch(next(batches), mesh, rules))
        steps.append(i + 1)
        losses.append(float(metrics["loss"]))  # syncs every step: fine at ablation scale
    seconds = time.perf_counter() - start
    final = jax.tree.map(np.asarray, state.params)
    pairs = zip(jax.tree.leaves(final), jax.tree.leaves(initial), strict=True)
    result = AblationResult(
        name=name,
        steps=steps,
        losses=losses,
        num_params=training.count_params(final),
        seconds=seconds,
        tokens_per_step=tc.batch_size * tc.seq_len,
        param_change=math.sqrt(sum(float(np.sum((a - b) ** 2)) for a, b in pairs)),
    )
    if save_params:
        checkpoint.save_params(tc.run_dir, exp.model, final, overwrite=True)
    return result


def make_folded_init(
    dense_dir: str | os.PathLike, out_dir: str | os.PathLike, loop_num: int = 2, **fold_kwargs
) -> str:
    """Folds a dense params checkpoint (2L layers) into a loop_num-loop L-layer init.

    Thin wrapper over `convert.fold_dense_to_loop` (the same code as
    `python -m loopcoder_jax.convert fold`); writes a params-only checkpoint, returns its path.
    """
    from loopcoder_jax import checkpoint, convert

    dense_cfg, dense_params = checkpoint.load_params(dense_dir)
    cfg, params = convert.fold_dense_to_loop(
        dense_cfg, dense_params, loop_num=loop_num, **fold_kwargs
    )
    return checkpoint.save_params(out_dir, cfg, params, overwrite=True)
