"""Gram Newton–Schulz vs standard NS: accuracy per precision and restart schedule, and where it is faster.

    python -m bench.gram_ns [--quick] [--write]            # tables; --write: a section of docs/benchmarks.md
    python -m bench.gram_ns --make-fixture RUN_DIR         # tests/fixtures/momentum_tiny.npz from a tiny run
    python -m bench.gram_ns --training RUN_DIR...          # final val loss of tiny runs -> docs/results.md

1. float32: relative Frobenius distance of gram from standard NS per matrix kind (Gaussian, singular
   values 1e-6..1, rank 32, power-law spectrum, real momentum from a tiny-config run).
2. bf16 / f16: for standard NS and Gram NS under several restart schedules, the distance from the
   float64 result of the same polynomial, the distance from the exact polar factor U Vᵀ (SVD, float64;
   on the range of a rank-deficient matrix) and the range of the output's singular values (those of
   the input's range). This chose the default restarts and made ``"auto"`` standard in half precision.
3. float32 time of standard vs gram per aspect ratio, which chose ``muon_jax.GRAM_MIN_ASPECT``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import muon_jax
from bench.report import device_line, replace_section
from muon_jax.newton_schulz import resolve_coeffs, resolve_restarts

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "momentum_tiny.npz"
SCHEDULES = ((), (2,), (3,), (2, 3), (2, 4), (1, 3), (1, 2, 3, 4))
HALF = {"bf16": jnp.bfloat16, "f16": jnp.float16}


def study_matrices(n: int, m: int, seed: int = 0) -> dict[str, np.ndarray]:
    """float64 ``[n, m]`` matrices, n ≤ m: Gaussian, ill-conditioned (σ log-spaced 1e-6..1), rank 32,
    power-law spectrum (σ_i = 1/i), and the tiny-run momentum fixture's widest matrix if present."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((n, n)))
    v, _ = np.linalg.qr(rng.standard_normal((m, n)))
    mats = {
        "gaussian": rng.standard_normal((n, m)),
        "ill-conditioned": (u * np.logspace(-6, 0, n)) @ v.T,
        "rank-deficient": rng.standard_normal((n, 32)) @ rng.standard_normal((32, m)),
        "power-law": (u * (1.0 / np.arange(1, n + 1))) @ v.T,
    }
    if FIXTURE.exists():
        with np.load(FIXTURE) as f:
            mats["momentum"] = max((f[k] for k in f.files if k != "how"), key=lambda a: a.size).astype(np.float64)
    return mats


def ns_float64(m: np.ndarray, coeffs: str, steps: int = 5) -> np.ndarray:
    """The same polynomial as muon_jax.newton_schulz, in float64 numpy."""
    table, scale = resolve_coeffs(coeffs, steps)
    x = m / (scale * np.linalg.norm(m) + 1e-7)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    for a, b, c in table:
        g = x @ x.T
        x = a * x + (b * g + c * g @ g) @ x
    return x.T if tall else x


def polar_on_range(m: np.ndarray, rtol: float = 1e-10) -> tuple[np.ndarray, int]:
    """``U_r V_rᵀ`` over the singular values above ``rtol·σ_max``, and that rank ``r``."""
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    r = int(np.sum(s > rtol * s[0]))
    return u[:, :r] @ vt[:r], r


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def run_ns(m, coeffs, dtype, method, restarts=None) -> np.ndarray:
    out = muon_jax.newton_schulz(jnp.asarray(m, jnp.float32), coeffs=coeffs, dtype=dtype, method=method,
                                 restarts=restarts)
    return np.asarray(out, np.float64)


def f32_equality(mats, coeffs_list) -> list[str]:
    """Table 1 rows: gram vs standard in float32, per kind and coefficient schedule."""
    rows = [f"| coeffs | restarts | {' | '.join(mats)} |", "|---|---|" + "---|" * len(mats)]
    for coeffs in coeffs_list:
        for restarts in (None, ()):
            errs = [rel(run_ns(m, coeffs, jnp.float32, "gram", restarts), run_ns(m, coeffs, jnp.float32, "standard"))
                    for m in mats.values()]
            label = f"default {resolve_restarts(None, jnp.float32, 5, coeffs)}" if restarts is None else "none"
            rows.append(f"| {coeffs} | {label} | " + " | ".join(f"{e:.1e}" for e in errs) + " |")
    return rows


def half_row(mats, refs, coeffs, dtype, method, restarts):
    """Distances from float64 and from U Vᵀ per kind, and the output σ range over all kinds."""
    d64, dpolar, lo, hi = [], [], np.inf, 0.0
    for name, m in mats.items():
        out = run_ns(m, coeffs, dtype, method, restarts)
        ref, (polar, r) = refs[name]
        d64.append(rel(out, ref))
        dpolar.append(rel(out, polar))
        s = np.linalg.svd(out, compute_uv=False)[:r] if np.all(np.isfinite(out)) else np.array([np.inf])
        if name in ("gaussian", "momentum"):
            lo, hi = min(lo, s.min()), max(hi, s.max())
    return d64, dpolar, (lo, hi)


def half_precision(mats, coeffs_list, dtypes, schedules) -> tuple[list[str], dict]:
    """Table 2 rows and {(dtype, coeffs, schedule): worst ratio to standard} for choosing restarts."""
    rows = [f"| dtype | coeffs | method (restarts) | vs float64, same polynomial: {' / '.join(mats)} | "
            f"vs U Vᵀ: {' / '.join(mats)} | σ range (gaussian, momentum) |", "|---|---|---|---|---|---|"]
    worst = {}
    for coeffs in coeffs_list:
        refs = {k: (ns_float64(m, coeffs), polar_on_range(m)) for k, m in mats.items()}
        for dname in dtypes:
            base = None
            for restarts in (None,) + tuple(schedules):
                method = "standard" if restarts is None else "gram"
                d64, dpol, (lo, hi) = half_row(mats, refs, coeffs, HALF[dname], method, restarts)
                base = base or (d64, dpol)
                if restarts is not None:
                    worst[(dname, coeffs, restarts)] = max(
                        max(a / b for a, b in zip(d64, base[0])), max(a / b for a, b in zip(dpol, base[1])))
                label = "standard" if restarts is None else f"gram {restarts or '(none)'}"
                rows.append(f"| {dname} | {coeffs} | {label} | " + " / ".join(f"{e:.3g}" for e in d64)
                            + " | " + " / ".join(f"{e:.3g}" for e in dpol) + f" | {lo:.2f}–{hi:.3g} |")
    return rows, worst


def time_fn(fn, x, repeats: int) -> float:
    jax.block_until_ready(fn(x))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def aspect_timing(n: int, ratios, repeats: int) -> list[str]:
    """Table 3 rows: float32 FLOPs (cost_analysis) and ms of standard vs gram (default restarts) for
    ``[n, ratio·n]`` matrices."""
    rows = ["| shape | standard GFLOP | gram GFLOP | FLOP ratio | standard ms | gram ms | gram speed-up |",
            "|---|---|---|---|---|---|---|"]
    for ratio in ratios:
        x = jax.random.normal(jax.random.key(0), (n, int(ratio * n)))
        fns = {method: jax.jit(lambda x, method=method: muon_jax.newton_schulz(x, dtype=jnp.float32, method=method))
               for method in ("standard", "gram")}
        flops = {}
        for method, fn in fns.items():
            cost = fn.lower(x).compile().cost_analysis()
            flops[method] = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
        ms = {method: time_fn(fn, x, repeats) for method, fn in fns.items()}
        rows.append(f"| {n}×{int(ratio * n)} | {flops['standard'] / 1e9:.3g} | {flops['gram'] / 1e9:.3g} | "
                    f"{flops['standard'] / flops['gram']:.2f}× | {ms['standard']:.1f} | {ms['gram']:.1f} | "
                    f"{ms['standard'] / ms['gram']:.2f}× |")
        print(rows[-1], flush=True)
    return rows


def make_fixture(run_dir: Path, out: Path = FIXTURE) -> None:
    """Saves one matrix per distinct Muon shape (layer 0) of the momentum buffer of ``run_dir``'s last
    checkpoint (a ``python -m train --config configs/tiny.yaml`` run) as float16."""
    from bench.paper import restore_for_update  # the only trainer dependence of this script
    cfg, _, opt_state, _ = restore_for_update(run_dir)
    momentum = [s.mu for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(
        s, muon_jax.ScaleByMomentumState)) if isinstance(s, muon_jax.ScaleByMomentumState)][0]
    picked = {}
    # Adam leaves are optax.MaskedNode (an empty pytree) in the Muon branch's momentum: only Muon leaves remain.
    for path, mu in jax.tree_util.tree_leaves_with_path(momentum):
        if mu.ndim >= 2:
            mat = np.asarray(mu, np.float32).reshape(-1, *mu.shape[-2:])[0]
            picked.setdefault(mat.shape, (jax.tree_util.keystr(path), mat))
    how = (f"python -m bench.gram_ns --make-fixture {run_dir}: layer 0 of the Muon momentum buffer at the "
           f"last checkpoint of `python -m train --config configs/tiny.yaml steps={cfg.steps} seed={cfg.seed} "
           f"optimizer.ns_method={cfg.optimizer.ns_method}`, one matrix per shape, float16.")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, how=np.asarray(how), **{
        name.replace("'", "").replace("[", "").replace("]", "/").strip("/"): mat.astype(np.float16)
        for name, mat in picked.values()})
    print(f"wrote {out}: {[m.shape for _, m in picked.values()]}")


def training_section(run_dirs: list[Path], png: Path = ROOT / "docs" / "gram_ns_tiny.png") -> str:
    """Final validation loss of tiny-config runs named ``{method}_s{seed}`` (``optimizer.ns_method``),
    per method and seed, with their loss curves plotted by ``python -m train.plot``."""
    final = {}
    for run in run_dirs:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        evals = [r for r in rows if "val_loss" in r]
        method, seed = run.name.rsplit("_s", 1)
        final.setdefault(method, {})[int(seed)] = (evals[-1]["step"], evals[-1]["val_loss"])
    subprocess.run([sys.executable, "-m", "train.plot", *map(str, run_dirs), "--out", str(png)], check=True)
    seeds = sorted({s for by_seed in final.values() for s in by_seed})
    lines = ["| ns_method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
             "|---|" + "---|" * (len(seeds) + 1)]
    for method, by_seed in sorted(final.items()):
        losses = [by_seed[s][1] for s in seeds if s in by_seed]
        lines.append(f"| {method} | " + " | ".join(f"{by_seed[s][1]:.6f}" if s in by_seed else "–" for s in seeds)
                     + f" | {statistics.mean(losses):.6f} |")
    step = max(st for by_seed in final.values() for st, _ in by_seed.values())
    return "\n".join([
        f"`python -m train --config configs/tiny.yaml optimizer.ns_method=METHOD seed=S steps={step}` (float32 "
        "NS, so `gram` runs Gram NS on every Muon matrix); final validation loss:", "", *lines, "",
        f"![loss curves]({png.name})"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small matrices, one schedule set (CI)")
    ap.add_argument("--write", action="store_true", help="write the tables into docs/benchmarks.md")
    ap.add_argument("--make-fixture", type=Path, metavar="RUN_DIR")
    ap.add_argument("--training", type=Path, nargs="+", metavar="RUN_DIR")
    args = ap.parse_args()
    if args.make_fixture:
        return make_fixture(args.make_fixture)
    if args.training:
        doc = training_section(args.training)
        print(doc)
        return replace_section(ROOT / "docs" / "results.md", "bench/gram_ns.py", doc) if args.write else None
    n, m = (32, 96) if args.quick else (256, 1024)
    mats = study_matrices(n, m)
    if args.quick:
        mats.pop("momentum", None)
    coeffs_list = ("moonlight", "polar_express")
    eq = f32_equality(mats, coeffs_list)
    print("\n".join(eq), flush=True)
    half, worst = half_precision(mats, coeffs_list, ("bf16",) if args.quick else tuple(HALF),
                                 SCHEDULES[2:5:2] if args.quick else SCHEDULES)
    print("\n".join(half), flush=True)
    speed = aspect_timing(64 if args.quick else 512, (1, 2) if args.quick else (1, 1.25, 1.5, 2, 3, 4), 3)
    doc = report(n, m, eq, half, worst, speed)
    print(doc)
    if args.write:
        replace_section(ROOT / "docs" / "benchmarks.md", "bench/gram_ns.py", doc)


def report(n, m, eq, half, worst, speed) -> str:
    """The markdown section: three tables and the choices they support."""
    worst_lines = [f"- {d}, {c}, restarts {r or '(none)'}: {w:.2f}×" for (d, c, r), w in sorted(worst.items())]
    return "\n".join([
        f"Matrices {n}×{m} (the momentum one: the tiny-run fixture's widest matrix), 5 NS steps, on {device_line()}.",
        "", "**float32: relative Frobenius distance of Gram NS from standard NS** (≤ 1e-4 required).", "", *eq,
        "", "**Half precision.** Distances are relative Frobenius norms; σ range over the input's range.", "",
        *half, "", "Worst ratio (over matrix kinds and both distances) of Gram NS to standard NS in the same "
        "half precision (≤ 1 means no worse):", "", *worst_lines, "",
        f"Chosen defaults: in float32 a restart every {muon_jax.GRAM_RESTART_EVERY} iterations by schedule "
        f"({muon_jax.GRAM_RESTART_EVERY_CUSTOM} for custom coefficients), the longest segments that keep "
        "Gram NS within 1e-4 of standard NS on every kind; in half precision a restart every iteration "
        "(as many products as standard NS) and `ns_method=\"auto\"` picks standard NS, since no cheaper "
        "schedule stayed as accurate for both schedules and both half types. Without restarts Gram NS "
        "diverges on ill-conditioned input in half precision: rounding makes small eigenvalues of `R` "
        "negative, and the iteration's polynomial grows them without bound, and `Q` carries the whole "
        "dynamic range `1/σ`, so its rounding error scales with `1/σ_min`.",
        "", f"**float32 time per matrix, standard vs Gram NS (default restarts)** — `GRAM_MIN_ASPECT` = "
        f"{muon_jax.GRAM_MIN_ASPECT}:", "", *speed])


if __name__ == "__main__":
    main()
