"""Distributed Muon, proven by compiled-HLO cost: FLOPs and collective bytes per device of one step.

    python -m bench.distributed [--scaling 8,16,64] [--layers 8] [--d 512] [--f 1536] [--write]
    python -m bench.distributed --devices 8          # one device count, in this process

Compiles one full optimizer step (update + apply, new parameters and state constrained to their
shardings) for a Llama-like stack of ``[L, A, B]`` weights sharded ``P(None, "fsdp", None)`` on
``--devices`` simulated CPU devices, for muon_jax's two ``ns_mode`` values and for
``optax.contrib.muon`` (same math as far as optax allows, see bench/optimizer.py), and reads from the
compiled executable:

- FLOPs per device (``compiled.cost_analysis()``, SPMD-partitioned, so per device) ÷ the ideal: the
  Newton–Schulz FLOPs of all matrices ÷ the number of devices;
- collective bytes per device (result sizes of every all-gather / all-reduce / all-to-all /
  reduce-scatter / collective-permute in ``compiled.as_text()``, whose shapes are per device) ÷ the
  bytes of one device's parameter shard.

Without ``--devices`` it runs itself in a subprocess per device count (XLA's simulated device count
is fixed when jax starts) and prints the scaling table; ``--write`` puts it in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

from bench.cli import add_stack_arguments

MODES = ("balanced", "gather")
COLLECTIVE = re.compile(
    r"^\s*\S+ = (.*?) (all-gather|all-reduce|all-to-all|reduce-scatter|collective-permute)(?:-start)?\(",
    re.M)
ARRAY = re.compile(r"\b(pred|[sufc]\d+|bf16|f8e\w+)\[([\d,]*)\]")


def collective_bytes(hlo: str) -> tuple[int, dict[str, int]]:
    """Total result bytes of the collectives in an HLO module, and how many of each kind."""
    import numpy as np

    total, counts = 0, {}
    for result, kind in COLLECTIVE.findall(hlo):
        counts[kind] = counts.get(kind, 0) + 1
        for dtype, dims in ARRAY.findall(result):
            bits = 1 if dtype == "pred" else int(re.sub(r"\D", "", dtype.split("e")[0]) or 8)
            total += int(np.prod([int(d) for d in dims.split(",") if d])) * max(bits // 8, 1)
    return total, counts


def stack_params(layers, d, f):
    """A Llama-like stack: attention (GQA, 4× fewer kv heads) and SwiGLU weights plus norm scales."""
    kv = d // 4
    return {"wq": (layers, d, d), "wk": (layers, d, kv), "wv": (layers, d, kv), "wo": (layers, d, d),
            "w_gate": (layers, d, f), "w_up": (layers, d, f), "w_down": (layers, f, d),
            "attn_norm": (layers, d), "mlp_norm": (layers, d)}


def measure(devices: int, layers: int, d: int, f: int) -> dict:
    """Compiles the step for every optimizer on ``devices`` simulated devices; returns the figures."""
    # The simulated device count is read once, when jax initialises its CPU backend.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={devices}").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

    import muon_jax
    from bench.optimizer import ns_flops, optax_contrib_same_math
    from bench.report import device_line

    mesh = Mesh(np.array(jax.devices()), ("fsdp",), axis_types=(AxisType.Auto,))
    shapes = stack_params(layers, d, f)
    shardings = {k: NamedSharding(mesh, P(None, "fsdp", None) if len(s) == 3 else P(None, "fsdp"))
                 for k, s in shapes.items()}
    params = {k: jax.device_put(jnp.full(s, 0.02, jnp.float32), shardings[k]) for k, s in shapes.items()}
    shard_bytes = sum(np.prod(shardings[k].shard_shape(s)) * 4 for k, s in shapes.items())
    ideal = ns_flops(params) / devices

    candidates = {f"muon_jax ns_mode={m!r}": muon_jax.muon(1e-3, mesh=mesh, ns_axis="fsdp", ns_mode=m)
                  for m in MODES}
    candidates["optax.contrib.muon"] = optax_contrib_same_math(1e-3, params)
    rows = {}
    for name, tx in candidates.items():
        # Eager init: every buffer is sharded like its parameter; scalars (step counts) replicated.
        state = jax.tree.map(
            lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, NamedSharding(mesh, P())),
            tx.init(params))

        def step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        out_shardings = (shardings, jax.tree.map(lambda x: x.sharding, state))
        compiled = jax.jit(step, out_shardings=out_shardings).lower(params, state, params).compile()
        cost = compiled.cost_analysis()
        flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
        moved, counts = collective_bytes(compiled.as_text())
        rows[name] = {"flops_ratio": flops / ideal, "bytes_ratio": moved / shard_bytes, "collectives": counts}
        print(f"{devices:3d} devices  {name:28s} FLOPs/ideal {flops / ideal:6.2f}   "
              f"collective bytes/shard {moved / shard_bytes:7.2f}   {counts}", flush=True)
    n_params = sum(int(np.prod(s)) for s in shapes.values())
    return {"devices": devices, "rows": rows, "device_line": device_line(), "n_params": n_params,
            "ns_gflop": ns_flops(params) / 1e9}


def markdown(results: list[dict], layers: int, d: int, f: int) -> str:
    first = results[0]
    lines = [
        f"One optimizer step (update + apply, new params and state constrained to their shardings) "
        f"compiled for a Llama-like stack: L={layers}, d={d}, f={f}, GQA kv=d/4, "
        f"{first['n_params'] / 1e6:.1f}M params (float32) sharded `P(None, \"fsdp\", None)`, "
        f"{first['ns_gflop']:.0f} GFLOP of Newton–Schulz per step. Figures per device from "
        f"`compiled.cost_analysis()` and the collectives in `compiled.as_text()`, on simulated devices: "
        f"{first['device_line'].split(', ', 1)[0]}, jax {first['device_line'].split('jax ')[1]}.",
        "",
        "FLOPs ÷ ideal (all NS FLOPs ÷ devices) and collective bytes ÷ local parameter-shard bytes:",
        "",
        "| devices | optimizer | FLOPs / ideal | collective bytes / shard | collectives |",
        "|---|---|---|---|---|",
    ]
    for res in results:
        for name, row in res["rows"].items():
            counts = ", ".join(f"{n}× {k}" for k, n in sorted(row["collectives"].items())) or "none"
            lines.append(f"| {res['devices']} | {name} | {row['flops_ratio']:.2f}× | "
                         f"{row['bytes_ratio']:.2f}× | {counts} |")
    lines += ["", f"Balanced pads each batch of same-shape matrices (here {layers} or {2 * layers}) to a "
              "multiple of the device count, and a zero tile costs what a real one does: beyond "
              f"{layers} devices its FLOPs and bytes grow with the padding (⌈B/n⌉·n / B). Gather "
              "repeats all NS on every device by design; optax.contrib.muon leaves the split "
              "matrices to XLA, which all-reduces their Gram matrices inside every NS step."]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, help="measure on this many simulated devices, in-process")
    ap.add_argument("--scaling", default="8,16,64", help="device counts for the table (subprocesses)")
    add_stack_arguments(ap, layers=8, d=512, f=1536)
    ap.add_argument("--json", action="store_true", help="with --devices: print the figures as JSON last")
    args = ap.parse_args()
    shape = ["--layers", str(args.layers), "--d", str(args.d), "--f", str(args.f)]

    if args.devices:
        result = measure(args.devices, args.layers, args.d, args.f)
        if args.json:
            print(json.dumps(result))
        results = [result]
    else:
        results = []
        for n in (int(v) for v in args.scaling.split(",")):
            out = subprocess.run([sys.executable, "-m", "bench.distributed", "--devices", str(n), "--json",
                                  *shape], check=True, capture_output=True, text=True).stdout
            print("\n".join(out.splitlines()[:-1]), flush=True)
            results.append(json.loads(out.splitlines()[-1]))
    table = markdown(results, args.layers, args.d, args.f)
    if not args.json:
        print("\n" + table)
    if args.write:
        from bench.report import replace_section
        replace_section("docs/benchmarks.md", "bench/distributed.py", table)


if __name__ == "__main__":
    main()
