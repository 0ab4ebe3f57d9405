"""Running the plan's trainer runs, or reusing finished ones from the runs folder, and reading their results."""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bench.paper.plan import BASE_CONFIG, Plan, Size, Spec
from train.config import load_config
from train.data import load_tokenizer
from train.loop import NonFiniteLoss
from train.loop import train as run_trainer
from train.mfu import flops_per_token
from train.models import param_counts
from train.plot import read_metrics
from train.runtime import cache_dir, model_config_for

MARKER = "paper.json"   # written into a run directory only once the trainer has returned (or diverged)


@dataclasses.dataclass
class Result:
    """A finished run: its metrics rows (`train.plot.read_metrics`), whether it diverged, its training time, and
    what converts steps into FLOPs."""
    spec: Spec
    run_dir: Path
    rows: list[dict]
    diverged: bool
    seconds: float
    flops_per_token: float
    tokens_per_step: int
    params: int

    @property
    def val(self) -> list[tuple[int, float]]:
        """(step, validation loss) at every eval."""
        return [(r["step"], r["val_loss"]) for r in self.rows if "val_loss" in r]

    @property
    def final_val(self) -> float:
        """The final validation loss; +inf for a run that diverged (so it never wins a sweep)."""
        return math.inf if self.diverged or not self.val else self.val[-1][1]

    @property
    def tokens_per_s(self) -> float:
        """Median throughput over the logging intervals free of compilation (the first) and of evaluation (the
        trainer evaluates after taking a row's time, so the eval lands in the next row's interval)."""
        steady = [r["tokens_per_s"] for prev, r in zip(self.rows, self.rows[1:]) if "val_loss" not in prev]
        steady = steady or [r["tokens_per_s"] for r in self.rows[1:]] or [r["tokens_per_s"] for r in self.rows]
        return float(np.median(steady)) if steady else math.nan

    def flops_at(self, step: int) -> float:
        """Training FLOPs up to `step` (the trainer's FLOPs-per-token accounting)."""
        return step * self.tokens_per_step * self.flops_per_token


class Study:
    """Runs (or reuses) trainer runs for a plan, keyed by `Spec`. With a `progress` bar, every run the study
    resolves (trained or reused) advances it."""

    def __init__(self, plan: Plan, runs: Path, progress: tqdm | None = None):
        self.plan, self.runs, self.progress = plan, runs, progress
        self.results: dict[Spec, Result] = {}

    def config(self, spec: Spec):
        """The trainer config of `spec`."""
        return load_config(BASE_CONFIG, spec.overrides(self.plan, self.runs))

    def run(self, spec: Spec) -> Result:
        """Train `spec` unless its run directory holds a finished run; a diverged run counts as finished."""
        if spec in self.results:
            return self.results[spec]
        cfg = self.config(spec)
        run_dir = Path(cfg.run_dir)
        if not (run_dir / MARKER).is_file():
            # the trainer's log lines go above the bar instead of through it
            with tqdm.external_write_mode(nolock=True):
                train_once(spec, cfg)
        status = json.loads((run_dir / MARKER).read_text())
        model_cfg = model_config_for(cfg, load_tokenizer(cfg.data, cache_dir()))
        result = Result(spec, run_dir, read_metrics(run_dir), status["diverged"], status["seconds"],
                        flops_per_token(model_cfg, cfg.seq_len), cfg.global_batch * cfg.seq_len,
                        param_counts(model_cfg)[0])
        self.results[spec] = result
        self.advance(spec)
        return result

    def advance(self, spec: Spec) -> None:
        """Count one more resolved run on the progress bar; an extended sweep raises its total."""
        if self.progress is None:
            return
        if self.progress.total is not None and self.progress.n >= self.progress.total:
            self.progress.total = self.progress.n + 1
        self.progress.set_postfix_str(spec.key, refresh=False)
        self.progress.update(1)

    def sweep(self, size: Size, optimizer: str) -> list[Result]:
        """The LR sweep of one optimizer at one size, extended while the best LR is at the grid's edge."""
        lrs = list(self.plan.lr_grid)
        factor = lrs[1] / lrs[0] if len(lrs) > 1 else 2.0
        for extension in range(self.plan.max_extend + 1):
            results = [self.run(Spec(size, optimizer, lr, self.plan.steps)) for lr in lrs]
            best_at = int(np.argmin([r.final_val for r in results]))
            if extension == self.plan.max_extend or 0 < best_at < len(lrs) - 1:
                break
            if best_at == 0:
                lrs.insert(0, lrs[0] / factor)
            else:
                lrs.append(lrs[-1] * factor)
        return sorted(results, key=lambda r: r.spec.lr)


def train_once(spec: Spec, cfg) -> None:
    """Train one run and mark its directory finished; an LR too high for an optimizer is a result of the sweep
    (the run is marked diverged), not a failure."""
    print(f"[bench.paper] training {spec.key}", flush=True)
    t0, diverged = time.perf_counter(), False
    try:
        run_trainer(cfg)
    except NonFiniteLoss as e:
        print(f"[bench.paper] {spec.key} diverged: {e}", flush=True)
        diverged = True
    marker = Path(cfg.run_dir) / MARKER
    marker.write_text(json.dumps({"seconds": time.perf_counter() - t0, "diverged": diverged}))


def best(results: list[Result]) -> Result:
    """The run with the lowest final validation loss."""
    return min(results, key=lambda r: r.final_val)
