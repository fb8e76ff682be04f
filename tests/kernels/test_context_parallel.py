"""Context parallelism (`kernels/context_parallel.py`) against one device.

The sequence is sharded over the `sequence` mesh axis on 8 fake CPU devices. The plain path
(one device, whole sequence) is the reference: kernels (the causal branch both load-balanced
and on the plain contiguous path, the balanced XLA kernel also against numpy), then the whole
model (logits AND gradients, both loops, non-zero gates, GQA 2, packed rows whose segments
cross shard boundaries, W smaller than, equal to and larger than a shard's chunk), then the
splash kernel in Pallas interpret mode, then the per-chip memory of a train step.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding

from loopcoder_jax import LoopCoder, RuntimeConfig
from loopcoder_jax import sharding as sh
from loopcoder_jax.checkpoint import abstract_params
from loopcoder_jax.config import AttnImpl
from loopcoder_jax.kernels import context_parallel as cp
from loopcoder_jax.kernels import reference
from tests.model.test_model import init_params

XLA = RuntimeConfig()

# (data, fsdp, tensor, sequence)
MESHES = {
    "fsdp2_seq4": (1, 2, 1, 4),
    "seq8": (1, 1, 1, 8),
    "data2_seq2_tensor2": (2, 1, 2, 2),
}


def _mesh(name):
    return Mesh(np.array(jax.devices()[:8]).reshape(MESHES[name]), sh.MESH_AXES)


def _packed(b, t, cuts_per_row):
    """Segment ids and per-segment positions; row r is cut at cuts_per_row[r] (then padding)."""
    seg = np.zeros((b, t), np.int32)
    pos = np.zeros((b, t), np.int32)
    for r, cuts in enumerate(cuts_per_row):
        bounds = [0, *cuts]
        for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            seg[r, lo:hi] = s + 1
            pos[r, lo:hi] = np.arange(hi - lo)
    return jnp.asarray(seg), jnp.asarray(pos)


# ---------------------------------------------------------------------------- kernels
def _qkv(b, t, n, k, h, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(kq, (b, t, n, h)),
        jax.random.normal(kk, (b, t, k, h)),
        jax.random.normal(kv, (b, t, k, h)),
    )


@pytest.mark.parametrize(
    "mesh_name",
    [
        "fsdp2_seq4",
        pytest.param("seq8", marks=pytest.mark.slow),
        pytest.param("data2_seq2_tensor2", marks=pytest.mark.slow),
    ],
)
def test_kernel_values_and_grads_match_whole_sequence(mesh_name):
    """Every branch on every mesh; the local windows are < , = and > the chunk (T/n)."""
    b, t = 4, 64
    q, k, v = _qkv(b, t, 4, 2, 8)
    seg, _ = _packed(b, t, [[20, 50, 64], [64], [7, 33, 62], [30]])  # cuts off the shard edges
    chunk = t // MESHES[mesh_name][3]
    windows = (3, chunk + 9) if mesh_name == "fsdp2_seq4" else (3, chunk, chunk + 9)  # CI: 2
    # (mask, balance): the causal mask through the balanced path and (slow meshes; CI runs it
    # in test_query_blocks_of_the_global_branch_match) the plain contiguous one
    cases = [(reference.Causal(), True)]
    cases += [(reference.Causal(), False)] if mesh_name != "fsdp2_seq4" else []
    cases += [(reference.LocalWindow(w), True) for w in windows]
    _check_kernel_against_whole_sequence(_mesh(mesh_name), q, k, v, seg, cases)


def _check_kernel_against_whole_sequence(mesh, q, k, v, seg, cases):
    def loss(attend, mask):
        return lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v, mask, seg)))

    for mask, balance in cases:
        want = reference.attention(q, k, v, mask, seg)
        want_g = jax.grad(loss(reference.attention, mask), argnums=(0, 1, 2))(q, k, v)
        sharded = lambda q, k, v, m, s, b=balance: cp.attention(q, k, v, m, s, balance=b)
        with jax.set_mesh(mesh), nn.logical_axis_rules(sh.FSDP_TP):
            got = jax.jit(lambda q, k, v, m=mask, f=sharded: f(q, k, v, m, seg))(q, k, v)
            got_g = jax.jit(jax.grad(loss(sharded, mask), argnums=(0, 1, 2)))(q, k, v)
        what = f"{mask} balance={balance}"
        np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.abs(want).max()), err_msg=what)
        for g, w in zip(got_g, want_g, strict=True):
            np.testing.assert_allclose(g, w, atol=1e-5 * float(jnp.abs(w).max()), err_msg=what)


@pytest.mark.slow
def test_balanced_causal_with_an_odd_number_of_shards():
    """sequence=3 (6 of the 8 devices): a shard computes one half it holds and one it gets."""
    mesh = Mesh(np.array(jax.devices()[:6]).reshape(1, 2, 1, 3), sh.MESH_AXES)
    q, k, v = _qkv(2, 48, 4, 2, 8)
    seg, _ = _packed(2, 48, [[11, 30, 48], [41]])
    _check_kernel_against_whole_sequence(mesh, q, k, v, seg, [(reference.Causal(), True)])


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 16])
def test_balanced_halves_are_a_balanced_permutation(n):
    """Shard j computes halves j and 2n-1-j; the two sends are permutations of the shards."""
    send0, send1 = cp._balanced_sends(n)
    for send in (send0, send1):
        assert sorted(d for _, d in send) == list(range(n))
    got = {}
    for slot, send in enumerate((send0, send1)):
        for s, d in send:
            got.setdefault(d, {})[slot] = 2 * s + slot  # half 2s + slot lands on shard d
    for j in range(n):
        assert sorted(got[j].values()) == [j, 2 * n - 1 - j]
        assert (got[j][0], got[j][1]) == tuple(int(x) for x in cp._received_halves(j, n, np))


def test_local_branch_is_a_halo_exchange_and_causal_an_all_gather():
    """The local branch moves only neighbours' tails (ppermute), never the sequence."""
    q, k, v = _qkv(2, 64, 4, 2, 8)
    mesh = _mesh("seq8")  # chunks of 8: W = 20 needs 3 neighbours
    with jax.set_mesh(mesh), nn.logical_axis_rules(sh.FSDP_TP):
        hlo = {
            name: jax.jit(lambda q, k, v, m=mask: cp.attention(q, k, v, m))
            .lower(q, k, v)
            .compile()
            .as_text()
            for name, mask in (("local", reference.LocalWindow(20)), ("causal", reference.Causal()))
        }
    assert "collective-permute" in hlo["local"] and "all-gather" not in hlo["local"]
    assert "all-gather" in hlo["causal"]


# ---------------------------------------------------------------------------- the model
B, T = 4, 64
CUTS = [[13, 40, 64], [64], [5, 29, 35, 60], [48, 62]]  # segments cross every shard edge


def _model_loss(cfg, runtime=XLA):
    def f(params, ids, seg, pos):
        logits = LoopCoder(cfg, runtime).apply({"params": params}, ids, seg, pos)
        lse = jax.nn.logsumexp(logits, -1)
        return jnp.mean(lse - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0]), logits

    return jax.value_and_grad(f, has_aux=True)


def _sharded_loss_and_grads(cfg, params, ids, seg, pos, mesh, runtime=XLA):
    rules = sh.FSDP_TP
    shardings = sh.param_shardings(abstract_params(cfg, boxed=True), mesh, rules)
    row = NamedSharding(mesh, nn.logical_to_mesh_axes((sh.BATCH, sh.LENGTH), rules))
    placed = [jax.device_put(x, row) for x in (ids, seg, pos)]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        fn = jax.jit(_model_loss(cfg, runtime))
        (loss, logits), grads = fn(jax.device_put(params, shardings), *placed)
    assert logits.sharding.spec[1] == "sequence"  # the activations stay sequence-sharded
    return loss, logits, grads


def _assert_close_scaled(got, want, rtol=1e-5):
    """Each leaf within rtol of its own largest magnitude (gradients span many scales)."""

    def check(path, g, w):
        scale = max(float(np.abs(w).max()), 1e-30)
        np.testing.assert_allclose(g, w, atol=rtol * scale, err_msg=jax.tree_util.keystr(path))

    jax.tree_util.tree_map_with_path(check, got, want)


CASES = [  # (mesh, loop_num, W): W vs the chunk T / sequence; CI runs two, `slow` the rest
    pytest.param("fsdp2_seq4", 3, 40, id="fsdp2_seq4-loop3-W>2chunks"),
    pytest.param("data2_seq2_tensor2", 2, 4, id="data2_seq2_tensor2-loop2-W<chunk"),
]
FULL_MATRIX = [
    pytest.param(m, loops, w, id=f"{m}-loop{loops}-W{w}", marks=pytest.mark.slow)
    for m in MESHES
    for loops in (1, 2, 3)
    for w in (4, 8, 16, 32, 40)
    if (m, loops, w) not in (("fsdp2_seq4", 3, 40), ("data2_seq2_tensor2", 2, 4))
]


@pytest.mark.parametrize("mesh_name,loop_num,window", CASES + FULL_MATRIX)
def test_model_logits_and_grads_equal_one_device(tiny_config, mesh_name, loop_num, window):
    cfg = tiny_config.replace(loop_num=loop_num, loop_window_size=window)
    params = init_params(cfg)
    ids = jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size)
    seg, pos = _packed(B, T, CUTS)
    (want_loss, want_logits), want_g = jax.jit(_model_loss(cfg))(params, ids, seg, pos)
    loss, logits, grads = _sharded_loss_and_grads(cfg, params, ids, seg, pos, _mesh(mesh_name))
    np.testing.assert_allclose(logits, want_logits, atol=1e-5 * float(jnp.abs(want_logits).max()))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)  # f32 sums in another order
    _assert_close_scaled(grads, want_g)


# ---------------------------------------------------------------------------- memory
def _train_temporaries(cfg, mesh, t, runtime=XLA):
    """Per-device temporaries of a compiled forward + backward at [1, t] (nothing runs)."""
    rules = sh.FSDP_TP
    boxed = abstract_params(cfg, boxed=True)
    shardings = sh.param_shardings(boxed, mesh, rules)
    params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed), shardings
    )
    row = NamedSharding(mesh, nn.logical_to_mesh_axes((sh.BATCH, sh.LENGTH), rules))
    ids = jax.ShapeDtypeStruct((1, t), jnp.int32, sharding=row)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        compiled = jax.jit(_model_loss(cfg, runtime)).lower(params, ids, ids, ids).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_sequence_split_four_ways_cuts_per_device_temporaries_to_a_quarter(tiny_config):
    """Same tokens per device, same memory: T = 8192 split 4 ways needs about 1/4 of the
    whole sequence's temporaries (the dense XLA causal scores dominate both)."""
    cfg = tiny_config.replace(loop_window_size=64)
    devices = np.array(jax.devices()[:4])
    whole = _train_temporaries(cfg, Mesh(devices[:1].reshape(1, 1, 1, 1), sh.MESH_AXES), 8192)
    split = _train_temporaries(cfg, Mesh(devices.reshape(1, 1, 1, 4), sh.MESH_AXES), 8192)
    assert split <= 0.3 * whole, (split / 2**20, whole / 2**20)


@pytest.mark.parametrize(
    "balance",
    # the balanced kernel's sub-blocks are also checked (unsharded) against numpy in CI
    [False, pytest.param(True, marks=pytest.mark.slow)],
)
def test_query_blocks_of_the_global_branch_match(monkeypatch, balance):
    """Long chunks run the XLA global branch in rematerialised query blocks: same result, on
    the plain path (blocks of queries against all keys) and the balanced one (square blocks
    inside each half: two query blocks per half here)."""
    # chunks of 16 (halves of 8): 4 blocks of 4 queries against 64 keys on the plain path,
    # blocks of 4 x 4 on the balanced one
    monkeypatch.setattr(cp, "_SCORE_BLOCK", 16 if balance else 4 * 64)
    assert (cp._sub_block(8) if balance else cp._query_block(16, 64)) == 4
    q, k, v = _qkv(2, 64, 4, 2, 8)
    seg, _ = _packed(2, 64, [[20, 50, 64], [30]])
    mask = reference.Causal()

    def loss(attend):
        return lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v, mask, seg)))

    want_g = jax.grad(loss(reference.attention), argnums=(0, 1, 2))(q, k, v)
    sharded = lambda q, k, v, m, s: cp.attention(q, k, v, m, s, balance=balance)
    with jax.set_mesh(_mesh("fsdp2_seq4")), nn.logical_axis_rules(sh.FSDP_TP):
        got_g = jax.jit(jax.grad(loss(sharded), argnums=(0, 1, 2)))(q, k, v)
    for g, w in zip(got_g, want_g, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5 * float(jnp.abs(w).max()))


@pytest.mark.parametrize("score_block", [1 << 24, 16])
def test_balanced_causal_kernel_against_numpy(monkeypatch, score_block):
    """The balanced XLA kernel of one shard (halves 1 and 6 of 8), against a few lines of
    numpy softmax attention: independent of the reference kernel."""
    monkeypatch.setattr(cp, "_SCORE_BLOCK", score_block)  # 16: two query blocks per half
    b, t, h = 2, 64, 8  # n = 4 shards of C = 16
    q, k, v = (np.asarray(x, np.float64) for x in _qkv(b, t, 4, 2, 8, seed=3))
    seg = np.asarray(_packed(b, t, [[10, 52, 64], [64]])[0])
    rows = np.concatenate([np.arange(8, 16), np.arange(48, 56)])  # halves 1 and 6
    as32 = lambda x: jnp.asarray(x, jnp.float32)
    got = cp._balanced_causal(
        as32(q[:, rows]), as32(k), as32(v), jnp.asarray(seg[:, rows]), jnp.asarray(seg), (1, 6)
    )
    want = np.zeros((b, 2 * h, 4, 8))
    for bi in range(b):
        for i, pos in enumerate(rows):
            keys = [j for j in range(pos + 1) if seg[bi, j] == seg[bi, pos]]
            for head in range(4):
                kv = head // 2  # GQA: query heads 0, 1 read kv head 0
                s = k[bi, keys, kv] @ q[bi, pos, head] / np.sqrt(8)
                p = np.exp(s - s.max())
                want[bi, i, head] = p @ v[bi, keys, kv] / p.sum()
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())


def test_balanced_splash_mask_gives_every_shard_the_same_blocks():
    """The splash kernel's block tables (what it computes, not what it skips): with the
    balanced rows every shard has the same number of key blocks; contiguous chunks do not."""
    t, n = 4096, 4
    for kernel, balanced in (
        (cp._splash_balanced_kernel(t, n, 1, True), True),
        (cp._splash_causal_kernel(t, n, 1, True), False),
    ):
        for info in (kernel.fwd_mask_info, kernel.dq_mask_info, kernel.dkv_mask_info):
            blocks = [int((r > 0).sum()) for r in np.split(np.asarray(info.block_mask), n, 1)]
            assert (len(set(blocks)) == 1) == balanced, blocks


# ---------------------------------------------------------------------------- splash
def _spy_splash(monkeypatch):
    calls = []
    real = cp._splash_call
    monkeypatch.setattr(cp, "_splash_call", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize(
    "mask,t",
    [
        pytest.param(reference.Causal(), 512, id="causal"),
        # halves of 128: query blocks inside one half (at 512 a block spans both halves)
        pytest.param(reference.Causal(), 1024, id="causal1024", marks=pytest.mark.slow),
        pytest.param(reference.LocalWindow(200), 512, id="local200"),  # halo of 2 neighbours
        pytest.param(reference.LocalWindow(64), 512, id="local64", marks=pytest.mark.slow),
    ],
)
def test_splash_with_the_sequence_sharded_matches_xla(monkeypatch, mask, t):
    """Pallas interpret mode, fsdp=2 x sequence=4: chunks of t / 4 positions; the balanced
    causal kernel's mask tables (rows in the balanced order) are sharded with the queries,
    the local one sees the halo band."""
    calls = _spy_splash(monkeypatch)
    b = 2
    q, k, v = _qkv(b, t, 4, 2, 32)
    seg, _ = _packed(b, t, [[100, 300, t], [t - 12]])
    with jax.set_mesh(_mesh("fsdp2_seq4")), nn.logical_axis_rules(sh.FSDP_TP):
        got = jax.jit(lambda q, k, v: cp.attention(q, k, v, mask, seg, AttnImpl.SPLASH))(q, k, v)
    assert calls, "splash did not run"
    want = reference.attention(q, k, v, mask, seg)
    np.testing.assert_allclose(got, want, atol=2e-5 * float(jnp.abs(want).max()), rtol=1e-5)


@pytest.mark.slow
def test_splash_with_the_sequence_sharded_gradients(monkeypatch):
    calls = _spy_splash(monkeypatch)
    b, t = 2, 512
    q, k, v = _qkv(b, t, 4, 2, 32)
    seg, _ = _packed(b, t, [[100, 300, 512], [500]])
    for mask in (reference.Causal(), reference.LocalWindow(64)):

        def loss(attend, m=mask):
            return lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v, m, seg)))

        want = jax.grad(loss(reference.attention), argnums=(0, 1, 2))(q, k, v)
        splash = lambda q, k, v, m, s: cp.attention(q, k, v, m, s, AttnImpl.SPLASH)
        with jax.set_mesh(_mesh("fsdp2_seq4")), nn.logical_axis_rules(sh.FSDP_TP):
            got = jax.jit(jax.grad(loss(splash), argnums=(0, 1, 2)))(q, k, v)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, atol=1e-5 * float(jnp.abs(w).max()))
    assert calls


@pytest.mark.slow
def test_model_with_splash_and_the_sequence_sharded_matches_one_device(tiny_config, monkeypatch):
    calls = _spy_splash(monkeypatch)
    cfg = tiny_config.replace(loop_window_size=40)
    params = init_params(cfg)
    b, t = 2, 512
    ids = jax.random.randint(jax.random.key(1), (b, t), 0, cfg.vocab_size)
    seg, pos = _packed(b, t, [[100, 300, 512], [500]])
    (_, want_logits), want_g = jax.jit(_model_loss(cfg))(params, ids, seg, pos)
    runtime = RuntimeConfig(attn_impl=AttnImpl.SPLASH)
    _, logits, grads = _sharded_loss_and_grads(
        cfg, params, ids, seg, pos, _mesh("fsdp2_seq4"), runtime
    )
    assert calls
    np.testing.assert_allclose(logits, want_logits, atol=1e-5 * float(jnp.abs(want_logits).max()))
    _assert_close_scaled(grads, want_g, rtol=1e-4)
