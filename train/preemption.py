"""Preemption: SIGTERM / SIGINT become a request to stop, which every process agrees on at the same step.

Schedulers (SLURM `--signal`, Kubernetes, GCE/TPU maintenance, spot reclaims) announce preemption with SIGTERM and
kill after a grace period. While a `StopSignal` is active, SIGTERM and SIGINT only set a flag; the training loop
polls `agreed()` once per step, finishes the step in flight, checkpoints it and raises `Preempted`. Further signals
during that save are recorded and otherwise ignored, so they cannot cut it short.

Agreement across processes: each process's flag goes into a 1-element-per-device array reduced with `max` over the
run's mesh; every process reads the same reduced value, so all stop after the same step and none is left waiting
in a collective. The vote is dispatched asynchronously and read one poll later: it costs one all-reduce of an
int32 per step and bounds the host to about one step ahead of the devices (enough to overlap batch preparation
with the step); the price is that a multi-process run stops one step later than a single-process one.
`jax.experimental.multihost_utils.reached_preemption_sync_point` also agrees on a step, but it reacts to SIGTERM
only (not Ctrl-C), needs `jax.distributed`, and its C++ SIGTERM handler and a Python one exclude each other.
"""
from __future__ import annotations

import signal
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from train.runtime import replicated, to_host

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """The run stopped on a signal after checkpointing `step` (`checkpoint` None: it stopped before its first
    step, and nothing new was written). `str()` is the one line the command prints."""

    def __init__(self, step: int, checkpoint: Path | None, signals: list[str]):
        self.step, self.checkpoint, self.signals = step, checkpoint, signals
        if checkpoint is None:
            line = (f"preempted before step {step + 1} ({signals[0]}); no checkpoint written; "
                    f"rerun the same command to {'continue' if step else 'start'}")
        else:
            line = (f"preempted at step {step}; checkpoint written to {checkpoint}; "
                    "rerun the same command to continue")
        super().__init__(line)


class StopSignal:
    """A context manager: while active (in the main thread), SIGTERM and SIGINT are recorded instead of ending the
    process; `agreed()` says whether the run should stop now. Outside the main thread (where Python cannot take
    signals) it installs nothing and never asks to stop."""

    def __init__(self):
        self.received: list[str] = []   # names of the signals received, in order
        self._previous, self._pending, self._vote_fn = {}, None, None

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._record) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _record(self, signum, frame) -> None:
        # only append: a handler runs between two bytecodes of the main thread, which may be inside print/logging
        self.received.append(signal.Signals(signum).name)

    def agreed(self, mesh: jax.sharding.Mesh, wait: bool = False) -> bool:
        """Whether all processes have been asked to stop. Every process must call this at the same points of the
        loop. Single process: the local flag. Several: the reduced vote of the previous call (this call's vote
        is read by the next one), or this call's own vote with `wait=True`."""
        if jax.process_count() == 1:
            return bool(self.received)
        vote = self._vote(mesh, bool(self.received))
        if wait:
            self._pending = None
            return bool(to_host(vote))
        previous, self._pending = self._pending, vote
        return previous is not None and bool(to_host(previous))

    def _vote(self, mesh: jax.sharding.Mesh, flag: bool) -> jax.Array:
        """max over the mesh of every device's copy of its process's flag (dispatched, not waited for)."""
        if self._vote_fn is None:
            self._vote_fn = jax.jit(jnp.max, out_shardings=replicated(mesh))
        sharding = NamedSharding(mesh, P(mesh.axis_names))
        local = np.full((1,), flag, np.int32)
        return self._vote_fn(jax.make_array_from_callback((mesh.size,), sharding, lambda _: local))
