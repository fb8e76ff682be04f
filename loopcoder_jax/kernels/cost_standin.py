"""How the planner's counting compiles charge splash attention, and the dense stand-in. Never
executed.

Splash is a Pallas kernel, a custom call that jax's splash leaves uncosted, so the planner's
FLOP/time compiles (`aot._counting_config`) charge it one of two ways (`counting(charge)`):
"kernel", splash's own block work through cost-only kernels (`kernels/splash_cost.py`, the
planner's default), or "dense", the XLA dot-product stand-in below (`--vs-maxtext`, and an
upper bound).

Why the dense stand-in is not `reference.attention` itself: its core keeps the [T, S] scores
and probabilities in float32 (DESIGN.md §1). In a dense XLA program those are HBM arrays, and
at 8K tokens x 40 heads they dominate the layer's memory traffic: the dense-40B layer at 8K
moved 153 GB per chip with the float32 core against 105 GB with this one (MaxText's layer: 106
GB; docs/tpu.md, "Where the step estimate's bytes go"). Splash keeps every score tile in VMEM,
so on the TPU neither version's [T, S] traffic exists; the float32 one only made our estimate
18% slower per layer than the same program costed the way MaxText's estimate is.

So the stand-in is the dot-product form MaxText's estimate is made with: scores and their
exponentials in the compute dtype, normalised after the PV product. FLOPs are the same as
the reference's (all S keys per query, both branches' blocking unchanged: the planner's FLOP
conventions hold). The masking and blocking are the reference's own
(`reference._masked_attention`); only the softmax core differs. Its numbers are never used:
counting compiles are compiled and costed, not run.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax.numpy as jnp

from loopcoder_jax.kernels import reference

# How a counting compile charges splash's attention (see `counting`); None outside one.
CHARGES = ("dense", "kernel")
_CHARGE = contextvars.ContextVar("attention_cost_standin", default=None)


def active() -> bool:
    """True while a counting compile charging `dense` is being traced (`kernels.attention`
    then calls `attention` below instead of any kernel)."""
    return _CHARGE.get() == "dense"


def kernel_charge() -> bool:
    """True while a counting compile charging `kernel` is being traced: the splash program is
    traced as it runs, its kernels replaced by `splash_cost.SplashCost`."""
    return _CHARGE.get() == "kernel"


@contextlib.contextmanager
def counting(charge: str = "dense"):
    """Trace the step for a counting compile, attention charged as `charge`:

    dense: every full-sequence attention call is the dot-product stand-in below (all keys per
      query, compute-dtype [T, S] scores in HBM): the form MaxText's estimate uses, an upper
      bound on splash, and what `--vs-maxtext` compares;
    kernel: the program's own splash calls, with the same masks and tiles, costed as splash's
      block-sparse work (`kernels/splash_cost.py`): a roofline of what runs on the TPU, the
      same charge with the sequence whole or sharded.
    """
    if charge not in CHARGES:
        raise ValueError(f"attention charge {charge!r}; choose one of {CHARGES}")
    token = _CHARGE.set(charge)
    try:
        yield
    finally:
        _CHARGE.reset(token)


def _dot_product_core(q, k, v, mask):
    """`reference._softmax_attend`'s contract with the arithmetic in q's dtype.

    q: [..., T, K, G, H]; k, v: [..., S, K, H]; mask: bool broadcastable to [..., T, S].
    """
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    scores = jnp.einsum("...tkgh,...skh->...kgts", q, k)  # compute dtype, like MaxText's
    mask = jnp.expand_dims(mask, (-4, -3))
    scores = jnp.where(mask, scores, jnp.asarray(jnp.finfo(scores.dtype).min / 2, scores.dtype))
    exps = jnp.exp(scores - scores.max(axis=-1, keepdims=True))
    denom = exps.sum(axis=-1)  # [..., K, G, T]
    out = jnp.einsum("...kgts,...skh->...tkgh", exps, v)
    denom = jnp.moveaxis(denom, -1, -3)[..., None]  # [..., T, K, G, 1]
    return (out / denom).astype(q.dtype)


def attention(q, k, v, mask, segment_ids=None):
    """`reference.attention`'s signature and masking, with the dot-product core."""
    return reference._masked_attention(q, k, v, mask, segment_ids, _dot_product_core)
