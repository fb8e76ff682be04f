"""One process of the 2-process replica-check test (run by test_integrity.py)."""

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, pid, victim_index = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)

from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from loopcoder_jax import integrity  # noqa: E402

# data=4 over both processes x fsdp=2: each half of `w` has 4 replicas, 2 per process.
victim = jax.devices()[victim_index].id  # ids are not 0..7 across processes
mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
sharding = NamedSharding(mesh, PartitionSpec("fsdp"))
full = np.arange(16, dtype=np.float32)
buffers = []
for dev, index in sharding.addressable_devices_indices_map(full.shape).items():
    data = full[index].copy()
    if dev.id == victim:
        data.view(np.uint32)[0] ^= 1  # one flipped bit in one replica
    buffers.append(jax.device_put(data, dev))
w = jax.make_array_from_single_device_arrays(full.shape, sharding, buffers)
found = integrity.check_replicas({"w": w})
report = [[m.path, [list(d) for d in m.bad_devices], len(m.good_devices)] for m in found]
# Marked, on a line of its own: gloo's C++ logging shares stdout and may leave a line unended.
print("\nREPORT " + json.dumps({"victim": victim, "found": report}), flush=True)
