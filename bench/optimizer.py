"""Time one jitted optimizer update of a Llama-like parameter tree: muon_jax vs optax.contrib.muon.

    python -m bench.optimizer [--layers 4] [--d 1024] [--f 4096] [--vocab 32000] [--repeats 5] [--write]

Both are configured to the same math as far as optax allows (0.2·√max(A,B) scaling, Moonlight NS
coefficients, 5 steps, weight decay 0.1, AdamW β2 = 0.95 for the rest, stacked [L, A, B] weights as
batches of matrices). Runs side by side in one process; prints milliseconds per update, the ratio,
and the Newton–Schulz FLOPs of one update. ``--write`` puts the table in docs/benchmarks.md.
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
from bench.cli import add_stack_arguments
from bench.report import device_line, replace_section


def llama_params(layers, d, f, vocab, dtype):
    kv = d // 4  # GQA with 4x fewer kv heads
    shapes = {
        "embed": (vocab, d),
        "layers": {
            "wq": (layers, d, d), "wk": (layers, d, kv), "wv": (layers, d, kv), "wo": (layers, d, d),
            "w_gate": (layers, d, f), "w_up": (layers, d, f), "w_down": (layers, f, d),
            "attn_norm": (layers, d), "mlp_norm": (layers, d),
        },
        "final_norm": (d,),
        "lm_head": (d, vocab),
    }
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
    keys = jax.random.split(jax.random.key(0), len(leaves))
    return jax.tree.unflatten(treedef, [0.02 * jax.random.normal(k, s, dtype) for k, s in zip(keys, leaves)])


def ns_flops(params, steps=5) -> int:
    """FLOPs of Newton–Schulz over every Muon matrix: per step X Xᵀ, A·A and B·X on the short side."""
    total = 0
    for label, x in zip(jax.tree.leaves(muon_jax.default_labels(params)), jax.tree.leaves(params)):
        if label == "muon":
            a, b = sorted(x.shape[-2:])
            batch = x.size // (a * b)
            total += batch * steps * (4 * a * a * b + 2 * a**3)
    return total


def optax_contrib_same_math(lr, params):
    dims = jax.tree.map(
        lambda label, x: MuonDimensionNumbers(x.ndim - 2, x.ndim - 1) if label == "muon" else None,
        muon_jax.default_labels(params), params)
    return optax.contrib.muon(
        lr, weight_decay=0.1, adam_b2=0.95, adam_weight_decay=0.1, consistent_rms=0.2,
        muon_weight_dimension_numbers=dims)


def time_update(tx, params, repeats):
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 1e-3, params)
    state = tx.init(params)
    update = jax.jit(tx.update)
    compile_start = time.perf_counter()
    jax.block_until_ready(update(grads, state, params))
    compile_s = time.perf_counter() - compile_start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(update(grads, state, params))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, compile_s


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_stack_arguments(ap, layers=4, d=1024, f=4096)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32", help="parameter dtype")
    args = ap.parse_args()

    params = llama_params(args.layers, args.d, args.f, args.vocab, jnp.dtype(args.dtype))
    flops = ns_flops(params)
    candidates = {
        "muon_jax (NS in float32)": muon_jax.muon(1e-3, ns_dtype=jnp.float32),
        "muon_jax (NS in bfloat16, default)": muon_jax.muon(1e-3),
        "optax.contrib.muon (NS in param dtype)": optax_contrib_same_math(1e-3, params),
    }
    rows = {}
    for name, tx in candidates.items():
        ms, compile_s = time_update(tx, params, args.repeats)
        rows[name] = (ms, compile_s)
        print(f"{name:42s} {ms:9.1f} ms/update  (compile {compile_s:.1f} s)  "
              f"{flops / ms / 1e6:7.1f} NS GFLOP/s", flush=True)
    base = rows["optax.contrib.muon (NS in param dtype)"][0]
    n_params = sum(x.size for x in jax.tree.leaves(params))
    lines = [
        f"Llama-like tree: {args.layers} layers, d={args.d}, f={args.f}, vocab={args.vocab}, "
        f"{n_params / 1e6:.1f}M params ({args.dtype}); NS FLOPs per update {flops / 1e9:.1f} GFLOP. "
        f"Median of {args.repeats} jitted updates on {device_line()}.",
        "",
        "| optimizer | ms / update | vs optax.contrib.muon | NS GFLOP/s | compile s |",
        "|---|---|---|---|---|",
    ] + [f"| {name} | {ms:.1f} | {ms / base:.2f}× | {flops / ms / 1e6:.1f} | {c:.1f} |"
         for name, (ms, c) in rows.items()]
    table = "\n".join(lines)
    print("\n" + table)
    if args.write:
        replace_section("docs/benchmarks.md", "bench/optimizer.py", table)


if __name__ == "__main__":
    main()
