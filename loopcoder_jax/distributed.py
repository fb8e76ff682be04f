"""Multi-process start-up shared by `train.py` and `infer.py` (their --distributed,
--coordinator, --num-processes and --process-id flags).

Every process runs the same command. On a TPU pod slice `--distributed` lets
`jax.distributed.initialize()` discover the coordinator; elsewhere (CPU processes on one
host, a cluster without discovery) `--coordinator HOST:PORT --num-processes N --process-id I`
names it.
"""

from __future__ import annotations

import argparse
import os


def initialize(args: argparse.Namespace) -> None:
    """Starts `jax.distributed` as the flags ask (nothing when none is given)."""
    import jax

    if args.coordinator or args.num_processes:
        on_cpu = os.environ.get("JAX_PLATFORMS") == "cpu"
        if on_cpu or jax.config.jax_platforms in (None, "", "cpu"):
            # CPU processes need a collectives backend to talk to each other (setting it is
            # harmless where the devices are TPUs: it only concerns the CPU backend).
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    elif args.distributed:
        jax.distributed.initialize()  # TPU pod slice: discovered from the environment
