"""A training run with the sequence sharded (`mesh.sequence=2`, context parallelism) on fake
CPU devices, with gradient accumulation and a chunked loss: a stopped run resumes exactly."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from loopcoder_jax import trainer
from loopcoder_jax.config import ExperimentConfig

STEPS = 6


def _exp(run_dir, **mesh):
    overrides = {
        "train.run_dir": str(run_dir),
        "train.steps": str(STEPS),
        "train.batch_size": "4",
        "train.seq_len": "64",
        "train.loss_chunk": "16",  # 2 chunks per sequence shard
        "train.grad_accum": "2",
        "train.warmup_steps": "2",
        "train.checkpoint_every": "100",
        "train.async_checkpointing": "false",
        "data.startup_check_records": "20",
        **{f"mesh.{k}": str(v) for k, v in mesh.items()},
    }
    return ExperimentConfig.from_yaml(None, overrides)


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


@pytest.mark.slow  # three trainer runs, ~50 s of compiles on a quiet 2-core box
def test_sequence_sharded_run_resumes_exactly(tmp_path):
    devices = jax.devices()[:2]
    straight = tmp_path / "cp_straight"
    trainer.run(_exp(straight, fsdp=1, sequence=2), progress=False, devices=devices)
    stopped = tmp_path / "cp_stopped"
    trainer.run(_exp(stopped, fsdp=1, sequence=2), progress=False, stop_at=3, devices=devices)
    assert len(_losses(stopped)) == 3
    trainer.run(_exp(stopped, fsdp=1, sequence=2), progress=False, devices=devices)
    # (context parallel = one device: tests/training/test_training_step.py)
    np.testing.assert_array_equal(_losses(stopped), _losses(straight))
