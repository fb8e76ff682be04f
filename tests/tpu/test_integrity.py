"""Silent-error check on 8 fake devices: one replica of a parameter is corrupted on purpose."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from loopcoder_jax import integrity


def _mesh():
    # data=4 replicas x fsdp=2 shards: a weight sharded over fsdp has 4 copies of each half.
    return Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))


def _params(mesh):
    rng = np.random.default_rng(0)
    return {
        "kernel": jax.device_put(
            rng.standard_normal((8, 6)).astype(np.float32),
            NamedSharding(mesh, PartitionSpec("fsdp", None)),
        ),
        "scale": jax.device_put(
            rng.standard_normal((6,)).astype(jnp.bfloat16),
            NamedSharding(mesh, PartitionSpec()),
        ),
    }


def _corrupt(x, device_id: int, flip_bit: int = 3):
    """Rebuilds `x` from per-device buffers with one bit flipped in `device_id`'s copy."""
    buffers = []
    for shard in x.addressable_shards:
        data = np.asarray(shard.data)
        if shard.device.id == device_id:
            words = data.view(np.uint16 if data.dtype.itemsize == 2 else np.uint32).copy()
            words.flat[1] ^= 1 << flip_bit
            data = words.view(data.dtype)
        buffers.append(jax.device_put(data, shard.device))
    return jax.make_array_from_single_device_arrays(x.shape, x.sharding, buffers)


def test_identical_replicas_pass():
    params = _params(_mesh())
    assert integrity.check_replicas(params) == []
    integrity.assert_replicas_identical(params)  # does not raise


@pytest.mark.parametrize("leaf", ["kernel", "scale"])
def test_one_flipped_bit_names_the_parameter_and_device(leaf):
    mesh = _mesh()
    params = _params(mesh)
    victim = mesh.devices[2, 1]  # holds the second fsdp half of the kernel
    params[leaf] = _corrupt(params[leaf], victim.id)
    found = integrity.check_replicas(params)
    assert len(found) == 1
    m = found[0]
    assert m.path == f"['{leaf}']"
    assert m.bad_devices == ((victim.id, 0),)
    # The other replicas of the same slice are the majority.
    replicas = 4 if leaf == "kernel" else 8
    assert len(m.good_devices) == replicas - 1
    if leaf == "kernel":
        assert m.index[0] == slice(4, 8)
    with pytest.raises(integrity.ReplicaMismatch, match=rf"device {victim.id} \(process 0\)"):
        integrity.assert_replicas_identical(params)


def test_two_way_replication_without_majority_reports_both():
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    x = jax.device_put(np.arange(8, dtype=np.float32), NamedSharding(mesh, PartitionSpec()))
    x = _corrupt(x, mesh.devices[1].id, flip_bit=30)
    (m,) = integrity.check_replicas({"w": x})
    assert sorted(d for d, _ in m.bad_devices) == sorted(d.id for d in mesh.devices)
    assert m.good_devices == ()


def test_fingerprint_sees_every_word_position():
    # Swapping two words keeps the sum and xor; the position-weighted sum must catch it.
    a = jnp.array([1.0, 2.0, 3.0, 4.0], jnp.float32)
    b = jnp.array([2.0, 1.0, 3.0, 4.0], jnp.float32)
    fa, fb = np.asarray(integrity._fingerprint(a)), np.asarray(integrity._fingerprint(b))
    assert fa[0] == fb[0] and fa[1] == fb[1] and fa[2] != fb[2]


def test_two_processes_agree_on_the_faulty_device():
    """Real jax.distributed on 127.0.0.1: both processes name process 1's corrupted device."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    victim = 6  # global device index: process 1 owns the last 4 devices
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).with_name("_integrity_worker.py")),
                str(port),
                str(i),
                str(victim),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=root,
            env=env,
        )  # fmt: skip
        for i in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    # (gloo prints its own lines to stdout too)
    reports = []
    for out, _ in outs:
        lines = [x for x in out.splitlines() if "REPORT {" in x]
        assert lines, f"no report in the worker's stdout: {out[-2000:]}"
        # raw_decode: gloo's C++ logging can land on the same line right after the JSON
        # (seen in CI: '...]]}[Gloo] Rank 0 is connected to 1 peer ranks...')
        reports.append(json.JSONDecoder().raw_decode(lines[-1].split("REPORT ", 1)[1])[0])
    victim_id = reports[0]["victim"]
    assert reports[0] == reports[1]
    assert reports[0]["found"] == [["['w']", [[victim_id, 1]], 3]]
