"""The fault matrix: inject many more faults than CI can afford and tabulate what was lost.

    python -m bench.faults [--kills 12] [--write]     # --write puts the table into docs/reliability.md
    python -m bench.faults --only sigterm,sigterm-2p --write   # just these trials; the table keeps the other rows

Faults: SIGKILL of the trainer at random moments (some land inside an async checkpoint write), the newest
checkpoint corrupted in several ways, NaN losses under both policies, a lost process in a 2-process run; SIGTERM
(preemption) of one process or of one of 2, a second SIGTERM while the preemption checkpoint is written, and
resuming a preempted run on fewer devices or fewer processes. "Differing" compares every logged loss of the faulty
run with an uninterrupted run of the same config, bit for bit (within rtol 1e-4 where the mesh changed: another
reduction order); "work lost" counts the steps run twice because a restart went back to an older checkpoint.
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

from train.cli import PREEMPTED_EXIT_CODE  # noqa: E402  (after JAX_PLATFORMS is set)

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


def compare(run_dir: Path, expected: dict[int, float], rtol: float = 0.0) -> tuple[int, int]:
    """(logged rows that differ from the uninterrupted run, bit for bit or beyond `rtol`; steps never reached)."""
    rows = losses(run_dir)
    wrong = sum(not abs(loss - expected[step]) <= rtol * abs(expected[step]) for step, loss in rows)
    return wrong, len(set(expected) - {s for s, _ in rows})


def recomputed(run_dir: Path) -> int:
    """Steps run (and logged) more than once: the work a restart from an older checkpoint repeats."""
    steps = [s for s, _ in losses(run_dir)]
    return len(steps) - len(set(steps))


def saving_now(run_dir: Path) -> bool:
    ckpts = run_dir / "checkpoints"
    return ckpts.is_dir() and any("tmp" in p.name for p in ckpts.iterdir())


def kill_trials(tmp: Path, expected, n: int, rng: random.Random) -> dict:
    kills = during_save = wrong = missing = again = 0
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
        wrong, missing, again = wrong + w, missing + m, again + recomputed(run_dir)
        shutil.rmtree(run_dir)
    return {"fault": "SIGKILL at a random step, then restart", "injected": kills,
            "note": f"{during_save} while an async checkpoint was being written", "wrong": wrong, "missing": missing,
            "recomputed": again}


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
                     "wrong": w, "missing": m, "recomputed": recomputed(run_dir)})
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


def launch(run_dir: Path, *extra: str, processes: int = 1, devices: int = 1) -> list[subprocess.Popen]:
    """The trainer as `processes` processes of one job (jax.distributed on localhost), `devices` CPU devices each."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    if processes == 1:
        return [subprocess.Popen(trainer(run_dir, *extra), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [subprocess.Popen(trainer(run_dir, *extra, "--coordinator", f"127.0.0.1:{port}", "--num-processes",
                                     str(processes), "--process-id", str(i)),
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            for i in range(processes)]


def finish(run_dir: Path, *extra: str, processes: int = 1, devices: int = 1) -> None:
    """Run the job (again) to its last step; raise if it fails."""
    procs = launch(run_dir, *extra, processes=processes, devices=devices)
    if any(p.wait() for p in procs):
        raise RuntimeError(f"{run_dir}: exit {[p.returncode for p in procs]}")


def preempt(run_dir: Path, rng: random.Random, *extra: str, processes: int = 1, devices: int = 1,
            second: bool = False) -> tuple[bool, bool]:
    """Start the job, SIGTERM one random process at a random step (and again while its checkpoint is being written
    when `second`); (every process exited 75 with one identical line naming a checkpoint of the last logged step,
    the second signal landed inside the save)."""
    procs, target = launch(run_dir, *extra, processes=processes, devices=devices), rng.randint(1, STEPS - 2)
    while procs[0].poll() is None and (not losses(run_dir) or losses(run_dir)[-1][0] < target):
        time.sleep(0.02)
    victim = procs[rng.randrange(processes)]
    victim.send_signal(signal.SIGTERM)
    in_save = False
    if second:
        t = time.time()
        while victim.poll() is None and not saving_now(run_dir) and time.time() - t < 60:
            time.sleep(0.001)
        in_save = saving_now(run_dir)
        if victim.poll() is None:
            victim.send_signal(signal.SIGTERM)
    outs = [p.communicate()[0] for p in procs]
    lines = {line for out in outs for line in out.splitlines() if line.startswith("preempted at step")}
    reached = losses(run_dir)[-1][0]
    ok = (all(p.returncode == PREEMPTED_EXIT_CODE for p in procs) and len(lines) == 1
          and lines.pop().startswith(f"preempted at step {reached};")
          and (run_dir / "checkpoints" / str(reached)).is_dir())
    return ok, in_save


MP = ("mesh.data=-1",)  # 1 device per process: the mesh spans the processes


def sigterm_trials(tmp: Path, expected, n: int, rng: random.Random, processes: int = 1, second: bool = False) -> dict:
    """`n` preemptions by SIGTERM at a random step, each followed by the same command until the run ends."""
    ok = in_save = wrong = missing = again = 0
    for trial in range(n):
        run_dir = tmp / f"term{trial}"
        good, landed = preempt(run_dir, rng, *MP, processes=processes, second=second)
        finish(run_dir, *MP, processes=processes)
        w, m = compare(run_dir, expected)
        ok, in_save, wrong, missing = ok + good, in_save + landed, wrong + w, missing + m
        again += recomputed(run_dir)
        shutil.rmtree(run_dir)
    who = "one of 2 processes" if processes > 1 else "the trainer"
    fault = (f"second SIGTERM while the preemption checkpoint is written ({who})" if second
             else f"SIGTERM to {who} at a random step, then the same command")
    note = f"{ok}/{n} exited {PREEMPTED_EXIT_CODE} with a checkpoint of the step reached"
    if second:
        note += f"; {in_save} second signals landed inside the write, the others just after it"
    return {"fault": fault, "injected": n, "note": note, "wrong": wrong, "missing": missing, "recomputed": again}


def elastic_trials(tmp: Path, n: int, rng: random.Random, before: dict, after: dict, fault: str) -> dict:
    """Preempt a run laid out as `before` (launch arguments) and finish it as `after`; losses within rtol 1e-4 of
    the uninterrupted `before` run (the reduction order changes with the mesh)."""
    expected_dir = tmp / "elastic_reference"
    finish(expected_dir, *before["extra"], processes=before["processes"], devices=before["devices"])
    expected = dict(losses(expected_dir))
    ok = wrong = missing = again = 0
    for trial in range(n):
        run_dir = tmp / f"elastic{trial}"
        ok += preempt(run_dir, rng, *before["extra"], processes=before["processes"], devices=before["devices"])[0]
        finish(run_dir, *after["extra"], processes=after["processes"], devices=after["devices"])
        w, m = compare(run_dir, expected, rtol=1e-4)
        wrong, missing, again = wrong + w, missing + m, again + recomputed(run_dir)
        shutil.rmtree(run_dir)
    shutil.rmtree(expected_dir)
    return {"fault": fault, "injected": n, "note": f"{ok}/{n} preempted cleanly, all resumed and finished",
            "wrong": wrong, "missing": missing, "recomputed": again}


def run_trials(tmp: Path, args, only: set[str]) -> list[dict]:
    """The rows of the selected trial groups (all of TRIALS when `only` is empty)."""
    rng, rows, selected = random.Random(args.seed), [], only or set(TRIALS)
    expected = reference(tmp) if selected - {"nan", "lost", "fewer-devices", "fewer-processes"} else {}
    two = {"extra": MP, "processes": 2, "devices": 1}
    if "sigterm-2p" in selected:
        finish(tmp / "reference_2p", *MP, processes=2)
        expected_2p = dict(losses(tmp / "reference_2p"))
    groups = {
        "kill": lambda: [kill_trials(tmp, expected, args.kills, rng)],
        "corrupt": lambda: corruption_trials(tmp, expected),
        "nan": lambda: nan_trials(tmp),
        "lost": lambda: [lost_process_trial(tmp)],
        "sigterm": lambda: [sigterm_trials(tmp, expected, args.sigterms, rng)],
        "sigterm-2p": lambda: [sigterm_trials(tmp, expected_2p, args.sigterms, rng, processes=2)],
        "second-sigterm": lambda: [sigterm_trials(tmp, expected, args.sigterms, rng, second=True)],
        "fewer-devices": lambda: [elastic_trials(
            tmp, args.elastic, rng, {"extra": ("mesh.data=2", "mesh.fsdp=4"), "processes": 1, "devices": 8},
            {"extra": ("mesh.fsdp=4",), "processes": 1, "devices": 4},
            "preempted on 8 devices (data 2 × fsdp 4), resumed on 4 (fsdp 4)")],
        "fewer-processes": lambda: [elastic_trials(
            tmp, args.elastic, rng, two, {"extra": MP, "processes": 1, "devices": 1},
            "preempted as 2 processes, resumed as 1")],
    }
    for name in TRIALS:
        if name in selected:
            rows += [{**row, "group": name} for row in groups[name]()]
    return rows


TRIALS = ("kill", "corrupt", "nan", "lost", "sigterm", "sigterm-2p", "second-sigterm", "fewer-devices",
          "fewer-processes")
# the first words of each group's rows in the table, to keep the rows of groups not rerun (`--only`)
ROW_PREFIX = {"kill": "SIGKILL at", "corrupt": "newest checkpoint", "nan": "NaN loss",
              "lost": "one of 2 processes SIGKILLed", "sigterm": "SIGTERM to the trainer",
              "sigterm-2p": "SIGTERM to one of 2", "second-sigterm": "second SIGTERM",
              "fewer-devices": "preempted on 8", "fewer-processes": "preempted as 2"}
HEADER = ["| fault | injected | outcome | logged losses differing from the uninterrupted run | steps lost "
          "| work lost (steps recomputed after a restart) |", "|---|---|---|---|---|---|"]


def table(rows: list[dict], only: set[str], previous: str) -> list[str]:
    """The markdown rows: this run's, plus (with `only`) the previous table's rows of the groups not rerun, in
    TRIALS order (a previous row without the work-lost column gets "–")."""
    old = [line for line in previous.splitlines() if line.startswith("| ") and not line.startswith("| fault")]
    lines = []
    for name in TRIALS:
        if only and name not in only:
            kept = [line for line in old if line[2:].startswith(ROW_PREFIX[name])]
            lines += [line if line.count("|") == 7 else line + " – |" for line in kept]
        else:
            lines += [f"| {r['fault']} | {r['injected']} | {r['note']} | {r['wrong']} | {r['missing']} | "
                      f"{r.get('recomputed', '–')} |" for r in rows if r["group"] == name]
    return HEADER + lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=12, help="SIGKILL trials (each 1-3 kills)")
    parser.add_argument("--sigterms", type=int, default=4, help="trials of each SIGTERM group")
    parser.add_argument("--elastic", type=int, default=2, help="trials of each resume-elsewhere group")
    parser.add_argument("--only", default="", help=f"comma-separated trial groups of {', '.join(TRIALS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", action="store_true", help="write the table into docs/reliability.md")
    args = parser.parse_args(argv)
    only = {g for g in args.only.split(",") if g}
    if only - set(TRIALS):
        parser.error(f"--only {args.only}: unknown group(s) {sorted(only - set(TRIALS))}; choose from {TRIALS}")
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        rows = run_trials(Path(tmp), args, only)
    doc = ROOT / "docs" / "reliability.md"
    lines = table(rows, only, doc.read_text() if only else "")
    which = f"the rows of {', '.join(sorted(only))} rerun in " if only else ""
    md = "\n".join(lines) + (f"\n\n{STEPS}-step tiny runs, checkpoint every 3 steps (async), {which}"
                             f"{time.time() - t0:.0f} s.\n")
    print(md)
    if args.write:
        from bench.report import device_line, replace_section
        replace_section(doc, "bench/faults.py", device_line() + "\n\n" + md)


if __name__ == "__main__":
    main()
