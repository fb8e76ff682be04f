"""Shared test setup.

Eight fake CPU devices for sharding tests: XLA reads this flag once, when jax is first
imported, so it must be set here, before any test module imports jax.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

from loopcoder_jax.config import ModelConfig  # noqa: E402
from tests._strict_deps import (  # noqa: E402, F401 - hooks: on CI a missing dependency fails
    pytest_make_collect_report,
    pytest_runtest_makereport,
)


def _skip_unless_backend(item, marker: str):
    # get_closest_marker, not `marker in item.keywords`: keywords also hold directory names,
    # so every test under tests/tpu/ would count as TPU-only.
    if item.get_closest_marker(marker) and jax.default_backend() != marker:
        item.add_marker(pytest.mark.skip(reason=f"needs a {marker.upper()} backend"))


def pytest_collection_modifyitems(config, items):
    for item in items:
        _skip_unless_backend(item, "tpu")
        _skip_unless_backend(item, "gpu")


@pytest.fixture(scope="session")
def tiny_config() -> ModelConfig:
    """2 layers, loop_num 2, W = 4, vocab 128, GQA 2: gemma's DummyGemma idea.

    Session-scoped so module-scoped fixtures can build on it; it is frozen, so sharing is safe.
    """
    return ModelConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rope_theta=10000.0,
        loop_num=2,
        loop_window_size=4,
        eos_token_id=(2,),
        torch_dtype="float32",
    )
