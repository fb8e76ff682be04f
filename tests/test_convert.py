"""HF safetensors <-> Orbax conversion against the independent torch reference.

Checkpoints are written in the official HF layout by `tests/reference/torch_loopcoder.py`
(single file and 3 shards, float32 and bfloat16), converted with `loopcoder_jax.convert` (which
never imports torch), and checked by logits against torch and by bit identity on round trips.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopcoder_jax import checkpoint as ckpt
from loopcoder_jax import convert
from loopcoder_jax import sharding as sh
from tests.convert_support import ATOL, bits, hf_config, jax_logits, read_all

torch = pytest.importorskip("torch")
from tests.reference.torch_loopcoder import (  # noqa: E402
    TorchLoopCoder,
    llama_forward,
    save_hf_checkpoint_torch,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = np.random.default_rng(0).integers(0, 128, (2, 12))
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture(autouse=True, scope="module")
def _single_thread_torch():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def torch_model():
    return TorchLoopCoder(hf_config()).init_random_(0, gate_scale=0.5).eval()


@pytest.fixture(scope="module")
def hf_dirs(torch_model, tmp_path_factory):
    """{(num_shards, dtype key): HF checkpoint dir} written by the torch reference."""
    out = {}
    for shards in (1, 3):
        for key, dtype in DTYPES.items():
            d = str(tmp_path_factory.mktemp(f"hf-{shards}-{key}"))
            save_hf_checkpoint_torch(torch_model, hf_config(), d, num_shards=shards, dtype=dtype)
            out[shards, key] = d
    return out


def torch_logits(model: TorchLoopCoder, dtype) -> np.ndarray:
    """Logits of the torch model computed in float32 with weights rounded to `dtype`."""
    rounded = TorchLoopCoder(model.cfg).eval()
    rounded.load_state_dict({k: v.to(dtype).float() for k, v in model.state_dict().items()})
    with torch.no_grad():
        return rounded(torch.tensor(IDS)).numpy()


@pytest.mark.parity
@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("key", ["f32", "bf16"])
def test_hf_checkpoint_logits_match_torch(hf_dirs, torch_model, shards, key):
    cfg, params = convert.load_hf_checkpoint(hf_dirs[shards, key], dtype="float32")
    assert cfg.loop_num == 2 and cfg.num_hidden_layers == 2
    ours = jax_logits(cfg, params, IDS)
    ref = torch_logits(torch_model, DTYPES[key])
    assert np.abs(ours - ref).max() < ATOL
    # Sensitivity: the other dtype's rounding (or a zeroed gate) is visible at this tolerance.
    other = torch_logits(torch_model, DTYPES["bf16" if key == "f32" else "f32"])
    assert np.abs(ours - other).max() > 10 * ATOL


def test_load_keeps_bf16_and_stored_bits(hf_dirs):
    cfg, params = convert.load_hf_checkpoint(hf_dirs[3, "bf16"])
    assert cfg.torch_dtype == "bfloat16"
    assert {str(x.dtype) for x in jax.tree.leaves(params)} == {"bfloat16"}
    stored = read_all(hf_dirs[3, "bf16"])
    q = params["layers"]["self_attn"]["q_proj"]["kernel"]  # [L, D, N, H]
    hf_q1 = stored["model.layers.1.self_attn.q_proj.weight"]  # [N*H, D]
    np.testing.assert_array_equal(bits(q[1].reshape(64, 64).T), bits(hf_q1))
    gate = params["layers"]["self_attn"]["loop_gate"]
    np.testing.assert_array_equal(
        bits(gate["bias"][0]), bits(stored["model.gate_projections.0.bias"])
    )


@pytest.mark.parametrize("src", [(1, "bf16"), (3, "f32")])
def test_round_trip_hf_orbax_hf_is_bit_identical(hf_dirs, tmp_path, src):
    # Tiny piece size: several Orbax groups, layer slabs split across groups.
    convert.hf_to_orbax(hf_dirs[src], tmp_path / "ox", piece_bytes=6000)
    assert len([g for g in os.listdir(tmp_path / "ox" / "params") if g.startswith("g")]) > 3
    convert.orbax_to_hf(tmp_path / "ox", tmp_path / "hf", max_shard_size="40KB")
    before, after = read_all(hf_dirs[src]), read_all(str(tmp_path / "hf"))
    assert sorted(before) == sorted(after)
    for name, x in before.items():
        assert after[name].dtype == x.dtype and after[name].shape == x.shape, name
        np.testing.assert_array_equal(bits(after[name]), bits(x), err_msg=name)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["IQuestLoopCoderForCausalLM"]
    assert config["torch_dtype"] == {"bf16": "bfloat16", "f32": "float32"}[src[1]]


def test_round_trip_orbax_hf_orbax_is_bit_identical(tiny_config, tmp_path):
    rng = np.random.default_rng(1)
    abstract = ckpt.abstract_params(tiny_config)
    params = jax.tree.map(
        lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.bfloat16), abstract
    )
    ckpt.save_params(tmp_path / "a", tiny_config, params, group_bytes=20_000)
    convert.orbax_to_hf(tmp_path / "a", tmp_path / "hf", max_shard_size="100KB")
    convert.hf_to_orbax(tmp_path / "hf", tmp_path / "b")
    cfg_a, a = ckpt.load_params(tmp_path / "a")
    cfg_b, b = ckpt.load_params(tmp_path / "b")
    assert cfg_a == cfg_b.replace(torch_dtype=cfg_a.torch_dtype)
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y), (_, z) in zip(
        flat_a, flat_b, jax.tree_util.tree_leaves_with_path(params), strict=True
    ):
        assert x.dtype == y.dtype == jnp.bfloat16, path
        np.testing.assert_array_equal(bits(x), bits(y), err_msg=str(path))
        np.testing.assert_array_equal(bits(x), bits(z), err_msg=str(path))


@pytest.mark.parity
def test_our_hf_checkpoint_loads_strictly_in_torch(hf_dirs, torch_model, tmp_path):
    """What we write has exactly the official names/shapes/layout (torch strict load)."""
    from safetensors.torch import load_file

    cfg, params = convert.load_hf_checkpoint(hf_dirs[1, "f32"])
    files = convert.save_hf_checkpoint(cfg, params, tmp_path / "hf", max_shard_size="50KB")
    assert len(files) > 1
    state = {}
    for f in files:
        state.update(load_file(str(tmp_path / "hf" / f)))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    reloaded = TorchLoopCoder(config).eval()
    reloaded.load_state_dict(state, strict=True)
    with torch.no_grad():
        got = reloaded(torch.tensor(IDS)).numpy()
    assert np.abs(got - torch_logits(torch_model, torch.float32)).max() == 0.0


@pytest.mark.parity
@pytest.mark.parametrize("tied", [False, True])
def test_dense_checkpoint_matches_plain_llama(tmp_path, tied):
    hf = hf_config(loop_num=1, num_hidden_layers=3, tie_word_embeddings=tied)
    model = TorchLoopCoder(hf).init_random_(3, std=0.1).eval()
    save_hf_checkpoint_torch(model, hf, tmp_path / "dense", num_shards=2)
    cfg, params = convert.load_hf_checkpoint(tmp_path / "dense")
    assert cfg.loop_num == 1 and not cfg.has_gate
    assert "loop_gate" not in params["layers"]["self_attn"]
    assert ("lm_head" in params) is not tied
    ref = llama_forward(model.state_dict(), hf, torch.tensor(IDS)).numpy()
    assert np.abs(jax_logits(cfg, params, IDS) - ref).max() < ATOL
    files = convert.save_hf_checkpoint(cfg, params, tmp_path / "out")
    assert files == ["model.safetensors"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert sorted(read_all(str(tmp_path / "out"))) == sorted(model.state_dict())


def test_restore_onto_a_mesh(hf_dirs, tmp_path):
    """The converted checkpoint restores onto a 4x2 fsdp/tensor mesh, sharded as asked."""
    convert.hf_to_orbax(hf_dirs[3, "f32"], tmp_path / "ox", piece_bytes=6000)
    cfg = ckpt.load_config(tmp_path / "ox")
    mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"))
    shardings = sh.param_shardings(ckpt.abstract_params(cfg, boxed=True), mesh, sh.FSDP_TP)
    _, sharded = ckpt.load_params(tmp_path / "ox", shardings=shardings, dtype="bfloat16")
    _, expected = convert.load_hf_checkpoint(hf_dirs[3, "f32"], dtype="bfloat16")
    for (path, x), s in zip(
        jax.tree_util.tree_leaves_with_path(sharded), jax.tree.leaves(shardings), strict=True
    ):
        assert x.sharding == s and x.dtype == jnp.bfloat16, path
        want = expected
        for k in path:
            want = want[k.key]
        np.testing.assert_array_equal(bits(x), bits(want), err_msg=str(path))
    mlp = sharded["layers"]["mlp"]["up_proj"]["kernel"]  # [L, D, F]: D on fsdp, F on tensor
    assert mlp.addressable_shards[0].data.shape == (2, 16, 48)
    # Layers themselves sharded (pipeline-style, L = 2 over 2 devices), others replicated: the
    # one-layer slabs of the checkpoint are reassembled onto it.
    mesh2 = jax.make_mesh((2, 4), ("stage", "rest"))
    by_layer = jax.tree.map(
        lambda s, x: jax.sharding.NamedSharding(
            mesh2, jax.sharding.PartitionSpec("stage" if x.ndim >= 2 and x.shape[0] == 2 else None)
        ),
        shardings,
        ckpt.abstract_params(cfg),
    )
    by_layer["embed_tokens"]["embedding"] = jax.sharding.NamedSharding(
        mesh2, jax.sharding.PartitionSpec()
    )
    _, staged = ckpt.load_params(tmp_path / "ox", shardings=by_layer)
    q = staged["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.addressable_shards[0].data.shape == (1, 64, 4, 16)
    assert q.dtype == jnp.float32  # the stored dtype
    _, expected32 = convert.load_hf_checkpoint(hf_dirs[3, "f32"])
    np.testing.assert_array_equal(
        bits(q), bits(expected32["layers"]["self_attn"]["q_proj"]["kernel"])
    )


def test_cli_round_trip_and_error_exit(hf_dirs, tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "loopcoder_jax.convert", *a],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # The first conversion runs with torch made unimportable: TPU VMs do not have it.
    no_torch = (
        "import sys; sys.modules['torch'] = None; from loopcoder_jax.convert import main; "
        "sys.exit(main(sys.argv[1:]))"
    )
    a = subprocess.run(
        [
            sys.executable,
            "-c",
            no_torch,
            "hf-to-orbax",
            hf_dirs[3, "bf16"],
            str(tmp_path / "ox"),
            "--dtype",
            "float32",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert a.returncode == 0, a.stderr
    summary = json.loads(a.stdout.strip().splitlines()[-1])
    assert summary["tensors"] == 25 and summary["bytes"] > 0 and summary["MB_per_s"] > 0
    assert summary["dtype"] == "float32"
    b = run("orbax-to-hf", str(tmp_path / "ox"), str(tmp_path / "hf"), "--dtype", "bfloat16")
    assert b.returncode == 0, b.stderr
    before, after = read_all(hf_dirs[3, "bf16"]), read_all(str(tmp_path / "hf"))
    for name, x in before.items():  # bf16 -> f32 -> bf16 is exact
        np.testing.assert_array_equal(bits(after[name]), bits(x), err_msg=name)
    c = run("hf-to-orbax", hf_dirs[3, "bf16"], str(tmp_path / "ox"))  # exists: refused
    assert c.returncode == 2 and "already exists" in c.stderr and "Traceback" not in c.stderr


def test_load_params_reads_single_tree_layout_and_keeps_dtype(tiny_config, tmp_path):
    """Checkpoints written by the earlier save_params (one Orbax tree) still load, and a bf16
    leaf stays bf16 unless a dtype is asked for."""
    import orbax.checkpoint as ocp

    rng = np.random.default_rng(5)
    params = jax.tree.map(
        lambda x: np.asarray(rng.standard_normal(x.shape), jnp.bfloat16),
        ckpt.abstract_params(tiny_config),
    )
    params["norm"]["scale"] = params["norm"]["scale"].astype(np.float32)  # mixed dtypes
    saver = ocp.StandardCheckpointer()
    saver.save(str(tmp_path / "old" / "params"), params)
    saver.wait_until_finished()
    ckpt.write_json_atomic(tmp_path / "old" / "config.json", tiny_config.to_hf())
    _, got = ckpt.load_params(tmp_path / "old")
    assert got["layers"]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16
    assert got["norm"]["scale"].dtype == jnp.float32
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(bits(x), bits(y))
    _, cast = ckpt.load_params(tmp_path / "old", dtype="float32")
    assert {str(x.dtype) for x in jax.tree.leaves(cast)} == {"float32"}
    convert.orbax_to_hf(tmp_path / "old", tmp_path / "hf")  # and exports
    assert read_all(str(tmp_path / "hf"))["model.norm.weight"].dtype == np.float32


@pytest.mark.slow
def test_streaming_memory_does_not_grow_with_the_largest_leaf(tmp_path):
    """hf-to-orbax never holds a whole stacked leaf: its RSS above the bare import stays below
    the size of the largest leaf (measured ~210 MB for a 384 MB leaf with --piece-mb 16; the
    multi-GB figure is bench/convert.py's)."""
    sys.path.insert(0, REPO)
    from bench.convert import synthetic_config, write_synthetic  # noqa: PLC0415

    args = type("A", (), dict(layers=24, hidden=1024, intermediate=8192, vocab=4096))
    cfg = synthetic_config(args)
    write_synthetic(cfg, str(tmp_path / "hf"))
    largest_mb = 24 * 1024 * 8192 * 2 / 2**20  # 384 MB per MLP leaf
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    run = lambda *cmd: subprocess.run(  # noqa: E731
        ["/usr/bin/time", "-f", "%M", *cmd], env=env, cwd=REPO, capture_output=True, text=True
    )
    base = run(sys.executable, "-c", "import jax, loopcoder_jax.convert; jax.devices()")
    conv = run(
        sys.executable,
        "-m",
        "loopcoder_jax.convert",
        "hf-to-orbax",
        str(tmp_path / "hf"),
        str(tmp_path / "ox"),
        "--no-progress",
        "--piece-mb",
        "16",
    )
    assert conv.returncode == 0, conv.stderr
    base_mb = int(base.stderr.split()[-1]) / 1024
    peak_mb = int(conv.stderr.split()[-1]) / 1024
    print(f"peak {peak_mb:.0f} MB, import {base_mb:.0f} MB, largest leaf {largest_mb:.0f} MB")
    # Holding the leaf whole would cost it once plus Orbax's ~2x working copy on top.
    assert peak_mb - base_mb < largest_mb, (peak_mb, base_mb)


@pytest.mark.slow
def test_two_process_save_and_reshard_restore(tmp_path):
    """save_params from 2 jax.distributed processes (8 devices, fsdp x tensor = 4 x 2) writes
    one checkpoint; it restores onto another mesh in both processes and here (1 process)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("XLA_FLAGS", None)
    worker = os.path.join(REPO, "tests", "convert_multiprocess_worker.py")
    procs = [
        subprocess.Popen(
            [sys.executable, worker, str(i), str(port), str(tmp_path)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    results = [
        json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])
        for out, _ in outs
    ]
    assert results[0] == results[1]
    r = results[0]
    assert r["bit_equal"] and r["dtype"] == "bfloat16"
    assert r["mesh"] == {"fsdp": 8, "tensor": 1} and r["local_shard"] == [2, 16, 384]
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # committed once, no temp dirs left
    _, here = ckpt.load_params(tmp_path / "ckpt")
    flat = jax.tree_util.tree_leaves_with_path(here)
    assert sorted(jax.tree_util.keystr(p) for p, _ in flat) == sorted(r["saved"])
    emb = np.asarray(here["embed_tokens"]["embedding"], np.float32).reshape(-1)
    want = float(np.sum(emb * np.cos(np.arange(emb.size, dtype=np.float32))))
    assert abs(want - r["saved"]["['embed_tokens']['embedding']"]) < 1e-3 * max(1, abs(want))
