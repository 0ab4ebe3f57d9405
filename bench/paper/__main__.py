"""`python -m bench.paper [--quick] [--report-only] [--study NAME ...] [--out DIR] [--records DIR] [--runs DIR]`:
train the runs of the study that have no record yet (in plan order), then write the report from the records."""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import bench.paper
from bench.paper.plan import FULL, QUICK, ROOT, STUDIES, next_spec
from bench.paper.records import RECORDS, read_records
from bench.paper.report import write_report


def main(argv=None) -> None:
    """Parse the command line; train what is missing (unless --report-only); write the report."""
    parser = argparse.ArgumentParser(prog="python -m bench.paper", description=bench.paper.__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="minutes-long miniature of the pipeline (CI)")
    parser.add_argument("--report-only", action="store_true", help="write the report from the records; train nothing")
    parser.add_argument("--out", type=Path, default=None,
                        help="where results.md, results.json and the PNGs go (default docs/, quick: runs/paper-quick)")
    parser.add_argument("--records", type=Path, default=None,
                        help="run records (default bench/paper/records, quick: runs/paper-quick/records)")
    parser.add_argument("--runs", type=Path, default=None,
                        help="run directories (default runs/paper, quick: runs/paper-quick/runs)")
    parser.add_argument("--study", nargs="+", choices=STUDIES, default=STUDIES,
                        help="train only these parts of the study (disjoint parts can run side by side)")
    parser.add_argument("--max-runs", type=int, default=None, help="stop training after this many runs")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    quick_dir = ROOT / "runs" / "paper-quick"
    out = args.out or (quick_dir if args.quick else ROOT / "docs")
    records_dir = args.records or (quick_dir / "records" if args.quick else RECORDS)
    runs = args.runs or (quick_dir / "runs" if args.quick else ROOT / "runs" / "paper")
    if not args.report_only:
        train_missing(plan, records_dir, runs, args.quick, args.max_runs, tuple(args.study))
    path = write_report(plan, read_records(records_dir), out)
    print(f"[bench.paper] wrote {path}", flush=True)


def train_missing(plan, records_dir: Path, runs: Path, quick: bool, max_runs: int | None,
                  studies: tuple[str, ...] = STUDIES) -> None:
    """Train the plan's next missing run of `studies` until none is missing (or `max_runs` ran)."""
    if quick:
        # quick runs are compile-bound: XLA's cheapest CPU code generation halves compile time (set before the
        # first computation, when the backend reads XLA_FLAGS)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    import jax   # noqa: PLC0415 (after XLA_FLAGS)

    from bench.paper.runs import train_spec   # noqa: PLC0415 (the trainer only when training)
    # runs of one size share compiled programs; a restarted study too
    jax.config.update("jax_compilation_cache_dir", str(runs / "jax-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    done, t0 = 0, time.perf_counter()
    while max_runs is None or done < max_runs:
        records = read_records(records_dir)
        spec = next_spec(plan, records, studies)
        if spec is None:
            break
        train_spec(spec, plan, runs, records_dir)
        done += 1
        print(f"[bench.paper] {done} runs this invocation, {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
