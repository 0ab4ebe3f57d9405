"""Training one `Spec` through the trainer and turning the finished run into its record.

A run directory without a record is stale (an interrupted run): it is removed and the run starts over, so a
record always describes one uninterrupted run and its `seconds`. The record is written last, atomically."""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from bench.optimizer import ns_flops
from bench.paper.plan import BASE_CONFIG, SFT_CONFIG, Plan, Spec, overrides
from bench.paper.records import commit, machine, write_record
from train import data as data_lib
from train.config import load_config
from train.loop import NonFiniteLoss
from train.loop import train as pretrain
from train.mfu import flops_per_token
from train.models import abstract_model, param_counts
from train.plot import read_metrics
from train.runtime import cache_dir, model_config_for

FINISHED = "bench-paper-finished"   # in a run directory once training returned: its checkpoint can start an SFT


def config_of(spec: Spec, plan: Plan, runs: Path):
    """The trainer config of `spec`."""
    return load_config(SFT_CONFIG if spec.study == "sft" else BASE_CONFIG, overrides(spec, plan, runs))


def train_spec(spec: Spec, plan: Plan, runs: Path, records: Path) -> dict:
    """Train `spec` from scratch (removing a stale run directory), write its record to `records`, return it.
    An LR too high for an optimizer is a result (the record says diverged), not a failure."""
    if spec.pretrain is not None:
        ensure_trained(spec.pretrain, plan, runs)
    cfg = config_of(spec, plan, runs)
    run_dir = Path(cfg.run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    print(f"[bench.paper] training {spec.key}", flush=True)
    provenance = commit()
    t0, diverged, summary = time.perf_counter(), False, {}
    try:
        summary = run_trainer(spec, cfg)
    except NonFiniteLoss as e:
        print(f"[bench.paper] {spec.key} diverged: {e}", flush=True)
        diverged = True
    seconds = time.perf_counter() - t0
    (run_dir / FINISHED).write_text("")
    record = make_record(spec, cfg, summary, diverged, seconds, provenance)
    write_record(records, record)
    print(f"[bench.paper] {spec.key}: final val loss {record['final_val_loss']} in {seconds:.0f} s", flush=True)
    return record


def run_trainer(spec: Spec, cfg) -> dict:
    """The trainer's summary of `spec`: `train.sft.sft` for an SFT run, `train.loop.train` otherwise."""
    if spec.study == "sft":
        from train.sft import sft   # noqa: PLC0415 (chat templates and HF export only for SFT runs)
        return sft(cfg)
    return pretrain(cfg)


def ensure_trained(spec: Spec, plan: Plan, runs: Path) -> None:
    """Make sure `spec`'s run directory holds its finished run (an SFT starts from its checkpoint): retrain it if
    the directory is missing or unfinished (its record, already written, is kept)."""
    cfg = config_of(spec, plan, runs)
    run_dir = Path(cfg.run_dir)
    if (run_dir / FINISHED).is_file():
        return
    if run_dir.exists():
        shutil.rmtree(run_dir)
    print(f"[bench.paper] retraining {spec.key} for its checkpoint (its record is kept)", flush=True)
    pretrain(cfg)
    (run_dir / FINISHED).write_text("")


def val_tokens(spec: Spec, cfg) -> int:
    """Target tokens the final validation loss averages over (the loss mask's ones in the eval batches)."""
    if spec.study == "sft":
        from train.data.chat import load_chat_data, val_batches   # noqa: PLC0415
        from train.sft import load_init   # noqa: PLC0415
        init = load_init(cfg)
        chat = load_chat_data(init.chat, train_file=cfg.sft.train_file, val_file=cfg.sft.val_file,
                              val_fraction=cfg.sft.val_fraction, seq_len=cfg.seq_len, seed=cfg.seed,
                              skip_bad_lines=cfg.sft.skip_bad_lines)
        batches = val_batches(chat.val, cfg.global_batch // cfg.grad_accum, cfg.log.eval_batches)
    else:
        corpus = data_lib.load_corpus(cfg.data, cache_dir())
        batches = data_lib.make_val_batches(corpus, seq_len=cfg.seq_len, max_batches=cfg.log.eval_batches,
                                            batch_size=cfg.global_batch // cfg.grad_accum)
    return int(sum(float(np.sum(b["loss_mask"])) for b in batches))


def make_record(spec: Spec, cfg, summary: dict, diverged: bool, seconds: float, provenance: dict) -> dict:
    """The record of a finished run (bench/paper/records.py lists the required keys).

    train_flops = steps × global_batch × seq_len × `train.mfu.flops_per_token` (6 × matmul weights + attention,
    PaLM's accounting); train_flops_ns adds, for Muon, standard Newton–Schulz on every Muon matrix at every step
    (`bench.optimizer.ns_flops`, `optimizer.ns_steps` steps)."""
    run_cfg = load_config(Path(cfg.run_dir) / "config.yaml")   # an SFT's model and tokenizer are its init's
    model_cfg = model_config_for(run_cfg, data_lib.load_tokenizer(run_cfg.data, cache_dir()))
    total, _ = param_counts(model_cfg)
    embeddings = model_cfg.vocab_size * model_cfg.hidden_size * (1 if model_cfg.tie_word_embeddings else 2)
    tokens = spec.steps * cfg.global_batch * cfg.seq_len
    flops = tokens * flops_per_token(model_cfg, cfg.seq_len)
    params = nnx.state(abstract_model(model_cfg), nnx.Param)
    ns = spec.steps * ns_flops(params, cfg.optimizer.ns_steps) if spec.optimizer == "muon" else 0
    rows = read_metrics(cfg.run_dir) if (Path(cfg.run_dir) / "metrics.jsonl").is_file() else []
    final = summary.get("val_loss")
    steady = [r["tokens_per_s"] for r in rows[1:] if "tokens_per_s" in r and "val_loss" not in r]
    return {
        "study": spec.study, "key": spec.key, "size": spec.size.name, "d_model": model_cfg.hidden_size,
        "layers": model_cfg.num_hidden_layers, "non_embedding_params": int(total - embeddings), "params": int(total),
        "vocab_size": model_cfg.vocab_size, "tokens": int(tokens), "steps": spec.steps, "seq_len": cfg.seq_len,
        "global_batch": cfg.global_batch, "train_flops": float(flops), "train_flops_ns": float(flops + ns),
        "optimizer": spec.optimizer, "lr_scale": spec.lr_scale, "lr": spec.lr,
        "weight_decay": cfg.optimizer.weight_decay, "seed": spec.seed,
        "final_val_loss": None if diverged or final is None or not math.isfinite(final) else round(float(final), 6),
        "initial_val_loss": (round(float(summary["initial_val_loss"]), 6)
                             if summary.get("initial_val_loss") is not None else None),
        "diverged": diverged or final is None or not math.isfinite(final),
        "val_tokens": val_tokens(spec, cfg), "seconds": round(seconds, 1),
        "tokens_per_s": round(float(np.median(steady)), 1) if steady else None,
        "train_loss_curve": [[r["step"], round(float(r["loss"]), 4)] for r in rows
                             if "loss" in r and math.isfinite(r["loss"])],
        "machine": machine(), "device": str(jax.devices()[0].device_kind), **provenance,
        "pretrain_optimizer": spec.pretrain.optimizer if spec.pretrain else None,
        "pretrain_lr": spec.pretrain.lr if spec.pretrain else None,
        "pretrain_key": spec.pretrain.key if spec.pretrain else None,
        "config": json.loads(json.dumps(cfg.to_dict())),
    }
