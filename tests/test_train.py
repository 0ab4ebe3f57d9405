"""End-to-end trainer runs on CPU: loss falls, sharded == single device, gradient accumulation, MuonClip, MoE
(resume is exact, 2 processes == 1: see test_reliability and test_sft)."""
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL_TRAINER as SMALL  # seconds per run, one compiled step for every length

from train.config import load_config
from train.loop import train

ROOT = Path(__file__).resolve().parent.parent


def run(tmp_path, name, *overrides, config="tiny.yaml"):
    cfg = load_config(ROOT / "configs" / config, [*SMALL, f"run_dir={tmp_path / name}", *overrides])
    return train(cfg), read_metrics(tmp_path / name)


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_short_run_learns_and_writes_its_run_dir(tmp_path):
    summary, rows = run(tmp_path, "a", "steps=60", "log.every=10", "log.eval_every=30",
                        "checkpoint.every=30", "log.sample_tokens=20",
                        "log.tensorboard=true")
    losses = [r["loss"] for r in rows]
    assert losses[-1] < losses[0] - 1.0, losses          # byte-level: ~5.5 nats at init
    assert summary["val_loss"] < summary["unigram_entropy"], summary
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "update_rms_muon", "update_rms_adam",
                "max_attn_logit"):
        assert key in rows[-1], key
    assert [r["step"] for r in rows if "val_loss" in r] == [30, 60]
    # Moonlight's scaling: Muon's update RMS relative to the LR is ≈ 0.2 (+ a little weight decay)
    assert 0.15 < rows[-1]["update_rms_muon"] < 0.3, rows[-1]
    run_dir = tmp_path / "a"
    assert (run_dir / "config.yaml").is_file() and list((run_dir / "tensorboard").iterdir())
    routing = (run_dir / "routing.txt").read_text().splitlines()   # muon_jax.infer_routing's table, one row a leaf
    assert any("lm_head" in r and "output layer" in r for r in routing) and sum(" muon " in r for r in routing) == 7
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [30, 60]
    assert isinstance(summary["sample"], str) and len(summary["sample"]) > 5

    from train.plot import plot_runs
    png = plot_runs([run_dir], tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_sharded_run_matches_single_device(tmp_path):
    common = ["steps=8", "log.every=2", "checkpoint.every=1000"]
    _, single = run(tmp_path, "single", *common)
    # data replicas and FSDP: every matrix is cut into blocks held by two data replicas, and distributed Muon
    # reassembles each on one device (tensor and expert axes: tests/test_distributed.py)
    _, sharded = run(tmp_path, "sharded", *common, "mesh.data=2", "mesh.fsdp=4")
    np.testing.assert_allclose([r["loss"] for r in sharded], [r["loss"] for r in single], rtol=2e-4)


@pytest.mark.slow
def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    common = ["steps=6", "log.every=1", "checkpoint.every=1000"]
    _, whole = run(tmp_path, "whole", *common)
    _, accumulated = run(tmp_path, "accum", *common, "grad_accum=4")
    # per-micro-batch means vs one mean over the batch differ only through unequal mask counts per micro-batch
    np.testing.assert_allclose([r["loss"] for r in accumulated], [r["loss"] for r in whole], rtol=2e-3)


@pytest.mark.slow
def test_muon_clip_caps_the_attention_logits(tmp_path, caplog):
    # not the canonical schedule (own steps, compiled for this test): a higher peak LR grows the logits within 12
    # steps, and its cosine decay keeps the last updates' drift (the margin over tau) small
    tau, common = 0.3, ["steps=12", "log.every=1", "optimizer.learning_rate=0.05", "schedule.name=cosine",
                        "schedule.warmup_steps=5"]
    with caplog.at_level("INFO", logger="train"):
        _, rows = run(tmp_path, "clip", *common, "muon_clip.enabled=true", f"muon_clip.tau={tau}")
        # the same run without MuonClip: its step computes no max logit, the loop measures it at logging steps
        _, free = run(tmp_path, "free", *common)
    assert [r.getMessage().split(" (")[0] for r in caplog.records if r.getMessage().startswith("attention:")] \
        == ["attention: xla"] * 2   # the attention path is logged once per run
    assert all(len(r["max_attn_logit_per_layer"]) == 2 for r in rows)
    # the logits the steps measure (before their own clip) grow well past tau without MuonClip and stay near it
    # with it: each step's clip bounds the logits the next step measures, up to the drift of one update
    assert min(r["max_attn_logit"] for r in free[-4:]) > 2 * tau
    assert max(r["max_attn_logit"] for r in rows[-4:]) < 1.5 * tau
    assert all(r["qk_clip_fraction"] > 0 for r in rows[-4:])


@pytest.mark.slow
def test_moe_config_trains(tmp_path):
    moe = ["model.hidden_size=64", "model.moe_intermediate_size=32", "model.intermediate_size=128",
           "model.kv_lora_rank=16", "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8", "model.v_head_dim=16",
           "model.num_hidden_layers=2"]
    _, rows = run(tmp_path, "moe", "steps=20", "log.every=10", *moe, config="moonlight_tiny.yaml")
    assert rows[-1]["loss"] < rows[0]["loss"] and "expert_load_max_over_mean" in rows[-1]


def test_cross_entropy_and_z_loss_match_numpy():
    from train.step import cross_entropy
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, size=(2, 5))
    mask = (rng.random((2, 5)) > 0.3).astype(np.float32)
    logz = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    nll = logz - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    loss, z = cross_entropy(logits, targets, mask, 1e-4)
    np.testing.assert_allclose(loss, (nll * mask).sum() / mask.sum(), rtol=1e-5)
    np.testing.assert_allclose(z, 1e-4 * (logz ** 2 * mask).sum() / mask.sum(), rtol=1e-5)
