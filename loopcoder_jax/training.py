"""The training step: TrainState, chunked cross-entropy, AdamW, and the sharded jitted step.

Pure functions only (no file I/O, no argparse): `train.py` (via `trainer.py`) and the AOT
planner call the same `make_train_step`, so the program compiled ahead of time from
`jax.eval_shape`'d state and `ShapeDtypeStruct` batches is the program that runs.

Batches are dicts of [B, T] arrays (B = GLOBAL batch): `input_ids`, `targets` (next token),
`segment_ids` (0 = padding), `positions` (per segment), `loss_mask` (float, 0 = no loss).
Shape legend as in `model/loopcoder.py`.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from loopcoder_jax import sharding as sh
from loopcoder_jax.config import TrainConfig
from loopcoder_jax.kernels import context_parallel
from loopcoder_jax.model import LoopCoder

BATCH_KEYS = ("input_ids", "targets", "segment_ids", "positions", "loss_mask")
_BATCH_DTYPES = {
    "input_ids": jnp.int32,
    "targets": jnp.int32,
    "segment_ids": jnp.int32,
    "positions": jnp.int32,
    "loss_mask": jnp.float32,
}


@struct.dataclass
class TrainState:
    """Everything a training step reads and writes (and a checkpoint stores, with data state)."""

    step: jax.Array  # int32 scalar: number of optimizer steps taken
    params: Any
    opt_state: Any


# ---------------------------------------------------------------------------- optimizer
def make_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine / linear decay to `lr * min_lr_ratio`, or flat."""
    end = tc.lr * tc.min_lr_ratio
    decay_steps = max(tc.steps - tc.warmup_steps, 1)
    if tc.schedule == "cosine":
        decay = optax.cosine_decay_schedule(tc.lr, decay_steps, alpha=tc.min_lr_ratio)
    elif tc.schedule == "linear":
        decay = optax.linear_schedule(tc.lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(tc.lr)
    if tc.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, tc.lr, tc.warmup_steps)
    return optax.join_schedules([warmup, decay], [tc.warmup_steps])


def decay_mask(params, decay_embeddings: bool = False):
    """True where AdamW weight decay applies: matmul kernels and the gate kernel.

    Excluded: norm scales (`scale`), the gate bias (`bias`), and the token embedding
    (`embedding`) unless `decay_embeddings`. Works on boxed or plain param trees.
    """

    def leaf_name(path):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return names[-1] if names else ""

    def rule(path, _):
        name = leaf_name(path)
        if name == "embedding":
            return decay_embeddings
        return name == "kernel"

    return jax.tree_util.tree_map_with_path(rule, params)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with the schedule and the weight-decay mask."""
    parts = []
    if tc.clip_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(tc.clip_grad_norm))
    parts.append(
        optax.adamw(
            make_schedule(tc),
            b1=tc.b1,
            b2=tc.b2,
            eps=tc.eps,
            weight_decay=tc.weight_decay,
            mask=functools.partial(decay_mask, decay_embeddings=tc.decay_embeddings),
        )
    )
    return optax.chain(*parts)


# ---------------------------------------------------------------------------- loss
def _chunk_size(seq_len: int, target: int) -> int:
    """Largest divisor of seq_len that is <= target (chunks must tile T exactly)."""
    target = max(1, min(target, seq_len))
    for c in range(target, 0, -1):
        if seq_len % c == 0:
            return c
    return 1


def chunked_cross_entropy(
    model: LoopCoder,
    params,
    hidden,
    targets,
    loss_mask,
    *,
    chunk: int,
    z_loss: float = 0.0,
):
    """Masked next-token cross-entropy from final hidden states, never holding [B, T, V].

    The LM head is applied to `chunk` positions at a time (per sequence shard) inside a
    `lax.scan`; each chunk's f32 logits [B, C, V] are rematerialised in the backward pass
    (`jax.checkpoint`), so peak memory is one chunk's logits rather than all T positions'.

    Args:
      hidden: [B, T, D] final-normed hidden states.
      targets: [B, T] int next-token ids.
      loss_mask: [B, T] float weights (0 = excluded).
      chunk: positions per chunk (a divisor of T is chosen <= this).
      z_loss: coefficient of the logsumexp^2 penalty (0 = off).
    Returns:
      (sum of masked CE, sum of masked z-loss terms), f32 scalars.
    """
    b, t, d = hidden.shape
    # With the sequence sharded S ways (context parallelism), each chip chunks its own part:
    # step j takes chunk j of every shard, so no chip gathers the sequence or computes
    # another chip's logits. S = 1 otherwise.
    s = context_parallel.sequence_shards()
    s = s if t % s == 0 else 1
    c = _chunk_size(t // s, chunk)
    n = t // s // c

    def to_chunks(x):  # [B, T, ...] -> [n, B, S*C, ...] (T = S * n * C, shard-major)
        x = jnp.moveaxis(x.reshape(b, s, n, c, *x.shape[2:]), 2, 0)
        return x.reshape(n, b, s * c, *x.shape[4:])

    @jax.checkpoint
    def one_chunk(params, h, tgt, m):
        logits = model.apply({"params": params}, h, method=LoopCoder.logits)  # f32 [B, SC, V]
        lse = jax.nn.logsumexp(logits, axis=-1)
        # one-hot contraction rather than a gather: stays local when V is sharded
        tgt_logit = jnp.einsum("bcv,bcv->bc", logits, jax.nn.one_hot(tgt, logits.shape[-1]))
        ce = jnp.sum((lse - tgt_logit) * m)
        zl = jnp.sum(z_loss * jnp.square(lse) * m) if z_loss else jnp.zeros((), jnp.float32)
        return ce, zl

    def body(carry, xs):
        ce, zl = one_chunk(params, *xs)
        return (carry[0] + ce, carry[1] + zl), None

    zero = jnp.zeros((), jnp.float32)
    xs = (to_chunks(hidden), to_chunks(targets), to_chunks(loss_mask.astype(jnp.float32)))
    (ce, zl), _ = jax.lax.scan(body, (zero, zero), xs)
    return ce, zl


def loss_sums(model: LoopCoder, params, batch: Mapping[str, jax.Array], tc: TrainConfig):
    """(CE sum + z-loss sum, (CE sum, z sum, token count)) for one (micro-)batch."""
    hidden = model.apply(
        {"params": params},
        batch["input_ids"],
        batch["segment_ids"],
        batch["positions"],
        method=LoopCoder.hidden_states,
    )
    ce, zl = chunked_cross_entropy(
        model,
        params,
        hidden,
        batch["targets"],
        batch["loss_mask"],
        chunk=tc.loss_chunk,
        z_loss=tc.z_loss,
    )
    return ce + zl, (ce, zl, jnp.sum(batch["loss_mask"].astype(jnp.float32)))


# ---------------------------------------------------------------------------- shardings
def _dummy_ids():
    return jnp.zeros((1, 1), jnp.int32)


def abstract_boxed_params(model: LoopCoder):
    """Boxed (logically annotated) abstract params: shapes, dtypes and logical axis names."""
    return jax.eval_shape(model.init, jax.random.key(0), _dummy_ids())["params"]


def param_shardings(model: LoopCoder, mesh: Mesh, rules):
    """NamedSharding per parameter leaf."""
    return sh.param_shardings(abstract_boxed_params(model), mesh, rules)


def state_shardings(model: LoopCoder, optimizer, mesh: Mesh, rules):
    """(abstract TrainState, matching tree of NamedSharding).

    Optimizer moments are sharded like the params they belong to (found with optax's
    `tree_map_params`); scalars (step, Adam count) are replicated.
    """
    boxed = abstract_boxed_params(model)
    p_sh = sh.param_shardings(boxed, mesh, rules)
    params = nn.unbox(boxed)
    opt_state = jax.eval_shape(optimizer.init, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    o_sh = optax.tree_utils.tree_map_params(
        optimizer,
        lambda _, s: s,
        opt_state,
        p_sh,
        transform_non_params=lambda _: replicated,
    )
    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt_state
    )
    shardings = TrainState(step=replicated, params=p_sh, opt_state=o_sh)
    return abstract, shardings


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    return NamedSharding(mesh, sh.batch_spec(rules))


def abstract_batch(global_batch: int, seq_len: int, mesh: Mesh, rules) -> dict:
    """ShapeDtypeStructs of one global batch, with shardings (for AOT lowering)."""
    s = batch_sharding(mesh, rules)
    return {
        k: jax.ShapeDtypeStruct((global_batch, seq_len), dt, sharding=s)
        for k, dt in _BATCH_DTYPES.items()
    }


def shard_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh, rules) -> dict:
    """This process's rows [B/P, T] -> global jax.Arrays [B, T] sharded over the batch axes."""
    s = batch_sharding(mesh, rules)
    out = {}
    for k in BATCH_KEYS:
        x = np.asarray(local_batch[k], dtype=_BATCH_DTYPES[k])
        global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
        out[k] = jax.make_array_from_process_local_data(s, x, global_shape)
    return out


def validate(model: LoopCoder, mesh: Mesh, rules, tc: TrainConfig) -> None:
    """Raises `sharding.MeshError` (naming the numbers) before anything is compiled."""
    boxed = abstract_boxed_params(model)
    specs = jax.tree.map(
        lambda spec: nn.logical_to_mesh_axes(spec, rules),
        nn.get_partition_spec(boxed),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
    sh.check_divisible(nn.unbox(boxed), specs, mesh, "params")
    sh.check_batch(mesh, rules, tc.batch_size, tc.seq_len, tc.grad_accum)
    if tc.batch_size % jax.process_count():
        raise sh.MeshError(
            f"train.batch_size={tc.batch_size} is not divisible by the {jax.process_count()} "
            "processes; each process loads an equal share of the global batch."
        )


# ---------------------------------------------------------------------------- the step
class MeshProgram:
    """A jitted function traced inside `jax.set_mesh(mesh)` + the logical axis rules.

    The model's `nn.with_logical_constraint` calls need both at trace time. Call it like
    the function, or `.lower(*abstract_args)` for ahead-of-time compilation.
    """

    def __init__(self, jitted, mesh: Mesh, rules, *, constrain: bool = True):
        self._jitted, self.mesh, self.rules = jitted, mesh, rules
        self._constrain = constrain

    def _context(self):
        if not self._constrain:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    def __call__(self, *args):
        with self._context():
            return self._jitted(*args)

    def lower(self, *args):
        with self._context():
            return self._jitted.lower(*args)


def make_init_fn(model: LoopCoder, optimizer, mesh: Mesh, rules) -> MeshProgram:
    """`init(key) -> TrainState`, created directly in its shardings (never whole on one device)."""
    _, shardings = state_shardings(model, optimizer, mesh, rules)

    def init(key):
        params = nn.unbox(model.init(key, _dummy_ids())["params"])
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params)
        )

    # Traced without the mesh context: Flax's DenseGeneral reshapes its boxed kernel during
    # init, which a rank-checked sharding constraint would reject; out_shardings place it.
    return MeshProgram(jax.jit(init, out_shardings=shardings), mesh, rules, constrain=False)


def make_state_from_params(model: LoopCoder, optimizer, mesh: Mesh, rules) -> MeshProgram:
    """`from_params(params) -> TrainState` at step 0 (fine-tuning from `--init-from`)."""
    _, shardings = state_shardings(model, optimizer, mesh, rules)

    def from_params(params):
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params)
        )

    return MeshProgram(
        jax.jit(from_params, in_shardings=(shardings.params,), out_shardings=shardings),
        mesh,
        rules,
    )


def make_train_step(
    model: LoopCoder,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    rules,
    *,
    train_cfg: TrainConfig,
) -> MeshProgram:
    """`step(state, batch) -> (state, metrics)`, jitted with explicit shardings, state donated.

    The loss is the token-weighted mean over the GLOBAL batch: with `grad_accum = A` the
    batch is split into A micro-batches whose gradient SUMS are accumulated in a `lax.scan`
    and divided by the total token count once, so A does not change the result (up to
    float summation order). Metrics (f32 scalars): loss, z_loss, grad_norm (before
    clipping), lr (of this step), tokens (loss tokens), skipped (1 when the NaN policy
    "skip" dropped the update).
    """
    tc = train_cfg
    _, state_sh = state_shardings(model, optimizer, mesh, rules)
    b_sh = batch_sharding(mesh, rules)
    batch_sh = {k: b_sh for k in BATCH_KEYS}
    schedule = make_schedule(tc)
    grad_fn = jax.grad(functools.partial(loss_sums, model), argnums=0, has_aux=True)
    micro_spec = PartitionSpec(None, *sh.batch_spec(rules))

    def accumulate(params, batch):
        if tc.grad_accum == 1:
            return grad_fn(params, batch, tc)
        a = tc.grad_accum

        def split(x):  # [B, T] -> [A, B/A, T]; rows j*A + i go to micro-batch i (stay local)
            x = x.reshape(x.shape[0] // a, a, *x.shape[1:])
            return jax.lax.with_sharding_constraint(jnp.swapaxes(x, 0, 1), micro_spec)

        micro = {k: split(v) for k, v in batch.items()}

        def body(carry, mb):
            g, (ce, zl, n) = grad_fn(params, mb, tc)
            acc_g, (acc_ce, acc_zl, acc_n) = carry
            acc_g = jax.tree.map(jnp.add, acc_g, g)
            return (acc_g, (acc_ce + ce, acc_zl + zl, acc_n + n)), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        z = jnp.zeros((), jnp.float32)
        (g, sums), _ = jax.lax.scan(body, (zeros, (z, z, z)), micro)
        return g, sums

    def step(state: TrainState, batch):
        grads, (ce, zl, n_tok) = accumulate(state.params, batch)
        denom = jnp.maximum(n_tok, 1.0)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
        loss = ce / denom
        grad_norm = optax.tree.norm(grads)
        updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if tc.nan_policy == "skip":
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
            new_params = keep(new_params, state.params)
            new_opt = keep(new_opt, state.opt_state)
        new_state = TrainState(step=state.step + 1, params=new_params, opt_state=new_opt)
        metrics = {
            "loss": loss,
            "z_loss": zl / denom,
            "grad_norm": grad_norm,
            "lr": jnp.asarray(schedule(state.step), jnp.float32),
            "tokens": n_tok,
            "skipped": jnp.where(ok, 0.0, 1.0) if tc.nan_policy == "skip" else jnp.float32(0),
        }
        return new_state, metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    metrics_sh = {k: replicated for k in ("loss", "z_loss", "grad_norm", "lr", "tokens", "skipped")}
    jitted = jax.jit(
        step,
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, metrics_sh),
        donate_argnums=(0,),
    )
    return MeshProgram(jitted, mesh, rules)


def count_params(params) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def experiment_model(model_cfg, runtime_cfg) -> LoopCoder:
    """The model a run trains (one place, so train.py, bench and the AOT planner agree)."""
    return LoopCoder(model_cfg, runtime_cfg)


__all__ = [
    "BATCH_KEYS",
    "MeshProgram",
    "TrainState",
    "abstract_batch",
    "chunked_cross_entropy",
    "decay_mask",
    "make_init_fn",
    "make_optimizer",
    "make_schedule",
    "make_state_from_params",
    "make_train_step",
    "shard_batch",
    "state_shardings",
    "validate",
]
