"""Time one jitted optimizer update per Llama layer shape and for a whole tree: muon_jax vs optax.contrib.muon.

    python -m bench.optimizer [--models 1b,8b] [--layers 1] [--repeats 2] [--write]
    python -m bench.optimizer --quick          # a small model, one repeat (CI)

For each model (Llama-1B: d=2048, f=8192; Llama-8B: d=4096, f=14336; GQA kv = d/4) one stack
``[L, d, d]``, ``[L, d, kv]``, ``[L, d, f]``, ``[L, f, d]`` each, and the whole Llama tree (all seven
matrices of L layers, norms, a 32k embedding and head) for Llama-1B, side by side in one run:
ms per update (median), FLOPs of the compiled update from ``cost_analysis()``, GFLOP/s, the ratios of
muon_jax ``ns_method="auto"`` vs ``"standard"`` vs ``optax.contrib.muon``, and FLOPs ÷ ideal, where
ideal = the Newton–Schulz FLOPs of the best formulation per matrix (standard NS or Gram NS without
restarts, dense GEMMs; a symmetric GEMM would halve the Gram products of either).

All three run NS in float32 on float32 parameters and are configured to the same math as far as optax
allows (0.2·√max(A,B) scaling, Moonlight coefficients, 5 steps, weight decay 0.1, AdamW β2 = 0.95 for
the rest, stacked [L, A, B] weights as batches of matrices). ``--write`` puts the table in
docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers

import muon_jax
from bench.report import device_line, replace_section

# name -> (d, f); kv = d // 4 (GQA with 4x fewer kv heads), as in Llama 3.
MODELS = {"1b": (2048, 8192), "8b": (4096, 14336), "quick": (128, 512)}
CANDIDATES = ("muon_jax auto", "muon_jax standard", "optax.contrib.muon")


def layer_shapes(layers, d, f) -> dict:
    kv = d // 4
    return {"wq": (layers, d, d), "wk": (layers, d, kv), "wv": (layers, d, kv), "wo": (layers, d, d),
            "w_gate": (layers, d, f), "w_up": (layers, d, f), "w_down": (layers, f, d)}


def init(shapes: dict, dtype=jnp.float32):
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
    keys = jax.random.split(jax.random.key(0), len(leaves))
    return jax.tree.unflatten(treedef, [0.02 * jax.random.normal(k, s, dtype) for k, s in zip(keys, leaves)])


def llama_params(layers, d, f, vocab, dtype):
    """A Llama-like parameter tree: stacked layer matrices and norms, embedding and head."""
    stack = {**layer_shapes(layers, d, f), "attn_norm": (layers, d), "mlp_norm": (layers, d)}
    return init({"embed": (vocab, d), "layers": stack, "final_norm": (d,), "lm_head": (d, vocab)}, dtype)


def muon_matrices(params):
    """(batch, short side, long side) of every Muon matrix stack of ``params``."""
    out = []
    for label, x in zip(jax.tree.leaves(muon_jax.default_labels(params)), jax.tree.leaves(params)):
        if label == "muon":
            a, b = sorted(x.shape[-2:])
            out.append((x.size // (a * b), a, b))
    return out


def ns_flops(params, steps=5) -> int:
    """FLOPs of standard Newton–Schulz over every Muon matrix: per step X Xᵀ, A·A and B·X on the short side."""
    return sum(batch * steps * (4 * a * a * b + 2 * a**3) for batch, a, b in muon_matrices(params))


def ideal_ns_flops(params, steps=5) -> int:
    """Per matrix the cheaper of standard NS and restart-free Gram NS (X Xᵀ and Q X, plus 4k−3 n×n
    products over k steps), dense GEMMs."""
    return sum(batch * min(steps * (4 * a * a * b + 2 * a**3), 4 * a * a * b + (4 * steps - 3) * 2 * a**3)
               for batch, a, b in muon_matrices(params))


def optax_contrib_same_math(lr, params):
    dims = jax.tree.map(
        lambda label, x: MuonDimensionNumbers(x.ndim - 2, x.ndim - 1) if label == "muon" else None,
        muon_jax.default_labels(params), params)
    return optax.contrib.muon(
        lr, weight_decay=0.1, adam_b2=0.95, adam_weight_decay=0.1, consistent_rms=0.2,
        muon_weight_dimension_numbers=dims)


def candidate(name: str, params) -> optax.GradientTransformation:
    if name == "optax.contrib.muon":
        return optax_contrib_same_math(1e-3, params)
    return muon_jax.muon(1e-3, ns_dtype=jnp.dtype(jnp.float32), ns_method=name.split()[-1])


def compiled_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def compile_update(tx, params):
    """(compiled ``tx.update``, its arguments, compile seconds)."""
    args = (jax.tree.map(lambda p: jnp.ones_like(p) * 1e-3, params), tx.init(params), params)
    start = time.perf_counter()
    update = jax.jit(tx.update).lower(*args).compile()
    return update, args, time.perf_counter() - start


def measure(label: str, params, repeats: int) -> dict:
    """One table row group: every candidate on ``params``. The candidates take turns in every round
    (``repeats`` rounds, after a warm-up round when an update is shorter than a second), so load from
    other processes hits them alike."""
    ideal = ideal_ns_flops(params)
    compiled = {name: compile_update(candidate(name, params), params) for name in CANDIDATES}
    times, warmed_up = {name: [] for name in CANDIDATES}, False
    while min(map(len, times.values())) < repeats:
        for name, (update, args, _) in compiled.items():
            # CPU time of all of this process's threads too: on a shared, loaded machine wall time also
            # counts waiting for a core, CPU time does not.
            start, cpu_start = time.perf_counter(), time.process_time()
            jax.block_until_ready(update(*args))
            times[name].append((time.perf_counter() - start, time.process_time() - cpu_start))
        if not warmed_up and min(t[0][0] for t in times.values()) < 1.0:
            times = {name: [] for name in CANDIDATES}  # that was the warm-up round (once)
        warmed_up = True
    out = {}
    for name, (update, _, compile_s) in compiled.items():
        # --repeats 0: FLOPs only
        ms = statistics.median(t[0] for t in times[name]) * 1e3 if times[name] else float("nan")
        cpu_s = statistics.median(t[1] for t in times[name]) if times[name] else float("nan")
        flops = compiled_flops(update)
        out[name] = (ms, flops)
        print(f"{label:28s} {name:20s} {ms:10.1f} ms  CPU {cpu_s:8.2f} s  {flops / 1e9:9.1f} GFLOP  "
              f"{flops / ms / 1e6:6.1f} GFLOP/s  FLOPs/ideal {flops / ideal:.2f}  (compile {compile_s:.1f} s)",
              flush=True)
    return {"label": label, "ideal": ideal, "rows": out}


def table(results) -> list[str]:
    lines = ["| shape | optimizer | ms / update | GFLOP (cost_analysis) | GFLOP/s | FLOPs / ideal | "
             "vs muon_jax standard | vs optax.contrib.muon |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        std, opt = r["rows"]["muon_jax standard"][0], r["rows"]["optax.contrib.muon"][0]
        for name, (ms, flops) in r["rows"].items():
            timed = [f"{ms:.1f}", f"{flops / 1e9:.4g}", f"{flops / ms / 1e6:.1f}", f"{flops / r['ideal']:.2f}",
                     f"{std / ms:.2f}×", f"{opt / ms:.2f}×"]
            cells = [c.replace("nan×", "–").replace("nan", "–") for c in timed]  # --repeats 0: not timed
            lines.append(f"| {r['label']} | {name} | " + " | ".join(cells) + " |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="1b,8b", help=f"comma-separated, from {sorted(MODELS)}")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="the small model, one repeat, vocab 1000 (CI)")
    ap.add_argument("--only", default="", help="only the stacks whose shape contains this, e.g. '2048, 8192'")
    ap.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    args = ap.parse_args()
    models = ["quick"] if args.quick else args.models.split(",")
    repeats, vocab = (1, 1000) if args.quick else (args.repeats, args.vocab)
    results = []
    for model in models:
        d, f = MODELS[model]
        for key, shape in layer_shapes(args.layers, d, f).items():
            if key in ("wq", "wk", "w_gate", "w_down") and args.only in str(shape):
                results.append(measure(f"{model} [{', '.join(map(str, shape))}]", {"w": init(shape)}, repeats))
        if model != "8b" and not args.only:  # the 8B tree is its shapes summed (2·[d,d] + 2·[d,kv] + 2·[d,f] + [f,d])
            tree = llama_params(args.layers, d, f, vocab, jnp.float32)
            results.append(measure(f"{model} tree (L={args.layers}, vocab {vocab})", tree, repeats))
        doc = "\n".join([
            (f"One jitted update, float32 parameters and NS, median of {repeats} on {device_line()}. "
             if repeats else f"FLOPs of the compiled update only (`--repeats 0`: not run), {device_line()}. ")
            + "Ideal: "
            "per matrix the cheaper of standard NS and restart-free Gram NS (dense GEMMs); the FLOPs also "
            "count the elementwise work (momentum, Adam, scaling).", "", *table(results)])
        print("\n" + doc, flush=True)
        if args.write:  # after every model, so a long run leaves its finished part in the doc
            key = "bench/optimizer.py" + ("" if repeats else " --repeats 0")
            replace_section("docs/benchmarks.md", key, doc)


if __name__ == "__main__":
    main()
