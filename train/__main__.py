"""`python -m train --config configs/tiny.yaml [key=value ...]` (also the `muon-train` console script).

Multi-process (one process per host, or several local CPU processes for testing): pass `--coordinator HOST:PORT
--num-processes N --process-id I`, or set them in the environment (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
`JAX_PROCESS_ID`); on Cloud TPU / SLURM `--distributed` lets `jax.distributed.initialize()` detect everything.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML config (default: configs/tiny.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optimizer.learning_rate=0.01")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="checkpoint and exit after this many steps (for time-sliced jobs); rerun to continue")
    parser.add_argument("--coordinator", default=os.environ.get("JAX_COORDINATOR_ADDRESS"))
    parser.add_argument("--num-processes", type=int, default=os.environ.get("JAX_NUM_PROCESSES"))
    parser.add_argument("--process-id", type=int, default=os.environ.get("JAX_PROCESS_ID"))
    parser.add_argument("--distributed", action="store_true", help="jax.distributed.initialize() with auto-detection")
    parser.add_argument("--initialization-timeout", type=int, default=300,
                        help="seconds to wait for the other processes to join before failing")
    parser.add_argument("--heartbeat-timeout", type=int, default=100,
                        help="seconds without a heartbeat after which a lost process fails the others")
    return parser.parse_args(argv)


def initialize_distributed(args) -> None:
    import jax
    if args.coordinator and args.num_processes and args.num_processes > 1:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                   initialization_timeout=args.initialization_timeout,
                                   heartbeat_timeout_seconds=args.heartbeat_timeout)
    elif args.distributed:
        jax.distributed.initialize()


def run_job(job) -> int:
    """Run `job()` with the trainer's logging; a user-facing error (bad config or data, unusable checkpoint,
    non-finite loss) prints one line and exits 2 instead of a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from train.checkpoint import CheckpointError
    from train.config import ConfigError
    from train.data import DataError
    from train.train import NonFiniteLoss
    try:
        job()
    except (ConfigError, DataError, CheckpointError, NonFiniteLoss) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)

    def job():
        from train.config import load_config
        from train.train import train
        cfg = load_config(args.config, args.overrides)
        initialize_distributed(args)
        train(cfg, stop_after=args.stop_after)

    return run_job(job)


if __name__ == "__main__":
    sys.exit(main())
