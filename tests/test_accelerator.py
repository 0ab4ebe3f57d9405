"""Honest MFU (peak table, measured and cached CPU peak, 'MFU n/a' for unknown devices) and the accelerator
benchmark's --quick path, run as CI runs it."""
import subprocess
import sys
import types
from pathlib import Path

import pytest

from train import mfu
from train.metrics import metrics_row, progress_line

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("kind, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12),
                                        ("NVIDIA A100-SXM4-80GB", 312e12), ("TPU v4", 275e12),
                                        ("TPU v5 lite", 197e12), ("TPU v5p", 459e12), ("TPU v6 lite", 918e12),
                                        ("NVIDIA GeForce RTX 4090", None)])
def test_peak_flops_table_and_unknown_device(kind, peak):
    device = types.SimpleNamespace(platform="gpu" if "TPU" not in kind else "tpu", device_kind=kind)
    assert mfu.peak_flops(device) == peak


def test_unknown_peak_prints_mfu_na():
    row = metrics_row([{"loss": 1.0, "lr": 0.1, "grad_norm": 1.0, "finite": True}], 1000.0, None, 0)
    assert row["mfu"] is None
    assert "MFU n/a" in progress_line(1, 10, row, 5.0)
    assert "MFU 41.0%" in progress_line(1, 10, {**row, "mfu": 0.41}, 5.0)


def test_cpu_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
    measured = mfu.measure_cpu_flops(n=256, repeats=2)
    assert 1e8 < measured < 1e14, measured   # a real rate: above 0.1 GFLOP/s, below any CPU's peak
    calls = []
    monkeypatch.setattr(mfu, "measure_cpu_flops", lambda: calls.append(1) or 123e9)
    assert mfu.cpu_peak_flops(tmp_path) == 123e9
    assert mfu.cpu_peak_flops(tmp_path) == 123e9 and len(calls) == 1   # the second call reads the cache
    assert mfu.cpu_key() in (tmp_path / mfu.CPU_PEAK_FILE).read_text()
    cpu = types.SimpleNamespace(platform="cpu", device_kind="cpu")
    import jax
    assert mfu.peak_flops(cpu, cache=tmp_path) == pytest.approx(123e9 / len(jax.local_devices(backend="cpu")))


def test_accelerator_benchmark_quick_runs(tmp_path, cpu_env):
    env = {**cpu_env(1), "PYTHONPATH": str(ROOT), "MUON_JAX_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "bench.accelerator", "--quick"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "failed" not in text and "skipped" not in text, text
    for row in ("| tiny | 64×256 | optax.contrib.muon |", "| tiny | 64×256 | muon_jax", "| llama_1b (tiny) | muon |",
                "| moonlight (tiny) | adamw |", "Attention (bf16): xla"):
        assert row in text, (row, text)
