"""Fault injection: SIGKILL and resume, corrupt checkpoints, NaN policy, bad input, disk full, lost process;
preemption (SIGTERM/SIGINT) and elastic resume on fewer devices or processes."""
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
from conftest import SMALL_TRAINER as SMALL  # one step for every run of every length

import train.step as step_mod
from train.checkpoint import CheckpointError, Checkpointer
from train.cli import PREEMPTED_EXIT_CODE
from train.config import ConfigError, load_config
from train.data import DataError, load_corpus, make_train_iterator
from train.loop import Logger, NonFiniteLoss, prepare_run_dir, pretraining_inputs, resume, setup, train
from train.preemption import Preempted
from train.runtime import cache_dir

ROOT = Path(__file__).resolve().parent.parent


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


@pytest.fixture(scope="session")
def straight(tmp_path_factory):
    """Per-step losses of an uninterrupted 12-step run: what every interrupted and resumed run must reproduce (once
    per worker, whichever of its tests runs first)."""
    run_dir = tmp_path_factory.mktemp("straight") / "r"
    train(config(run_dir, "steps=12", "log.every=1", "checkpoint.every=1000"))
    return losses(run_dir)


@pytest.mark.slow
def test_sigkill_at_random_steps_then_resume_is_bit_identical(tmp_path, straight):
    common = ["steps=12", "log.every=1", "checkpoint.every=3", "checkpoint.async_save=true"]
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "train", *SMALL, f"run_dir={run_dir}", *common]
    rng = random.Random(0)
    for kill_after in sorted(rng.sample(range(2, 11), 2)):
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_for_step(run_dir, kill_after, proc)
        time.sleep(rng.random() * 0.3)  # somewhere in the next steps, maybe inside an async save
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = metrics(run_dir)
    assert len(rows) > 12  # steps between a checkpoint and a kill were run (and logged) twice
    for row in rows:
        assert row["loss"] == straight[row["step"]], row["step"]
    assert max(r["step"] for r in rows) == 12


def test_corrupt_latest_checkpoint_falls_back_and_keeps_older(tmp_path, caplog, straight):
    """An in-process run stopped after step 8 (asynchronous saves), its newest checkpoint then corrupted: the rerun
    resumes from step 4 and reproduces the straight run bit for bit."""
    common = ["steps=12", "log.every=1", "checkpoint.every=4", "checkpoint.keep=5"]
    run_dir = tmp_path / "r"
    train(config(run_dir, *common, "checkpoint.async_save=true"), stop_after=8)
    ckpts = run_dir / "checkpoints"
    for f in (ckpts / "8" / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])  # truncate every data file of the newest
    with caplog.at_level("WARNING", logger="train"):
        summary = train(config(run_dir, *common, "checkpoint.async_save=false"))
    assert summary["start_step"] == 4
    assert "checkpoint" in caplog.text and "/8" in caplog.text and "resuming from step 4" in caplog.text
    assert (ckpts / "4").is_dir() and list(ckpts.glob("unreadable-8-*"))
    assert all(r["loss"] == straight[r["step"]] for r in metrics(run_dir))


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
    train(config(run_dir, "steps=4", "checkpoint.every=4"))
    with pytest.raises(ConfigError, match="different 'model'"):
        train(config(run_dir, "steps=8", "model.hidden_size=32"))
    (run_dir / "config.yaml").unlink()  # even without the saved config, the checkpoint itself is checked
    with pytest.raises(CheckpointError, match=r"embed_tokens/embedding has shape \(257, 64\) there but \(257, 32\)"):
        train(config(run_dir, "steps=8", "model.hidden_size=32"))
    assert (run_dir / "checkpoints" / "4").is_dir()


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


@pytest.fixture
def start_processes(cpu_env):
    """`start_processes(run_dir, n, *overrides)`: `n` trainer processes of one jax.distributed job on localhost, one
    CPU device each."""
    def start(run_dir, n, *overrides):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return [subprocess.Popen([sys.executable, "-m", "train", *SMALL, "mesh.data=-1", f"run_dir={run_dir}",
                                  *overrides, "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n),
                                  "--process-id", str(i)],
                                 cwd=ROOT, env=cpu_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for i in range(n)]
    return start


@pytest.mark.slow
def test_lost_process_fails_the_other_instead_of_hanging(tmp_path, start_processes):
    run_dir = tmp_path / "mp"
    procs = start_processes(run_dir, 2, "steps=100000", "log.every=1", "--heartbeat-timeout", "5")
    wait_for_step(run_dir, 2, procs[0])
    procs[1].send_signal(signal.SIGKILL)
    _, err = procs[0].communicate(timeout=120)  # a survivor that hangs fails the test here
    assert procs[0].returncode != 0
    assert "stopped sending heartbeats" in err or "unhealthy" in err, err[-2000:]


def preempted_line(out):
    lines = [line for line in out.splitlines() if line.startswith("preempted")]
    assert len(lines) == 1, out[-2000:]
    return lines[0]


def assert_each_step_once_and_equal(run_dir, expected, steps):
    """No step was recomputed (each logged once) and every loss is bit-identical to the uninterrupted run's."""
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert [r["loss"] for r in rows] == [expected[s] for s in range(1, steps + 1)]


@pytest.mark.slow
def test_sigterm_checkpoints_the_step_reached_and_the_rerun_is_bit_identical(tmp_path, straight):
    common = ["steps=12", "log.every=1", "checkpoint.every=1000"]
    run_dir, target = tmp_path / "preempted", random.Random(1).randint(2, 8)
    proc = subprocess.Popen([sys.executable, "-m", "train", *SMALL, f"run_dir={run_dir}", *common], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(run_dir, target, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    reached = metrics(run_dir)[-1]["step"]  # the step in flight when the signal came, logged before exiting
    assert target <= reached < 12 and Checkpointer(run_dir).steps() == [reached]
    assert preempted_line(out) == (f"preempted at step {reached}; checkpoint written to "
                                   f"{run_dir.resolve() / 'checkpoints' / str(reached)}; rerun the same command to "
                                   "continue")
    assert train(config(run_dir, *common))["start_step"] == reached
    assert_each_step_once_and_equal(run_dir, straight, 12)


def test_second_sigterm_during_the_save_changes_nothing(tmp_path, monkeypatch):
    common = ["steps=8", "log.every=1", "checkpoint.every=2", "checkpoint.keep=5"]
    run_dir, original_save, original_log = tmp_path / "r", Checkpointer.save, Logger.log
    step2 = {}

    def log(self, step, *args):  # the first SIGTERM arrives while step 3 runs
        original_log(self, step, *args)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    def save(self, step, **kw):
        original_save(self, step, **kw)
        if step == 3:  # the second arrives while the asynchronous write of step 3 is under way
            step2.update({p: p.read_bytes() for p in (self.directory / "2").rglob("*") if p.is_file()})
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Logger, "log", log)
    monkeypatch.setattr(Checkpointer, "save", save)
    with pytest.raises(Preempted, match=r"^preempted at step 3; checkpoint written to .*/checkpoints/3;") as e:
        train(config(run_dir, *common, "checkpoint.async_save=true"))
    assert e.value.signals == ["SIGTERM", "SIGTERM"]
    assert step2 and all(p.read_bytes() == b for p, b in step2.items())  # the previous checkpoint is untouched
    ckpt = Checkpointer(run_dir)
    assert ckpt.steps() == [2, 3]
    for step in (2, 3):  # both restore
        ckpt.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))


@pytest.mark.slow
def test_ctrl_c_during_compile_exits_cleanly_without_a_checkpoint(tmp_path):
    run_dir = tmp_path / "r"
    no_cache = {**os.environ, "JAX_COMPILATION_CACHE_DIR": ""}  # so step 1 really compiles when the signal comes
    proc = subprocess.Popen([sys.executable, "-m", "train", *SMALL, f"run_dir={run_dir}", "steps=4"], cwd=ROOT,
                            env=no_cache, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("model "), line + proc.communicate()[1][-3000:]  # printed just before step 1 compiles
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    assert preempted_line(out) == ("preempted before step 1 (SIGINT); no checkpoint written; rerun the same "
                                   "command to start")
    assert "Traceback" not in err and Checkpointer(run_dir).steps() == []
    assert not (run_dir / "metrics.jsonl").is_file() or not metrics(run_dir)


def test_resume_on_fewer_devices_restores_into_the_new_shardings(tmp_path):
    common = ["steps=8", "log.every=1", "checkpoint.every=4"]
    train(config(tmp_path / "straight", *common, "mesh.data=2", "mesh.fsdp=4"))
    # the same run as if preempted after step 4: its checkpoint of step 4 and the metrics up to it
    run_dir = tmp_path / "r"
    shutil.copytree(tmp_path / "straight", run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "8")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics(run_dir)[:4]))
    four = config(run_dir, *common, "mesh.fsdp=4")
    run = setup(four, pretraining_inputs)
    fresh = jax.tree.map(lambda x: x.sharding, run.state)
    resume(run)
    run.ckpt.close()
    assert run.start == 4 and run.mesh.size == 4
    # params and optimizer state come back laid out on the new mesh exactly as a fresh state there would be
    same = jax.tree.leaves(jax.tree.map(lambda x, s: x.sharding == s, run.state, fresh))
    assert len(same) > 10 and all(same)
    assert train(four)["start_step"] == 4
    expected, got = losses(tmp_path / "straight"), losses(run_dir)
    np.testing.assert_allclose([got[s] for s in range(5, 9)], [expected[s] for s in range(5, 9)], rtol=1e-4)


class RecordingIterator:
    """A train iterator that keeps the token ids of every batch it hands out."""

    def __init__(self, it):
        self.it, self.inputs = it, []

    def __next__(self):
        batch = next(self.it)
        self.inputs.append(batch["inputs"])
        return batch

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_then_resume_on_two_or_one(tmp_path, start_processes):
    common = ["steps=10", "log.every=1", "checkpoint.every=1000"]
    straight = start_processes(tmp_path / "straight", 2, *common)  # the reference job runs alongside
    run_dir, target = tmp_path / "preempted", random.Random(2).randint(2, 6)
    procs = start_processes(run_dir, 2, *common)
    wait_for_step(run_dir, target, procs[0])
    procs[1].send_signal(signal.SIGTERM)  # only the second process is told
    lines = []
    for p in procs:  # neither may hang: both stop after the same step
        out, err = p.communicate(timeout=120)
        assert p.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
        lines.append(preempted_line(out))
    reached = metrics(run_dir)[-1]["step"]
    assert lines[0] == lines[1] and lines[0].startswith(f"preempted at step {reached};") and target <= reached < 10
    assert Checkpointer(run_dir).steps() == [reached]
    shutil.copytree(run_dir, tmp_path / "one")
    for p in straight:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    for p in start_processes(run_dir, 2, *common):  # the same command again
        assert p.wait(timeout=300) == 0, p.communicate()[1][-3000:]
    expected = losses(tmp_path / "straight")
    assert_each_step_once_and_equal(run_dir, expected, 10)

    # the checkpoint of 2 processes resumed by 1 (on 2 devices): the same global batches, close losses
    recording = {}

    def inputs(cfg, mesh):
        run_inputs = pretraining_inputs(cfg, mesh)
        run_inputs.train_iter = recording["it"] = RecordingIterator(run_inputs.train_iter)
        return run_inputs

    assert train(config(tmp_path / "one", *common, "mesh.data=2"), inputs=inputs)["start_step"] == reached
    cfg = config(tmp_path / "x", *common)
    corpus = load_corpus(cfg.data, cache_dir())
    kw = dict(seq_len=cfg.seq_len, global_batch=cfg.global_batch, seed=cfg.seed, shuffle=cfg.data.shuffle)
    whole = make_train_iterator(corpus, **kw)
    halves = [make_train_iterator(corpus, process_index=i, process_count=2, **kw) for i in range(2)]
    global_batches = [next(whole)["inputs"] for _ in range(10)]
    for b in global_batches:  # what the 2 processes saw, row for row
        np.testing.assert_array_equal(np.concatenate([next(h)["inputs"] for h in halves]), b)
    np.testing.assert_array_equal(np.stack(recording["it"].inputs), np.stack(global_batches[reached:]))
    got = losses(tmp_path / "one")
    np.testing.assert_allclose([got[s] for s in range(reached + 1, 11)],
                               [expected[s] for s in range(reached + 1, 11)], rtol=1e-4)


def test_global_batch_change_on_resume_is_refused(tmp_path):
    run_dir = tmp_path / "r"
    prepare_run_dir(config(run_dir, "steps=2"))  # what the first run's start-up writes
    with pytest.raises(ConfigError, match=r"global_batch=32 differs from global_batch=16 .* must keep global_batch"):
        train(config(run_dir, "steps=4", "global_batch=32"))
