"""The input pipeline at scale: host memory and speed of `python -m train.prepare_data` and of the trainer reading
a prepared corpus, on synthetic word-salad corpora generated here (200 MB and >= 2 GB of JSONL, 60 MB of text).

    python bench/data.py [--dir /tmp/muon_data_bench] [--big-gb 2] [--write]

Every measurement runs the real command line in a child process; peak RSS is the largest sum of the resident
memory of that process and all its descendants (worker processes included), sampled every 50 ms with psutil.
Results are kept in DIR/results.json, so a rerun only measures what is missing (delete the file to redo all).
`--write` puts the table into docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
TRAIN_ARGS = ["steps=20", "log.every=10", "log.eval_every=1000", "checkpoint.every=1000", "log.sample_tokens=0",
              "log.tensorboard=false"]


def word_salad(path: Path, size: int, jsonl: bool, seed: int) -> None:
    """`size` bytes of Zipf-distributed pseudo-words: JSONL documents of 100-1200 words, or plain text lines."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    p = 1 / np.arange(1, 27)
    words = np.array(["".join(rng.choice(letters, size=rng.integers(1, 10), p=p / p.sum()))
                      for _ in range(20000)], dtype=object)
    wp = 1 / np.arange(1, 20001) ** 1.05
    wp /= wp.sum()

    def text(n):
        w = words[rng.choice(len(words), size=n, p=wp)]
        return "\n".join(" ".join(w[i:i + 12]) + "." for i in range(0, n, 12))
    done, tmp = 0, path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        while done < size:
            buf = ("".join(json.dumps({"text": text(int(rng.integers(100, 1200)))}) + "\n" for _ in range(500))
                   if jsonl else text(200_000) + "\n")
            f.write(buf)
            done += len(buf)
    tmp.replace(path)


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run `cmd`; its wall time, exit status and peak RSS summed over its process tree."""
    start, peak = time.time(), 0
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_data_{os.getpid()}.log", "w+")
    # a file, not a pipe: a progress bar filling an unread pipe would block the child
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                            text=True)
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            peak = max(peak, sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)]))
        except psutil.Error:
            pass
        time.sleep(0.05)
    log.seek(0)
    out = log.read()
    log.close()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    return {"seconds": time.time() - start, "peak_rss_gb": peak / 1e9, "log": out[-2000:]}


def prepare(src: Path, out: Path, tokenizer: str) -> dict:
    r = measure([sys.executable, "-m", "train.prepare_data", f"data.source={src}", f"data.tokenizer={tokenizer}",
                 "--out", str(out)])
    m = json.loads((out / "manifest.json").read_text())
    r["tokens"] = m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]
    r["tokenize_seconds"], r["processes"] = m["seconds"], min(m["processes"], m["units_run"])
    r["input_gb"] = sum(f[1] for f in m["files"]) / 1e9
    return r


def train(source: Path, run_dir: Path, cache: Path, *overrides: str) -> dict:
    r = measure([sys.executable, "-m", "train", f"run_dir={run_dir}", f"data.source={source}", *TRAIN_ARGS,
                 *overrides], env={"MUON_JAX_CACHE": str(cache)})
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    r["train_tokens_per_s"] = rows[-1]["tokens_per_s"]
    return r


PIPELINE = """
import json, sys, time
from train.config import load_config
from train.data import load_corpus, make_train_iterator
cfg = load_config(None, ["data.source=" + sys.argv[1], "data.tokenizer=byte", "data.workers=" + sys.argv[2]])
corpus = load_corpus(cfg.data, "/tmp")
it = make_train_iterator(corpus, seq_len=cfg.seq_len, global_batch=cfg.global_batch, seed=0,
                         worker_count=cfg.data.workers)
for _ in range(20):
    next(it)
start = time.perf_counter()
for _ in range(400):
    next(it)
print(json.dumps({"tokens_per_s": 400 * cfg.global_batch * cfg.seq_len / (time.perf_counter() - start)}))
"""


def pipeline(prepared: Path, workers: int) -> dict:
    """The input pipeline alone (tiny config's seq_len and global_batch), batches/s after a warm-up."""
    r = measure([sys.executable, "-c", PIPELINE, str(prepared), str(workers)])
    r.update(json.loads(r["log"].strip().splitlines()[-1]))
    return r


def stages(d: Path, big_gb: float) -> dict:
    """name → (files it needs, a function measuring it)."""
    cache = d / "cache"
    return {
        "prepare_200mb": lambda: prepare(d / "c200m.jsonl", d / "p200m", "byte"),
        "first_run_raw60mb": lambda: train(d / "raw60m.txt", d / "run_raw", d / "cache_raw"),
        "train_200mb": lambda: train(d / "p200m", d / "run200", cache, "data.tokenizer=byte"),
        "prepare_big": lambda: prepare(d / "big.jsonl", d / "pbig", "byte"),
        "train_big": lambda: train(d / "pbig", d / "runbig", cache, "data.tokenizer=byte"),
        "pipeline_0": lambda: pipeline(d / "pbig", 0),
        "pipeline_2": lambda: pipeline(d / "pbig", 2),
    }


def table(res: dict, big_gb: float) -> str:
    """The markdown table of the results."""
    def row(name, what, key):
        r = res.get(name)
        return f"| {what} | {r[key]:,.0f} |" if r and key in r else f"| {what} | not measured |"
    first = res.get("first_run_raw60mb", {})
    # the fastest training rate seen (the machine is shared, so rates vary): the ratio below is the conservative one
    tiny_tps = max((r.get("train_tokens_per_s", 0) for r in res.values()), default=0) or None
    lines = ["| measurement | value |", "|---|---|"]
    for name, label in (("prepare_200mb", "200 MB"), ("prepare_big", f"{big_gb:g} GB")):
        r = res.get(name, {})
        if r:
            lines.append(f"| prepare_data, {label} JSONL (byte tokenizer): peak RSS | {r['peak_rss_gb']:.2f} GB |")
            tps = r["tokens"] / r["tokenize_seconds"]
            lines.append(f"| prepare_data, {label}: tokens/s ({r['processes']} processes; per process) | "
                         f"{tps:,.0f} ({tps / r['processes']:,.0f}) |")
    if first:
        lines.append(f"| first `python -m train` on raw 60 MB text (bpe 2048 trained, prepared, 20 steps): "
                     f"peak RSS | {first['peak_rss_gb']:.2f} GB (was 12.3 GB) |")
        procs = first.get("bpe_processes", 1)
        lines.append(f"| ... its bpe tokenization: tokens/s ({procs} processes; per process) | "
                     f"{first.get('bpe_tokens_per_s', 0):,.0f} ({first.get('bpe_tokens_per_s', 0) / procs:,.0f}) |")
    small, big = res.get("train_200mb"), res.get("train_big")
    if small and big:
        diff = abs(big["peak_rss_gb"] - small["peak_rss_gb"]) / small["peak_rss_gb"]
        lines.append(f"| trainer peak RSS, prepared 200 MB vs {big_gb:g} GB | {small['peak_rss_gb']:.2f} GB vs "
                     f"{big['peak_rss_gb']:.2f} GB ({100 * diff:.1f}% apart) |")
    if tiny_tps:
        lines.append(f"| tiny config training consumption, fastest of the runs above (tokens/s) | {tiny_tps:,.0f} |")
    for w in (0, 2):
        r = res.get(f"pipeline_{w}")
        if r:
            ratio = f" = {r['tokens_per_s'] / tiny_tps:.0f}× training" if tiny_tps else ""
            lines.append(f"| input pipeline alone, data.workers={w} (tokens/s) | {r['tokens_per_s']:,.0f}{ratio} |")
    return "\n".join(lines)


def main() -> None:
    """Generate what is missing, measure what is missing, print (and with --write, record) the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/muon_data_bench")
    ap.add_argument("--big-gb", type=float, default=2.0)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--stages", default="", help="comma-separated subset of the measurements (default: all)")
    args = ap.parse_args()
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    file = d / "results.json"
    res = json.loads(file.read_text()) if file.exists() else {}
    chosen = args.stages.split(",") if args.stages else list(stages(d, args.big_gb))
    for name, run in stages(d, args.big_gb).items():
        if name not in res and name in chosen:
            needs = {"prepare_200mb": "c200m.jsonl", "first_run_raw60mb": "raw60m.txt", "prepare_big": "big.jsonl"}
            for file_name, size, jsonl, seed in (("raw60m.txt", 60e6, False, 1), ("c200m.jsonl", 200e6, True, 2),
                                                 ("big.jsonl", args.big_gb * 1e9, True, 3)):
                if needs.get(name) == file_name and not (d / file_name).exists():
                    print(f"generating {d / file_name}", flush=True)
                    word_salad(d / file_name, int(size), jsonl, seed)
            print(f"measuring {name}", flush=True)
            res[name] = run()
            if name == "first_run_raw60mb":  # the trainer prepared the raw text into its cache: its rate
                m = json.loads(next((d / "cache_raw").glob("prepared-*/manifest.json")).read_text())
                res[name]["bpe_tokens_per_s"] = (m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]
                                                 ) / m["seconds"]
                res[name]["bpe_processes"] = min(m["processes"], m["units_run"])
            saved = json.loads(file.read_text()) if file.exists() else {}  # another run may have added some
            file.write_text(json.dumps({**saved, name: res[name]}, indent=1))
            res = {**saved, **res}
    md = table(res, args.big_gb)
    print(md)
    if args.write:
        from bench.report import replace_section
        note = (f"Synthetic word-salad corpora on this machine ({os.cpu_count()} CPU cores, shared with other "
                "jobs: load average during the run " + ", ".join(f"{x:.0f}" for x in os.getloadavg()) +
                "). Peak RSS sums the process and its workers. `python bench/data.py --write`.\n\n")
        replace_section(ROOT / "docs" / "benchmarks.md", "bench/data.py", note + md)


if __name__ == "__main__":
    main()
