"""bench.paper: the study's plan, the compute ratio against a known multiplier, a report computed from records
alone and byte-identical on rerun, and `python -m bench.paper --quick` end to end (records -> report).

The quick run checks the pipeline, not Moonlight's claims: its runs are a few steps long."""
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.paper.analysis import compute_ratio, compute_to_reach
from bench.paper.plan import QUICK, Size, next_spec
from bench.paper.records import REQUIRED, read_records, write_record
from bench.paper.report import write_report

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"
SECTIONS = ["## Status", "## 1. Scaling", "## 2. Compute ratio", "## 3. LR transfer", "## 4. SFT 2×2", "## Runs",
            "## Limitations"]
PLAN = dataclasses.replace(QUICK, points=3, max_extend=3)


def adamw_loss(compute: float) -> float:
    """A smooth loss-vs-compute frontier (a saturating power law, as in scaling-law fits)."""
    return 3.0 + 40.0 * compute ** -0.12


def fake_record(spec, loss: float, compute: float, seconds: float = 10.0) -> dict:
    """A record as bench.paper.runs.make_record writes it, with a chosen loss and compute."""
    return {"study": spec.study, "key": spec.key, "size": spec.size.name, "d_model": spec.size.hidden,
            "layers": spec.size.layers, "non_embedding_params": 1000 * spec.size.hidden, "params": 2000 * spec.size.hidden,
            "vocab_size": 1024, "tokens": 5000 * spec.size.hidden, "steps": spec.steps, "seq_len": 64,
            "global_batch": 4, "train_flops": compute, "train_flops_ns": compute * (1.1 if spec.optimizer == "muon" else 1),
            "optimizer": spec.optimizer, "lr_scale": spec.lr_scale, "lr": spec.lr, "weight_decay": 0.1,
            "seed": spec.seed, "final_val_loss": loss, "initial_val_loss": None, "diverged": False,
            "val_tokens": 1024, "seconds": seconds, "tokens_per_s": None, "train_loss_curve": [],
            "machine": "test CPU", "device": "cpu", "commit": "0" * 40, "dirty_files": [],
            "pretrain_optimizer": spec.pretrain.optimizer if spec.pretrain else None,
            "pretrain_lr": spec.pretrain.lr if spec.pretrain else None,
            "config": {"data": {"val_fraction": 0.3}, "log": {"eval_batches": 10**6}}}


def simulate(plan, ratio: float, noise: float = 0.0, best_lr=None) -> dict:
    """Run the plan's scheduling to completion on synthetic losses: AdamW follows `adamw_loss`, Muon reaches AdamW's
    loss with `ratio` × the compute; a quadratic LR penalty in log2(lr / best LR of the mode); seed noise."""
    best_lr = best_lr or {"adamw": 2e-3, "muon-moonlight": 1.6e-2, "muon-spectral": 6.4e-2}
    compute = {s.name: 1e9 * 4.0 ** i for i, s in enumerate(sorted({*plan.sizes, *(Size(w, plan.transfer_layers)
                                                                                   for w in plan.transfer_widths)}))}
    rng = np.random.default_rng(1)
    records: dict = {}
    while (spec := next_spec(plan, records)) is not None:
        c = compute[spec.size.name]
        base = adamw_loss(c if spec.optimizer == "adamw" else c / ratio)
        loss = base + 0.05 * math.log2(spec.lr / best_lr[spec.mode]) ** 2 + noise * rng.standard_normal()
        records[spec.key] = fake_record(spec, loss, c)
    return records


def test_compute_to_reach_interpolates_inside_the_range_only():
    frontier = [(1e9, 5.0), (1e10, 4.0), (1e11, 3.5)]
    assert compute_to_reach(frontier, 4.5) == pytest.approx(math.log(10 ** 9.5))
    assert compute_to_reach(frontier, 3.75) == pytest.approx(math.log(10 ** 10.5))
    assert compute_to_reach(frontier, 5.01) is None and compute_to_reach(frontier, 3.49) is None


def test_the_plan_extends_each_grid_until_the_best_lr_is_interior_then_adds_seeds():
    records = simulate(PLAN, ratio=0.6)
    order = [r["study"] for r in records.values()]
    assert order == sorted(order, key=["scaling", "lr_transfer", "sft"].index)   # the ratio's runs come first
    for size in PLAN.sizes:
        for mode, best in (("adamw", 2e-3), ("muon-moonlight", 1.6e-2)):
            runs = [r for r in records.values() if r["study"] == "scaling" and r["size"] == size.name
                    and (r["optimizer"] if r["optimizer"] == "adamw" else "muon-" + r["lr_scale"]) == mode]
            lrs = sorted({r["lr"] for r in runs})
            assert min(lrs) < best < max(lrs) and best in lrs, (size, mode, lrs)   # 2e-3: two steps below 8e-3
            seeds = {r["seed"] for r in runs if r["lr"] == best}
            assert seeds == set(PLAN.more_seeds if size in PLAN.more_seeds_at else PLAN.seeds)
    sft = [r for r in records.values() if r["study"] == "sft"]
    assert {(r["pretrain_optimizer"], r["optimizer"]) for r in sft} == {(a, b) for a in ("adamw", "muon")
                                                                        for b in ("adamw", "muon")}
    assert {r["pretrain_lr"] for r in sft if r["pretrain_optimizer"] == "adamw"} == {2e-3}


def test_next_spec_limited_to_some_studies_skips_the_others():
    records = simulate(PLAN, ratio=0.6)
    scaling = {k: r for k, r in records.items() if r["study"] == "scaling"}
    assert next_spec(PLAN, {}, ("lr_transfer",)).study == "lr_transfer"
    assert next_spec(PLAN, {}, ("sft",)) is None   # the SFT's pretraining runs are not chosen yet
    assert next_spec(PLAN, scaling, ("sft",)).study == "sft"
    assert next_spec(PLAN, scaling, ("scaling",)) is None


@pytest.mark.parametrize("ratio", [0.5, 0.8])
def test_the_compute_ratio_recovers_a_known_multiplier(ratio):
    # Muon's frontier is AdamW's shifted by `ratio` in compute; piecewise-linear reading in log compute of a
    # smooth power law between points 4x apart is accurate to ~1% (the stated tolerance: 2%)
    plan = dataclasses.replace(PLAN, sizes=tuple(Size(32 + 16 * i, 1) for i in range(4)))
    records = simulate(plan, ratio)
    result = compute_ratio(records, ns=False)
    assert result["muon_over_adamw"] == pytest.approx(ratio, rel=0.02)
    assert result["ci95"][0] == pytest.approx(result["muon_over_adamw"]) == pytest.approx(result["ci95"][1])
    assert result["points"] >= 3
    # NS FLOPs (here +10% of Muon's compute) move the ratio by that factor
    assert compute_ratio(records, ns=True)["muon_over_adamw"] == pytest.approx(1.1 * result["muon_over_adamw"])
    seeded = dataclasses.replace(plan, seeds=(0, 1, 2, 3), more_seeds=(0, 1, 2, 3))
    noisy = compute_ratio(simulate(seeded, ratio, noise=0.01), ns=False)
    # the CI covers seed noise (0.01 nats, about 2.5% in compute here); the reading's own 2% tolerance on top
    lo, hi = noisy["ci95"]
    assert lo < ratio * 1.02 and hi > ratio / 1.02 and hi - lo < 0.5 and lo < noisy["muon_over_adamw"] < hi


def test_no_overlap_gives_no_ratio():
    # Muon 1000x more efficient: its whole frontier lies below AdamW's, so nothing may be read
    assert compute_ratio(simulate(PLAN, ratio=1e-3), ns=False)["muon_over_adamw"] is None


def test_report_only_is_deterministic_and_computed_from_the_records(tmp_path):
    plan = dataclasses.replace(PLAN, sizes=tuple(Size(32 + 16 * i, 1) for i in range(4)), seeds=(0, 1))
    records_dir = tmp_path / "records"
    for record in simulate(plan, 0.6, noise=0.01).values():
        write_record(records_dir, record)
    assert not list(records_dir.glob("*.tmp"))
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        write_report(plan, read_records(records_dir), out)
    names = sorted(p.name for p in outs[0].iterdir())
    assert names == ["paper_lr_transfer.png", "paper_scaling.png", "results.json", "results.md"]
    for name in names:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    doc = (outs[0] / "results.md").read_text()
    positions = [doc.find(s) for s in SECTIONS]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), positions
    assert "All runs of the plan are recorded" in doc
    summary = json.loads((outs[0] / "results.json").read_text())
    ratio = summary["compute_ratio"]["muon_over_adamw"]
    assert f"**{ratio:.3f}×**" in doc and 0.5 < ratio < 0.7
    assert set(summary["lr_transfer"]) == {"adamw", "muon-moonlight", "muon-spectral"}
    assert set(summary["sft_2x2"]) == {f"{a}->{b}" for a in ("adamw", "muon") for b in ("adamw", "muon-moonlight")}
    # the 2×2's sentences are computed: simulated Muon fine-tuning reaches AdamW's loss with 0.6× the compute
    assert re.search(r"Lowest held-out SFT loss: pretrained with \w+, fine-tuned with Muon", doc), doc
    assert re.search(r"Pretrained with AdamW: fine-tuning with Muon instead of AdamW changes the loss by -0\.\d+ "
                     r"nats \(\d+\.\d standard errors\)", doc)

    # the numbers come from the records: worsen Muon's best cell at one size and the ratio moves up
    key = max((k for k, r in read_records(records_dir).items() if r["study"] == "scaling" and r["optimizer"] ==
               "muon" and r["size"] == "d64-L1"), key=lambda k: -read_records(records_dir)[k]["final_val_loss"])
    edited = {**read_records(records_dir)[key]}
    edited["final_val_loss"] += 0.05
    write_record(records_dir, edited)
    write_report(plan, read_records(records_dir), tmp_path / "c")
    assert json.loads((tmp_path / "c" / "results.json").read_text())["compute_ratio"]["muon_over_adamw"] > ratio

    # a missing run makes the report partial and say what is missing
    (records_dir / f"{key}.json").unlink()
    write_report(plan, read_records(records_dir), tmp_path / "d")
    assert "**Partial report**" in (tmp_path / "d" / "results.md").read_text()


def test_a_bad_record_is_one_clear_error_naming_its_file(tmp_path):
    from bench.paper.records import RecordError
    (tmp_path / "scaling-x.json").write_text(json.dumps({"study": "scaling", "key": "scaling-x"}))
    with pytest.raises(RecordError, match=r"scaling-x\.json: missing keys \['size'.*delete it and rerun"):
        read_records(tmp_path)
    with pytest.raises(RecordError, match="lacks"):
        write_record(tmp_path, {"key": "y"})
    assert not list(tmp_path.glob("y*"))


def quick(out: Path, records: Path, runs: Path) -> subprocess.CompletedProcess:
    # the CLI as a user runs it: one CPU device (not the 8 simulated ones conftest sets for the other tests)
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "bench.paper", "--quick", "--out", str(out), "--records", str(records),
                           "--runs", str(runs)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_quick_study_trains_into_records_and_reports_from_them(tmp_path):
    out, records, runs = tmp_path / "out", tmp_path / "records", tmp_path / "runs"
    # an interrupted run (a run directory without a record) is started over
    first = next_spec(QUICK, {})
    (runs / first.key).mkdir(parents=True)
    (runs / first.key / "stale").write_text("")
    # a section another script maintains in results.md survives the rewrite; the old report's text does not
    kept = "## Kept (`bench/other.py`)\n\n<!-- bench/other.py:begin -->\nwritten elsewhere\n<!-- bench/other.py:end -->"
    out.mkdir()
    (out / "results.md").write_text(f"# an older study\n\n## 1. Old\n\nold text\n\n{kept}\n")
    proc = quick(out, records, runs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not (runs / first.key / "stale").exists()
    doc = (out / "results.md").read_text()
    assert doc.endswith(kept + "\n") and "older study" not in doc and "Quick mode" in doc
    assert "All runs of the plan are recorded" in doc
    found = read_records(records)
    assert next_spec(QUICK, found) is None and {r["study"] for r in found.values()} == {"scaling", "lr_transfer", "sft"}
    for r in found.values():
        assert all(k in r for k in REQUIRED) and r["val_tokens"] > 0 and r["seconds"] > 0
        assert r["diverged"] or math.isfinite(r["final_val_loss"])
        assert r["train_flops_ns"] > r["train_flops"] if r["optimizer"] == "muon" else r["train_flops_ns"] == r["train_flops"]
        assert re.fullmatch(r"[0-9a-f]{40}", r["commit"]) and "cores" in r["machine"]
        assert (r["pretrain_optimizer"] is not None) == (r["study"] == "sft")
    for row in re.findall(r"^\|.*\|$", doc, re.M):
        assert not re.search(r"\b(nan|inf)\b", row, re.I), row
    for name in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", doc):
        data = (out / name).read_bytes()
        assert data[:8] == PNG and len(data) > 10_000, name   # a real plot, not an empty canvas

    # --report-only reproduces the report from the records, byte for byte, and trains nothing
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "bench.paper", "--quick", "--report-only", "--out", str(out),
                           "--records", str(records)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training" not in proc.stdout and {p.name: p.read_bytes() for p in out.iterdir()} == before
