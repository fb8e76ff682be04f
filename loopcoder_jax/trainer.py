"""The training run: run dir, data, state (fresh / resumed / --init-from), the loop, logging.

`train.py` parses the command line and calls `run(experiment)`. Everything that touches
files lives here or in `checkpoint.py`; the math is in `training.py`.

Run dir layout (RUN = train.run_dir):
    RUN/config.json        ModelConfig.to_hf()           (load_params(RUN) / infer.py read it)
    RUN/experiment.json    the resolved ExperimentConfig
    RUN/tokenizer.model    copy of the tokenizer the data was encoded with
    RUN/checkpoints/<step>/{params,opt_state,data,meta}   Orbax CheckpointManager
    RUN/metrics.jsonl      one JSON line per step (process 0)
    RUN/tensorboard/       TensorBoard event files (process 0)

Data layout: the global batch is made of `train.data_shards` equal slices (default: one per
process), slice s read by `make_train_iterator(process_index=s, process_count=data_shards)`.
Each process reads the slices of its rows, so the same global batches come out whatever the
number of processes, and a run can resume on a different process count.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import statistics
import threading
import time
from typing import Any

import jax
import numpy as np

from loopcoder_jax import checkpoint as ckpt
from loopcoder_jax import eval_loop, flops
from loopcoder_jax import sharding as sh
from loopcoder_jax import training as tr
from loopcoder_jax.config import ConfigError, ExperimentConfig, ModelConfig


class TrainingDivergedError(RuntimeError):
    """The loss became NaN/inf (train.nan_policy = "stop")."""


@dataclasses.dataclass
class RunSummary:
    run_dir: str
    first_step: int  # first step trained in this invocation (1-based)
    last_step: int  # steps completed (the state's step counter)
    first_loss: float | None
    last_loss: float | None
    tokens_per_s: float | None  # median over this invocation's steps, compile step excluded
    checkpoint: str | None  # latest committed checkpoint step dir
    preempted: bool = False
    losses: list[float] = dataclasses.field(default_factory=list)
    eval: eval_loop.EvalResult | None = None  # the last held-out evaluation of this invocation

    def line(self) -> str:
        loss = (
            f"loss {self.first_loss:.4f} -> {self.last_loss:.4f}"
            if self.first_loss is not None
            else "no steps run"
        )
        tps = f"{self.tokens_per_s:,.0f} tokens/s" if self.tokens_per_s else "tokens/s n/a"
        why = " (preempted: SIGTERM)" if self.preempted else ""
        ev = self.eval
        held_out = f", eval loss {ev.loss:.4f} (ppl {ev.ppl:.2f}, step {ev.step})" if ev else ""
        return (
            f"[train] done{why}: steps {self.first_step}..{self.last_step}, {loss}{held_out}, "
            f"{tps}, checkpoint {self.checkpoint}"
        )


# ---------------------------------------------------------------------------- run dir
def _is_main() -> bool:
    return jax.process_index() == 0


def prepare_run_dir(exp: ExperimentConfig, tokenizer_path: str) -> str:
    """Creates RUN and writes config/experiment/tokenizer (process 0); checks a resumed RUN."""
    run_dir = os.path.abspath(exp.train.run_dir)
    cfg_path = os.path.join(run_dir, ckpt.CONFIG_FILE)
    if os.path.exists(cfg_path) and ckpt.finished_steps(run_dir):
        existing = ModelConfig.from_hf(cfg_path)
        if existing != exp.model:
            diff = {
                f.name: (getattr(existing, f.name), getattr(exp.model, f.name))
                for f in dataclasses.fields(ModelConfig)
                if getattr(existing, f.name) != getattr(exp.model, f.name)
            }
            raise ConfigError(
                f"{run_dir} holds checkpoints of a different model (run dir vs now: {diff}). "
                "Use a new train.run_dir, or the same model config to resume."
            )
    if _is_main():
        os.makedirs(run_dir, exist_ok=True)
        ckpt.write_json_atomic(cfg_path, exp.model.to_hf())
        ckpt.write_json_atomic(os.path.join(run_dir, "experiment.json"), exp.to_dict())
        dst = os.path.join(run_dir, "tokenizer.model")
        if os.path.abspath(tokenizer_path) != dst:
            tmp = dst + ".tmp"
            shutil.copyfile(tokenizer_path, tmp)
            os.replace(tmp, dst)
    return run_dir


def _logged_step(line: str) -> float:
    """The step of one metrics.jsonl line; inf for a partial or foreign line (dropped)."""
    try:
        return json.loads(line)["step"] if line.endswith("\n") else math.inf
    except (ValueError, KeyError, TypeError):
        return math.inf


class MetricsLog:
    """RUN/metrics.jsonl (append + flush per step) and TensorBoard scalars; process 0 only."""

    def __init__(self, run_dir: str, resume_step: int, tensorboard: bool = True):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.enabled = _is_main()
        self.writer = None
        if not self.enabled:
            return
        # A killed run may have logged steps past its last checkpoint (they are re-run now)
        # and, killed mid-write, a partial last line.
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [ln for ln in f if _logged_step(ln) <= resume_step]
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)
        self.file = open(self.path, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    tag = f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"
                    self.writer.add_scalar(tag, v, record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.writer is not None:
            self.writer.close()


# ---------------------------------------------------------------------------- data
class ShardedBatches:
    """This process's rows of every global batch, from `data_shards` grain iterators."""

    def __init__(self, exp: ExperimentConfig, tokenizer):
        from loopcoder_jax.data.pipeline import make_train_iterator

        tc = exp.train
        p, n_proc = jax.process_index(), jax.process_count()
        shards = tc.data_shards or n_proc
        if shards % n_proc or tc.batch_size % shards:
            raise ConfigError(
                f"train.data_shards={shards} must be a multiple of the {n_proc} processes and "
                f"divide train.batch_size={tc.batch_size}."
            )
        per = shards // n_proc
        self.shard_ids = list(range(p * per, (p + 1) * per))
        self.iterators = [
            make_train_iterator(
                exp.data,
                tokenizer=tokenizer,
                seq_len=tc.seq_len,
                batch_size=tc.batch_size // shards,
                process_index=s,
                process_count=shards,
                seed=tc.seed,
            )
            for s in self.shard_ids
        ]

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(it) for it in self.iterators]
        return {k: np.concatenate([b[k] for b in parts]) for k in tr.BATCH_KEYS}

    def get_state(self) -> dict[str, Any]:
        pairs = zip(self.shard_ids, self.iterators, strict=True)
        return {"shards": {str(s): it.get_state() for s, it in pairs}}

    def set_state(self, saved: list[dict[str, Any]]) -> None:
        """Restores from every process's saved state (any former process count)."""
        merged: dict[str, Any] = {}
        for state in saved:
            merged.update(state["shards"])
        for s, it in zip(self.shard_ids, self.iterators, strict=True):
            if str(s) not in merged:
                raise ckpt.CheckpointNotFoundError(
                    f"The checkpoint has no data state for shard {s} (it has "
                    f"{sorted(merged, key=int)}); was train.data_shards changed? Resume with the "
                    "data_shards of the saved run."
                )
            it.set_state(merged[str(s)])


# ---------------------------------------------------------------------------- preemption
class _StopFlag:
    """Set by SIGTERM (TPU preemption notice); checked between steps."""

    def __init__(self):
        self.set = False
        self._old = None

    def install(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.set = True

    def uninstall(self):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)

    def any_process(self) -> bool:
        """True if any process got SIGTERM (all must agree, since saving is collective)."""
        if jax.process_count() == 1:
            return self.set
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.set))
        return bool(np.any(flags))


# ---------------------------------------------------------------------------- the run
def _log(msg: str) -> None:
    if _is_main():
        print(msg, flush=True)


def run(
    exp: ExperimentConfig,
    *,
    progress: bool = True,
    stop_at: int | None = None,
    devices=None,
) -> RunSummary:
    """Trains `exp` to `train.steps`, resuming from RUN's latest checkpoint if there is one.

    stop_at: end this invocation (with a checkpoint) once the step counter reaches it; the
    run continues later with the same config. (Changing train.steps instead would change the
    learning-rate schedule, which is a function of train.steps.)
    devices: the devices the mesh is built from (default: all).
    """
    from loopcoder_jax.data.tokenizer import load_tokenizer

    tc = exp.train
    if tc.init_from and not ckpt.finished_steps(tc.run_dir):
        init_cfg = ckpt.load_config(tc.init_from)
        if init_cfg != exp.model:
            _log(f"[train] --init-from {tc.init_from}: using its model config")
            exp = exp.replace(model=init_cfg)
    tokenizer = load_tokenizer(exp.data.tokenizer)
    if tokenizer.vocab_size > exp.model.vocab_size:
        raise ConfigError(
            f"The tokenizer ({tokenizer.path}) has {tokenizer.vocab_size} pieces but "
            f"model.vocab_size={exp.model.vocab_size}; use a model with vocab_size >= "
            f"{tokenizer.vocab_size} or a smaller tokenizer (data.tokenizer)."
        )

    mesh = sh.make_mesh(exp.mesh, devices)
    rules = sh.get_rules(exp.mesh.rules)
    model = tr.experiment_model(exp.model, exp.runtime)
    optimizer = tr.make_optimizer(tc)
    tr.validate(model, mesh, rules, tc)  # bad mesh/batch: a clear error before compiling
    run_dir = prepare_run_dir(exp, tokenizer.path)
    batches = ShardedBatches(exp, tokenizer)
    evaluator = eval_loop.Evaluator(exp, tokenizer, model, mesh, rules, log=_log)

    checkpointer = ckpt.TrainCheckpointer(
        run_dir, keep=tc.keep_checkpoints, async_save=tc.async_checkpointing
    )
    abstract, shardings = tr.state_shardings(model, optimizer, mesh, rules)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    start = checkpointer.latest_step()
    if start is not None:
        state, _ = checkpointer.restore(start, abstract)
        batches.set_state(checkpointer.data_states(start))
        _log(f"[train] resumed from {checkpointer.step_dir(start)}")
    elif tc.init_from:
        _, params = ckpt.load_params(
            tc.init_from, dtype=exp.runtime.param_dtype, shardings=shardings.params
        )
        state = tr.make_state_from_params(model, optimizer, mesh, rules)(params)
        start = 0
        _log(f"[train] initialised params from {tc.init_from}")
    else:
        state = tr.make_init_fn(model, optimizer, mesh, rules)(jax.random.key(tc.seed))
        start = 0
    n_params = tr.count_params(abstract.params)
    _log(
        f"[train] {n_params:,} params, mesh {dict(mesh.shape)}, {jax.process_count()} process(es),"
        f" global batch {tc.batch_size} x {tc.seq_len}, steps {start + 1}..{tc.steps}, "
        f"run dir {run_dir}"
    )

    step_fn = tr.make_train_step(model, optimizer, mesh, rules, train_cfg=tc)
    step_flops = flops.train_flops(exp.model, tc.batch_size, tc.seq_len)
    peak = flops.device_peak_flops(jax.devices()[0].device_kind)
    peak_total = peak * jax.device_count() if peak else None
    tokens_per_step = tc.batch_size * tc.seq_len

    metrics_log = MetricsLog(run_dir, start)
    stop = _StopFlag().install()
    bar = None
    if progress and _is_main():
        from tqdm.auto import tqdm  # a widget in notebooks (Colab), a text bar elsewhere

        bar = tqdm(total=tc.steps, initial=start, desc="train", dynamic_ncols=True)
    losses, rates = [], []
    last_saved = start if start > 0 else None
    preempted = False
    step = start
    try:
        while step < tc.steps:
            t0 = time.perf_counter()
            local = next(batches)
            state, m = step_fn(state, tr.shard_batch(local, mesh, rules))
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            dt = time.perf_counter() - t0
            step += 1
            if not math.isfinite(m["loss"]) and tc.nan_policy == "stop":
                last = checkpointer.step_dir(last_saved) if last_saved else "none"
                raise TrainingDivergedError(
                    f"Loss is {m['loss']} at step {step} (grad norm {m['grad_norm']}). Last good "
                    f"checkpoint: {last}. Try a lower train.lr or longer train.warmup_steps, "
                    "train.clip_grad_norm, runtime.bptt_grad_scale < 1, or train.nan_policy=skip "
                    "to drop such steps."
                )
            tps = tokens_per_step / dt
            record = {
                "step": step,
                "loss": m["loss"],
                "lr": m["lr"],
                "grad_norm": m["grad_norm"],
                "loss_tokens": m["tokens"],
                "tokens_per_s": tps,
                "step_time_s": dt,
                "mfu": step_flops / dt / peak_total if peak_total else None,
            }
            if tc.z_loss:
                record["z_loss"] = m["z_loss"]
            if m["skipped"]:
                record["skipped"] = True
            if evaluator.due(step):
                record.update(evaluator(state.params, step).record())
            metrics_log.write(record)
            losses.append(m["loss"])
            if step > start + 1:
                rates.append(tps)
            if bar is not None:
                bar.update(1)
                if step % tc.log_every == 0 or step == tc.steps:
                    mfu = f"{record['mfu']:.1%}" if record["mfu"] is not None else "n/a"
                    bar.set_postfix(
                        loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", tok_s=f"{tps:,.0f}", mfu=mfu
                    )
            preempted = stop.any_process()
            pause = stop_at is not None and step >= stop_at
            if step % tc.checkpoint_every == 0 or step == tc.steps or preempted or pause:
                checkpointer.save(
                    step, state, data_state=batches.get_state(), meta={"loss": m["loss"]}
                )
                last_saved = step
            if preempted or pause:
                break
    finally:
        if bar is not None:
            bar.close()
        stop.uninstall()
        checkpointer.close()  # waits for pending async saves: committed or not, never half
        metrics_log.close()
    summary = RunSummary(
        run_dir=run_dir,
        first_step=start + 1,
        last_step=step,
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        tokens_per_s=statistics.median(rates) if rates else None,
        checkpoint=checkpointer.step_dir(last_saved) if last_saved else None,
        preempted=preempted,
        losses=losses,
        eval=evaluator.last,
    )
    _log(summary.line())
    return summary
