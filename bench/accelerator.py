"""Accelerator benchmark: Newton–Schulz throughput and full train steps on whatever device jax finds, in one run.

    python -m bench.accelerator            # prints a markdown table
    python -m bench.accelerator --write    # ... and puts it into docs/benchmarks.md, naming the device
    python -m bench.accelerator --quick    # tiny shapes (CPU CI): the script runs end to end in seconds

On the GPU host (no network), from the repository root, after `bash bench/gpu_wheels.sh` filled wheels/ here:

    pip install --no-index --find-links wheels grain tensorboardX && python -m bench.accelerator --write

Parts, side by side: (a) NS on the Llama-1B/8B weight shapes in bf16, muon_jax (every `method` its
`newton_schulz` has) vs optax.contrib's Muon, as TFLOP/s and as % of a bf16 matmul of the same shape (X·Xᵀ,
NS's own Gram product) measured here; (b) configs/llama_1b.yaml train steps with Muon and AdamW; (c) a
Moonlight-shaped MoE cut to a few layers. Train rows give tokens/s, MFU (train.mfu), compiled memory, the device's
peak memory where it reports one, and the optimizer update (timed alone, buffers donated) over the step time.
Each part has a time budget (whole script on one H100 ≤ 8 min); items past it are reported as skipped.
"""
from __future__ import annotations

import argparse
import inspect
import re
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bench.train_throughput import time_update

ROOT = Path(__file__).resolve().parent.parent
NS_STEPS = 5
NS_SHAPES = {"Llama-1B": [(2048, 2048), (2048, 512), (2048, 8192)],
             "Llama-8B": [(4096, 4096), (4096, 1024), (4096, 14336)]}
QUICK_NS_SHAPES = {"tiny": [(64, 64), (64, 256)]}
# (name, config, overrides, optimizers): batch sized for one 80 GB GPU; remat as the config sets it
BOTH = ("muon", "adamw")
TRAIN = [("llama_1b", "configs/llama_1b.yaml", ["global_batch=16", "model.vocab_size=50257"], BOTH),
         ("moonlight, 3 layers", "configs/moonlight_16b_a3b.yaml",
          ["model.num_hidden_layers=3", "seq_len=4096", "global_batch=2", "mesh.expert=1"], BOTH)]
TINY_MODEL = ["model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=1",
              "model.num_attention_heads=4", "model.vocab_size=256", "seq_len=64", "global_batch=2",
              "model.dtype=float32", "optimizer.ns_dtype=float32"]
# CI: each model with one optimizer, so that both models and both optimizers run in well under a minute
QUICK_TRAIN = [("llama_1b (tiny)", "configs/llama_1b.yaml",
                [*TINY_MODEL, "model.num_key_value_heads=2", "model.head_dim=16"], ("muon",)),
               ("moonlight (tiny)", "configs/moonlight_16b_a3b.yaml",
                [*TINY_MODEL, "model.moe_intermediate_size=32", "model.num_key_value_heads=4",
                 "model.n_routed_experts=4", "model.num_experts_per_tok=2", "model.n_shared_experts=1",
                 "model.first_k_dense_replace=0", "model.kv_lora_rank=16", "model.qk_nope_head_dim=16",
                 "model.qk_rope_head_dim=8", "model.v_head_dim=16", "mesh.expert=1"], ("adamw",))]
# seconds per part (the MoE rows share "train" with llama_1b); a train row starts only with ROW_S of its part left,
# so that on one H100 the script ends within 8 minutes even when the last row runs long
BUDGET_S = {"ns": 80, "train": 270}
ROW_S = 60


def timed(fn, *args, repeats: int) -> float:
    """Mean seconds of `fn(*args)` over `repeats` calls after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t) / repeats


def ns_methods() -> dict[str, dict]:
    """{label: newton_schulz kwargs} for every `method` muon_jax.newton_schulz accepts (one entry if it has none):
    the choices are read from its signature (a Literal annotation or the default) plus muon_jax.NS_METHODS."""
    import muon_jax
    param = inspect.signature(muon_jax.newton_schulz).parameters.get("method")
    if param is None:
        return {"muon_jax": {}}
    names = re.findall(r"['\"](\w+)['\"]", str(param.annotation))
    names += [param.default] if isinstance(param.default, str) else []
    names += list(getattr(muon_jax, "NS_METHODS", ()))
    return {f"muon_jax {m}": {"method": m} for m in dict.fromkeys(names)}


def ns_candidates(shape) -> dict:
    """{label: jitted f(x)} of the NS implementations compared on one bf16 matrix of `shape`."""
    import optax
    import muon_jax
    fns = {label: jax.jit(lambda x, kw=kw: muon_jax.newton_schulz(x, steps=NS_STEPS, dtype=jnp.bfloat16, **kw))
           for label, kw in ns_methods().items()}
    tx = optax.contrib.scale_by_muon(ns_steps=NS_STEPS, mu_dtype=jnp.bfloat16,  # optax 0.2.8 needs the dims given
                                     weight_dimension_numbers={"w": optax.contrib.MuonDimensionNumbers()})
    state = tx.init({"w": jnp.zeros(shape, jnp.bfloat16)})
    fns["optax.contrib.muon"] = jax.jit(lambda x: tx.update({"w": x}, state, {"w": x})[0]["w"])
    return fns


def ns_rows(shapes: dict, repeats: int, deadline: float) -> list[dict]:
    """NS timings per (model, shape, implementation), with the same shape's bf16 Gram-matmul rate as the peak."""
    rows = []
    for model, model_shapes in shapes.items():
        for shape in model_shapes:
            m, n = min(shape), max(shape)
            x = jax.random.normal(jax.random.key(0), shape, jnp.bfloat16)
            if time.perf_counter() > deadline:
                rows.append({"model": model, "shape": shape, "impl": "skipped: over the part's time budget"})
                continue
            gram = jax.jit(lambda a: a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a)
            peak = 2.0 * m * m * n / timed(gram, x, repeats=repeats)
            flops = NS_STEPS * (4.0 * m * m * n + 2.0 * m ** 3)
            for label, fn in ns_candidates(shape).items():
                try:
                    s = timed(fn, x, repeats=repeats)
                    rows.append({"model": model, "shape": shape, "impl": label, "ms": 1e3 * s,
                                 "tflops": flops / s / 1e12, "peak_tflops": peak / 1e12, "of_peak": flops / s / peak})
                except Exception as e:  # one implementation failing must not hide the others
                    rows.append({"model": model, "shape": shape, "impl": f"{label}: failed ({type(e).__name__})"})
    return rows


def random_batch(rows: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
    """Packed rows of random tokens: documents of random length (mean 512 tokens), as the corpus packs them."""
    from train.models.layers import segment_positions
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (rows, seq_len + 1), dtype=np.int32)
    starts = rng.random((rows, seq_len)) < 1 / 512
    starts[:, 0] = True
    segment_ids = np.cumsum(starts, axis=1, dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segment_ids,
            "positions": np.asarray(segment_positions(jnp.asarray(segment_ids))),
            "loss_mask": np.ones((rows, seq_len), np.float32)}


def build_step(cfg, max_logit_block: int | None = None):
    """(jitted donating train step, initial state, batch, model config, tx) for `cfg` on its mesh, no data files:
    the vocab comes from `model.vocab_size`, the batch is `random_batch`."""
    from train.loop import initial_state
    from train.models import model_config_from_dict
    from train.runtime import batch_sharding, make_mesh
    from train.step import make_train_step
    mesh = make_mesh(cfg)
    model_cfg = model_config_from_dict({"max_position_embeddings": max(cfg.seq_len, 2048), **cfg.model})
    graphdef, state, tx, schedule, routing = initial_state(cfg, model_cfg, mesh,
                                                          types.SimpleNamespace(init_model=None))
    shardings = jax.tree.map(lambda x: x.sharding, state)
    step = jax.jit(make_train_step(cfg, graphdef, tx, schedule, routing.labels, model_cfg, max_logit_block),
                   donate_argnums=(0,), out_shardings=(shardings, None))
    sharding = batch_sharding(mesh, (cfg.global_batch, cfg.seq_len))
    batch = {k: jax.device_put(v, sharding) for k, v in
             random_batch(cfg.global_batch, cfg.seq_len, model_cfg.vocab_size, cfg.seed).items()}
    return step, state, batch, model_cfg, tx


def update_seconds(tx, params, opt_state, repeats: int) -> float:
    """`time_update` with a constant gradient and donated buffers (no second copy of the state)."""
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
    return time_update(tx, params, opt_state, grads, repeats, donate=True)


def compiled_bytes(compiled) -> float:
    """Arguments + outputs + temporaries of a compiled step, less donated (aliased) buffers."""
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def train_row(name: str, path: str, overrides: list[str], optimizer: str, repeats: int) -> dict:
    """One train-step row: tokens/s, MFU, memory and the optimizer's share, for `optimizer` on a config."""
    from train.config import load_config
    from train.mfu import flops_per_token, peak_flops
    from train.runtime import cache_dir
    cfg = load_config(ROOT / path, [*overrides, f"optimizer.name={optimizer}", "mesh.data=1", "mesh.fsdp=-1"])
    step, state, batch, model_cfg, tx = build_step(cfg)
    compiled = step.lower(state, batch).compile()
    state, _ = jax.block_until_ready(compiled(state, batch))  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - t) / repeats
    tokens_per_s = cfg.global_batch * cfg.seq_len / step_s
    peak = peak_flops(cache=cache_dir())
    stats = jax.devices()[0].memory_stats() or {}
    opt_s = update_seconds(tx, state["params"], state["opt_state"], repeats)
    return {"name": name, "optimizer": optimizer, "tokens": f"{cfg.global_batch}×{cfg.seq_len}",
            "tokens_per_s": tokens_per_s, "step_ms": 1e3 * step_s, "optimizer_ms": 1e3 * opt_s,
            "mfu": None if peak is None else flops_per_token(model_cfg, cfg.seq_len) * tokens_per_s / peak,
            "share": opt_s / step_s, "compiled_gb": compiled_bytes(compiled) / 1e9,
            "peak_gb": stats.get("peak_bytes_in_use", float("nan")) / 1e9, "loss": float(metrics["loss"])}


def train_rows(models: list, repeats: int, deadline: float, row_s: float = ROW_S) -> list[dict]:
    """`train_row` for each model's optimizers; an error (e.g. out of memory) or the budget ends a row."""
    rows = []
    for name, path, overrides, optimizers in models:
        for optimizer in optimizers:
            if time.perf_counter() > deadline - row_s:
                rows.append({"name": name, "optimizer": optimizer, "error": "skipped: over the part's time budget"})
                continue
            try:
                rows.append(train_row(name, path, overrides, optimizer, repeats))
            except Exception as e:  # e.g. out of memory: report it, measure the rest
                first = (str(e).splitlines() or [""])[0][:160]
                rows.append({"name": name, "optimizer": optimizer, "error": f"failed: {type(e).__name__} {first}"})
    return rows


def ns_table(rows: list[dict]) -> list[str]:
    """Markdown lines of the NS part."""
    lines = ["| model | shape | implementation | ms | TFLOP/s | bf16 matmul TFLOP/s (same shape) | % of matmul |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        shape = f"{r['shape'][0]}×{r['shape'][1]}"
        if "ms" not in r:
            lines.append(f"| {r['model']} | {shape} | {r['impl']} | | | | |")
            continue
        lines.append(f"| {r['model']} | {shape} | {r['impl']} | {r['ms']:.2f} | {r['tflops']:.3g} | "
                     f"{r['peak_tflops']:.3g} | {100 * r['of_peak']:.0f}% |")
    return lines


def train_table(rows: list[dict]) -> list[str]:
    """Markdown lines of the train-step parts."""
    from train.metrics import format_mfu
    lines = ["| model | optimizer | batch×seq | tokens/s | MFU | step ms | optimizer ms | optimizer share | "
             "compiled memory GB | device peak GB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['optimizer']} | {r['error']} | | | | | | | |")
            continue
        lines.append(f"| {r['name']} | {r['optimizer']} | {r['tokens']} | {r['tokens_per_s']:,.0f} | "
                     f"{format_mfu(r['mfu'])[4:]} | {r['step_ms']:.1f} | {r['optimizer_ms']:.1f} | "
                     f"{100 * r['share']:.1f}% | {r['compiled_gb']:.3g} | {r['peak_gb']:.3g} |")
    return lines


def report(quick: bool) -> str:
    """Run every part within its budget; the markdown section (device, attention path, tables, part times)."""
    from bench.report import device_line
    from train.models import attention_path
    repeats, t0 = (2, time.perf_counter()) if quick else (10, time.perf_counter())
    ns = ns_rows(QUICK_NS_SHAPES if quick else NS_SHAPES, repeats, t0 + BUDGET_S["ns"])
    t1 = time.perf_counter()
    train = train_rows(QUICK_TRAIN if quick else TRAIN, 2 if quick else 5, t1 + BUDGET_S["train"],
                       0 if quick else ROW_S)
    t2 = time.perf_counter()
    path, why = attention_path(jax.default_backend(), jnp.bfloat16, 64)
    head = (f"{device_line()}{' — `--quick` (tiny shapes)' if quick else ''}. Attention (bf16): {path} — {why}. "
            f"Parts took {t1 - t0:.0f} s (NS) and {t2 - t1:.0f} s (train steps).")
    notes = ("NS: TFLOP/s counts 5 × (4m²n + 2m³) per m×n matrix (m ≤ n); the peak is X·Xᵀ in bf16 timed "
             "here. Train: MFU against train.mfu's peak (table for accelerators, measured matmul rate on CPU); the "
             "step computes no max attention logit (MuonClip off); optimizer: one donating update timed alone. "
             "GPU host: `pip install --no-index --find-links wheels grain tensorboardX && "
             "python -m bench.accelerator --write` (wheels from `bash bench/gpu_wheels.sh`).")
    return "\n".join([head, "", notes, "", "Newton–Schulz, bf16, 5 steps:", "", *ns_table(ns), "",
                      "Train step (Muon vs AdamW):", "", *train_table(train)])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, seconds on a CPU (CI)")
    parser.add_argument("--write", action="store_true", help="put the table into docs/benchmarks.md")
    args = parser.parse_args(argv)
    md = report(args.quick)
    print(md, flush=True)
    if args.write:
        from bench.report import replace_section
        replace_section(ROOT / "docs" / "benchmarks.md", "bench/accelerator.py", md)


if __name__ == "__main__":
    main()
