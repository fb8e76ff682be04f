"""ModelConfig: HF round trip, validation messages, presets."""

import json

import pytest

from loopcoder_jax import ConfigError, ModelConfig, RuntimeConfig, preset
from loopcoder_jax.config import PRESETS

RELEASED_40B_LOOP = {
    "architectures": ["IQuestLoopCoderForCausalLM"],
    "model_type": "iquestloopcoder",
    "hidden_size": 5120,
    "num_hidden_layers": 80,
    "intermediate_size": 27648,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 76800,
    "max_position_embeddings": 131072,
    "rope_theta": 500000,
    "rms_norm_eps": 1e-5,
    "loop_num": 2,
    "loop_window_size": 64,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "hidden_act": "silu",
    "eos_token_id": [2, 75864, 75869],
    "bos_token_id": 1,
    "transformers_version": "4.57.0",
    "use_cache": True,
    "attention_dropout": 0.0,
}


def test_released_config_loads_and_equals_preset(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(RELEASED_40B_LOOP))
    cfg = ModelConfig.from_hf(tmp_path)  # a directory works too
    assert cfg == preset("loop40b")
    assert cfg.eos_token_id == (2, 75864, 75869)
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg


def test_official_parameter_counts():
    # 40B-Loop: one shared 80-layer stack (~39.8e9 params incl. embeddings and head).
    assert 39.5e9 < preset("loop40b").num_params() < 40.1e9
    assert preset("dense7b").num_hidden_layers == 14
    assert preset("dense14b").num_hidden_layers == 28


def test_dense_llama_config_gets_loop_num_1():
    raw = {k: v for k, v in RELEASED_40B_LOOP.items() if k not in ("loop_num", "loop_window_size")}
    raw["model_type"] = "llama"
    cfg = ModelConfig.from_hf(raw)
    assert cfg.loop_num == 1 and not cfg.has_gate
    assert cfg.to_hf()["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_key_value_heads": 3}, "not divisible"),
        ({"loop_window_size": 0}, "loop_window_size"),
        ({"loop_num": 0}, "loop_num"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"head_dim": 7}, "even"),
        ({"gate_type": "sometimes"}, "gate_type"),
    ],
)
def test_invalid_values_are_named(change, message):
    with pytest.raises(ConfigError, match=message):
        preset("tiny").replace(**change)


def test_unknown_keys_are_rejected_unless_lenient():
    raw = dict(RELEASED_40B_LOOP, loop_nums=3)
    with pytest.raises(ConfigError, match="loop_nums"):
        ModelConfig.from_hf(raw)
    assert ModelConfig.from_hf(raw, strict=False).loop_num == 2


def test_unsupported_features_are_refused():
    with pytest.raises(ConfigError, match="rope_scaling"):
        ModelConfig.from_hf(dict(RELEASED_40B_LOOP, rope_scaling={"type": "linear", "factor": 2}))
    with pytest.raises(ConfigError, match="attention_bias"):
        ModelConfig.from_hf(dict(RELEASED_40B_LOOP, attention_bias=True))


def test_missing_and_corrupt_config_files(tmp_path):
    with pytest.raises(ConfigError, match="No config.json"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_hf(tmp_path)


def test_ablation_fields_stay_out_of_released_hf_configs():
    assert "gate_type" not in preset("loop40b").to_hf()
    hidden = preset("tiny").replace(gate_type="hidden", untied_loops=True)
    assert ModelConfig.from_hf(hidden.to_hf()) == hidden
    assert not hidden.is_released_architecture


def test_runtime_config_validation():
    assert RuntimeConfig(remat="dots").remat.value == "dots"
    with pytest.raises(ConfigError, match="remat"):
        RuntimeConfig(remat="sometimes")
    with pytest.raises(ConfigError, match="dtype"):
        RuntimeConfig(dtype="int8")
    with pytest.raises(ConfigError, match="bptt_grad_scale"):
        RuntimeConfig(bptt_grad_scale=2.0)


def test_every_preset_is_valid_and_round_trips():
    for name, cfg in PRESETS.items():
        assert ModelConfig.from_hf(cfg.to_hf()) == cfg, name
    with pytest.raises(ConfigError, match="Unknown preset"):
        preset("loop41b")
