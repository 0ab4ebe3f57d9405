"""Run records: one JSON file per finished run (`DIR/KEY.json`, KEY = `Spec.key`), written atomically, read back
checked; and the provenance every record carries (machine, device, commit)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from bench.paper.plan import ROOT

RECORDS = ROOT / "bench" / "paper" / "records"
REQUIRED = ("study", "key", "size", "d_model", "layers", "non_embedding_params", "params", "tokens", "steps",
            "train_flops", "train_flops_ns", "optimizer", "lr_scale", "lr", "weight_decay", "seed",
            "final_val_loss", "diverged", "val_tokens", "seconds", "machine", "commit", "pretrain_optimizer")


class RecordError(ValueError):
    """A record file that cannot be used."""


def write_record(directory: Path, record: dict) -> Path:
    """Write `record` to DIR/KEY.json: a temporary file renamed into place, so a killed run leaves no record."""
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise RecordError(f"record {record.get('key')!r} lacks {missing}; bench.paper.runs.make_record sets them")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{record['key']}.json"
    tmp = path.with_suffix(f".json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def read_records(directory: Path) -> dict[str, dict]:
    """Every record of DIR, by key (file name order). A file without the required keys is an error naming it."""
    out = {}
    for path in sorted(Path(directory).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except ValueError as e:
            raise RecordError(f"{path}: not JSON ({e}); delete it and rerun python -m bench.paper") from e
        missing = [k for k in REQUIRED if k not in record]
        if missing or record["key"] != path.stem:
            raise RecordError(f"{path}: missing keys {missing} or a key other than its file name; delete it and "
                              "rerun python -m bench.paper")
        out[record["key"]] = record
    return out


def machine() -> str:
    """The CPU model and the cores this process may use, from /proc/cpuinfo and the affinity mask."""
    model = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {os.cpu_count()} cores ({cores} usable)"


def git(*args: str) -> str:
    """stdout of a git command in the repository ('' if git fails)."""
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()


def commit() -> dict:
    """HEAD at run time, and the tracked files that differed from it (the code the run actually used may hold
    those edits; records of one commit with no dirty study or trainer file are exactly reproducible)."""
    dirty = sorted(line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines())
    return {"commit": git("rev-parse", "HEAD") or "unknown", "dirty_files": dirty}
