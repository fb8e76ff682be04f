"""The LoopCoder KV cache (DESIGN.md "Incremental decoding").

Per layer, a loop-0 cache over the whole context (exactly a dense model's KV cache) and, for
each loop >= 1, a ring buffer of that loop's last W keys/values (slot = position % W). KV
memory is the dense model's plus (loop_num - 1) * W tokens per layer.

Shape legend: C = loop_num - 1 local loops, L layers, B batch, S cache length, W window,
K kv heads, H head_dim.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from loopcoder_jax import sharding as sh
from loopcoder_jax.config import ModelConfig


@flax.struct.dataclass
class LoopCache:
    """Decoding state; a pytree, passed into and returned from every step.

    global_k, global_v: [L, B, K, S, H] loop-0 keys/values (post-RoPE) by position.
    local_k, local_v: [C, L, B, K, W, H] ring buffers of loops 1..loop_num-1.
    Heads-major (K before S) so decode attention reads the cache in place (see
    `kernels.cached_attention`).
    lengths: [B] int32 tokens already in the cache per row (= position of the next token).
    """

    global_k: jax.Array
    global_v: jax.Array
    local_k: jax.Array
    local_v: jax.Array
    lengths: jax.Array

    @property
    def max_length(self) -> int:
        return self.global_k.shape[3]


# Logical axes of each cache field, for sharding it by the same rules as the model.
CACHE_AXES = LoopCache(
    global_k=(sh.LAYERS, sh.BATCH, sh.ACT_KV_HEADS, sh.KV_LENGTH, sh.HEAD_DIM),
    global_v=(sh.LAYERS, sh.BATCH, sh.ACT_KV_HEADS, sh.KV_LENGTH, sh.HEAD_DIM),
    local_k=(sh.CACHE_LOOPS, sh.LAYERS, sh.BATCH, sh.ACT_KV_HEADS, None, sh.HEAD_DIM),
    local_v=(sh.CACHE_LOOPS, sh.LAYERS, sh.BATCH, sh.ACT_KV_HEADS, None, sh.HEAD_DIM),
    lengths=(sh.BATCH,),
)


def init_cache(cfg: ModelConfig, batch: int, max_length: int, dtype=jnp.float32) -> LoopCache:
    """An empty cache for `batch` rows of up to `max_length` tokens."""
    layers, k, h = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    c, w = cfg.loop_num - 1, cfg.loop_window_size
    return LoopCache(
        global_k=jnp.zeros((layers, batch, k, max_length, h), dtype),
        global_v=jnp.zeros((layers, batch, k, max_length, h), dtype),
        local_k=jnp.zeros((c, layers, batch, k, w, h), dtype),
        local_v=jnp.zeros((c, layers, batch, k, w, h), dtype),
        lengths=jnp.zeros((batch,), jnp.int32),
    )


def cache_bytes(cfg: ModelConfig, batch: int, max_length: int, dtype=jnp.bfloat16) -> int:
    """Bytes of the K/V buffers: the dense model's plus (loop_num - 1) * W tokens per layer."""
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim
    tokens = max_length + (cfg.loop_num - 1) * cfg.loop_window_size
    return batch * tokens * per_token * jnp.dtype(dtype).itemsize
