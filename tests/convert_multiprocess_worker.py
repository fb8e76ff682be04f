"""One process of the 2-process save/restore test (tests/test_convert.py): 4 CPU devices each,
jax.distributed over 127.0.0.1 with gloo collectives.

argv: process_id port out_dir. Saves sharded bf16 params collectively on a (fsdp=4, tensor=2)
mesh, restores them onto a (fsdp=8, tensor=1) mesh and prints per-leaf fingerprints as JSON.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import linen as nn  # noqa: E402

from loopcoder_jax import checkpoint as ckpt  # noqa: E402
from loopcoder_jax import sharding as sh  # noqa: E402
from loopcoder_jax.config import preset  # noqa: E402
from loopcoder_jax.model import LoopCoder  # noqa: E402


def fingerprints(params) -> dict[str, float]:
    """Order-sensitive float32 checksums, computed on device, identical on every process."""

    def fp(x):
        x = x.astype(jnp.float32).reshape(-1)
        return jnp.sum(x * jnp.cos(jnp.arange(x.size, dtype=jnp.float32)))

    flat = jax.tree_util.tree_leaves_with_path(params)
    values = jax.jit(lambda xs: [fp(x) for x in xs])([x for _, x in flat])
    return {jax.tree_util.keystr(p): float(v) for (p, _), v in zip(flat, values, strict=True)}


def main():
    proc, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=proc)
    cfg = preset("tiny")
    model = LoopCoder(cfg)
    boxed = ckpt.abstract_params(cfg, boxed=True)
    auto = (jax.sharding.AxisType.Auto,) * 2  # classic GSPMD propagation for the checksums
    save_mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=auto)
    shardings = sh.param_shardings(boxed, save_mesh, sh.FSDP_TP)

    def init(key):
        p = nn.unbox(model.init(key, jnp.zeros((1, 1), jnp.int32))["params"])
        return jax.tree.map(lambda x: (x + 0.1).astype(jnp.bfloat16), p)

    params = jax.jit(init, out_shardings=shardings)(jax.random.key(3))
    ckpt.save_params(os.path.join(out, "ckpt"), cfg, params, group_bytes=100_000)
    load_mesh = jax.make_mesh((8, 1), ("fsdp", "tensor"), axis_types=auto)
    _, restored = ckpt.load_params(
        os.path.join(out, "ckpt"), shardings=sh.param_shardings(boxed, load_mesh, sh.FSDP_TP)
    )
    leaf = restored["layers"]["mlp"]["up_proj"]["kernel"]
    same = jax.jit(lambda a, b: jax.tree.map(lambda x, y: jnp.array_equal(x, y), a, b))
    result = {
        "bit_equal": all(bool(v) for v in jax.tree.leaves(same(params, restored))),
        "saved": fingerprints(params),
        "restored": fingerprints(restored),
        "dtype": str(leaf.dtype),
        "local_shard": list(leaf.addressable_shards[0].data.shape),
        "mesh": dict(leaf.sharding.mesh.shape),
    }
    print("RESULT " + json.dumps(result), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
