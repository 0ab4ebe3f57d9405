"""Fault injection: SIGKILL and resume, corrupt checkpoints, NaN policy, bad input, disk full, lost process."""
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import train.step as step_mod
from train.checkpoint import CheckpointError, Checkpointer
from train.config import ConfigError, load_config
from train.data import DataError
from train.loop import NonFiniteLoss, train

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=2",
         "model.num_attention_heads=4", "model.num_key_value_heads=2", "seq_len=64", "global_batch=16",
         "data.tokenizer=byte", "log.eval_batches=1", "log.tensorboard=false", "log.sample_tokens=0",
         "optimizer.ns_dtype=float32", "schedule.warmup_steps=3", "mesh.data=1", "log.eval_every=1000"]


def config(run_dir, *overrides):
    return load_config(ROOT / "configs" / "tiny.yaml", [*SMALL, f"run_dir={run_dir}", *overrides])


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir):
    return {r["step"]: r["loss"] for r in metrics(run_dir)}


def wait_for_step(run_dir, step, proc, timeout=240):
    path, t = Path(run_dir) / "metrics.jsonl", time.time()
    while time.time() - t < timeout:
        if path.is_file():
            rows = [json.loads(x) for x in path.read_text().splitlines() if x.endswith("}")]
            if rows and rows[-1]["step"] >= step:
                return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


@pytest.mark.slow
def test_sigkill_at_random_steps_then_resume_is_bit_identical(tmp_path):
    common = ["steps=16", "log.every=1", "checkpoint.every=3", "checkpoint.async_save=true"]
    train(config(tmp_path / "straight", *common))
    expected = losses(tmp_path / "straight")
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "train", *SMALL, f"run_dir={run_dir}", *common]
    rng = random.Random(0)
    for kill_after in sorted(rng.sample(range(2, 15), 2)):
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_for_step(run_dir, kill_after, proc)
        time.sleep(rng.random() * 0.3)  # somewhere in the next steps, maybe inside an async save
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = metrics(run_dir)
    assert len(rows) > 16  # steps between a checkpoint and a kill were run (and logged) twice
    for row in rows:
        assert row["loss"] == expected[row["step"]], row["step"]
    assert max(r["step"] for r in rows) == 16


def test_corrupt_latest_checkpoint_falls_back_and_keeps_older(tmp_path, caplog):
    common = ["log.every=1", "checkpoint.every=4", "checkpoint.keep=5", "checkpoint.async_save=false"]
    train(config(tmp_path / "straight", "steps=16", *common))
    run_dir = tmp_path / "r"
    train(config(run_dir, "steps=16", *common), stop_after=12)
    ckpts = run_dir / "checkpoints"
    for f in (ckpts / "12" / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])  # truncate every data file of the newest
    with caplog.at_level("WARNING", logger="train"):
        summary = train(config(run_dir, "steps=16", *common))
    assert summary["start_step"] == 8
    assert "checkpoint" in caplog.text and "/12" in caplog.text and "resuming from step 8" in caplog.text
    assert (ckpts / "4").is_dir() and (ckpts / "8").is_dir() and list(ckpts.glob("unreadable-12-*"))
    expected = losses(tmp_path / "straight")
    assert all(r["loss"] == expected[r["step"]] for r in metrics(run_dir))


def poison_some_batches(monkeypatch):
    """NaN loss (and so NaN grads) on a deterministic ~1/4 of the batches."""
    original = step_mod.cross_entropy

    def cross_entropy(logits, targets, mask, z_loss):
        loss, z = original(logits, targets, mask, z_loss)
        return jnp.where(targets[:, :4].sum() % 4 == 0, jnp.nan, loss), z

    monkeypatch.setattr(step_mod, "cross_entropy", cross_entropy)


def test_nan_skip_keeps_params_and_counts(tmp_path, monkeypatch):
    poison_some_batches(monkeypatch)
    run_dir = tmp_path / "skip"
    train(config(run_dir, "steps=12", "log.every=1", "checkpoint.every=4", "nan_policy=skip",
                 "max_consecutive_skips=12"))
    rows = metrics(run_dir)
    skipped = [r["step"] for r in rows if not np.isfinite(r["loss"])]
    assert skipped and rows[-1]["skipped_steps"] == len(skipped)
    # no NaN ever reaches a checkpoint
    ckpt = Checkpointer(run_dir)
    for step in ckpt.steps():
        params = ckpt.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))["params"]
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_nan_halt_names_step_and_last_good_checkpoint(tmp_path, monkeypatch):
    poison_some_batches(monkeypatch)
    with pytest.raises(NonFiniteLoss, match=r"step \d+: loss=nan .* (last good checkpoint|no checkpoint yet)"):
        train(config(tmp_path / "halt", "steps=12", "log.every=1", "checkpoint.every=1"))


def test_bad_input_gives_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="smaller than the tokenizer's vocabulary"):
        train(config(tmp_path / "a", "steps=2", "model.vocab_size=100"))
    with pytest.raises(ConfigError, match="nearest valid global_batch"):
        train(config(tmp_path / "b", "steps=2", "global_batch=12", "mesh.data=8"))
    with pytest.raises(DataError, match="no such file"):
        train(config(tmp_path / "c", "steps=2", f"data.source={tmp_path / 'nothing.txt'}"))
    run_dir = tmp_path / "d"
    train(config(run_dir, "steps=2", "checkpoint.every=2"))
    with pytest.raises(ConfigError, match="different 'model'"):
        train(config(run_dir, "steps=4", "model.hidden_size=32"))
    (run_dir / "config.yaml").unlink()  # even without the saved config, the checkpoint itself is checked
    with pytest.raises(CheckpointError, match=r"embed_tokens/embedding has shape \(257, 64\) there but \(257, 32\)"):
        train(config(run_dir, "steps=4", "model.hidden_size=32"))
    assert (run_dir / "checkpoints" / "2").is_dir()


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    original = Checkpointer.save

    def save(self, step, **kw):
        if step == 4:
            raise OSError(28, "No space left on device")
        return original(self, step, **kw)

    monkeypatch.setattr(Checkpointer, "save", save)
    run_dir = tmp_path / "full"
    with pytest.raises(CheckpointError, match=r"step 4 failed .*No space left.*checkpoints/2 is intact"):
        train(config(run_dir, "steps=6", "checkpoint.every=2", "checkpoint.async_save=false"))
    monkeypatch.setattr(Checkpointer, "save", original)
    assert train(config(run_dir, "steps=6", "checkpoint.every=2"))["start_step"] == 2


@pytest.mark.slow
def test_lost_process_fails_the_other_instead_of_hanging(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    run_dir = tmp_path / "mp"
    procs = [subprocess.Popen([sys.executable, "-m", "train", *SMALL, "mesh.data=-1", "steps=100000", "log.every=1",
                               f"run_dir={run_dir}", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                               "--process-id", str(i), "--heartbeat-timeout", "5"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    wait_for_step(run_dir, 2, procs[0])
    procs[1].send_signal(signal.SIGKILL)
    _, err = procs[0].communicate(timeout=120)  # a survivor that hangs fails the test here
    assert procs[0].returncode != 0
    assert "stopped sending heartbeats" in err or "unhealthy" in err, err[-2000:]
