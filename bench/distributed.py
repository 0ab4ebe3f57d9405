"""Distributed Muon at pod scale, from compiled HLO: FLOPs, collectives and memory per device of one step.

    python -m bench.distributed --config configs/llama_8b.yaml --devices 256   # one case, in-process
    python -m bench.distributed [--configs a.yaml,b.yaml] [--scaling 8,64,256,1024] [--write]

Compiles one optimizer step (update + apply, new parameters and state constrained to their
shardings) for the abstract parameter tree the trainer builds from a config — ``jax.ShapeDtypeStruct``
leaves with the shardings of the config's mesh and logical-axis rules, nothing allocated — on
``--devices`` simulated CPU devices, for muon_jax's ``ns_mode`` values and ``optax.contrib.muon``
(same math as far as optax allows, see bench/optimizer.py). Read from the compiled executable:

- FLOPs per device (``compiled.cost_analysis()``; SPMD-partitioned, so per device; a conditional
  counts its costliest branch) ÷ the limit ``max(all NS FLOPs / devices, NS FLOPs of the largest
  matrix)``: no placement that keeps matrices whole can do less;
- collective bytes per device (result sizes of the all-gather / all-reduce / all-to-all /
  reduce-scatter / collective-permute ops in ``compiled.as_text()``, whose shapes are per device)
  ÷ the bytes of the device's parameter shard, and the count of each kind;
- peak temporary memory (``compiled.memory_analysis().temp_size_in_bytes``), compiled with XLA:CPU's
  memory-minimising scheduler (:data:`MEMORY_SCHEDULER`). Its default schedules breadth-first, to run
  independent work on the host's threads at once, and so keeps it all live at once (Moonlight on 8
  devices: 20.6 GB temporary with it, 4.7 GB without); accelerators' schedulers minimise memory. The
  schedule changes no FLOP, byte or collective.

Newton–Schulz is spread over every mesh axis of size > 1. Without ``--devices`` the script runs one
subprocess per (config, device count) — XLA's simulated device count is fixed when jax starts —
prints the table, and ``--write`` puts it in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time

MODES = ("placed", "balanced", "gather")
MEMORY_SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
SENT_BYTES = 2  # bytes per element that placed moves, both ways: muon's default ns_dtype, bf16
OPTAX = "optax.contrib.muon"
COLLECTIVE = re.compile(
    r"^\s*\S+ = (.*?) (all-gather|all-reduce|all-to-all|reduce-scatter|collective-permute)(?:-start)?\(",
    re.M)
ARRAY = re.compile(r"\b(pred|[sufc]\d+|bf16|f8e\w+)\[([\d,]*)\]")


def collective_bytes(hlo: str) -> tuple[int, dict[str, int]]:
    """Total result bytes of the collectives in an HLO module, and how many of each kind."""
    total, counts = 0, {}
    for result, kind in COLLECTIVE.findall(hlo):
        counts[kind] = counts.get(kind, 0) + 1
        for dtype, dims in ARRAY.findall(result):
            bits = 1 if dtype == "pred" else int(re.sub(r"\D", "", dtype.split("e")[0]) or 8)
            total += math.prod(int(d) for d in dims.split(",") if d) * max(bits // 8, 1)
    return total, counts


def trainer_tree(config_path: str, overrides=()):
    """The trainer's abstract parameters for ``config_path`` (with ``key=value`` ``overrides``) on all
    devices: a pure-dict tree of ``jax.ShapeDtypeStruct`` with shardings, and the mesh. The only use of
    train/ in this file."""
    import jax
    from flax import nnx

    from train.config import load_config
    from train.models import abstract_model, model_config_from_dict, state_shardings
    from train.runtime import make_mesh

    cfg = load_config(config_path, list(overrides))
    model = dict(cfg.model)
    model.setdefault("vocab_size", 50257)  # the gpt2 tokenizer's, as the trainer would take it
    model_cfg = model_config_from_dict(model)
    mesh = make_mesh(cfg)
    state = nnx.state(abstract_model(model_cfg), nnx.Param)
    shardings = nnx.to_pure_dict(state_shardings(state, mesh))
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nnx.to_pure_dict(state), shardings)
    return params, mesh


def muon_leaves(params) -> list:
    """The leaves muon_jax's default labels send to Muon."""
    import jax
    import muon_jax

    return [x for label, x in zip(jax.tree.leaves(muon_jax.default_labels(params)), jax.tree.leaves(params))
            if label == "muon"]


def state_sharding(path, leaf, params):
    """A state leaf is laid out as a trainer keeps it: like the parameter whose path ends its own
    (momentum, Adam moments), else replicated (step counts)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for p_path, p in flat:
        if tuple(path[-len(p_path):]) == tuple(p_path) and p.shape == leaf.shape:
            return p.sharding
    return NamedSharding(flat[0][1].sharding.mesh, PartitionSpec())


def compile_step(tx, params):
    """Compiles update + apply for abstract ``params``; the state takes the shardings its init gives."""
    import jax
    import optax

    state = jax.tree_util.tree_map_with_path(
        lambda path, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=state_sharding(path, x, params)),
        jax.eval_shape(tx.init, params))

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    out = (jax.tree.map(lambda x: x.sharding, params), jax.tree.map(lambda x: x.sharding, state))
    return jax.jit(step, out_shardings=out, donate_argnums=(0, 1)).lower(params, state, params).compile()


def candidates(names, params, mesh, ns_axis, specs):
    """The optimizers to compare, by name (muon_jax's told the parameters' partition ``specs``, as the
    trainer does)."""
    import muon_jax
    from bench.optimizer import optax_contrib_same_math

    for name in names:
        if name == OPTAX:
            yield name, optax_contrib_same_math(1e-3, params)
        else:
            yield name, muon_jax.muon(1e-3, mesh=mesh, ns_axis=ns_axis, ns_mode=name, param_specs=specs)


def measure(config: str, names, overrides=()) -> dict:
    """Compiles the step for every optimizer in ``names`` on the devices jax has; returns the figures."""
    import jax
    import muon_jax
    from muon_jax.placement import plan_leaves
    from muon_jax.placement import ns_cost

    params, mesh = trainer_tree(config, overrides)
    n_dev = jax.device_count()
    ns_axis = tuple(a for a in mesh.axis_names if mesh.shape[a] > 1) or None
    n_ns = math.prod(mesh.shape[a] for a in ns_axis) if ns_axis else 1
    shard = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(params))
    leaves = muon_leaves(params)
    mats = [(math.prod(x.shape[:-2]), x.shape[-2:]) for x in leaves]
    total = sum(c * ns_cost(s) for c, s in mats)
    limit = max(total / n_ns, max(ns_cost(s) for _, s in mats))
    # What one device of the placement holds: its own matrices, and the all-to-all buffers.
    _, placement = plan_leaves([x.shape for x in leaves], [x.sharding.spec for x in leaves], mesh, ns_axis or ())
    head = {"config": " ".join([os.path.basename(config), *overrides]), "devices": n_dev, "mesh": dict(mesh.shape),
            "ns_axis": ns_axis, "shard_mb": shard / 2**20, "owned_mb": placement.owned_elements() * 4 / 2**20,
            "buffer_mb": placement.buffer_elements() * SENT_BYTES / 2**20, "roles": len(placement.roles),
            "exchanges": [list(e) for e in placement.exchanges],
            "n_params": sum(x.size for x in jax.tree.leaves(params)), "ns_tflop": total / 1e12,
            "largest_mb": max(math.prod(s) for _, s in mats) * 4 / 2**20, "rows": {}}
    specs = jax.tree.map(lambda x: x.sharding.spec, params)
    for name, tx in candidates(names, params, mesh, ns_axis, specs):
        start = time.perf_counter()
        compiled = compile_step(tx, params)
        seconds = time.perf_counter() - start
        cost = compiled.cost_analysis()
        flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
        moved, counts = collective_bytes(compiled.as_text())
        temp = compiled.memory_analysis().temp_size_in_bytes
        row = {"flops_ratio": flops / limit, "bytes_ratio": moved / shard, "collectives": counts,
               "temp_mb": temp / 2**20, "compile_s": seconds}
        if name == "placed":
            # The same step without Newton–Schulz's iterations (normalisation only): what the placement
            # itself needs, apart from the iteration workspace that any device running NS needs.
            bare = compile_step(muon_jax.muon(1e-3, mesh=mesh, ns_axis=ns_axis, ns_steps=0, param_specs=specs),
                                params)
            row["temp_no_iter_mb"] = bare.memory_analysis().temp_size_in_bytes / 2**20
        head["rows"][name] = row
        print(f"{head['config']} {n_dev:5d} dev {name:20s} FLOPs/limit {row['flops_ratio']:7.3f}  "
              f"bytes/shard {row['bytes_ratio']:8.2f}  {counts}  temp {row['temp_mb']:9.1f} MiB  "
              f"(shard {head['shard_mb']:.1f})  compile {seconds:.1f} s", flush=True)
    return head


PARAGRAPH = (
    "How `placed` works (docs/distributed.md): the optimizer is told each parameter's partition spec (the "
    "trainer passes them). At trace time a pure-Python plan reads, for every Muon leaf, which mesh axes cut "
    "its matrices into blocks, which shard its batch axis (experts over `expert`) and which merely replicate "
    "it, and assigns every matrix (each layer of a stack, each expert) to one device, largest NS cost first, "
    "to the device (or, for expert stacks, the position repeated in every expert group) whose busiest member "
    "is least loaded — Megatron's `layer_sharded` bin packing, with `[d, f]` and `[f, d]` as one shape. "
    "Inside one `shard_map` one all-reduce of one float per matrix sums the Frobenius norms, every device "
    "writes its block of each matrix (a `1/r` slice of it when `r` devices hold the same block), "
    "normalised and in bf16 (Newton–Schulz's input, exactly as one device would form it), into the owner's "
    "row of one send buffer per exchange; one all-to-all delivers whole matrices, a `lax.switch` on the "
    "device's role runs Newton–Schulz per shape (in at most 4 slabs, one after the other; wide matrices in "
    "column blocks), one all-to-all brings the bf16 results back, and one all-gather per set of "
    "replicating axes (`data` for HSDP, `expert` for Moonlight's dense layers) rebuilds replicated blocks. "
    "No leaf is resharded by XLA; buffers are packed as unsigned bits so that XLA cannot widen them. "
    "`bytes/shard bound` is what any design that keeps matrices whole must move (the largest matrix in and "
    "back, in bf16): on FSDP-only meshes where the largest matrix outgrows three shards (Llama-1B from 256 "
    "devices, Llama-8B at 1024) it exceeds 3, which is why pods run HSDP (`mesh.fsdp` fixed, `mesh.data` "
    "over the rest; rows marked `mesh.fsdp=…`), fsdp chosen as the largest power of two that keeps a "
    "parameter shard at least twice the largest matrix.")


def fmt_row(res: dict, name: str) -> str:
    """One markdown table row."""
    row = res["rows"].get(name)
    if row is None:
        return f"| {res['devices']} | {res['config']} | {name} | — | — | not measured | — |"
    counts = ", ".join(f"{n}× {k}" for k, n in sorted(row["collectives"].items())) or "none"
    return (f"| {res['devices']} | {res['config']} | {name} | {row['flops_ratio']:.3f} | "
            f"{row['bytes_ratio']:.2f} | {counts} | {row['temp_mb']:,.0f} |")


def markdown(results: list[dict]) -> str:
    """The docs/benchmarks.md section: the table, then per-case memory and placement figures."""
    import jax
    lines = [
        "One optimizer step (update + apply, new params and state donated and constrained to their "
        "shardings) compiled for the abstract parameters the trainer builds from each config, with "
        "that config's mesh (`data: 1, fsdp: -1`, and `expert: 8` for Moonlight; from 256 devices on the "
        "llama configs also on the HSDP mesh a pod would use, rows marked `mesh.fsdp=…`) and logical-axis "
        "rules; Newton–Schulz spread over every mesh axis of size > 1; float32 parameters. Per device, "
        "from the compiled executable on simulated CPU devices (jax " + jax.__version__ + "). FLOPs ÷ "
        "limit, limit = max(all NS FLOPs / devices, NS FLOPs of the largest matrix); bytes ÷ the "
        "device's parameter shard; peak temporary memory in MiB (XLA:CPU's memory-minimising scheduler for "
        "every optimizer: its default, breadth-first for thread concurrency, keeps independent work live "
        "together).",
        "",
        "| devices | config | optimizer | FLOPs / limit | collective bytes / shard | collectives | temp MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    names = [*MODES, OPTAX]
    lines += [fmt_row(res, name) for res in results for name in names]
    lines += ["", "Memory of `ns_mode=\"placed\"` per device (MiB): local parameter shard, the matrices "
              "the busiest device orthogonalises (float32, as the parameters), its all-to-all buffers (all "
              "exchanges, bf16 as sent), peak temporary memory and its ratio to the budget shard + owned + "
              "buffer, and the same for the step compiled without Newton–Schulz's iterations (`ns_steps=0`: "
              "the placement's own memory, apart from the iteration workspace any device running NS needs; "
              "on simulated CPU devices that workspace holds float32 copies even for bf16 NS, as XLA's CPU "
              "backend upcasts bf16 matmuls); the largest single matrix (float32); compile time of the "
              "placed step.", "",
              "| devices | config | shard | owned | buffer | temp | temp / budget | without NS iterations / "
              "budget | largest matrix | bytes/shard bound | device roles | compile s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        row, n = res["rows"].get("placed", {}), res["devices"]
        # Whoever owns the largest matrix receives it whole and sends it back, both in NS's dtype.
        bound = 2 * SENT_BYTES / 4 * res["largest_mb"] * (n - 1) / n / res["shard_mb"]
        budget = res["shard_mb"] + res["owned_mb"] + res["buffer_mb"]
        lines.append(f"| {n} | {res['config']} | {res['shard_mb']:,.0f} | {res['owned_mb']:,.0f} | "
                     f"{res['buffer_mb']:,.0f} | {row.get('temp_mb', 0):,.0f} | {row.get('temp_mb', 0) / budget:.2f} | "
                     f"{row.get('temp_no_iter_mb', float('nan')) / budget:.2f} | "
                     f"{res['largest_mb']:,.0f} | ≥ {bound:.2f} | {res['roles']} | {row.get('compile_s', 0):.0f} |")
    return "\n".join(lines + ["", PARAGRAPH])


def cases(args) -> list[tuple[int, str, list[str]]]:
    """(devices, config, overrides) of every measurement: each config on its own mesh, and the ``--pods``
    configs from 256 devices on also on their HSDP mesh."""
    pods = dict(item.split(":") for item in args.pods.split(",") if item)
    out = []
    for n in (int(v) for v in args.scaling.split(",")):
        for config in args.configs.split(","):
            out.append((n, config, list(args.set)))
            if n >= 256 and config in pods:
                out.append((n, config, [*args.set, f"mesh.fsdp={pods[config]}", f"mesh.data={n // int(pods[config])}"]))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/llama_8b.yaml", help="with --devices: the one config")
    ap.add_argument("--devices", type=int, help="measure on this many simulated devices, in-process")
    ap.add_argument("--configs", default="configs/llama_1b.yaml,configs/moonlight_16b_a3b.yaml,configs/llama_8b.yaml")
    ap.add_argument("--scaling", default="8,64,256,1024", help="device counts for the table (subprocesses)")
    ap.add_argument("--optimizers", default=",".join([*MODES, OPTAX]))
    ap.add_argument("--placed-only-from", type=int, default=4096,
                    help="from this many devices on, compile only ns_mode='placed' (the baselines are slow)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides, e.g. --set mesh.data=16 mesh.fsdp=-1 (a data x fsdp pod mesh)")
    ap.add_argument("--pods", default="configs/llama_1b.yaml:32,configs/llama_8b.yaml:64",
                    help="CONFIG:FSDP,...: from 256 devices on, also measure CONFIG on a data x fsdp (HSDP) mesh")
    ap.add_argument("--json", action="store_true", help="with --devices: print the figures as JSON last")
    ap.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    ap.add_argument("--save", help="also save the figures as JSON here")
    ap.add_argument("--load", help="render the table from figures saved by --save instead of measuring")
    args = ap.parse_args()
    if args.devices:
        # The simulated device count is read once, when jax initialises its CPU backend.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {MEMORY_SCHEDULER}"
                                   f" --xla_force_host_platform_device_count={args.devices}").strip()
        os.environ["JAX_PLATFORMS"] = "cpu"
        result = measure(args.config, [o for o in args.optimizers.split(",") if o], args.set)
        if args.json:
            print(json.dumps(result))
        return
    results = json.load(open(args.load)) if args.load else []
    for n, config, overrides in ([] if args.load else cases(args)):
        names = "placed" if n >= args.placed_only_from else args.optimizers
        out = subprocess.run([sys.executable, "-m", "bench.distributed", "--devices", str(n), "--config",
                              config, "--optimizers", names, "--json", "--set", *overrides],
                             check=True, capture_output=True, text=True).stdout
        print("\n".join(out.splitlines()[:-1]), flush=True)
        results.append(json.loads(out.splitlines()[-1]))
        if args.save:
            json.dump(results, open(args.save, "w"))
    table = markdown(results)
    print("\n" + table)
    if args.write:
        from bench.report import replace_section
        replace_section("docs/benchmarks.md", "bench/distributed.py", table)


if __name__ == "__main__":
    main()
