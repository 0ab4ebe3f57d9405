"""Peak host memory of loading a ~1 GB sharded Hugging Face checkpoint: the safetensors-library loader of
`train.models.hf` against the hand-written reader it replaced (read from git, commit c22e2ec).

    python -m bench.hf_load [--write-docs]

A random float32 Llama checkpoint (~1.1 GB, 5 shards of <= 256 MB) is written once to a temp dir; each loader then
runs in a fresh process that reports its RSS after importing jax and the loader (baseline) and its peak RSS (VmHWM) after
the load. "beyond model" = peak - baseline - model bytes: the loader's transient host memory, which the
requirement bounds by one shard.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OLD_COMMIT = "c22e2ec"
SHARD = 256 * 2**20
CONFIG = dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=3,
              num_attention_heads=16, num_key_value_heads=16)

MEASURE = """
import importlib.util, json, sys
import jax, jax.numpy as jnp
jnp.zeros(1).block_until_ready()
rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096
# VmHWM, not ru_maxrss: getrusage keeps the parent's high-water mark across fork + exec, and the parent has
# just written the checkpoint
hwm = lambda: int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) * 1024
if sys.argv[2] == 'old':
    spec = importlib.util.spec_from_file_location('old_hf', sys.argv[3])
    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
else:
    import train.models.hf as module
base = rss()  # after imports: the loader's code and libraries are not memory the load holds
model, _ = module.load_hf_checkpoint(sys.argv[1], dtype=jnp.float32)
jax.block_until_ready(jax.tree.leaves(__import__('flax').nnx.state(model)))
peak = hwm()
print(json.dumps({'base': base, 'peak': peak, 'final': rss()}))
"""


def write_checkpoint(path: Path) -> int:
    """A random float32 checkpoint of CONFIG in shards of <= SHARD bytes; returns the model's bytes."""
    import jax
    import numpy as np
    from flax import nnx

    from train.models import abstract_model, model_config_from_dict
    from train.models.hf import save_hf_checkpoint
    config = model_config_from_dict(CONFIG)
    graphdef, state = nnx.split(abstract_model(config))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda v: rng.standard_normal(v.shape, np.float32) * 0.02, state)
    save_hf_checkpoint(nnx.merge(graphdef, state), config, path, max_shard_size=SHARD)
    return sum(x.nbytes for x in jax.tree.leaves(state))


def measure(path: Path, which: str, old_file: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path), which, str(old_file)], capture_output=True,
                         text=True, cwd=ROOT, env={"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
                                                   "PATH": "/usr/bin:/bin"})
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_bytes = write_checkpoint(tmp / "ckpt")
        old_file = tmp / "old_hf.py"
        old_file.write_text(subprocess.run(["git", "show", f"{OLD_COMMIT}:train/models/hf.py"], cwd=ROOT,
                                           capture_output=True, text=True, check=True).stdout)
        files = sorted((tmp / "ckpt").glob("*.safetensors"))
        largest = max(f.stat().st_size for f in files)
        rows = [f"checkpoint: {model_bytes / 2**30:.2f} GiB float32 in {len(files)} shards (largest "
                f"{largest / 2**20:.0f} MiB), loaded as float32 on CPU", "",
                "| loader | peak RSS − baseline (MiB) | beyond model (MiB) | beyond model / largest shard |",
                "|---|---|---|---|"]
        for which, label in (("old", f"hand-written reader ({OLD_COMMIT})"), ("new", "safetensors safe_open")):
            r = measure(tmp / "ckpt", which, old_file)
            beyond = r["peak"] - r["base"] - model_bytes
            rows.append(f"| {label} | {(r['peak'] - r['base']) / 2**20:.0f} | {beyond / 2**20:.0f} | "
                        f"{beyond / largest:.2f} |")
    table = "\n".join(rows)
    print(table)
    if args.write_docs:
        from bench.report import replace_section
        replace_section(ROOT / "docs" / "benchmarks.md", "bench/hf_load.py", table)


if __name__ == "__main__":
    main()
