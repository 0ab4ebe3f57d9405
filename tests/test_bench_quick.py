"""`python -m bench.optimizer --quick` and `python -m bench.gram_ns --quick` end to end, as CI runs them.

They check that the scripts run and print well-formed tables whose FLOP counts (from cost_analysis, not
timings) show Gram NS where "auto" should pick it; speed itself is only measured by the full runs."""
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(module: str, env: dict) -> str:
    proc = subprocess.run([sys.executable, "-m", module, "--quick"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in re.findall(r"^\|.*\|$", text, re.M)
            if not line.startswith("|---")]


@pytest.mark.slow
def test_optimizer_quick_table(cpu_env):
    table = {(r[0], r[1]): r for r in rows(run("bench.optimizer", cpu_env(1))) if r[0] != "shape"}
    shapes = {s for s, _ in table}
    assert shapes == {"quick [1, 128, 128]", "quick [1, 128, 32]", "quick [1, 128, 512]", "quick [1, 512, 128]",
                      "quick tree (L=1, vocab 1000)"}, shapes
    for row in table.values():
        assert all(math.isfinite(float(v.rstrip("×"))) and float(v.rstrip("×")) > 0 for v in row[2:]), row
    gflop = {k: float(r[3]) for k, r in table.items()}
    for shape in ("quick [1, 128, 512]", "quick [1, 512, 128]", "quick tree (L=1, vocab 1000)"):
        assert gflop[shape, "muon_jax auto"] < 0.8 * gflop[shape, "muon_jax standard"], shape
    assert gflop["quick [1, 128, 128]", "muon_jax auto"] == gflop["quick [1, 128, 128]", "muon_jax standard"]


@pytest.mark.slow
def test_gram_ns_quick_tables(cpu_env):
    out = run("bench.gram_ns", cpu_env(1))  # prints each section as it goes, then the whole report: rows come twice
    f32 = [list(r) for r in dict.fromkeys(tuple(r) for r in rows(out) if r[0] in ("moonlight", "polar_express"))]
    assert len(f32) == 4 and all(float(v) <= 1e-4 for r in f32 if r[1].startswith("default") for v in r[2:]), f32
    half = [r for r in rows(out) if r[0] == "bf16"]
    assert {r[2] for r in half} >= {"standard", "gram (3,)"}, half
