"""What the command-line entry points share: loading and checking the config before any work, multi-process
start-up, and one-line errors (exit 2) for user mistakes."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

import jax

from train.checkpoint import CheckpointError
from train.config import Config, ConfigError, load_config
from train.data import DataError
from train.loop import NonFiniteLoss
from train.models import model_config_from_dict
from train.optim import make_optimizer, make_schedule
from train.preemption import Preempted

USER_ERRORS = (ConfigError, DataError, CheckpointError, NonFiniteLoss)
# EX_TEMPFAIL (sysexits.h): "temporary failure, the user is invited to retry". A scheduler's requeue hook can tell
# a preempted run (rerun it) from success (0), a crash (1) and a user error (2).
PREEMPTED_EXIT_CODE = 75
# The model section leaves vocab_size to the tokenizer, known only after data work; any size checks the other keys.
CHECK_VOCAB_SIZE = 50257


def check_config(cfg: Config) -> None:
    """What `load_config` cannot check from the bottom of train/, done before any data work or JAX start-up: the
    model section builds a model config (strict keys and values), and the optimizer constructs (muon_jax checks its
    options at construction, single-device: no mesh is needed). A ValueError from either is a ConfigError."""
    try:
        model_config_from_dict({"vocab_size": CHECK_VOCAB_SIZE, "max_position_embeddings": max(cfg.seq_len, 2048),
                                **cfg.model})
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    try:
        make_optimizer(cfg, make_schedule(cfg), mesh=None)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"optimizer: {e}") from None


def load_checked_config(path, overrides) -> Config:
    """`load_config(path, overrides)` then `check_config`: what every command line that runs a config calls first."""
    cfg = load_config(path, overrides)
    check_config(cfg)
    return cfg


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """--coordinator / --num-processes / --process-id (or JAX_* variables), --distributed and the timeouts."""
    parser.add_argument("--coordinator", default=os.environ.get("JAX_COORDINATOR_ADDRESS"))
    parser.add_argument("--num-processes", type=int, default=os.environ.get("JAX_NUM_PROCESSES"))
    parser.add_argument("--process-id", type=int, default=os.environ.get("JAX_PROCESS_ID"))
    parser.add_argument("--distributed", action="store_true", help="jax.distributed.initialize() with auto-detection")
    parser.add_argument("--initialization-timeout", type=int, default=300,
                        help="seconds to wait for the other processes to join before failing")
    parser.add_argument("--heartbeat-timeout", type=int, default=100,
                        help="seconds without a heartbeat after which a lost process fails the others")


def initialize_distributed(args: argparse.Namespace) -> None:
    """Join the other processes of a multi-process job, if the arguments describe one."""
    if args.coordinator and args.num_processes and args.num_processes > 1:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                   initialization_timeout=args.initialization_timeout,
                                   heartbeat_timeout_seconds=args.heartbeat_timeout)
    elif args.distributed:
        jax.distributed.initialize()


def run_job(job: Callable[[], object]) -> int:
    """Run `job()` with the trainer's logging; a user-facing error (bad config or data, unusable checkpoint,
    non-finite loss) prints one line and exits 2 instead of a traceback; a run stopped by SIGTERM/SIGINT (checkpointed
    at the step it reached) prints one line and exits PREEMPTED_EXIT_CODE (75)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        job()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(e, flush=True)
        return PREEMPTED_EXIT_CODE
    return 0
