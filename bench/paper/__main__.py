"""`python -m bench.paper [--quick] [--out docs/] [--runs runs/paper]`: run the study and write its report."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import jax

import bench.paper
from bench.paper.plan import FULL, QUICK, ROOT
from bench.paper.report import run_study


def main(argv=None) -> None:
    """Parse the command line, set up the compilation cache, and run the full or the quick study."""
    parser = argparse.ArgumentParser(prog="python -m bench.paper", description=bench.paper.__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="minutes-long miniature of the pipeline (CI)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where results.md and the PNGs go")
    parser.add_argument("--runs", type=Path, default=None,
                        help="run directories (default runs/paper, or runs/paper-quick with --quick)")
    args = parser.parse_args(argv)
    runs = args.runs or ROOT / "runs" / ("paper-quick" if args.quick else "paper")
    if args.quick:
        # a quick run's 8-step trainings are compile-bound: XLA's cheapest CPU code generation halves compile
        # time (set before the first computation, when the backend reads XLA_FLAGS)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    # runs of one size share compiled programs (model init, eval step, optimizer init); a restarted study too
    jax.config.update("jax_compilation_cache_dir", str(runs / "jax-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    run_study(QUICK if args.quick else FULL, args.out, runs, args.quick)


if __name__ == "__main__":
    main()
