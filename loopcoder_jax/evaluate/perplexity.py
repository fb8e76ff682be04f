"""Token-weighted loss and perplexity of a checkpoint on text or chat JSONL records.

The records go through the training data pipeline (`data.pipeline.make_train_iterator`: one
pass, no shuffle, no FIM) and the loss is the training loss (`training.loss_sums`), so what is
scored is exactly what training optimises: text records on every next token (BOS/EOS as in
training), chat records on assistant tokens only. Documents are packed into rows of `seq_len`
tokens with cross-document masking; a document that fits a row is never split
(`split_long="long_only"`), a longer one continues in the next row without the earlier context
(pick `seq_len` >= your longest record to avoid that).

    loss = sum over scored tokens of -log p(token | its document prefix) / number of scored tokens
    perplexity = exp(loss)
"""

from __future__ import annotations

import functools
import math
import time

import numpy as np

BATCH_KEYS = ("input_ids", "targets", "segment_ids", "positions", "loss_mask")


@functools.lru_cache(maxsize=4)
def _loss_sums_fn(cfg, runtime, loss_chunk: int):
    """jit of (params, batch) -> (CE sum, scored-token count): the training loss, kept per
    settings so repeated evaluations reuse its compiled programs."""
    import jax

    from loopcoder_jax.config import TrainConfig
    from loopcoder_jax.model import LoopCoder
    from loopcoder_jax.training import loss_sums

    model, tc = LoopCoder(cfg, runtime), TrainConfig(loss_chunk=loss_chunk)

    @jax.jit
    def sums(params, batch):
        _, (ce, _, count) = loss_sums(model, params, batch, tc)
        return ce, count

    return sums


class PerplexityError(ValueError):
    """Unusable data for perplexity; the message names the problem and the fix."""


def evaluate_perplexity(
    cfg,
    params,
    tokenizer,
    data_path: str,
    *,
    seq_len: int,
    batch_size: int = 8,
    record_format: str = "auto",
    runtime=None,
) -> dict:
    """Returns dict(loss, perplexity, tokens, records, records_skipped, rows, seconds, ...)."""
    import jax.numpy as jnp

    from loopcoder_jax.config import DataConfig, RuntimeConfig
    from loopcoder_jax.data import pipeline

    if seq_len < 2 or seq_len > cfg.max_position_embeddings:
        raise PerplexityError(
            f"--seq-len {seq_len} must lie in [2, {cfg.max_position_embeddings}] (the model's "
            "max_position_embeddings)."
        )
    if batch_size < 1:
        raise PerplexityError(f"--batch-size must be >= 1, got {batch_size}.")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise PerplexityError(
            f"The tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but the model "
            f"only {cfg.vocab_size} embeddings; pass the model's own tokenizer (--tokenizer)."
        )
    data_cfg = DataConfig(
        sources=(data_path,), record_format=record_format, tokenizer=tokenizer.path,
        shuffle=False, num_epochs=1, split_long="long_only", fim_rate=0.0, read_threads=1,
    )  # fmt: skip
    t0 = time.perf_counter()
    # batch_size=1 rows, batched here: the pipeline drops a last partial batch (training
    # wants full ones), an evaluation must not drop records.
    it = pipeline.make_train_iterator(data_cfg, tokenizer=tokenizer, seq_len=seq_len, batch_size=1)
    sums = _loss_sums_fn(cfg, runtime or RuntimeConfig(), min(512, seq_len))

    def flush(chunk):
        batch = {k: np.concatenate([r[k] for r in chunk]) for k in BATCH_KEYS}
        pad = batch_size - len(chunk)  # zero rows: loss_mask 0, so they add nothing
        if pad:
            batch = {k: np.concatenate([v, np.zeros((pad, seq_len), v.dtype)]) for k, v in
                     batch.items()}  # fmt: skip
        ce, count = sums(params, {k: jnp.asarray(v) for k, v in batch.items()})
        return float(ce), float(count)

    # Streamed: host memory holds one batch of rows, whatever the size of the data.
    ce_total, count_total, num_rows, chunk = 0.0, 0.0, 0, []
    for row in it:
        chunk.append(row)
        num_rows += 1
        if len(chunk) == batch_size:
            ce, count = flush(chunk)
            ce_total, count_total, chunk = ce_total + ce, count_total + count, []
    if chunk:
        ce, count = flush(chunk)
        ce_total, count_total = ce_total + ce, count_total + count
    stats = pipeline.data_stats(it).as_dict()
    if num_rows == 0 or stats["records_ok"] == 0:
        raise PerplexityError(
            f"{data_path} has no usable record ({stats['records_bad']} skipped as malformed: "
            f"{stats['examples'][:2]}). Records are JSON objects with a string 'text' or a "
            "'messages' list of {role, content}."
        )
    if count_total == 0:
        raise PerplexityError(
            f"{data_path}: no token is scored (chat records need assistant turns)."
        )
    loss = ce_total / count_total
    return dict(
        data=data_path,
        loss=loss,
        perplexity=math.exp(loss) if loss < 700 else float("inf"),
        bits_per_token=loss / math.log(2),
        tokens=int(count_total),
        records=stats["records_ok"],
        records_skipped=stats["records_bad"],
        skipped_examples=stats["examples"],
        rows=num_rows,
        seq_len=seq_len,
        seconds=round(time.perf_counter() - t0, 2),
    )
