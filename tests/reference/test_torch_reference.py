"""Self-consistency tests of the PyTorch LoopCoder reference (tests/reference/torch_loopcoder.py).

The reference is the oracle for the JAX parity tests, so each property here is checked against a
second computation (dense Llama, separate cached decoder, separate segment runs) and every test
also asserts the difference it relies on is visible, so a broken reference cannot pass silently.
"""

from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from .torch_loopcoder import (  # noqa: E402
    TorchLoopCoder,
    causal_mask,
    llama_forward,
    masked_attention,
    rope_cos_sin,
    save_hf_checkpoint_torch,
    window_mask,
)

ATOL = 1e-5
W = 4


@pytest.fixture(autouse=True, scope="module")
def _single_thread_torch():
    # The tensors are tiny; intra-op threads only add spin contention (10x slower on a busy box).
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def tiny_config(**overrides) -> dict:
    cfg = {
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "loop_num": 2,
        "loop_window_size": W,
        "tie_word_embeddings": False,
    }
    cfg.update(overrides)
    return cfg


def make_model(seed: int = 0, **overrides) -> TorchLoopCoder:
    return TorchLoopCoder(tiny_config(**overrides)).init_random_(seed).eval()


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (batch, length), generator=gen)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --- parameter names ------------------------------------------------------------------------------


@pytest.mark.parametrize("loop_num,tied", [(1, False), (2, False), (3, True)])
def test_state_dict_has_official_names(loop_num, tied):
    cfg = tiny_config(loop_num=loop_num, tie_word_embeddings=tied)
    sd = TorchLoopCoder(cfg).state_dict()
    expected = {"model.embed_tokens.weight": (128, 64), "model.norm.weight": (64,)}
    if not tied:
        expected["lm_head.weight"] = (128, 64)
    for i in range(2):
        p = f"model.layers.{i}."
        expected[p + "self_attn.q_proj.weight"] = (64, 64)
        expected[p + "self_attn.k_proj.weight"] = (32, 64)
        expected[p + "self_attn.v_proj.weight"] = (32, 64)
        expected[p + "self_attn.o_proj.weight"] = (64, 64)
        expected[p + "mlp.gate_proj.weight"] = (96, 64)
        expected[p + "mlp.up_proj.weight"] = (96, 64)
        expected[p + "mlp.down_proj.weight"] = (64, 96)
        expected[p + "input_layernorm.weight"] = (64,)
        expected[p + "post_attention_layernorm.weight"] = (64,)
        if loop_num >= 2:
            expected[f"model.gate_projections.{i}.weight"] = (4, 16)
            expected[f"model.gate_projections.{i}.bias"] = (4,)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_init_random_is_deterministic_and_gate_is_not_half():
    a, b, c = make_model(seed=3), make_model(seed=3), make_model(seed=4)
    for name, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[name]), name
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    norm_w = a.model.layers[0].input_layernorm.weight
    assert 0.05 < (norm_w - 1).std().item() < 0.2
    # Gate values on real activations must be spread well away from 0.5.
    ids = random_ids(1, 16)
    with torch.no_grad():
        h = a.model.embed_tokens(ids)
        cos_sin = _rope_for(a, 16)
        q, _, _ = a._qkv(a.model.layers[0], h, *cos_sin)
        g = a.model.gate_projections[0](q)
    assert (g - 0.5).abs().max().item() > 0.2


def _rope_for(model: TorchLoopCoder, t: int):
    return rope_cos_sin(torch.arange(t)[None], model.cfg["head_dim"], model.cfg["rope_theta"])


# --- loop_num = 1 is plain Llama ------------------------------------------------------------------


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])  # GQA ratio 1, 2 and 4
@pytest.mark.parametrize("tied", [False, True])
def test_llama_forward_equals_loop1(num_kv_heads, tied):
    cfg = tiny_config(loop_num=1, num_key_value_heads=num_kv_heads, tie_word_embeddings=tied)
    model = TorchLoopCoder(cfg).init_random_(5, std=0.1).eval()
    ids = random_ids(2, 24)
    with torch.no_grad():
        ours = model(ids)
    ref = llama_forward(model.state_dict(), cfg, ids)
    assert ours.dtype == torch.float32 and ours.shape == (2, 24, 128)
    assert max_diff(ours, ref) < ATOL
    # Sensitivity: a second loop (same weights) must change the output.
    looped = TorchLoopCoder(dict(cfg, loop_num=2)).init_random_(5, std=0.1).eval()
    looped.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        assert max_diff(looped(ids), ref) > 1e-3


def test_loop2_with_pure_local_gate_equals_doubled_llama():
    """g = 0 and W >= T: loop 1 is plain causal attention on its own K/V, so a 2-loop model
    equals a dense 2L-layer Llama whose layers L..2L-1 repeat layers 0..L-1 (one final norm)."""
    t = 12
    cfg = tiny_config(loop_num=2, loop_window_size=t)
    model = TorchLoopCoder(cfg).init_random_(6, std=0.1).eval()
    with torch.no_grad():
        for gate in model.model.gate_projections:
            gate.bias.fill_(-1e4)  # sigmoid == 0 exactly in float32
    sd = model.state_dict()
    n_layers = cfg["num_hidden_layers"]
    dense = {k: v for k, v in sd.items() if "gate_projections" not in k}
    for name, value in sd.items():
        if name.startswith("model.layers."):
            i, rest = name[len("model.layers.") :].split(".", 1)
            dense[f"model.layers.{int(i) + n_layers}.{rest}"] = value
    dense_cfg = dict(cfg, num_hidden_layers=2 * n_layers, loop_num=1)
    ids = random_ids(2, t)
    with torch.no_grad():
        ours = model(ids)
    assert max_diff(ours, llama_forward(dense, dense_cfg, ids)) < ATOL
    # Sensitivity: the all-global gate (g = 1) reads loop-0 K/V instead and must differ.
    with torch.no_grad():
        for gate in model.model.gate_projections:
            gate.bias.fill_(1e4)
        assert max_diff(model(ids), ours) > 1e-3


# --- cached decoding == full forward --------------------------------------------------------------


@pytest.mark.parametrize("loop_num", [2, 3])
@pytest.mark.parametrize("prompt_len", [3, 9])  # shorter and longer than W
def test_cached_decode_matches_forward(loop_num, prompt_len):
    total = 30  # generation runs well past W
    model = make_model(seed=7, loop_num=loop_num)
    ids = random_ids(2, total, seed=prompt_len)
    with torch.no_grad():
        full = model(ids)
    logits, cache = model.prefill(ids[:, :prompt_len])
    steps = [logits]
    for i in range(prompt_len, total):
        logits, cache = model.decode_step(ids[:, i : i + 1], cache)
        assert logits.shape == (2, 1, 128)
        steps.append(logits)
        assert cache.length == i + 1
        assert all(k.shape[2] == i + 1 for k in cache.k0)
        assert all(k.shape[2] == min(i + 1, W) for ks in cache.local_k for k in ks)
        assert len(cache.local_k) == loop_num - 1
    cached = torch.cat(steps, dim=1)
    assert max_diff(cached, full) < ATOL


@pytest.mark.parametrize("chunks", [[1] * 11, [3, 1, 6, 2, 10, 1], [22]])
def test_chunked_extend_matches_forward(chunks):
    model = make_model(seed=8, loop_num=3)
    total = sum(chunks)
    ids = random_ids(2, total, seed=11)
    with torch.no_grad():
        full = model(ids)
    cache, outs, start = None, [], 0
    for n in chunks:
        logits, cache = model.extend(ids[:, start : start + n], cache)
        outs.append(logits)
        start += n
    assert max_diff(torch.cat(outs, dim=1), full) < ATOL


def test_decode_step_does_not_mutate_its_input_cache():
    model = make_model(seed=9)
    ids = random_ids(1, 8)
    _, cache = model.prefill(ids[:, :6])
    before = [k.clone() for ks in cache.local_k for k in ks]
    a, _ = model.decode_step(ids[:, 6:7], cache)
    b, _ = model.decode_step(ids[:, 6:7], cache)
    assert torch.equal(a, b)
    assert cache.length == 6
    after = [k for ks in cache.local_k for k in ks]
    assert all(torch.equal(x, y) for x, y in zip(before, after, strict=True))


@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_generate_matches_naive_argmax(batch):
    model = TorchLoopCoder(tiny_config()).init_random_(10, std=0.2).eval()
    prompt = random_ids(batch, 5, seed=12)
    new = model.greedy_generate(prompt, max_new_tokens=12)
    assert new.shape == (batch, 12)
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            nxt = model(seq)[:, -1].argmax(dim=-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(new, seq[:, 5:])
    assert model.greedy_generate(prompt, 0).shape == (batch, 0)


# --- packing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("loop_num", [2, 3])
def test_packed_row_equals_separate_segments(loop_num):
    model = make_model(seed=13, loop_num=loop_num)
    lengths = [7, 11, 3]
    segs = [random_ids(1, n, seed=20 + n) for n in lengths]
    packed = torch.cat(segs, dim=1)
    segment_ids = torch.cat([torch.full((1, n), s) for s, n in enumerate(lengths)], dim=1)
    positions = torch.cat([torch.arange(n)[None] for n in lengths], dim=1)
    with torch.no_grad():
        out = model(packed, segment_ids=segment_ids, positions=positions)
        separate = torch.cat([model(s) for s in segs], dim=1)
        unsegmented = model(packed)
    assert max_diff(out, separate) < ATOL
    # Sensitivity: without segment ids the later segments see the earlier ones.
    assert max_diff(unsegmented[:, lengths[0] :], separate[:, lengths[0] :]) > 1e-3
    # Positions matter too (RoPE restarts per segment).
    with torch.no_grad():
        global_pos = model(packed, segment_ids=segment_ids)
    assert max_diff(global_pos[:, lengths[0] :], separate[:, lengths[0] :]) > 1e-4


# --- the local window and the gate really matter --------------------------------------------------


def test_window_mask_primitive():
    gen = torch.Generator().manual_seed(0)
    t, i = 12, 9
    q = torch.randn(1, 4, t, 16, generator=gen)
    k = torch.randn(1, 2, t, 16, generator=gen)
    v = torch.randn(1, 2, t, 16, generator=gen)
    seg = torch.zeros(1, t, dtype=torch.long)
    full, local = causal_mask(seg), window_mask(seg, W)
    assert local[0, i].nonzero().flatten().tolist() == list(range(i - W + 1, i + 1))

    def outputs(k, v):
        return masked_attention(q, k, v, full)[..., i, :], masked_attention(q, k, v, local)[
            ..., i, :
        ]

    g0, l0 = outputs(k, v)
    k_out, v_out = k.clone(), v.clone()
    k_out[:, :, i - W] += 1.0  # just outside the window: W tokens back
    v_out[:, :, i - W] += 1.0
    g1, l1 = outputs(k_out, v_out)
    assert max_diff(g0, g1) > 1e-3
    assert torch.equal(l0, l1)
    k_in, v_in = k.clone(), v.clone()
    k_in[:, :, i - W + 1] += 1.0  # oldest key inside the window
    v_in[:, :, i - W + 1] += 1.0
    _, l2 = outputs(k_in, v_in)
    assert max_diff(l0, l2) > 1e-3


@pytest.mark.parametrize("loop_num", [2, 3])
def test_window_size_matters_exactly_from_position_w(loop_num):
    """Windows W and W + 1 agree at positions < W (both see the whole prefix) and differ at W."""
    ids = random_ids(1, 16, seed=30)
    a = make_model(seed=14, loop_num=loop_num, loop_window_size=W)
    b = make_model(seed=14, loop_num=loop_num, loop_window_size=W + 1)
    with torch.no_grad():
        la, lb = a(ids), b(ids)
    assert max_diff(la[:, :W], lb[:, :W]) < ATOL
    assert max_diff(la[:, W], lb[:, W]) > 1e-4
    # With an all-global gate the window is irrelevant everywhere.
    with torch.no_grad():
        for m in (a, b):
            for gate in m.model.gate_projections:
                gate.bias.fill_(1e4)
        assert max_diff(a(ids), b(ids)) < ATOL


def test_gate_weights_change_logits():
    ids = random_ids(2, 16, seed=31)
    base = make_model(seed=15)
    other = make_model(seed=15)
    with torch.no_grad():
        other.model.gate_projections[1].weight.mul_(-1.0)
        ref = base(ids)
        assert max_diff(other(ids), ref) > 1e-4
        other.load_state_dict(base.state_dict())
        other.model.gate_projections[0].bias.add_(1.0)
        assert max_diff(other(ids), ref) > 1e-4


# --- checkpoint writing ---------------------------------------------------------------------------


def _load_dir(out_dir) -> dict:
    index_path = os.path.join(out_dir, "model.safetensors.index.json")
    if not os.path.exists(index_path):
        return safetensors_torch.load_file(os.path.join(out_dir, "model.safetensors"))
    with open(index_path) as f:
        index = json.load(f)
    loaded = {}
    for fname in sorted(set(index["weight_map"].values())):
        part = safetensors_torch.load_file(os.path.join(out_dir, fname))
        assert all(index["weight_map"][name] == fname for name in part)
        loaded.update(part)
    assert set(loaded) == set(index["weight_map"])
    total = sum(t.numel() * t.element_size() for t in loaded.values())
    assert index["metadata"]["total_size"] == total
    return loaded


@pytest.mark.parametrize("num_shards", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [False, True])
def test_checkpoint_round_trip(tmp_path, num_shards, dtype, tied):
    cfg = tiny_config(tie_word_embeddings=tied)
    model = TorchLoopCoder(cfg).init_random_(16)
    files = save_hf_checkpoint_torch(model, cfg, tmp_path, num_shards=num_shards, dtype=dtype)
    if num_shards == 1:
        assert files == ["model.safetensors"]
        assert not (tmp_path / "model.safetensors.index.json").exists()
    else:
        assert files == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
        assert not (tmp_path / "model.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == sorted(
        files + ["config.json"] + (["model.safetensors.index.json"] if num_shards > 1 else [])
    )
    loaded = _load_dir(tmp_path)
    sd = model.state_dict()
    assert set(loaded) == set(sd)
    assert ("lm_head.weight" in loaded) == (not tied)
    for name, t in sd.items():
        assert loaded[name].dtype == dtype
        assert torch.equal(loaded[name], t.to(dtype)), name
    with open(tmp_path / "config.json") as f:
        written = json.load(f)
    assert written["architectures"] == ["IQuestLoopCoderForCausalLM"]
    assert written["model_type"] == "iquestloopcoder"
    assert written["torch_dtype"] == str(dtype).removeprefix("torch.")
    assert {k: written[k] for k in cfg} == cfg
    # The reloaded float32 weights give back the same model.
    if dtype == torch.float32:
        again = TorchLoopCoder(written)
        again.load_state_dict(loaded)
        ids = random_ids(1, 10)
        with torch.no_grad():
            assert torch.equal(again(ids), model(ids))
