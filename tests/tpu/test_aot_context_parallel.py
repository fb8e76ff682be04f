"""AOT planner with the sequence sharded (`--mesh ... sequence=N`): train and prefill compile
for a TPU slice with splash inside the context-parallel shard_map."""

import importlib.util
import json

import pytest

from loopcoder_jax import aot

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="libtpu (the `tpu` extra) not installed"
)

# head_dim 128 (the TPU lane width, as in the real models), GQA 2, W = 64: chunks of 256.
ARGS = [
    "--preset", "tiny", "--topology", "v5p-8", "--mesh", "fsdp=2", "sequence=2",
    "--set", "model.hidden_size=256", "--set", "model.num_attention_heads=4",
    "--set", "model.num_key_value_heads=2", "--set", "model.head_dim=128",
    "--set", "model.loop_window_size=64",
    "--seq", "512", "--global-batch", "2", "--no-flop-count", "--json",
]  # fmt: skip


@needs_libtpu
@pytest.mark.parametrize("mode", ["prefill", pytest.param("train", marks=pytest.mark.slow)])
def test_context_parallel_plan_from_cli(capsys, mode):
    rc = aot.main([*ARGS, "--mode", mode])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["fits"] and out["mode"] == mode
    assert out["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1, "sequence": 2}
    assert any("Pallas kernels" in n for n in out["notes"]), out["notes"]  # splash ran
    # K/V all-gathered for the causal branches, the local branch's halo permuted.
    assert out["collectives"]["all-gather"]["count"] > 0
    assert out["collectives"]["collective-permute"]["count"] > 0


@pytest.mark.slow  # 4 counting compiles; tests/kernels/test_splash_cost.py checks the kernels
@needs_libtpu
def test_kernel_charge_is_the_same_with_the_sequence_whole_or_sharded():
    """The planner's attention charge (`--attention-cost kernel`, the default) counts splash's
    blocks: with the same tokens per chip, a layer costs the same FLOPs whether each chip
    holds whole sequences or halves of twice as many (balanced context parallelism), up to
    tile rounding. The dense stand-in charged the whole [T, T] square on one chip and only
    the causal blocks with the sequence sharded."""
    from loopcoder_jax import aot

    def per_layer(mesh):
        model = ARGS[ARGS.index("--set") : ARGS.index("--seq")]  # the model overrides above
        args = aot.build_parser().parse_args(
            ["--preset", "tiny", "--topology", "v5p-8", *model, "--mesh", *mesh]
            + ["--seq", "1024", "--global-batch", "4"]
        )
        exp = aot.build_experiment(args)
        return aot.counting_estimate(exp, "v5p-8", "train")["flops_per_layer"]

    whole, sharded = per_layer(["fsdp=4"]), per_layer(["fsdp=2", "sequence=2"])
    assert sharded == pytest.approx(whole, rel=0.03)
