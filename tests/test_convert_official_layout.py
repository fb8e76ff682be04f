"""Checkpoints as the official `IQuestLoopCoderForCausalLM` class writes them (issue 14, item 5):
a loop_num=1 model still carries its (unused) `model.gate_projections.*`."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from loopcoder_jax import convert
from loopcoder_jax.config import ModelConfig
from tests.convert_support import hf_config
from tests.test_convert_errors import official_tensors, write_hf


def _loop1_with_gates(tmp_path):
    loop2 = hf_config(loop_num=2)
    tensors = official_tensors(loop2)  # has gate_projections
    cfg = dict(loop2, loop_num=1, architectures=["IQuestLoopCoderForCausalLM"])
    cfg["model_type"] = "iquestloopcoder"
    write_hf(tmp_path / "hf", tensors, cfg)
    return tmp_path / "hf", tensors


def test_loop1_checkpoint_with_unused_gates_loads_with_a_note(tmp_path, caplog):
    src, tensors = _loop1_with_gates(tmp_path)
    with caplog.at_level(logging.WARNING, logger="loopcoder_jax.convert"):
        cfg, params = convert.load_hf_checkpoint(src)
    assert cfg.loop_num == 1 and not cfg.has_gate
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and "unused at loop_num 1" in notes[0] and "\n" not in notes[0]
    assert "loop_gate" not in params["layers"]["self_attn"]
    np.testing.assert_array_equal(
        params["layers"]["mlp"]["up_proj"]["kernel"][1],
        tensors["model.layers.1.mlp.up_proj.weight"].T,
    )
    out = convert.hf_to_orbax(src, tmp_path / "orbax")
    assert out["tensors"] == len(convert.expected_hf_shapes(cfg))
    # the in-memory table accepts them too
    convert.hf_to_params(cfg, tensors)


def test_gates_of_the_wrong_layers_are_still_refused(tmp_path):
    src, tensors = _loop1_with_gates(tmp_path)
    cfg = ModelConfig.from_hf(src / "config.json")
    tensors["model.gate_projections.7.bias"] = tensors["model.gate_projections.0.bias"]
    with pytest.raises(convert.CheckpointError, match="unexpected tensors"):
        convert.hf_to_params(cfg, tensors)
