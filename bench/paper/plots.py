"""Figures of the report, byte-identical on rerun (no software or date metadata, fixed SVG hash salt), with at
most a few labelled ticks per log axis and a legend entry for every line."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")   # the study writes files; it never opens a window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import (FixedLocator, LogFormatterSciNotation, LogLocator, NullFormatter,  # noqa: E402
                               NullLocator)

matplotlib.rcParams["svg.hashsalt"] = "bench.paper"
LABEL = {"adamw": "AdamW", "muon-moonlight": "Muon (lr_scale=moonlight)", "muon-spectral": "Muon (lr_scale=spectral)"}
COLOR = {"adamw": "C0", "muon-moonlight": "C3", "muon-spectral": "C2"}


def figure(ncols: int = 1, nrows: int = 1, width: float = 5.0, height: float = 3.8):
    """A matplotlib figure (Agg backend, no display) and its 2-D array of axes."""
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), dpi=100, squeeze=False)
    return fig, axes


def log_compute_axis(ax) -> None:
    """A log x axis labelled at 1 and 3 × each power of ten (a handful of labels over the few decades the study
    spans, none overlapping), unlabelled ticks at 2, 5."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 3.0), numticks=8))
    ax.xaxis.set_major_formatter(LogFormatterSciNotation(labelOnlyBase=False))
    ax.xaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0), numticks=8))
    ax.xaxis.set_minor_formatter(NullFormatter())


def lr_axis(ax, lrs) -> None:
    """A log x axis labelled at the LRs tried (every other one when there are more than 5), no minor ticks."""
    lrs = sorted(set(lrs))
    shown = lrs if len(lrs) <= 5 else lrs[::2]
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(shown))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(shown, [f"{x:g}" for x in shown], rotation=30)


def save(fig, out: Path, name: str, caption: str) -> str:
    """Save a figure (caption as a footer) without metadata and return its markdown image line."""
    fig.text(0.01, 0.005, caption, fontsize=7, ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(out / name, metadata={"Software": None})
    plt.close(fig)
    return f"![{name}]({name})"
