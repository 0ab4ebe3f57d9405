"""`python -m train --config configs/tiny.yaml [key=value ...]` (also the `muon-train` console script).

Multi-process (one process per host, or several local CPU processes for testing): pass `--coordinator HOST:PORT
--num-processes N --process-id I`, or set them in the environment (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
`JAX_PROCESS_ID`); on Cloud TPU / SLURM `--distributed` lets `jax.distributed.initialize()` detect everything.
"""
from __future__ import annotations

import argparse
import sys

from train.cli import add_distributed_args, initialize_distributed, load_checked_config, run_job
from train.loop import train


def parse_args(argv=None) -> argparse.Namespace:
    """The trainer's command line."""
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML config (default: the bundled configs/tiny.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optimizer.learning_rate=0.01")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="checkpoint and exit after this many steps (for time-sliced jobs); rerun to continue")
    add_distributed_args(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Parse, join the other processes, train; exit status 2 on a user error."""
    args = parse_args(argv)

    def job():
        cfg = load_checked_config(args.config, args.overrides)
        initialize_distributed(args)
        train(cfg, stop_after=args.stop_after)

    return run_job(job)


if __name__ == "__main__":
    sys.exit(main())
