"""Dense-to-loop folding: the strategies' layer maps, and a folded model against a dense torch
Llama it must equal exactly (DESIGN.md: loop 1 with g = 0 and W >= T is a second pass of the same
layers, i.e. a dense 2L-layer model whose top half repeats the bottom half)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from convert_support import ATOL, bits, hf_config, jax_logits

from loopcoder_jax import checkpoint as ckpt
from loopcoder_jax import convert
from loopcoder_jax.config import ModelConfig
from loopcoder_jax.convert import CheckpointError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = np.random.default_rng(2).integers(0, 128, (2, 12))


def layered_dense(num_layers: int = 4):
    """Dense params whose stacked leaves hold the value d in every entry of layer d."""
    cfg = ModelConfig.from_hf(hf_config(loop_num=1, num_hidden_layers=num_layers))
    abstract = ckpt.abstract_params(cfg)
    params = {}
    for path, x in convert._leaf_rows(cfg).items():
        leaf = abstract
        for k in path:
            leaf = leaf[k]
        if x[2]:
            value = np.arange(num_layers, dtype=np.float32).reshape(-1, *[1] * (leaf.ndim - 1))
            arr = np.broadcast_to(value, leaf.shape).copy()
        else:
            arr = np.full(leaf.shape, 7.0, np.float32)
        convert._set(params, path, arr)
    return cfg, params


@pytest.mark.parametrize(
    "strategy,expected",
    [
        ("first", [0.0, 1.0]),
        ("average", [1.0, 2.0]),  # (0 + 2) / 2, (1 + 3) / 2
        ("average-adjacent", [0.5, 2.5]),  # (0 + 1) / 2, (2 + 3) / 2
        ("stride", [0.0, 2.0]),
    ],
)
def test_strategies_map_layers(strategy, expected):
    dense_cfg, dense = layered_dense(4)
    cfg, params = convert.fold_dense_to_loop(dense_cfg, dense, strategy, 2, 2, gate_init=-1.5)
    assert cfg.num_hidden_layers == 2 and cfg.loop_num == 2 and cfg.has_gate
    for name in ("q_proj", "o_proj"):
        kernel = params["layers"]["self_attn"][name]["kernel"]
        assert kernel.shape[0] == 2
        assert [float(kernel[i].min()) for i in range(2)] == expected
        assert [float(kernel[i].max()) for i in range(2)] == expected
    assert float(params["layers"]["mlp"]["down_proj"]["kernel"][1].mean()) == expected[1]
    gate = params["layers"]["self_attn"]["loop_gate"]
    assert gate["kernel"].shape == (2, 4, 16) and not gate["kernel"].any()
    assert gate["bias"].shape == (2, 4) and (gate["bias"] == -1.5).all()
    np.testing.assert_array_equal(params["embed_tokens"]["embedding"], 7.0)


def test_bad_fold_requests():
    dense_cfg, dense = layered_dense(4)
    with pytest.raises(CheckpointError, match="divide"):
        convert.fold_dense_to_loop(dense_cfg, dense, "average", 3, 2)
    with pytest.raises(CheckpointError, match="between 1 and"):
        convert.fold_dense_to_loop(dense_cfg, dense, "first", 5, 2)
    with pytest.raises(CheckpointError, match="choose"):
        convert.fold_dense_to_loop(dense_cfg, dense, "median", 2, 2)
    loop_cfg, loop = convert.fold_dense_to_loop(dense_cfg, dense, "first", 2, 2)
    with pytest.raises(CheckpointError, match="dense"):
        convert.fold_dense_to_loop(loop_cfg, loop, "first", 1, 2)
    # 'first' does not need a divisor.
    cfg, _ = convert.fold_dense_to_loop(dense_cfg, dense, "first", 3, 2)
    assert cfg.num_hidden_layers == 3


@pytest.fixture(scope="module")
def doubled_dense(tmp_path_factory):
    """A dense 4-layer HF checkpoint whose layers 2, 3 repeat layers 0, 1, and its torch state."""
    torch = pytest.importorskip("torch")
    from reference.torch_loopcoder import TorchLoopCoder, save_hf_checkpoint_torch

    torch.set_num_threads(1)
    half = TorchLoopCoder(hf_config(loop_num=1, num_hidden_layers=2)).init_random_(4, std=0.1)
    hf = hf_config(loop_num=1, num_hidden_layers=4)
    dense = TorchLoopCoder(hf).eval()
    state = dict(half.state_dict())
    for name, value in half.state_dict().items():
        if name.startswith("model.layers."):
            i, rest = name[len("model.layers.") :].split(".", 1)
            state[f"model.layers.{int(i) + 2}.{rest}"] = value
    dense.load_state_dict(state, strict=True)
    path = str(tmp_path_factory.mktemp("dense") / "hf")
    save_hf_checkpoint_torch(dense, hf, path, num_shards=2)
    return path, state, hf


@pytest.mark.parity
def test_folded_loop_model_equals_doubled_dense_llama(doubled_dense, tmp_path):
    import torch
    from reference.torch_loopcoder import llama_forward

    path, state, hf = doubled_dense
    ref = llama_forward(state, hf, torch.tensor(IDS)).numpy()
    # g = sigmoid(-30) ~ 1e-13: loop 1 attends locally with W = T, i.e. causally to its own K/V.
    convert.fold_checkpoint(
        path,
        tmp_path / "loop",
        strategy="average",
        num_layers=2,
        gate_init=-30.0,
        loop_window_size=IDS.shape[1],
        piece_bytes=20_000,
    )
    cfg, params = ckpt.load_params(tmp_path / "loop")
    assert cfg.loop_num == 2 and cfg.num_hidden_layers == 2
    assert np.abs(jax_logits(cfg, params, IDS) - ref).max() < ATOL
    # Sensitivity: the all-global gate reads the loop-0 K/V instead, which is different.
    glob_cfg, glob = convert.fold_dense_to_loop(
        *convert.load_hf_checkpoint(path),
        "average",
        2,
        2,
        gate_init=30.0,
        loop_window_size=IDS.shape[1],
    )
    assert np.abs(jax_logits(glob_cfg, glob, IDS) - ref).max() > 1e-3


@pytest.mark.parametrize("source", ["hf", "orbax"])
def test_streaming_fold_equals_python_api(doubled_dense, tmp_path, source):
    path = doubled_dense[0]
    if source == "orbax":
        convert.hf_to_orbax(path, tmp_path / "dense-ox")
        src = tmp_path / "dense-ox"
    else:
        src = path
    convert.fold_checkpoint(
        src,
        tmp_path / "loop",
        strategy="average-adjacent",
        num_layers=2,
        gate_init=0.25,
        dtype="bfloat16",
        piece_bytes=10_000,
    )
    cfg, got = ckpt.load_params(tmp_path / "loop")
    # Averages are taken in float32 from the stored (float32) layers, then cast.
    dense_cfg, dense = convert.load_hf_checkpoint(path)
    want_cfg, want = convert.fold_dense_to_loop(
        dense_cfg, dense, "average-adjacent", 2, 2, gate_init=0.25
    )
    want = convert._cast_tree(want, convert.DTYPE_NAMES["bfloat16"])
    assert cfg == want_cfg.replace(torch_dtype="bfloat16")
    for p, (_, _, _) in convert._leaf_rows(cfg).items():
        x, y = got, want
        for k in p:
            x, y = x[k], y[k]
        assert x.dtype == y.dtype and x.shape == y.shape, p
        np.testing.assert_array_equal(bits(x), bits(y), err_msg=str(p))


def test_fold_cli(doubled_dense, tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    cmd = [
        sys.executable,
        "-m",
        "loopcoder_jax.convert",
        "fold",
        doubled_dense[0],
        str(tmp_path / "loop"),
        "--strategy",
        "first",
        "--num-layers",
        "3",
        "--gate-init",
        "1.0",
        "--no-progress",
    ]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["sources"] == [[0], [1], [2]]
    cfg, params = ckpt.load_params(tmp_path / "loop")
    assert cfg.num_hidden_layers == 3 and cfg.loop_num == 2
    np.testing.assert_allclose(params["layers"]["self_attn"]["loop_gate"]["bias"], 1.0)
    bad = subprocess.run(
        cmd[:-7] + ["--strategy", "average", "--num-layers", "3"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "divide" in bad.stderr
