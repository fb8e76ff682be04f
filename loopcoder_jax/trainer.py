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
RUN may be a `gs://` URL (multi-host pods share no local disk): every file above then goes
through `storage.py`, and checkpoints are committed by Orbax's commit file, not a rename.

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
from loopcoder_jax import eval_loop, flops, integrity, runlock, storage
from loopcoder_jax import sharding as sh
from loopcoder_jax import training as tr
from loopcoder_jax.checkpoint_integrity import short_list
from loopcoder_jax.config import ConfigError, ExperimentConfig, ModelConfig


class TrainingDivergedError(RuntimeError):
    """The loss, grad norm or state became NaN/inf (train.nan_policy = "stop")."""


class SilentCorruptionError(RuntimeError):
    """Replicas of a parameter disagree (integrity.py): a faulty device; the message names it."""


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
    total_steps: int | None = None  # train.steps (a run that ends short of it was paused)
    eval: eval_loop.EvalResult | None = None  # the last held-out evaluation of this invocation

    def line(self) -> str:
        if self.first_step > self.last_step:
            return (
                f"[train] already complete at step {self.last_step}: raise --steps or use a "
                f"new --run-dir (checkpoint {self.checkpoint})"
            )
        loss = (
            f"loss {self.first_loss:.4f} -> {self.last_loss:.4f}"
            if self.first_loss is not None
            else "no steps run"
        )
        tps = f"{self.tokens_per_s:,.0f} tokens/s" if self.tokens_per_s else "tokens/s n/a"
        paused = self.total_steps is not None and self.last_step < self.total_steps
        head, tail = "done", ""
        if self.preempted:
            head = "done (preempted: SIGTERM)"
        elif paused:  # --stop-at
            head = f"paused at {self.last_step}/{self.total_steps}"
            tail = "; rerun without --stop-at (or with a later one) to continue"
        ev = self.eval
        held_out = f", eval loss {ev.loss:.4f} (ppl {ev.ppl:.2f}, step {ev.step})" if ev else ""
        return (
            f"[train] {head}: steps {self.first_step}..{self.last_step}, {loss}{held_out}, "
            f"{tps}, checkpoint {self.checkpoint}{tail}"
        )


# ---------------------------------------------------------------------------- run dir
def _is_main() -> bool:
    return jax.process_index() == 0


def prepare_run_dir(exp: ExperimentConfig, tokenizer_path: str) -> str:
    """Creates RUN and writes config/experiment/tokenizer (process 0); checks a resumed RUN."""
    run_dir = storage.resolve(exp.train.run_dir)
    cfg_path = storage.join(run_dir, ckpt.CONFIG_FILE)
    if storage.exists(cfg_path) and ckpt.finished_steps(run_dir):
        existing = ckpt.load_config(run_dir)
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
        storage.makedirs(run_dir)
        ckpt.write_json_atomic(cfg_path, exp.model.to_hf())
        ckpt.write_json_atomic(storage.join(run_dir, "experiment.json"), exp.to_dict())
        dst = storage.join(run_dir, "tokenizer.model")
        if storage.is_remote(dst):
            storage.copy_file(tokenizer_path, dst)
        elif os.path.abspath(tokenizer_path) != dst:
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
    """RUN/metrics.jsonl (append + flush per step) and TensorBoard scalars; process 0 only.

    On an object store, where objects cannot be appended to, the lines are kept in memory and
    the whole object is rewritten by `flush()` (called before every checkpoint save, so the
    log covers every committed step), every `upload_every_s` seconds, and at `close()`.
    """

    upload_every_s = 60.0

    def __init__(self, run_dir: str, resume_step: int, tensorboard: bool = True):
        self.path = storage.join(run_dir, "metrics.jsonl")
        self.enabled = _is_main()
        self.writer = None
        self.remote = storage.is_remote(self.path)
        if not self.enabled:
            return
        if self.remote:
            kept = []
            if storage.exists(self.path):
                text = storage.read_bytes(self.path).decode()
                kept = [ln for ln in text.splitlines(True) if _logged_step(ln) <= resume_step]
            self._lines, self._uploaded = kept, time.monotonic()
        # A killed run may have logged steps past its last checkpoint (they are re-run now)
        # and, killed mid-write, a partial last line.
        elif os.path.exists(self.path):
            with open(self.path) as f:
                kept = [ln for ln in f if _logged_step(ln) <= resume_step]
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)
        if not self.remote:
            self.file = open(self.path, "a")
        if tensorboard:
            if self.remote:  # tensorboardX writes gs:// itself; _ScalarEvents is local-only
                self.writer = _RemoteScalarEvents(storage.join(run_dir, "tensorboard"))
            else:
                self.writer = _ScalarEvents(os.path.join(run_dir, "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # TensorBoard first, flushed: a step in metrics.jsonl is then in TensorBoard too,
        # even after a kill -9.
        if self.writer is not None:
            scalars = {
                (f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"): v
                for k, v in record.items()
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)
            }
            self.writer.write(record["step"], scalars)
        # NaN/inf are not JSON (json.dumps would write bare NaN): they are logged as null.
        clean = {k: _json_number(v) for k, v in record.items()}
        line = json.dumps(clean, allow_nan=False) + "\n"
        if self.remote:
            self._lines.append(line)
            if time.monotonic() - self._uploaded > self.upload_every_s:
                self.flush()
        else:
            self.file.write(line)
            self.file.flush()

    def flush(self) -> None:
        """Object store: uploads the whole log (local files are flushed on every write)."""
        if self.enabled and self.remote:
            storage.write_bytes(self.path, "".join(self._lines).encode())
            self._uploaded = time.monotonic()

    def close(self) -> None:
        if not self.enabled:
            return
        if self.remote:
            self.flush()
        else:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


class _ScalarEvents:
    """TensorBoard scalars written and flushed in the calling thread.

    tensorboardX's SummaryWriter hands events to a background thread, so its flush() does not
    mean "on disk": a kill -9 right after it lost the last steps. This writes each step's
    event file record synchronously (tensorboardX's EventsWriter: the same file format).
    """

    def __init__(self, logdir: str):
        from tensorboardX.event_file_writer import EventsWriter

        os.makedirs(logdir, exist_ok=True)
        self._events = EventsWriter(os.path.join(logdir, "events"))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        event = Event(wall_time=time.time(), step=step)
        for tag, value in scalars.items():
            event.summary.value.extend(scalar(tag, value).value)
        self._events.write_event(event)
        self._events.flush()

    def close(self) -> None:
        self._events.close()


class _RemoteScalarEvents:
    """_ScalarEvents' interface over tensorboardX's own writer, which can write gs:// (it
    buffers: an object store has no partial appends to flush anyway)."""

    def __init__(self, logdir: str):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(logdir)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        for k, v in scalars.items():
            self._writer.add_scalar(k, v, step)

    def close(self) -> None:
        self._writer.close()


def _json_number(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


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
    run_dir = storage.resolve(tc.run_dir)
    created = not storage.exists(run_dir)
    lock = _lock_run_dir(run_dir)
    started = _Started()
    try:
        return _train(exp, run_dir, tokenizer, mesh, rules, model, optimizer, progress, stop_at,
                      started)  # fmt: skip
    except BaseException:
        if created and not started.training and _is_main() and not ckpt.finished_steps(run_dir):
            lock.release()
            storage.rmtree(run_dir)  # a failed start leaves no empty run dir
        raise
    finally:
        lock.release()


@dataclasses.dataclass
class _Started:
    training: bool = False  # the first step has run: the run dir now holds a real attempt


def _lock_run_dir(run_dir: str) -> runlock.RunDirLock | _NoLock:
    """Process 0 locks RUN (one writer per run dir); every process learns whether it did."""
    lock, error = _NoLock(), None
    if storage.is_remote(run_dir):
        # An object store has no atomic create-if-absent through our storage layer: one
        # writer per gs:// run dir is the launcher's job (one job name per run dir).
        if _is_main():
            _log(f"[train] note: {run_dir} is on an object store; the run-dir lock is local-only")
    elif _is_main():
        lock = runlock.RunDirLock(run_dir, log=_log)
        try:
            lock.acquire()
        except runlock.RunDirLockedError as e:
            error = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        failed = multihost_utils.process_allgather(np.int32(error is not None))
        if error is None and np.any(failed):
            error = runlock.RunDirLockedError(
                f"process 0 could not lock {run_dir} (see its message); not starting."
            )
    if error is not None:
        raise error
    return lock


class _NoLock:
    def release(self) -> None:
        pass


def _train(exp, run_dir, tokenizer, mesh, rules, model, optimizer, progress, stop_at, started):
    tc = exp.train
    prepare_run_dir(exp, tokenizer.path)
    batches = ShardedBatches(exp, tokenizer)
    evaluator = eval_loop.Evaluator(exp, tokenizer, model, mesh, rules, log=_log)

    checkpointer = ckpt.TrainCheckpointer(
        run_dir, keep=tc.keep_checkpoints, async_save=tc.async_checkpointing
    )
    abstract, shardings = tr.state_shardings(model, optimizer, mesh, rules)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    try:
        resumed = checkpointer.restore_verified(abstract, log=_log)
    except BaseException:
        checkpointer.close()
        raise
    if resumed is not None:
        start, state, _, data_states = resumed
        batches.set_state(data_states)
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
    if start >= tc.steps:
        checkpointer.close()
        summary = RunSummary(run_dir, start + 1, start, None, None, None,
                             checkpointer.step_dir(start))  # fmt: skip
        _log(summary.line())
        return summary
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
    # silent-data-corruption check (integrity.py): every N steps and/or before each save
    check_every = tc.integrity_every if tc.integrity_every > 0 else None
    check_at_save = tc.integrity_every > 0 or (tc.integrity_every == -1 and mesh.devices.size > 1)

    metrics_log = MetricsLog(run_dir, start)
    stop = _StopFlag().install()
    bar = None
    if progress and _is_main():
        from tqdm.auto import tqdm  # a widget in notebooks (Colab), a text bar elsewhere

        bar = tqdm(total=tc.steps, initial=start, desc="train", dynamic_ncols=True)
    losses, rates = [], []
    saved = [start] if start > 0 else []  # steps whose save started (each checked finite)
    preempted = False
    step = start
    failing = False
    try:
        while step < tc.steps:
            t0 = time.perf_counter()
            local = next(batches)
            state, m = step_fn(state, tr.shard_batch(local, mesh, rules))
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            dt = time.perf_counter() - t0
            step += 1
            started.training = True
            checkpointer.check_for_errors()  # a background save that failed stops the run now
            finite = math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])
            if not finite and tc.nan_policy == "stop":
                raise TrainingDivergedError(
                    f"Loss is {m['loss']} and grad norm {m['grad_norm']} at step {step}: the "
                    f"update is not finite. {_last_good(checkpointer, saved)} Try a lower "
                    "train.lr or longer train.warmup_steps, train.clip_grad_norm, "
                    "runtime.bptt_grad_scale < 1, or train.nan_policy=skip to drop such steps."
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
            save = step % tc.checkpoint_every == 0 or step == tc.steps or preempted or pause
            if (check_every and step % check_every == 0) or (save and check_at_save):
                _check_replicas(state, step, checkpointer, saved)
            if save:
                metrics_log.flush()  # object store: the log first, so it covers the checkpoint
                try:
                    checkpointer.save(
                        step, state, data_state=batches.get_state(), meta={"loss": m["loss"]}
                    )
                except ckpt.NonFiniteStateError as e:
                    raise TrainingDivergedError(
                        f"At step {step} (loss {m['loss']}, grad norm {m['grad_norm']}) the "
                        f"state holds NaN/inf in {short_list(e.leaves)}; it was not saved. "
                        f"{_last_good(checkpointer, saved)} Try a lower train.lr or "
                        "train.clip_grad_norm."
                    ) from None
                saved.append(step)
            if preempted or pause:
                break
    except BaseException:
        failing = True
        raise
    finally:
        if bar is not None:
            bar.close()
        stop.uninstall()
        metrics_log.close()
        try:
            checkpointer.close()  # waits for pending async saves: committed or not, never half
        except ckpt.CheckpointSaveError:
            if not failing:  # else the error already in flight is the one to report
                raise
    summary = RunSummary(
        run_dir=run_dir,
        first_step=start + 1,
        last_step=step,
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        tokens_per_s=statistics.median(rates) if rates else None,
        checkpoint=checkpointer.step_dir(saved[-1]) if saved else None,
        preempted=preempted,
        losses=losses,
        total_steps=tc.steps,
        eval=evaluator.last,
    )
    _log(summary.line())
    return summary


def _last_good(checkpointer: ckpt.TrainCheckpointer, saved: list[int]) -> str:
    """Names the newest checkpoint verified finite (every save is) that is committed."""
    try:
        checkpointer.wait()
    except ckpt.CheckpointSaveError:
        pass  # that save is not a checkpoint; an older one is named below
    committed = set(ckpt.finished_steps(storage.parent(checkpointer.directory)))
    good = [s for s in saved if s in committed]
    if not good:
        return "No checkpoint of this run is verified finite (none was saved)."
    return f"Last checkpoint verified finite: {checkpointer.step_dir(good[-1])}."


def _check_replicas(state, step, checkpointer, saved) -> None:
    mismatches = integrity.check_replicas({"params": state.params, "opt_state": state.opt_state})
    if mismatches:
        raise SilentCorruptionError(
            f"Silent data corruption detected at step {step} (replica check, "
            f"train.integrity_every): {integrity.ReplicaMismatch(mismatches)} "
            f"{_last_good(checkpointer, saved)}"
        )
