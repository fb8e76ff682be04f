"""Named remat policies save exactly the activations they name (and the gradients stay)."""

from __future__ import annotations

import contextlib
import io
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from loopcoder_jax.config import Remat, RuntimeConfig
from loopcoder_jax.model import LoopCoder

WANT = {  # per layer application, with loop_num 1: q, k, v (3), o_proj (1), MLP input (1)
    "full": {},
    "save_qkv": {"qkv_proj": 3},
    "save_qkv_out": {"qkv_proj": 3, "out_proj": 1},
    "save_qkv_out_mlp_in": {"qkv_proj": 3, "out_proj": 1, "mlp_in": 1},
}


def _residuals(cfg, remat):
    model = LoopCoder(cfg, RuntimeConfig(remat=remat, scan_layers=False))
    ids = jnp.asarray(np.arange(8)[None] % cfg.vocab_size, jnp.int32)
    params = nn.unbox(model.init(jax.random.key(0), ids)["params"])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print_saved_residuals(
            lambda p: model.apply({"params": p}, ids, method=LoopCoder.hidden_states).sum(),
            params,
        )
    return buf.getvalue()


@pytest.mark.parametrize("remat", [*WANT, "offload_qkv_out"])
def test_named_policy_saves_what_it_names(tiny_config, remat):
    cfg = tiny_config.replace(num_hidden_layers=1, loop_num=1)
    text = _residuals(cfg, remat)
    named = re.findall(r"named '(\w+)'", text)
    host = re.findall(r"<host>\[([0-9,]+)\]", text)
    if remat == "offload_qkv_out":  # the same four activations, in host memory
        assert named == [] and sorted(host) == sorted(["1,8,4,16", "1,8,2,16", "1,8,2,16",
                                                       "1,8,64"])  # fmt: skip
        return
    assert {n: named.count(n) for n in set(named)} == WANT[remat] and host == []
    # and the shapes: q [B, T, N, H], k and v [B, T, K, H], the others [B, T, D]
    shapes = re.findall(r"f32\[([0-9,]+)\] named '(\w+)'", text)
    for shape, name in shapes:
        dims = tuple(int(d) for d in shape.split(","))
        assert dims in {
            "qkv_proj": {(1, 8, 4, 16), (1, 8, 2, 16)},
            "out_proj": {(1, 8, 64)},
            "mlp_in": {(1, 8, 64)},
        }[name]


def test_every_remat_value_has_a_policy():
    from loopcoder_jax.model import loopcoder

    assert set(loopcoder._REMAT_POLICIES) == set(Remat) - {Remat.NONE}
