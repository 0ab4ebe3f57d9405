"""Trainer throughput: tokens/s and MFU per config, and the optimizer update's share of the step time.

    python -m bench.train_throughput configs/tiny.yaml configs/moonlight_tiny.yaml [--steps 30] [key=value ...]
    python -m bench.train_throughput --abstract configs/moonlight_16b_a3b.yaml   # param counts only, any machine

Each config runs through the real trainer (`train.loop.train`) in a temporary run_dir; tokens/s is the rate over the
steps after the first logging interval (which holds the compilation). The optimizer share is one jitted
`tx.update` + `apply_updates` on the model's params, timed alone, over the measured step time.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import jax
import numpy as np


def abstract_counts(path: str) -> None:
    from flax import nnx

    from train.config import load_config
    from train.models import abstract_model, model_config_from_dict, param_counts
    cfg = load_config(path)
    model_cfg = model_config_from_dict({"vocab_size": 50257, **cfg.model})
    abstract = abstract_model(model_cfg)
    built = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    total, active = param_counts(model_cfg)
    embed = model_cfg.vocab_size * model_cfg.hidden_size * (1 if model_cfg.tie_word_embeddings else 2)
    print(f"{path}: abstract params {built / 1e9:.3f}B (formula {total / 1e9:.3f}B); "
          f"without embeddings {(total - embed) / 1e9:.2f}B total / {(active - embed) / 1e9:.2f}B active")


def time_update(tx, params, opt_state, grads, repeats: int = 5, donate: bool = False) -> float:
    """Seconds of one jitted `tx.update` + `apply_updates` (`donate`: params and state buffers donated, so no second
    copy of the state). Two chained warm-up calls: the state a first update returns can differ in abstract type from
    the initial one (AdamW's weak types), which would otherwise put a recompilation inside the timing."""
    import optax

    def update(params, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(update, donate_argnums=(0, 1) if donate else ())

    for _ in range(2):
        params, opt_state = jax.block_until_ready(step(params, opt_state))
    t = time.perf_counter()
    for _ in range(repeats):
        params, opt_state = jax.block_until_ready(step(params, opt_state))
    return (time.perf_counter() - t) / repeats


def optimizer_seconds(cfg) -> float:
    """`time_update` for the config's optimizer on its freshly initialised params (mesh as the trainer builds it)."""
    from flax import nnx

    from train.data import load_tokenizer
    from train.models import build_model
    from train.optim import make_optimizer, make_schedule
    from train.runtime import cache_dir, make_mesh, model_config_for
    mesh = make_mesh(cfg)
    model_cfg = model_config_for(cfg, load_tokenizer(cfg.data, cache_dir()))
    params = nnx.state(build_model(model_cfg, rngs=nnx.Rngs(0), mesh=mesh), nnx.Param)
    tx = make_optimizer(cfg, make_schedule(cfg), mesh)
    return time_update(tx, params, tx.init(params), jax.tree.map(lambda p: p * 1e-3, params))


def measure(path: str, steps: int, overrides: list[str]) -> dict:
    from train.config import load_config
    from train.loop import train
    with tempfile.TemporaryDirectory() as tmp:
        every = max(1, steps // 3)
        cfg = load_config(path, [f"run_dir={tmp}/run", f"steps={steps}", f"log.every={every}",
                                 f"log.eval_every={10 ** 9}", "log.eval_batches=1", f"checkpoint.every={10 ** 9}",
                                 "log.sample_tokens=0", "log.tensorboard=false", "schedule.warmup_steps=1",
                                 *overrides])
        train(cfg)
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    steady = rows[1:] or rows
    tokens_per_s = float(np.mean([r["tokens_per_s"] for r in steady]))
    step_s = cfg.global_batch * cfg.seq_len / tokens_per_s
    opt_s = optimizer_seconds(cfg)
    return {"config": path, "optimizer": cfg.optimizer.name, "tokens_per_s": tokens_per_s,
            "mfu": float(np.mean([r["mfu"] for r in steady])), "step_s": step_s, "optimizer_s": opt_s,
            "optimizer_share": opt_s / step_s}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="config paths, then optional key=value overrides for all")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--abstract", action="store_true", help="only build abstract params and print counts")
    parser.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_intermixed_args(argv)
    paths = [c for c in args.configs if "=" not in c]
    overrides = [c for c in args.configs if "=" in c]
    if args.abstract:
        for p in paths:
            abstract_counts(p)
        return
    results = [measure(p, args.steps, overrides) for p in paths]
    lines = ["| config | optimizer | tokens/s | MFU | step ms | optimizer ms | optimizer share |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['optimizer']} | {r['tokens_per_s']:.0f} | {100 * r['mfu']:.1f}% | "
              f"{1e3 * r['step_s']:.1f} | {1e3 * r['optimizer_s']:.1f} | {100 * r['optimizer_share']:.1f}% |"
              for r in results]
    from bench.report import device_line, replace_section
    md = (f"{device_line()}; {args.steps} steps per config, steady-state rate after the first logging interval"
          f"{'; overrides: ' + ' '.join(overrides) if overrides else ''}.\n\n" + "\n".join(lines))
    print(md)
    if args.write:
        replace_section(Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md", "bench/train_throughput.py", md)


if __name__ == "__main__":
    main()
