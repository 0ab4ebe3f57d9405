"""Figures of the report: one style per optimizer, a figure factory, validation curves, and saving a figure with
its config as a footer."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")   # the study writes files; it never opens a window
import matplotlib.pyplot as plt  # noqa: E402

from bench.paper.runs import Result  # noqa: E402

LABEL = {"adamw": "AdamW", "muon": "Muon (Moonlight scaling)"}
COLOR = {"adamw": "C0", "muon": "C3"}


def figure(ncols: int = 1, nrows: int = 1, width: float = 6.0, height: float = 4.0):
    """A matplotlib figure (Agg backend, no display) and its 2-D array of axes."""
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), dpi=110, squeeze=False)
    return fig, axes


def plot_val(ax, result: Result, fmt: str, x=None, **style) -> None:
    """The validation curve of `result` against its steps, or against `x(step)`; nothing for a run that
    diverged before its first eval."""
    if not result.val:
        return
    steps, vals = zip(*result.val)
    ax.plot(steps if x is None else [x(s) for s in steps], vals, fmt, **style)


def save(fig, out: Path, name: str, caption: str) -> str:
    """Save a figure (caption = its config, as a footer) and return its markdown image line."""
    fig.text(0.01, 0.005, caption, fontsize=7, ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(out / name)
    plt.close(fig)
    return f"![{name}]({name})"
