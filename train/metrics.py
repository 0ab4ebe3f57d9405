"""What a run reports: metrics.jsonl (one JSON object per logged step), TensorBoard, and the progress line."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np


class MetricsWriter:
    """metrics.jsonl (one object per logged step) + TensorBoard, from process 0 only."""

    def __init__(self, run_dir: Path, tensorboard: bool):
        self.enabled = jax.process_index() == 0
        self.tb = None
        if self.enabled:
            path = run_dir / "metrics.jsonl"
            if path.is_file():  # a process killed mid-write leaves a partial last line: drop it
                text = path.read_text()
                if text and not text.endswith("\n"):
                    path.write_text(text[:text.rfind("\n") + 1])
            self.file = open(path, "a")
            if tensorboard:
                from tensorboardX import SummaryWriter  # optional: only runs that ask for TensorBoard need it
                self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        """Append one step's metrics (scalars, or lists such as per-layer values)."""
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.tb:
            for k, v in metrics.items():
                for name, x in ([(f"{k}/{i}", x) for i, x in enumerate(v)] if isinstance(v, list) else [(k, v)]):
                    self.tb.add_scalar(name, x, step)

    def close(self) -> None:
        """Flush and close the files."""
        if self.enabled:
            self.file.close()
            if self.tb:
                self.tb.close()


def format_eta(seconds: float) -> str:
    """'1h05m' or '4m07s'."""
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def metrics_row(fetched: list[dict], tokens_per_s: float, mfu: float | None, skipped: int) -> dict:
    """The logged row for a group of steps: mean loss over them, the last step's other metrics (lists stay lists)."""
    m = fetched[-1]
    return {"loss": float(np.mean([f["loss"] for f in fetched])), "lr": float(m["lr"]),
            "grad_norm": float(m["grad_norm"]), "tokens_per_s": tokens_per_s, "mfu": mfu, "skipped_steps": skipped,
            **{k: float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()
               for k, v in m.items() if k not in ("loss", "lr", "grad_norm", "finite")}}


def format_mfu(mfu: float | None) -> str:
    """'MFU 41.3%', or 'MFU n/a' where the device's peak is unknown."""
    return "MFU n/a" if mfu is None else f"MFU {100 * mfu:.1f}%"


def progress_line(step: int, steps: int, row: dict, eta_seconds: float) -> str:
    """step, loss, val loss, lr, grad norm, tokens/s, MFU and ETA on one line."""
    val = f" | val {row['val_loss']:.4f}" if "val_loss" in row else ""
    return (f"step {step:>6}/{steps} | loss {row['loss']:.4f}{val} | lr {row['lr']:.2e} | "
            f"gnorm {row['grad_norm']:.2f} | {row['tokens_per_s'] / 1e3:.1f}k tok/s | {format_mfu(row['mfu'])} "
            f"| ETA {format_eta(eta_seconds)}")
