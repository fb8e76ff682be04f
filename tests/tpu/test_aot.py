"""AOT planner: compiles the real steps for TPU topologies with libtpu on this CPU machine."""

import dataclasses
import importlib.util
import json

import jax
import jax.numpy as jnp
import pytest

from loopcoder_jax import aot
from loopcoder_jax.cache import cache_bytes
from loopcoder_jax.config import ExperimentConfig, MeshConfig, RuntimeConfig, preset

GIB = 2**30

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="libtpu (the `tpu` extra) not installed"
)


def _tiny_experiment(**train) -> ExperimentConfig:
    exp = ExperimentConfig.from_dict(
        # XLA attention: splash's FLOPs are only its own estimate (test_splash_compiles...).
        {"model": {"preset": "tiny"}, "runtime": {"dtype": "bfloat16", "attn_impl": "xla"}},
        {},
    )
    return exp.replace(
        mesh=MeshConfig(data=1, fsdp=4, tensor=2, sequence=1),
        train=dataclasses.replace(exp.train, batch_size=8, seq_len=256, **train),
    )


# ---------------------------------------------------------------------------- no compiler
@pytest.mark.parametrize(
    "name, chips, grid, kind",
    [
        ("v4-8", 4, (2, 2, 1), "v4"),
        ("v5p-128", 64, (4, 4, 4), "v5"),
        ("v5p-1024", 512, (8, 8, 8), "v5"),
        ("v5e-16", 16, (4, 4), "v5e"),
        ("v5litepod-256", 256, (16, 16), "v5e"),
        ("v6e-64", 64, (8, 8), "v6e"),
    ],
)
def test_parse_topology(name, chips, grid, kind):
    topo = aot.parse_topology(name)
    assert topo.num_chips == chips and topo.grid == grid
    assert topo.libtpu_name == f"{kind}:{'x'.join(map(str, grid))}"


@pytest.mark.parametrize("bad", ["v5p-7", "v7-8", "tpu-128", "v5e-12"])
def test_bad_topology_names_the_fix(bad):
    with pytest.raises(aot.PlannerError, match="v5p-128|sizes"):
        aot.parse_topology(bad)


def test_missing_libtpu_says_how_to_install(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "libtpu" else real(n, *a)
    )
    rc = aot.main(["--preset", "tiny", "--topology", "v5e-8"])
    assert rc == 2
    assert "pip install 'loopcoder-jax[tpu]'" in capsys.readouterr().err


def test_collectives_parsed_from_hlo():
    hlo = """
  %all-gather.3 = bf16[8,1024]{1,0} all-gather(bf16[2,1024]{1,0} %p), dimensions={0}
  %ags = (f32[16]{0}, f32[64]{0}) all-gather-start(f32[16]{0} %x), dimensions={0}
  %agd = f32[64]{0} all-gather-done((f32[16]{0}, f32[64]{0}) %ags)
  %ar = f32[4,4]{1,0} all-reduce(f32[4,4]{1,0} %y), to_apply=%add
  %rs.1 = f32[2]{0} reduce-scatter(f32[8]{0} %z), dimensions={0}
"""
    got = aot.collectives_in_hlo(hlo)
    assert got == {
        "all-gather": {"count": 2, "bytes": 8 * 1024 * 2 + 64 * 4},
        "all-reduce": {"count": 1, "bytes": 64},
        "reduce-scatter": {"count": 1, "bytes": 8},
    }


def test_plan_verdict_and_report():
    plan = aot.Plan(
        topology="v5e-8", device_kind="TPU v5 lite", num_chips=8, mesh={"fsdp": 8},
        mode="train", seq_len=4096, global_batch=8, remat="full", attn_impl="splash",
        dtype="bfloat16", argument_bytes=10 * aot.GiB, output_bytes=10 * aot.GiB,
        alias_bytes=10 * aot.GiB, temp_bytes=7 * aot.GiB, peak_bytes=0, hbm_bytes=16 * aot.GiB,
        compiled_flops_per_chip=1.5e15, analytic_flops=8e15, optimal_seconds=10.0,
        peak_flops_per_chip=197e12, collectives={}, compile_seconds=1.0,
    )  # fmt: skip
    assert plan.total_bytes == 17 * aot.GiB and not plan.fits
    assert plan.flops_ratio == pytest.approx(1.5)
    assert plan.mfu_bound == pytest.approx(8e15 / (10.0 * 8 * 197e12))
    text = plan.report()
    assert "DOES NOT FIT" in text and "(ESTIMATE)" in text and "ratio 1.50" in text


def _plan(**kw):
    base = dict(
        topology="v6e-8", device_kind="TPU v6 lite", num_chips=8, mesh={"fsdp": 8},
        mode="train", seq_len=8192, global_batch=8, remat="full", attn_impl="splash",
        dtype="bfloat16", argument_bytes=GIB, output_bytes=GIB, alias_bytes=GIB, temp_bytes=GIB,
        peak_bytes=0, hbm_bytes=32 * GIB, compiled_flops_per_chip=None, analytic_flops=8e15,
        optimal_seconds=None, peak_flops_per_chip=918e12, collectives={}, compile_seconds=1.0,
    )  # fmt: skip
    return aot.Plan(**{**base, **kw})


@pytest.mark.parametrize("seconds", [None, 0.0, -8.931])
def test_absent_or_negative_estimate_is_never_printed_as_a_number(seconds):
    p = _plan(optimal_seconds=seconds, analytic_flops_causal=5e15)
    text = p.report()
    assert "no estimate" in text and "MFU bound" not in text and "-8931" not in text
    assert p.mfu_bound is None and p.mfu_bound_causal is None and not p.has_estimate
    out = p.to_json()
    assert out["mfu_bound_estimate"] is None and out["has_estimate"] is False


def test_mfu_reported_on_causal_and_full_counts_labelled():
    """Both conventions, each from its own analytic count (checked here by hand)."""
    exp = _tiny_experiment()  # seq 256, batch 8
    full, causal = aot.analytic_flops(exp, "train"), aot.analytic_flops(exp, "train", causal=True)
    cfg, t, b = exp.model, 256, 8
    # attention pairs per layer: loop 0 + the global branch of loop 1 (causal), loop 1's
    # local branch (W keys); 4 * H_q * head_dim FLOPs per pair forward, x3 for training
    pairs_full = cfg.loop_num * t * t
    pairs_causal = cfg.loop_num * t * (t + 1) / 2
    per_pair = 3 * 4 * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers * b
    assert full - causal == pytest.approx(per_pair * (pairs_full - pairs_causal), rel=1e-9)
    p = _plan(analytic_flops=full, analytic_flops_causal=causal, optimal_seconds=1e-3,
              peak_flops_per_chip=1e12)  # fmt: skip
    assert p.mfu_bound == pytest.approx(full / (1e-3 * 8 * 1e12))
    assert p.mfu_bound_causal == pytest.approx(causal / (1e-3 * 8 * 1e12))
    text = p.report()
    assert f"MFU bound {100 * p.mfu_bound_causal:.1f}% on causal FLOPs" in text
    assert f"{100 * p.mfu_bound:.1f}% on full-attention FLOPs" in text
    assert "T/2 keys per query" in text and "T keys per query" in text


@pytest.mark.slow
def test_flop_count_extrapolation_is_exact_on_cpu():
    """Depth-1/2 unrolled compiles extrapolated to 3 layers == a 3-layer unrolled compile.

    Checked on the 8 CPU devices (cost_analysis reports FLOPs there too; no libtpu needed).
    """
    exp = _tiny_experiment()
    exp = exp.replace(model=exp.model.replace(num_hidden_layers=3))
    plan = aot.plan(exp, "v5e-8", "train", devices=jax.devices()[:8])
    direct = aot._counting_config(exp, 3)
    mesh = aot.sh.make_mesh(exp.mesh, jax.devices()[:8])
    want = aot._cost(aot._lower(direct, mesh, aot.sh.get_rules("fsdp_tp"), "train").compile())
    # Equal up to the compiler's fusion choices in the O(params) optimizer update (~1e-4).
    assert plan.compiled_flops_per_chip == pytest.approx(want[0], rel=1e-3)
    # and the scanned program's cost counts its body once: the planner reports no count
    scanned = aot.plan(exp, "v5e-8", "train", devices=jax.devices()[:8], count_flops=False)
    assert scanned.compiled_flops_per_chip is None and not scanned.has_estimate
    raw = aot._cost(aot._lower(exp, mesh, aot.sh.get_rules("fsdp_tp"), "train").compile())
    assert raw[0] < 0.9 * plan.compiled_flops_per_chip


# ---------------------------------------------------------------------------- with libtpu
@pytest.fixture(scope="module")
def tiny_train_plan():
    return aot.plan(_tiny_experiment(), "v5e-8", "train")


@needs_libtpu
def test_train_plan_on_v5e_8(tiny_train_plan):
    p = tiny_train_plan
    assert p.device_kind == "TPU v5 lite" and p.num_chips == 8 and p.fits
    assert p.mesh == {"data": 1, "fsdp": 4, "tensor": 2, "sequence": 1}
    # Arguments hold this chip's shard of params + 2 Adam moments (f32): between a fully
    # sharded and a fully replicated copy.
    exp = _tiny_experiment()
    n = exp.model.num_params()
    assert 3 * 4 * n / 8 <= p.argument_bytes <= 3 * 4 * n + 2**20
    assert p.alias_bytes > 0  # the state is donated
    # Compiled FLOPs >= the model FLOPs (dense causal score blocks, tiny-matmul padding
    # aside) and within a small factor: a mistake in the depth extrapolation would be 2x off.
    assert 0.9 < p.flops_ratio < 3.0
    assert p.optimal_seconds > 0 and 0 < p.mfu_bound < 1
    # FSDP gathers the weights; gradients are reduced.
    assert p.collectives["all-gather"]["count"] > 0
    assert {"all-reduce", "reduce-scatter"} & set(p.collectives)


@needs_libtpu
def test_decode_plan_from_cli(capsys):
    rc = aot.main(
        ["--preset", "tiny", "--topology", "v4-8", "--mesh", "fsdp=2", "tensor=2",
         "--seq", "512", "--global-batch", "4", "--mode", "decode", "--no-flop-count", "--json"]
    )  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["fits"] and out["mode"] == "decode"
    assert out["device_kind"] == "TPU v4" and out["num_chips"] == 4
    # The donated cache is an argument: this chip's quarter (batch over fsdp, kv heads
    # over tensor) of the bf16 K/V of 4 rows x 512 positions.
    cache = cache_bytes(preset("tiny"), 4, 512, jnp.bfloat16)
    assert out["argument_bytes"] >= cache / 4 and out["alias_bytes"] >= cache / 4


@needs_libtpu
def test_splash_compiles_for_v5p():
    """head_dim 128 (the TPU lane width, as in the real models) through the Pallas kernel."""
    exp = _tiny_experiment()
    model = exp.model.replace(
        hidden_size=256, num_attention_heads=2, num_key_value_heads=2, head_dim=128
    )
    exp = exp.replace(
        model=model,
        runtime=RuntimeConfig(dtype="bfloat16", attn_impl="auto"),
        mesh=MeshConfig(data=1, fsdp=4, tensor=1, sequence=1),
    )
    p = aot.plan(exp, "v5p-8", "train", count_flops=False)
    assert p.device_kind == "TPU v5" and p.fits
    assert any("Pallas kernels" in n for n in p.notes), p.notes
    # Not counted (the scan body is costed once): no FLOPs, no time, no MFU as a number
    # (a 7B plan at 128K once printed "MFU bound 1945%" here).
    assert p.compiled_flops_per_chip is None and not p.has_estimate, p.report()
    assert "MFU bound" not in p.report() and "no estimate" in p.report()


@needs_libtpu
@pytest.mark.slow
def test_loop40b_plan_on_v5p_128():
    """The question the planner exists for: 40B-Loop, 4k tokens, one sequence per chip."""
    exp = ExperimentConfig.from_dict(
        {"model": {"preset": "loop40b"}, "runtime": {"dtype": "bfloat16", "remat": "full"}}, {}
    )
    exp = exp.replace(
        mesh=MeshConfig(data=1, fsdp=64, tensor=1, sequence=1),
        train=dataclasses.replace(exp.train, batch_size=64, seq_len=4096),
    )
    p = aot.plan(exp, "v5p-128", "train", count_flops=False)
    assert p.num_chips == 64 and p.device_kind == "TPU v5"
    # f32 params + 2 Adam moments of ~40B parameters, FSDP-sharded 64 ways: ~7 GiB per chip.
    n = exp.model.num_params()
    assert 3 * 4 * n / 64 <= p.argument_bytes <= 1.1 * 3 * 4 * n / 64 + 2**30
    assert p.fits, p.report()


def test_compiler_oom_becomes_does_not_fit():
    msg = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (128.93G) exceeds available HBM (95.74G)."
    )
    assert aot._parse_oom(msg) == int(128.93 * 2**30)
    assert aot._parse_oom("INTERNAL: something else") is None
    topo = aot.parse_topology("v5p-16")
    exp = _tiny_experiment()

    class _Dev:
        device_kind = "TPU v5"

    class _Mesh:
        shape = {"fsdp": 8}

    p = aot._oom_plan(exp, topo, [_Dev()] * 8, _Mesh(), "train", aot._parse_oom(msg), 1.0)
    assert not p.fits and "RESOURCE_EXHAUSTED" in p.report() and "DOES NOT FIT" in p.report()


@pytest.mark.slow
@needs_libtpu
def test_flop_count_is_not_cut_by_windowed_einsum():
    """The same per-chip work (one 1k sequence of a 7B-wide layer per chip) counts the same
    FLOPs on 4 and on 8 chips. On 8, XLA:TPU splits FSDP matmuls into loops over the shards
    (windowed einsum), whose bodies cost_analysis counts once; the counting compiles turn that
    off. Without it the 8-chip count was 0.83x the 4-chip one."""
    per_chip, windowed = {}, {}
    for topology, chips in (("v5p-8", 4), ("v5p-16", 8)):
        exp = ExperimentConfig.from_dict(
            {"model": {"preset": "dense7b"}, "runtime": {"dtype": "bfloat16"}}, {}
        )
        exp = exp.replace(
            mesh=MeshConfig(data=1, fsdp=chips, tensor=1, sequence=1),
            train=dataclasses.replace(exp.train, batch_size=chips, seq_len=1024),
        )
        devices = aot.topology_devices(aot.parse_topology(topology))
        mesh = aot.sh.make_mesh(exp.mesh, devices)
        rules = aot.sh.get_rules(exp.mesh.rules)
        per_chip[chips] = aot._counting_cost(exp, 1, mesh, rules, "train", devices)[0]
        plain = aot._lower(aot._counting_config(exp, 1), mesh, rules, "train").compile()
        windowed[chips] = "windowed_dot_general_body" in plain.as_text()
    assert windowed[8]  # the case this guards against does occur on 8 chips
    assert per_chip[8] == pytest.approx(per_chip[4], rel=0.02)


# ---------------------------------------------------------------------------- fit search
def test_fit_candidates_nearest_first():
    """The shipped-YAML failure of issue 12: fsdp=8 x tensor=8, 256 sequences in 4 micro-batches
    of 64, on 64 chips. Single changes come first, each batch splits over its mesh."""
    exp = ExperimentConfig.from_dict({"model": {"preset": "loop40b"},
                                      "runtime": {"remat": "dots"}}, {})  # fmt: skip
    exp = exp.replace(
        mesh=MeshConfig(data=1, fsdp=8, tensor=8, sequence=1),
        train=dataclasses.replace(exp.train, batch_size=256, grad_accum=4, seq_len=8192),
    )
    cands = aot.fit_candidates(exp, 64, "train")
    desc = [(c.mesh.fsdp, c.mesh.tensor, c.runtime.remat.value, c.train.batch_size,
             c.train.grad_accum) for c in cands]  # fmt: skip
    assert desc[:6] == [
        (8, 8, "dots", 256, 8),  # same mesh and remat, smaller micro-batches
        (8, 8, "dots", 256, 16),
        (8, 8, "dots", 256, 32),
        (-1, 1, "dots", 256, 4),  # every chip on fsdp only
        (8, 8, "full", 256, 4),  # remat only
        (8, 8, "dots", 8, 1),  # a smaller global batch: the last single change
    ]
    assert desc.index((-1, 1, "full", 256, 4)) > desc.index((-1, 1, "dots", 256, 4))
    for c in cands:
        sizes = aot.sh.resolve_mesh_shape(c.mesh.axis_sizes, 64)
        assert (c.train.batch_size // c.train.grad_accum) % (sizes["data"] * sizes["fsdp"]) == 0
    assert (exp.mesh, exp.runtime.remat, 256, 4) not in [
        (c.mesh, c.runtime.remat, c.train.batch_size, c.train.grad_accum) for c in cands
    ]


def test_suggest_fit_returns_the_first_candidate_that_fits(monkeypatch):
    """The search itself, with `plan` replaced by a made-up memory model (no compiles)."""
    exp = _tiny_experiment()
    exp = exp.replace(train=dataclasses.replace(exp.train, batch_size=32, grad_accum=1))
    calls = []

    def fake_plan(cand, topology, mode, *, count_flops, devices):
        calls.append(cand)
        micro = cand.train.batch_size // cand.train.grad_accum
        total = micro * (1 if cand.runtime.remat.value == "full" else 3) * aot.GiB
        return dataclasses.replace(
            _plan(), temp_bytes=total, argument_bytes=0, output_bytes=0, alias_bytes=0,
            hbm_bytes=12 * aot.GiB, mesh={"fsdp": 4},
        )  # fmt: skip

    monkeypatch.setattr(aot, "plan", fake_plan)
    g = aot.suggest_fit(exp, "v5e-8", "train", devices=[object()] * 8)
    # 32 rows over 4 batch shards at 3 GiB a row against 12 GiB: accumulation 2 (16 rows per
    # micro-batch) and 4 (8 rows) do not fit, 8 (4 rows: 12 GiB) does: the third try.
    assert [c.train.grad_accum for c in calls] == [2, 4, 8]
    assert g["tried"] == 3 and g["grad_accum"] == 8 and g["global_batch"] == 32
    assert g["total_bytes"] == 12 * aot.GiB
    assert "--global-batch 32 --set train.grad_accum=8" in g["flags"]
    calls.clear()
    assert aot.suggest_fit(exp, "v5e-8", "train", devices=[object()] * 8, max_tries=1) == {
        "tried": 1
    }


@pytest.mark.slow
def test_plan_that_does_not_fit_names_the_nearest_that_does(monkeypatch):
    """On the 8 CPU devices (memory analysis works there too), with a made-up HBM size that
    the given plan exceeds and remat=full plus smaller micro-batches meet."""
    exp = _tiny_experiment()
    exp = exp.replace(
        runtime=exp.runtime.replace(remat="none"),
        train=dataclasses.replace(exp.train, batch_size=32, grad_accum=1, seq_len=256),
    )
    devices = jax.devices()[:8]
    first = aot.plan(exp, "v5e-8", "train", count_flops=False, devices=devices)
    want = None
    for cand in aot.fit_candidates(exp, 8, "train"):
        total = aot.plan(cand, "v5e-8", "train", count_flops=False, devices=devices).total_bytes
        if total < first.total_bytes * 0.8:
            want = (cand, total)
            break
    assert want is not None
    gen = dataclasses.replace(aot.GENERATIONS["v5e"], hbm_bytes=(first.total_bytes + want[1]) // 2)
    monkeypatch.setitem(aot.GENERATIONS, "v5e", gen)
    p = aot.plan(exp, "v5e-8", "train", count_flops=False, devices=devices)
    assert not p.fits
    p.suggestion = aot.suggest_fit(exp, "v5e-8", "train", devices=devices)
    g = p.suggestion
    assert g["total_bytes"] <= gen.hbm_bytes and g["tried"] >= 1
    assert g["grad_accum"] == want[0].train.grad_accum or g["remat"] == "full"
    assert "nearest plan that fits: --mesh" in p.report() and "--global-batch" in g["flags"]
    # nothing fits: says so
    monkeypatch.setitem(aot.GENERATIONS, "v5e", dataclasses.replace(gen, hbm_bytes=1))
    p.suggestion = aot.suggest_fit(exp, "v5e-8", "train", devices=devices, max_tries=2)
    assert p.suggestion == {"tried": 2} and "none of the 2 variants" in p.report()


def test_long_sequence_that_does_not_fit_is_offered_context_parallelism(monkeypatch):
    """40B-Loop at 32K, one sequence per chip on v5p-256 (139.6 GiB): no batch or remat change
    helps; splitting the sequence does. Made-up memory model: activations scale with the rows
    and tokens one chip holds per micro-step."""
    exp = ExperimentConfig.from_dict({"model": {"preset": "loop40b"},
                                      "runtime": {"remat": "full"}}, {})  # fmt: skip
    exp = exp.replace(
        mesh=MeshConfig(data=1, fsdp=128, tensor=1, sequence=1),
        train=dataclasses.replace(exp.train, batch_size=128, grad_accum=1, seq_len=32768),
    )
    cands = aot.fit_candidates(exp, 128, "train")
    cp = [(c.mesh.fsdp, c.mesh.sequence, c.train.batch_size, c.train.grad_accum)
          for c in cands if c.mesh.sequence > 1]  # fmt: skip
    # fewest ways first, the global batch kept through accumulation; at most 2K tokens a chip
    assert cp == [(-1, 2, 128, 2), (-1, 4, 128, 4), (-1, 8, 128, 8), (-1, 16, 128, 16)]

    def fake_plan(cand, topology, mode, *, count_flops, devices):
        sizes = aot.sh.resolve_mesh_shape(cand.mesh.axis_sizes, 128)
        rows = cand.train.batch_size // cand.train.grad_accum // (sizes["data"] * sizes["fsdp"])
        tokens = rows * cand.train.seq_len // sizes["sequence"]
        return dataclasses.replace(
            _plan(), temp_bytes=int(4.25 * tokens / 1024 * aot.GiB), argument_bytes=0,
            output_bytes=0, alias_bytes=0, hbm_bytes=50 * aot.GiB, mesh=sizes,
        )  # fmt: skip

    monkeypatch.setattr(aot, "plan", fake_plan)
    # 32K tokens a chip: 136 GiB, 16K: 68 GiB, 8K: 34 GiB of a (made-up) 50 GiB chip
    g = aot.suggest_fit(exp, "v5p-256", "train", devices=[object()] * 128)
    assert g["mesh"]["sequence"] == 4 and g["mesh"]["fsdp"] == 32, g
    assert "--mesh fsdp=32 sequence=4 --global-batch 128" in g["flags"]
    assert "train.grad_accum=4" in g["flags"]
    # nothing to try says so in words, not "none of the 0 variants"
    p = _plan(suggestion={"tried": 0})
    assert "no variant to try" in p.report() and "0 variants" not in p.report()


def test_suggested_flags_rebuild_the_suggested_experiment():
    """The printed flags are a working command: --global-batch keeps an explicit grad_accum."""
    exp = _tiny_experiment()
    exp = exp.replace(
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1, sequence=1),
        runtime=exp.runtime.replace(remat="full"),
        train=dataclasses.replace(exp.train, batch_size=32, grad_accum=4),
    )
    flags = aot._flags(exp, 8, "train").split()
    ns = aot.build_parser().parse_args(["--preset", "tiny", "--topology", "v5e-8", *flags])
    got = aot.build_experiment(ns)
    assert got.train.batch_size == 32 and got.train.grad_accum == 4
    assert got.runtime.remat.value == "full"
    assert aot.sh.resolve_mesh_shape(got.mesh.axis_sizes, 8)["fsdp"] == 8


def test_preset_plans_use_the_recipe_remat_unless_told():
    """`--preset loop40b` plans the shipped recipe's remat, not RuntimeConfig's `none`."""
    parse = lambda *flags: aot.build_experiment(
        aot.build_parser().parse_args(["--preset", *flags, "--topology", "v5p-128"])
    )
    for name, remat in aot.PRESET_REMAT.items():
        assert parse(name).runtime.remat == remat
    assert parse("loop40b", "--remat", "none").runtime.remat.value == "none"
    assert parse("loop40b", "--set", "runtime.remat=dots").runtime.remat.value == "dots"
    assert parse("tiny").runtime.remat.value == "none"


# ---------------------------------------------------------------------------- remat table
def test_remat_table_counts_only_what_fits_and_reports_errors(monkeypatch):
    calls = []

    def fake_plan(variant, topology, mode, *, count_flops, devices, count_only_if_fits,
                  attention_cost):  # fmt: skip
        assert attention_cost == "kernel"  # the planner's default charge, passed through
        r = variant.runtime.remat.value
        if r == "offload_qkv_out":
            raise jax.errors.JaxRuntimeError("INVALID_ARGUMENT: no pinned_host memory space")
        temp = {"none": 40, "full": 2}.get(r, 10) * GIB
        counted = count_flops and not (count_only_if_fits and temp > 16 * GIB)
        calls.append((r, counted))
        return _plan(temp_bytes=temp, remat=r, hbm_bytes=16 * GIB, analytic_flops_causal=5e15,
                     optimal_seconds=2.0 if counted else None)  # fmt: skip

    monkeypatch.setattr(aot, "plan", fake_plan)
    rows = aot.remat_table(_tiny_experiment(), "v5e-8", devices=[object()] * 8)
    assert [name for name, _ in rows] == [r.value for r in aot.Remat]
    got = dict(rows)
    assert isinstance(got["offload_qkv_out"], str) and "pinned_host" in got["offload_qkv_out"]
    assert not got["none"].fits and got["none"].optimal_seconds is None
    assert got["full"].fits and got["full"].optimal_seconds == 2.0
    assert ("none", True) not in calls and ("full", True) in calls  # count only what fits
    assert len(calls) == len(aot.Remat) - 1  # one plan per policy (offload raised)
    text = aot.format_remat_table(rows)
    assert "cannot compile" in text and "no estimate" in text and "MFU causal / full" in text


@needs_libtpu
def test_count_only_if_fits_compiles_a_plan_that_does_not_fit_once(monkeypatch):
    """The sweep's plans: no counting compiles (two more full-width compiles each for a 40B
    model) for a policy whose memory already rules it out."""
    small = dataclasses.replace(aot.GENERATIONS["v5e"], hbm_bytes=1)
    monkeypatch.setitem(aot.GENERATIONS, "v5e", small)

    def no_counting(*args, **kwargs):
        raise AssertionError("counted a plan that does not fit")

    monkeypatch.setattr(aot, "_counting_cost", no_counting)
    exp = _tiny_experiment().replace(mesh=MeshConfig(data=1, fsdp=8, tensor=1, sequence=1))
    p = aot.plan(exp, "v5e-8", count_only_if_fits=True)
    assert not p.fits and any("not counted" in n for n in p.notes)
    assert p.compiled_flops_per_chip is None and not p.has_estimate


@pytest.mark.slow
@needs_libtpu
def test_every_remat_policy_compiles_for_tpu():
    """Each named policy (host offload included) compiles for v5p-8 with head_dim 128."""
    exp = _tiny_experiment()
    model = exp.model.replace(
        hidden_size=256, num_attention_heads=2, num_key_value_heads=2, head_dim=128
    )
    exp = exp.replace(model=model, mesh=MeshConfig(data=1, fsdp=4, tensor=1, sequence=1))
    rows = aot.remat_table(exp, "v5p-8", count_flops=False)
    errors = {name: p for name, p in rows if isinstance(p, str)}
    assert errors == {}, errors
    plans = dict(rows)
    assert plans["full"].temp_bytes <= plans["none"].temp_bytes


@needs_libtpu
@pytest.mark.slow
def test_shipped_loop40b_yaml_fits_v5p_128_at_8k():
    """Shipped configs are working recipes (issue 12): the YAML's own mesh and batch, no
    flags but the slice and length. Minutes of host compile on a 2-core box (75.7 GiB with
    the YAML's save_qkv remat)."""
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "loop40b.yaml")
    exp = ExperimentConfig.from_yaml(path)
    exp = exp.replace(train=dataclasses.replace(exp.train, seq_len=8192))
    p = aot.plan(exp, "v5p-128", "train", count_flops=False)
    assert p.fits, p.report()


@pytest.mark.parametrize(
    "platform,attn,charge,want",
    [
        ("tpu", "auto", "kernel", (False, True, "auto")),
        ("tpu", "splash", "kernel", (False, True, "splash")),
        ("tpu", "auto", "dense", (True, False, "xla")),
        ("tpu", "splash", "dense", (True, False, "xla")),
        ("tpu", "xla", "kernel", (False, False, "xla")),
        ("cpu", "auto", "kernel", (False, False, "xla")),
        ("cpu", "auto", "dense", (False, False, "xla")),
    ],
)
def test_counting_compiles_charge_splash_as_told(monkeypatch, platform, attn, charge, want):
    """A program that runs splash on the TPU is costed as `attention_cost` says: "kernel"
    traces the splash program with kernels/splash_cost.py's kernels, "dense" traces
    kernels/cost_standin.py's XLA attention; one that really runs XLA attention (attn=xla,
    or not a TPU) is costed as it is."""
    from loopcoder_jax.kernels import cost_standin

    seen = []

    class _Compiled:
        def cost_analysis(self):
            return {"flops": 1.0, "optimal_seconds": 2.0, "bytes accessed": 3.0}

    class _Lowered:
        def compile(self, compiler_options=None):
            return _Compiled()

    def fake_lower(exp, mesh, rules, mode):
        seen.append(
            (cost_standin.active(), cost_standin.kernel_charge(), exp.runtime.attn_impl.value)
        )
        return _Lowered()

    class _Dev:
        pass

    dev = _Dev()
    dev.platform = platform
    monkeypatch.setattr(aot, "_lower", fake_lower)
    exp = _tiny_experiment()
    exp = exp.replace(runtime=exp.runtime.replace(attn_impl=attn))
    assert aot._counting_cost(exp, 1, None, None, "train", [dev], charge) == (1.0, 2.0)
    assert seen == [want]
    assert not cost_standin.active() and not cost_standin.kernel_charge()
    with pytest.raises(aot.PlannerError, match="choose one of"):
        aot._counting_cost(exp, 1, None, None, "train", [dev], "flash")
