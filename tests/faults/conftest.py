"""One tiny train state shared by the fault tests (its init compiles once per session)."""

from __future__ import annotations

import jax
import pytest

from loopcoder_jax import sharding as sh
from loopcoder_jax import training as tr
from loopcoder_jax.config import MeshConfig, TrainConfig
from loopcoder_jax.model import LoopCoder

RULES = sh.get_rules("fsdp_tp")


@pytest.fixture(scope="session")
def tiny_state(tiny_config):
    """(model, optimizer, one-device mesh, TrainState) of the tiny test model."""
    model, opt = LoopCoder(tiny_config), tr.make_optimizer(TrainConfig(steps=10))
    mesh = sh.make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    state = tr.make_init_fn(model, opt, mesh, RULES)(jax.random.key(0))
    return model, opt, mesh, state
