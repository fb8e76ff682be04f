"""bench/tpu_plan.py --vs-maxtext: the child that runs a MaxText checkout's train_compile, on a
stand-in checkout (a train_compile.py whose compiled FLOPs grow with the layer count)."""

import importlib.util
import os
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tpu_plan():
    path = os.path.join(REPO, "bench", "tpu_plan.py")
    spec = importlib.util.spec_from_file_location("tpu_plan", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["tpu_plan"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


FAKE_TRAIN_COMPILE = textwrap.dedent(
    """
    import jax, jax.numpy as jnp

    def main(argv):
        assert argv[1].endswith("base.yml"), argv
        kv = dict(a.split("=", 1) for a in argv[2:])
        layers = int(kv["base_num_decoder_layers"])
        def step(x):
            for _ in range(layers):
                x = jnp.tanh(x @ x)  # 2 * 64^3 FLOPs per layer
            return x
        jax.jit(step).lower(jnp.zeros((64, 64), jnp.float32)).compile()
    """
)


def test_maxtext_child_reports_the_compiled_numbers(tpu_plan, tmp_path):
    pkg = tmp_path / "src" / "MaxText"
    (pkg / "configs").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "configs" / "base.yml").write_text("# stand-in\n")
    (pkg / "train_compile.py").write_text(FAKE_TRAIN_COMPILE)
    env_backup = os.environ.get("JAX_PLATFORMS")
    os.environ["JAX_PLATFORMS"] = "cpu"
    try:
        got = tpu_plan.run_maxtext(str(tmp_path), ["base_num_decoder_layers=3"])
    finally:
        if env_backup is None:
            os.environ.pop("JAX_PLATFORMS")
        else:
            os.environ["JAX_PLATFORMS"] = env_backup
    assert got["flops"] >= 3 * 2 * 64**3 and got["flops"] < 4 * 2 * 64**3
    assert got["argument_bytes"] == 64 * 64 * 4 and got["jax"]


def test_maxtext_args_and_extrapolation(tpu_plan):
    row = tpu_plan.Row("x", "dense40b", 8192, "v5p-128", fsdp=64, remat="full", attn="xla")
    args = tpu_plan.maxtext_args(tpu_plan.experiment(row), "v5p-128", 2)
    kv = dict(a.split("=", 1) for a in args)
    assert kv["base_emb_dim"] == "5120" and kv["base_num_kv_heads"] == "8"
    assert kv["base_mlp_dim"] == "27648" and kv["vocab_size"] == "76800"
    assert kv["per_device_batch_size"] == "1" and kv["ici_fsdp_parallelism"] == "64"
    assert kv["base_num_decoder_layers"] == "2" and kv["scan_layers"] == "false"
    assert kv["max_target_length"] == "8192" and kv["remat_policy"] == "full"
    # the arithmetic: s1 + 79 * (s2 - s1)
    assert tpu_plan.extrapolate(1.0, 1.25, 80) == pytest.approx(1.0 + 79 * 0.25)
    assert tpu_plan.extrapolate(None, 1.0, 80) is None


def test_ours_is_charged_like_maxtexts_dot_product_estimate(tpu_plan, monkeypatch):
    """--vs-maxtext compares like with like: MaxText's estimate is made with
    attention=dot_product, so ours is costed with the dense stand-in, not the planner's
    default kernel charge (splash's causal blocks against MaxText's whole square)."""
    charges = []

    def fake_estimate(exp, topology, mode, devices=None, attention_cost="kernel"):
        charges.append(attention_cost)
        return {
            "flops": 1.0,
            "seconds": 1.0,
            "bytes": 1.0,
            "flops_per_layer": 1.0,
            "seconds_per_layer": 1.0,
            "bytes_per_layer": 1.0,
            "mesh": {},
            "num_chips": 8,
        }

    monkeypatch.setattr(tpu_plan.aot, "counting_estimate", fake_estimate)
    row = tpu_plan.Row("x", "dense40b", 8192, "v5p-8", fsdp=4, remat="full", attn="auto")
    tpu_plan.vs_maxtext("/nowhere", tpu_plan.experiment(row), "v5p-8", side="ours")
    assert charges == ["dense"]
