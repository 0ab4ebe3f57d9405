"""`python -m train.plot RUN_DIR [RUN_DIR ...] [--out loss.png]`: training and validation loss curves as a PNG.

Reads each run's `metrics.jsonl`; train loss is solid, validation loss dashed with markers, one colour per run.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass run directories written by `python -m train`")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_step = {r["step"]: r for r in rows}  # a resumed run re-logs steps after its checkpoint: keep the latest
    return [by_step[s] for s in sorted(by_step)]


def plot_runs(run_dirs, out: str | Path, x: str = "step") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for i, run in enumerate(run_dirs):
        rows, color = read_metrics(run), f"C{i}"
        ax.plot([r[x] for r in rows], [r["loss"] for r in rows], color=color, label=f"{Path(run).name} train")
        val = [r for r in rows if "val_loss" in r]
        if val:
            ax.plot([r[x] for r in val], [r["val_loss"] for r in val], "--o", color=color, markersize=3,
                    label=f"{Path(run).name} val")
    ax.set_xlabel(x)
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/loss.png of the first run)")
    args = parser.parse_args(argv)
    out = plot_runs(args.run_dirs, args.out or Path(args.run_dirs[0]) / "loss.png")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
