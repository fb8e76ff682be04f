"""Shared helpers of the conversion tests: tiny HF checkpoints written by the torch reference."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from loopcoder_jax.config import ModelConfig
from loopcoder_jax.model import LoopCoder
from loopcoder_jax.safetensors_io import open_checkpoint

ATOL = 1e-5  # as the torch-reference parity tests


def hf_config(**overrides) -> dict:
    """A tiny HF config.json dict (GQA 2, W = 4, non-zero gates come from init_random_)."""
    cfg = {
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "loop_num": 2,
        "loop_window_size": 4,
        "tie_word_embeddings": False,
        "max_position_embeddings": 512,
        "eos_token_id": 2,
    }
    cfg.update(overrides)
    return cfg


def read_all(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a HF checkpoint dir, as stored (our reader; safetensors' numpy API has no
    bf16)."""
    with open_checkpoint(path) as reader:
        return {name: reader.read(name) for name in reader.infos}


def bits(x) -> np.ndarray:
    """A dtype-independent bit view, for bit-identity checks."""
    x = np.ascontiguousarray(np.asarray(x))
    return x.view(f"u{x.dtype.itemsize}") if x.dtype.itemsize in (1, 2, 4, 8) else x


@functools.cache
def _apply_fn(cfg: ModelConfig):
    model = LoopCoder(cfg)
    return jax.jit(lambda p, ids: model.apply({"params": p}, ids))


def jax_logits(cfg: ModelConfig, params, ids: np.ndarray) -> np.ndarray:
    """float32 logits [B, T, V] of our model; params cast to float32 (cfg's compute dtype)."""
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    return np.asarray(_apply_fn(cfg)(params, jnp.asarray(ids, jnp.int32)))


def listdir_clean(path: str) -> list[str]:
    """Entries of `path`, to assert that failed conversions leave nothing behind."""
    return sorted(os.listdir(path))
