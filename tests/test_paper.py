"""`python -m bench.paper --quick` end to end: the report and its plots are written and well-formed.

This checks the pipeline (runs, reuse, sections, plots), not Moonlight's claims: quick-mode runs are 8 steps long."""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ["## 1. Update RMS", "## 2. Learning-rate sweeps", "## 3. Steps to reach", "## 4. Weight decay",
            "## 5. SVD entropy", "## 6. Scaling", "## 7. Optimizer cost", "## Runs", "## Limitations"]
PNG = b"\x89PNG\r\n\x1a\n"


def quick(out: Path, runs: Path) -> subprocess.CompletedProcess:
    # the CLI as a user runs it: one CPU device (not the 8 simulated ones conftest sets for the other tests)
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "bench.paper", "--quick", "--out", str(out), "--runs", str(runs)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_quick_study_writes_a_well_formed_report(tmp_path):
    out, runs = tmp_path / "out", tmp_path / "runs"
    # a section another script maintains in results.md survives the rewrite; the old study's text does not
    kept = "## Kept (`bench/other.py`)\n\n<!-- bench/other.py:begin -->\nwritten elsewhere\n<!-- bench/other.py:end -->"
    out.mkdir()
    (out / "results.md").write_text(f"# an older study\n\n## 1. Old\n\nold text\n\n{kept}\n")
    proc = quick(out, runs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = (out / "results.md").read_text()
    assert doc.endswith(kept + "\n") and "older study" not in doc

    positions = [doc.find(s) for s in SECTIONS]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), positions
    for section in re.split(r"\n## ", doc)[1:-2]:   # every section but Limitations (and Kept) has a table
        assert re.search(r"^\|.*\|\n\|(---\|)+\n\|", section, re.M), section[:200]
    for row in re.findall(r"^\|.*\|$", doc, re.M):
        for cell in row.strip("|").split("|"):
            for number in re.findall(r"-?\d+\.\d+(?:e[+-]?\d+)?", cell):
                assert math.isfinite(float(number)), row
        assert not re.search(r"\b(nan|inf)\b", row, re.I), row

    images = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", doc)
    assert len(images) == 6, images
    for name in images:
        data = (out / name).read_bytes()
        assert data[:8] == PNG and len(data) > 10_000, name   # a real plot, not an empty canvas

    # every run finished, and a finished run is reused, not trained again (what makes the study resumable)
    assert len(list(runs.glob("*/paper.json"))) == 7
    from bench.paper import QUICK, Spec, Study
    spec = Spec(QUICK.sizes[0], "muon", QUICK.lr_grid[-1], QUICK.steps)
    before = (runs / spec.key / "metrics.jsonl").read_text()
    result = Study(QUICK, runs).run(spec)
    assert (runs / spec.key / "metrics.jsonl").read_text() == before
    assert math.isfinite(result.final_val) and result.val[-1][0] == QUICK.steps
