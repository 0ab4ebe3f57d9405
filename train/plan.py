"""`python -m train.plan CONFIG --devices N`: per-device memory of a training job, and the mesh that needs least.

    python -m train.plan configs/moonlight_16b_a3b.yaml --devices 8 --device-memory 80
    python -m train.plan path/to/Moonlight-16B-A3B-Instruct --devices 64 --device-memory 95 --seq-len 4096

CONFIG is a trainer YAML (its model, seq_len, global_batch, grad_accum, optimizer) or a Hugging Face checkpoint
directory / config.json (fine-tuned as `train.sft model.remat=full` does it: float32 params and compute, Muon;
--seq-len/--global-batch set the batch). Every (data, fsdp, expert) factorisation of N (tensor=1) is costed, or only `--mesh data=..,fsdp=..`.

Per device: params and grads (each param's shard under DEFAULT_RULES, exactly as the trainer lays them out),
optimizer state (Muon: one momentum buffer per matrix; its AdamW branch, for embeddings / norms / biases: two),
and an activation estimate for `remat` policies that keep each layer's input (full remat): the saved layer
inputs, one layer's recomputed working set (q/k/v, the T x T attention scores XLA materialises, the MoE expert
rows) and the float32 logits with their gradient. Activations are an estimate; the rest is exact.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import jax
from flax import nnx

from train.cli import load_checked_config, run_job
from train.loop import model_routing
from train.models import (DEFAULT_RULES, DeepseekV3Config, abstract_model, model_config_from_dict,
                          model_config_from_hf, param_counts)

GiB = 2**30


def shard_factor(names, shape, mesh: dict, rules=DEFAULT_RULES) -> int:
    """How many ways an array is split on a mesh {axis: size} (the rule of `logical_to_spec`, without devices)."""
    table, used, factor = dict(rules), set(), 1
    for name, size in zip(names, shape):
        target = table.get(name) if name is not None else None
        axes = [a for a in ((target,) if isinstance(target, str) else tuple(target or ()))
                if mesh.get(a, 1) > 1 and a not in used]
        if axes and size % math.prod(mesh[a] for a in axes) == 0:
            used.update(axes)
            factor *= math.prod(mesh[a] for a in axes)
    return factor


def routing_labels(model_cfg) -> list[str]:
    """Each param's "muon" / "adam" label (in `nnx.to_flat_state` order) as the trainer routes it: read from the
    model's loss by `train.loop.model_routing` (abstract: nothing runs)."""
    graphdef, params, variables = nnx.split(abstract_model(model_cfg), nnx.Param, ...)
    routing = model_routing(graphdef, params, variables, rows=1, seq_len=8)
    return [label for _, label in nnx.to_flat_state(routing.labels)]


def state_bytes(model_cfg, mesh: dict, optimizer: str, labels: list[str] | None = None) -> tuple[float, float]:
    """(params bytes, optimizer state bytes) per device; `labels`: `routing_labels(model_cfg)` (computed if None)."""
    params = opt = 0.0
    flat = nnx.to_flat_state(nnx.state(abstract_model(model_cfg), nnx.Param))
    if labels is None and optimizer != "adamw":
        labels = routing_labels(model_cfg)
    for i, (_, var) in enumerate(flat):
        names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
        size = math.prod(var.shape) * var.dtype.itemsize / shard_factor(names, var.shape, mesh)
        params += size
        adam = optimizer == "adamw" or labels[i] == "adam"   # Muon: one momentum buffer, AdamW: two
        opt += size * (2 if adam else 1)
    return params, opt


def activation_bytes(c, batch: int, seq: int, tensor: int) -> float:
    """Activation estimate per device for `batch` sequences of `seq` tokens (full remat, see the docstring)."""
    act = 2 if c.dtype == "bfloat16" else 4
    bt, d, layers = batch * seq, c.hidden_size, c.num_hidden_layers
    saved = layers * bt * d * act
    heads = c.num_attention_heads / tensor
    if isinstance(c, DeepseekV3Config):
        qkv = heads * (2 * c.qk_head_dim + c.v_head_dim) + c.kv_lora_rank + c.qk_rope_head_dim
        ffn = max(3 * c.intermediate_size, c.num_experts_per_tok * (3 * c.moe_intermediate_size + 2 * d)
                  + 3 * c.moe_intermediate_size * c.n_shared_experts) / tensor
    else:
        qkv = (heads + 2 * c.num_key_value_heads / tensor) * c.head_dim
        ffn = 3 * c.intermediate_size / tensor
    scores = batch * heads * seq * seq * 4
    layer = bt * (2 * qkv + ffn + 4 * d) * act + 2 * scores  # forward values and their gradients
    logits = 2 * bt * c.vocab_size / tensor * 4
    return saved + layer + logits


def meshes(devices: int, fixed: dict | None):
    """Candidate meshes {data, fsdp, tensor, expert} for `devices` (tensor=1 unless fixed)."""
    if fixed:
        yield {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1, **fixed}
        return
    divisors = [k for k in range(1, devices + 1) if devices % k == 0]
    for fsdp, expert in itertools.product(divisors, divisors):
        if devices % (fsdp * expert) == 0:
            yield {"data": devices // (fsdp * expert), "fsdp": fsdp, "tensor": 1, "expert": expert}


def plan(model_cfg, devices: int, seq: int, global_batch: int, grad_accum: int, optimizer: str,
         fixed_mesh: dict | None = None) -> list[dict]:
    """Per-device memory (bytes) for each candidate mesh, smallest total first."""
    rows, labels = [], None if optimizer == "adamw" else routing_labels(model_cfg)
    for mesh in meshes(devices, fixed_mesh):
        if isinstance(model_cfg, DeepseekV3Config) and model_cfg.n_routed_experts % mesh["expert"]:
            continue
        split = mesh["data"] * mesh["fsdp"]
        if global_batch % (split * grad_accum):
            continue
        params, opt = state_bytes(model_cfg, mesh, optimizer, labels)
        act = activation_bytes(model_cfg, global_batch // (split * grad_accum), seq, mesh["tensor"])
        rows.append({"mesh": mesh, "params": params, "grads": params, "optimizer": opt, "activations": act,
                     "total": 2 * params + opt + act})
    return sorted(rows, key=lambda r: r["total"])


def load_job(path: str, overrides: list[str], seq: int | None, batch: int | None):
    """(model config, seq_len, global_batch, grad_accum, optimizer name) from a YAML or a HF dir/config.json."""
    p = Path(path)
    if p.is_dir() or p.suffix == ".json":
        hf = json.loads((p / "config.json" if p.is_dir() else p).read_text())
        model_cfg = model_config_from_hf(hf, dtype="float32", param_dtype="float32", remat="full")  # as train.sft
        return model_cfg, seq or 4096, batch or 8, 1, "muon"
    cfg = load_checked_config(p, overrides)  # a bad model key is one line, as in the trainer
    model_cfg = model_config_from_dict({"vocab_size": 50257, **cfg.model})
    return model_cfg, seq or cfg.seq_len, batch or cfg.global_batch, cfg.grad_accum, cfg.optimizer.name


def report(model_cfg, rows, devices: int, memory_gib: float, seq: int, batch: int, top: int = 5) -> str:
    """The printed plan: model size, then the best meshes with per-device GiB and whether each fits."""
    total, active = param_counts(model_cfg)
    lines = [f"{model_cfg.architecture}: {total / 1e9:.2f}B params ({active / 1e9:.2f}B active), params "
             f"{model_cfg.param_dtype}, compute {model_cfg.dtype}; {devices} devices x {memory_gib:g} GiB; "
             f"global batch {batch} x {seq} tokens",
             "| mesh (data, fsdp, tensor, expert) | params | grads | optimizer | activations (est.) | total | fits |",
             "|---|---|---|---|---|---|---|"]
    for r in rows[:top]:
        m = r["mesh"]
        g = {k: r[k] / GiB for k in ("params", "grads", "optimizer", "activations", "total")}
        lines.append(f"| {m['data']}, {m['fsdp']}, {m['tensor']}, {m['expert']} | {g['params']:.1f} | "
                     f"{g['grads']:.1f} | {g['optimizer']:.1f} | {g['activations']:.1f} | {g['total']:.1f} | "
                     f"{'yes' if g['total'] < 0.9 * memory_gib else 'no'} |")
    if not rows:
        lines.append("no mesh divides the batch and the experts; change --devices or --global-batch")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Parse the arguments and print the plan; a user error (bad config or override) prints one line, exit 2."""
    parser = argparse.ArgumentParser(prog="python -m train.plan", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="trainer YAML, or a Hugging Face checkpoint dir / config.json")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides for a YAML config")
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--device-memory", type=float, default=80.0, help="GiB per device (default 80)")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--global-batch", type=int, default=None)
    parser.add_argument("--mesh", default=None, help="only this mesh, e.g. data=1,fsdp=8,expert=8")
    args = parser.parse_intermixed_args(argv)
    fixed = dict((k, int(v)) for k, v in (kv.split("=") for kv in args.mesh.split(","))) if args.mesh else None

    def job():
        model_cfg, seq, batch, accum, optimizer = load_job(args.config, args.overrides, args.seq_len,
                                                           args.global_batch)
        rows = plan(model_cfg, args.devices, seq, batch, accum, optimizer, fixed)
        print(report(model_cfg, rows, args.devices, args.device_memory, seq, batch))

    return run_job(job)


if __name__ == "__main__":
    with jax.default_device(jax.devices("cpu")[0]):
        sys.exit(main())
