"""Held-out evaluation during training: the eval set, the jitted eval step, the loop over it.

`trainer.run` builds one `Evaluator` and calls it every `train.eval_every` steps and at the last
step; the result goes into that step's metrics.jsonl line (`eval_loss`, `eval_ppl`,
`eval_tokens`), TensorBoard (`eval/*`) and the run summary.

Eval loss = token-weighted mean next-token cross-entropy over every loss token of the eval set
(sum of CE / number of loss tokens, the same masking as training; no z-loss), so batches with
fewer tokens weigh less. Perplexity = exp(eval loss).

The eval set is read once, at start-up, and kept in host memory: the first `train.eval_batches`
batches of `pipeline.make_eval_iterator` (no shuffling, one epoch), each `batch_size / grad_accum`
rows (a training micro-batch, so it fits wherever training fits). A short last batch is padded
with rows whose loss mask is 0, which changes no sum. It is the same set at every evaluation and
after a resume, and evaluation touches neither the train state nor the data iterator, so
resumed runs stay bitwise exact and log the same eval losses.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from loopcoder_jax import training as tr
from loopcoder_jax.config import ConfigError, ExperimentConfig, TrainConfig
from loopcoder_jax.model import LoopCoder


@dataclasses.dataclass(frozen=True)
class EvalResult:
    step: int
    loss: float  # token-weighted mean CE over the eval set
    tokens: int  # loss tokens evaluated

    @property
    def ppl(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf

    def record(self) -> dict[str, float]:
        """The fields added to the step's metrics.jsonl line."""
        return {"eval_loss": self.loss, "eval_ppl": self.ppl, "eval_tokens": self.tokens}


def make_eval_step(model: LoopCoder, mesh: Mesh, rules, *, train_cfg: TrainConfig):
    """`eval_step(params, batch) -> {"ce": sum of masked CE, "tokens": loss tokens}`.

    Jitted on the training mesh with the training param and batch shardings; the forward pass
    and the chunked cross-entropy are the training step's (`training.loss_sums`), z-loss off.
    """
    tc = dataclasses.replace(train_cfg, z_loss=0.0)
    b_sh = tr.batch_sharding(mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())

    def step(params, batch):
        _, (ce, _, tokens) = tr.loss_sums(model, params, batch, tc)
        return {"ce": ce, "tokens": tokens}

    jitted = jax.jit(
        step,
        in_shardings=(tr.param_shardings(model, mesh, rules), {k: b_sh for k in tr.BATCH_KEYS}),
        out_shardings={"ce": replicated, "tokens": replicated},
    )
    return tr.MeshProgram(jitted, mesh, rules)


def load_eval_batches(
    exp: ExperimentConfig, tokenizer, process_index: int = 0, process_count: int = 1
) -> list[dict[str, np.ndarray]]:
    """This process's rows of the first `train.eval_batches` eval batches (numpy, padded).

    Every process returns the same number of batches (the most any process has; a process
    that runs out adds all-padding batches), each with `rows / process_count` rows.
    """
    from loopcoder_jax.data.pipeline import make_eval_iterator

    tc = exp.train
    rows = tc.batch_size // tc.grad_accum
    if rows % process_count:
        raise ConfigError(
            f"Eval batches have batch_size / grad_accum = {rows} rows, not divisible by the "
            f"{process_count} processes; use a train.batch_size that makes it a multiple."
        )
    local = rows // process_count
    it = make_eval_iterator(
        exp.data,
        tokenizer=tokenizer,
        seq_len=tc.seq_len,
        batch_size=local,
        process_index=process_index,
        process_count=process_count,
    )
    batches = []
    for batch in it:
        batches.append(_pad_rows(batch, local, tokenizer.pad_id))
        if len(batches) == tc.eval_batches:
            break
    count = len(batches)
    if process_count > 1:
        from jax.experimental import multihost_utils

        count = int(np.max(multihost_utils.process_allgather(np.int32(count))))
    while len(batches) < count:
        batches.append(_pad_rows(None, local, tokenizer.pad_id, seq_len=tc.seq_len))
    return batches


def _pad_rows(batch, rows: int, pad_id: int, seq_len: int | None = None):
    """`batch` with padding rows (segment 0, loss mask 0) appended up to `rows` rows."""
    if batch is None:
        batch = {k: np.zeros((0, seq_len), np.float32 if k == "loss_mask" else np.int32)
                 for k in tr.BATCH_KEYS}  # fmt: skip
    missing = rows - batch["input_ids"].shape[0]
    if missing == 0:
        return {k: batch[k] for k in tr.BATCH_KEYS}
    out = {}
    for k in tr.BATCH_KEYS:
        fill = pad_id if k in ("input_ids", "targets") else 0
        pad = np.full((missing, *batch[k].shape[1:]), fill, batch[k].dtype)
        out[k] = np.concatenate([batch[k], pad])
    return out


def evaluate(eval_step, params, batches, mesh: Mesh, rules, step: int = 0) -> EvalResult:
    """Runs `eval_step` over `batches` (this process's rows) and returns the global mean loss."""
    ce = jnp.zeros((), jnp.float32)
    tokens = jnp.zeros((), jnp.float32)
    for batch in batches:
        out = eval_step(params, tr.shard_batch(batch, mesh, rules))
        ce, tokens = ce + out["ce"], tokens + out["tokens"]
    ce, tokens = float(ce), float(tokens)
    return EvalResult(step=step, loss=ce / max(tokens, 1.0), tokens=int(tokens))


class Evaluator:
    """The held-out evaluation of one run: built once, called at the steps `due` names.

    With no eval data configured it is disabled and says so once (through `log`).
    """

    def __init__(
        self,
        exp: ExperimentConfig,
        tokenizer,
        model: LoopCoder,
        mesh: Mesh,
        rules,
        log: Callable[[str], None] = print,
    ):
        from loopcoder_jax.data.pipeline import has_eval_data

        self.every, self.last_step = exp.train.eval_every, exp.train.steps
        self.mesh, self.rules = mesh, rules
        self.last: EvalResult | None = None
        self.batches: list[Mapping[str, np.ndarray]] = []
        if not has_eval_data(exp.data):
            log(
                "[train] no held-out eval data (data.eval_sources is empty and "
                "data.eval_fraction is 0): only the training loss is logged. Set "
                "data.eval_fraction=0.05 or data.eval_sources=[FILES] to evaluate."
            )
            return
        self.batches = load_eval_batches(exp, tokenizer, jax.process_index(), jax.process_count())
        if not self.batches:
            raise ConfigError(
                "The eval data yields no batch (every held-out record is malformed?); check "
                "data.eval_sources / data.eval_fraction."
            )
        self.step_fn = make_eval_step(model, mesh, rules, train_cfg=exp.train)
        n_tok = sum(int(b["loss_mask"].sum()) for b in self.batches)
        rows = exp.train.batch_size // exp.train.grad_accum
        where = (
            f"files {list(exp.data.eval_sources)}"
            if exp.data.eval_sources
            else f"{exp.data.eval_fraction:g} of the training records, held out"
        )
        every = f"every {self.every} steps and " if self.every else ""
        log(
            f"[train] eval: {len(self.batches)} batches x {rows} x {exp.train.seq_len} "
            f"({n_tok:,} loss tokens on process 0) from {where}, "
            f"{every}at step {self.last_step}"
        )

    @property
    def enabled(self) -> bool:
        return bool(self.batches)

    def due(self, step: int) -> bool:
        if not self.enabled:
            return False
        return step == self.last_step or (self.every > 0 and step % self.every == 0)

    def __call__(self, params, step: int) -> EvalResult:
        self.last = evaluate(self.step_fn, params, self.batches, self.mesh, self.rules, step)
        return self.last
