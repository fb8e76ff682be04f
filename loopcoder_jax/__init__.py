"""loopcoder-jax: IQuest-Coder-V1 LoopCoder in JAX/Flax.

Public API:
  ModelConfig, RuntimeConfig, AttnImpl, Remat, preset  -- configuration (config.py)
  LoopCoder                                            -- the model (model/loopcoder.py)
  LoopCache, init_cache, cache_bytes                   -- decoding cache (cache.py)
"""

from loopcoder_jax.cache import LoopCache, cache_bytes, init_cache
from loopcoder_jax.config import (
    AttnImpl,
    ConfigError,
    ModelConfig,
    Remat,
    RuntimeConfig,
    preset,
)
from loopcoder_jax.model import LoopCoder

__version__ = "0.1.0"

__all__ = [
    "AttnImpl",
    "ConfigError",
    "LoopCache",
    "LoopCoder",
    "ModelConfig",
    "Remat",
    "RuntimeConfig",
    "cache_bytes",
    "init_cache",
    "preset",
]
