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
from convert_support import ATOL, bits, hf_config, jax_logits, read_all

from loopcoder_jax import checkpoint as ckpt
from loopcoder_jax import convert
from loopcoder_jax import sharding as sh

torch = pytest.importorskip("torch")
from reference.torch_loopcoder import (  # noqa: E402
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
    a = run("hf-to-orbax", hf_dirs[3, "bf16"], str(tmp_path / "ox"), "--dtype", "float32")
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
