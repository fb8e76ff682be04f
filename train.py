"""Train LoopCoder: `python train.py [--config configs/<x>.yaml] [--set section.key=value ...]`.

With no arguments it trains the tiny embedded default (configs/tiny.yaml: the `tiny` preset on
the corpus shipped in the package) into runs/tiny, resuming if that run has checkpoints.
Multi-process (several hosts, or several processes on one machine): pass --coordinator,
--num-processes and --process-id to every process, or --distributed on a TPU pod slice (the
coordinator is discovered). See docs/training.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tiny.yaml")


def build_parser() -> argparse.ArgumentParser:
    from loopcoder_jax.cli import HelpFormatter

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", default=None, help="YAML preset (default: configs/tiny.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set train.lr=1e-3 --set model.loop_num=1 "
        "(repeatable)",
    )
    p.add_argument(
        "--run-dir", default=None,
        help="shorthand for --set train.run_dir=DIR (default: the config's, runs/tiny)",
    )  # fmt: skip
    p.add_argument(
        "--steps", type=int, default=None,
        help="shorthand for --set train.steps=N (default: the config's)",
    )  # fmt: skip
    p.add_argument(
        "--init-from", default=None,
        help="params checkpoint to start from: converter output or a run dir (default: random "
        "init)",
    )  # fmt: skip
    p.add_argument(
        "--stop-at", type=int, default=None, metavar="STEP",
        help="checkpoint and exit once this step is reached; resume later with the same config "
        "(default: run to train.steps)",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    dist = p.add_argument_group("multi-process")
    dist.add_argument(
        "--distributed", action="store_true",
        help="jax.distributed.initialize() with discovery (TPU pod slices)",
    )  # fmt: skip
    dist.add_argument(
        "--coordinator", default=None, help="HOST:PORT of process 0 (default: single process)"
    )
    dist.add_argument(
        "--num-processes", type=int, default=None,
        help="processes in the job, with --coordinator (default: single process)",
    )  # fmt: skip
    dist.add_argument(
        "--process-id", type=int, default=None,
        help="this process's index, with --coordinator (default: single process)",
    )  # fmt: skip
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _overrides(args) -> dict[str, str]:
    out = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"--set expects SECTION.KEY=VALUE, got {item!r}")
        out[key.strip()] = value
    if args.run_dir is not None:
        out["train.run_dir"] = args.run_dir
    if args.steps is not None:
        out["train.steps"] = str(args.steps)
    if args.init_from is not None:
        out["train.init_from"] = args.init_from
    return out


class _NoBackgroundTracebacks(logging.Filter):
    """Orbax logs a failed background save with its traceback before re-raising it in the
    main thread, where train.py reports it in one line (exit 2): keep the log line, drop the
    traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and "orbax" in record.pathname:
            record.exc_info, record.exc_text = None, None
        return True


def main(argv=None) -> int:
    args = parse_args(argv)
    from loopcoder_jax import distributed  # imports jax: keep it off the --help path

    distributed.initialize(args)

    from loopcoder_jax import checkpoint as ckpt
    from loopcoder_jax.config import ConfigError, ExperimentConfig
    from loopcoder_jax.runlock import RunDirLockedError
    from loopcoder_jax.trainer import SilentCorruptionError, TrainingDivergedError, run

    # After the imports above, which install the log handlers Orbax writes to.
    for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
        handler.addFilter(_NoBackgroundTracebacks())
    # Faults that end a run with a message naming the problem and the fix (exit 2).
    clear_errors = (
        ConfigError,
        TrainingDivergedError,
        SilentCorruptionError,
        RunDirLockedError,
        ckpt.CheckpointCorruptError,
        ckpt.CheckpointSaveError,
        ckpt.CheckpointNotFoundError,
    )
    config = args.config or DEFAULT_CONFIG
    try:
        exp = ExperimentConfig.from_yaml(config, _overrides(args))
        run(exp, progress=not args.no_progress, stop_at=args.stop_at)
    except clear_errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # MeshError, DataError, ...: messages name the fix
        if type(e).__name__ in ("MeshError", "DataError", "TokenizerError", "RemoteStorageError"):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
