"""The fault matrix: inject many more faults than CI can afford and tabulate what was lost.

    python -m bench.faults [--kills 12] [--write]     # --write puts the table into docs/reliability.md

Faults: SIGKILL of the trainer at random moments (some land inside an async checkpoint write), the newest
checkpoint corrupted in several ways, NaN losses under both policies, and a lost process in a 2-process run.
"Lost" compares every logged loss of the faulty run with an uninterrupted run of the same config, bit for bit.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=2",
         "model.num_attention_heads=4", "model.num_key_value_heads=2", "seq_len=64", "global_batch=16",
         "data.tokenizer=byte", "log.eval_batches=1", "log.tensorboard=false", "log.sample_tokens=0",
         "optimizer.ns_dtype=float32", "schedule.warmup_steps=3", "mesh.data=1", "log.eval_every=1000",
         "log.every=1", "checkpoint.every=3", "checkpoint.keep=3"]
STEPS = 24


def losses(run_dir: Path) -> list[tuple[int, float]]:
    path = run_dir / "metrics.jsonl"
    return [(r["step"], r["loss"]) for r in map(json.loads, path.read_text().splitlines())] if path.is_file() else []


def trainer(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "train", *SMALL, f"steps={STEPS}", f"run_dir={run_dir}", *extra]


def reference(tmp: Path) -> dict[int, float]:
    run_dir = tmp / "reference"
    subprocess.run(trainer(run_dir), cwd=ROOT, check=True, capture_output=True)
    return dict(losses(run_dir))


def compare(run_dir: Path, expected: dict[int, float]) -> tuple[int, int]:
    """(logged rows that differ from the uninterrupted run, steps never reached)."""
    rows = losses(run_dir)
    wrong = sum(loss != expected[step] for step, loss in rows)
    return wrong, len(set(expected) - {s for s, _ in rows})


def saving_now(run_dir: Path) -> bool:
    ckpts = run_dir / "checkpoints"
    return ckpts.is_dir() and any("tmp" in p.name for p in ckpts.iterdir())


def kill_trials(tmp: Path, expected, n: int, rng: random.Random) -> dict:
    kills = during_save = wrong = missing = 0
    for trial in range(n):
        run_dir = tmp / f"kill{trial}"
        for _ in range(rng.randint(1, 3)):
            proc = subprocess.Popen(trainer(run_dir), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            target = rng.randint(1, STEPS - 1)
            while proc.poll() is None and (not losses(run_dir) or losses(run_dir)[-1][0] < target):
                time.sleep(0.02)
            time.sleep(rng.random() * 0.5)
            if proc.poll() is None:
                during_save += saving_now(run_dir)
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait()
        subprocess.run(trainer(run_dir), cwd=ROOT, check=True, capture_output=True)
        w, m = compare(run_dir, expected)
        wrong, missing = wrong + w, missing + m
        shutil.rmtree(run_dir)
    return {"fault": "SIGKILL at a random step, then restart", "injected": kills,
            "note": f"{during_save} while an async checkpoint was being written", "wrong": wrong, "missing": missing}


CORRUPTIONS = {
    "truncate every params file": lambda d: [f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
                                             for f in (d / "params").rglob("*") if f.is_file()],
    "delete the params manifest": lambda d: (d / "params" / "manifest.ocdbt").unlink(),
    "delete the optimizer state": lambda d: shutil.rmtree(d / "opt_state"),
    "garbage data-iterator state": lambda d: [f.write_text("{not json") for f in (d / "data").rglob("*") if f.is_file()],
}


def corruption_trials(tmp: Path, expected) -> list[dict]:
    rows = []
    for name, corrupt in CORRUPTIONS.items():
        run_dir = tmp / "corrupt"
        subprocess.run(trainer(run_dir, "--stop-after", str(STEPS - 3)), cwd=ROOT, check=True, capture_output=True)
        ckpts = run_dir / "checkpoints"
        newest = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
        corrupt(ckpts / str(newest))
        done = subprocess.run(trainer(run_dir), cwd=ROOT, capture_output=True, text=True)
        resumed = re.search(r"resuming from step (\d+)", done.stderr)
        aside = list(ckpts.glob(f"unreadable-{newest}-*"))
        w, m = compare(run_dir, expected) if done.returncode == 0 else (0, STEPS)
        rows.append({"fault": f"newest checkpoint (step {newest}) corrupted: {name}", "injected": 1,
                     "note": f"reported, resumed from step {resumed.group(1)}, corrupt one kept aside" if resumed and aside
                     else f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1][:120]}",
                     "wrong": w, "missing": m})
        shutil.rmtree(run_dir)
    return rows


def nan_trials(tmp: Path) -> list[dict]:
    """NaN loss on a deterministic quarter of the batches, in-process (the loss function is patched)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import orbax.checkpoint as ocp

    import train.step as step_mod
    from train.checkpoint import Checkpointer
    from train.config import load_config
    from train.loop import NonFiniteLoss, train
    original = step_mod.cross_entropy

    def poisoned(logits, targets, mask, z_loss):
        loss, z = original(logits, targets, mask, z_loss)
        return jnp.where(targets[:, :4].sum() % 4 == 0, jnp.nan, loss), z

    step_mod.cross_entropy = poisoned
    rows = []
    try:
        for policy in ("skip", "halt"):
            run_dir = tmp / f"nan_{policy}"
            cfg = load_config(ROOT / "configs" / "tiny.yaml", [*SMALL, f"steps={STEPS}", f"run_dir={run_dir}",
                                                               f"nan_policy={policy}", "max_consecutive_skips=24"])
            try:
                train(cfg)
                outcome = "finished"
            except NonFiniteLoss as e:
                outcome = f"halted: {str(e)[:60]}…"
            nan_steps = sum(not np.isfinite(loss) for _, loss in losses(run_dir))
            ckpt = Checkpointer(run_dir)
            finite = all(
                np.isfinite(np.asarray(x)).all()
                for s in ckpt.steps()
                for x in jax.tree.leaves(ckpt.manager.restore(
                    s, args=ocp.args.Composite(params=ocp.args.StandardRestore()))["params"]))
            rows.append({"fault": f"NaN loss, nan_policy={policy}", "injected": max(nan_steps, 1),
                         "note": f"{outcome}; {len(ckpt.steps())} checkpoints, "
                                 f"{'all finite' if finite else 'NaN IN A CHECKPOINT'}",
                         "wrong": 0 if finite else 1, "missing": 0})
    finally:
        step_mod.cross_entropy = original
    return rows


def lost_process_trial(tmp: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    run_dir = tmp / "mp"
    procs = [subprocess.Popen(trainer(run_dir, "mesh.data=-1", "steps=100000", "--coordinator", f"127.0.0.1:{port}",
                                      "--num-processes", "2", "--process-id", str(i), "--heartbeat-timeout", "5"),
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    while not losses(run_dir):
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGKILL)
    t = time.time()
    _, err = procs[0].communicate(timeout=300)
    return {"fault": "one of 2 processes SIGKILLed", "injected": 1,
            "note": f"survivor exited {procs[0].returncode} after {time.time() - t:.0f} s "
                    f"({'heartbeat error' if 'heartbeat' in err else 'other error'})", "wrong": 0, "missing": 0}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=12, help="SIGKILL trials (each 1-3 kills)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", action="store_true", help="write the table into docs/reliability.md")
    args = parser.parse_args(argv)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        expected = reference(tmp)
        rows = [kill_trials(tmp, expected, args.kills, random.Random(args.seed)), *corruption_trials(tmp, expected),
                *nan_trials(tmp), lost_process_trial(tmp)]
    table = ["| fault | injected | outcome | logged losses differing from the uninterrupted run | steps lost |",
             "|---|---|---|---|---|"]
    table += [f"| {r['fault']} | {r['injected']} | {r['note']} | {r['wrong']} | {r['missing']} |" for r in rows]
    md = "\n".join(table) + f"\n\n{STEPS}-step tiny runs, checkpoint every 3 steps (async), {time.time() - t0:.0f} s in all.\n"
    print(md)
    if args.write:
        from bench.report import device_line, replace_section
        replace_section(ROOT / "docs" / "reliability.md", "bench/faults.py", device_line() + "\n\n" + md)


if __name__ == "__main__":
    main()
