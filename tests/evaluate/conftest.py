"""A params checkpoint of the `tiny` preset (vocab 512 = the shipped tokenizer), random
weights, written once per session for the evaluation tests."""

from __future__ import annotations

import os
import shutil

import pytest

from loopcoder_jax import checkpoint
from loopcoder_jax.config import preset
from loopcoder_jax.data.tokenizer import shipped_model_path
from tests.inference.helpers import random_params


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    cfg = preset("tiny")
    params = random_params(cfg, seed=7, std=0.05)
    path = str(tmp_path_factory.mktemp("eval_ckpt") / "tiny")
    checkpoint.save_params(path, cfg, params)
    shutil.copy(shipped_model_path(), os.path.join(path, "tokenizer.model"))
    return cfg, params, path
