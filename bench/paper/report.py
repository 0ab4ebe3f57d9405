"""`results.md`, `results.json` and the figures, from the records alone (the plan only says which runs are still
missing). Everything is sorted and every float printed with a fixed format, so a rerun is byte-identical."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

from bench.paper.analysis import (BOOTSTRAP_REPLICATES, best_lr, cells, compute_ratios, frontier, lr_transfer,
                                  mode_of, sft_2x2)
from bench.paper.plan import Plan, sweep_state
from bench.paper.plots import COLOR, LABEL, figure, log_compute_axis, lr_axis, save

PAPER_COMPUTE_RATIO = 0.52   # Moonlight, Fig. 3 / Sec. 3.2: Muon matches AdamW with ~52% of the training FLOPs
RATIO_METHOD = (
    "Per optimizer, the frontier is each size's best-LR mean final val loss (over seeds) against that size's "
    "training FLOPs, for sizes whose best LR is interior. Every frontier point of either optimizer whose loss lies "
    "inside the other's loss range is read on the other's frontier (linear in log FLOPs between its points, never "
    "extrapolated); the ratio is the geometric mean of C_Muon/C_AdamW over those points. 95% CI: "
    f"{BOOTSTRAP_REPLICATES} bootstrap replicates, seeds resampled with replacement within every (size, optimizer, "
    "LR) cell and the best LR re-chosen per replicate; percentile interval.")


def fmt(x, digits: int = 3) -> str:
    """A table cell: 'diverged' for +inf, '—' for a missing number."""
    return "diverged" if x == math.inf else "—" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def table(header: list[str], rows: list[list]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def size_order(name: str) -> tuple[int, int]:
    """(width, depth) of a size name like 'd64-L3', for sorting."""
    d, layers = re.match(r"d(\d+)-L(\d+)", name).groups()
    return int(d), int(layers)


def sweep_table(sweeps: dict, groups: list) -> tuple[list[list], list[float]]:
    """Markdown table of sweeps (group -> lr -> {seed: loss}): mean (seeds) per LR, best bold, edge flagged."""
    lrs = sorted({lr for g in groups for lr in sweeps[g]})
    rows = []
    for g in groups:
        b = best_lr(sweeps[g])
        row = []
        for lr in lrs:
            if lr not in sweeps[g]:
                row.append("")
                continue
            losses = list(sweeps[g][lr].values())
            cell = fmt(float(np.mean(losses))) + (f" ({len(losses)})" if len(losses) > 1 else "")
            row.append(f"**{cell}**" if lr == b.lr else cell)
        rows.append([*g, *row, f"{b.lr:g}" + ("" if b.interior else " (edge)")])
    return rows, lrs


MARKERS = "osD^vP*X"   # one per size in the sweep panels


def mean_curve(sweep: dict) -> list[tuple[float, float]]:
    """(lr, mean loss over seeds) of a sweep's finite cells, sorted by LR."""
    points = sorted((lr, float(np.mean(list(v.values())))) for lr, v in sweep.items())
    return [(x, y) for x, y in points if math.isfinite(y)]


def scaling_figure(sweeps: dict, flops: dict, sizes: list[str], lrs: list[float], out: Path) -> str:
    """Left: each size's best-LR loss vs FLOPs and the frontier per optimizer; right: the LR sweeps."""
    fig, axes = figure(2, width=6.0)
    left, right = axes[0]
    for mode in ("adamw", "muon-moonlight"):
        bests = [(flops[g], best_lr(sweeps[g])) for g in sorted(sweeps, key=lambda g: size_order(g[0]))
                 if g[1] == mode]
        for i, (c, b) in enumerate((c, b) for c, b in bests if math.isfinite(b.mean)):
            left.errorbar([c], [b.mean], yerr=[b.std], fmt="o", color=COLOR[mode], capsize=3,
                          mfc=COLOR[mode] if b.interior else "white",
                          label=f"{LABEL[mode]}: best LR per size, ± std over seeds" if i == 0 else None)
        pts = frontier(sweeps, flops, mode)
        if pts:
            left.plot(*zip(*pts), "-", color=COLOR[mode], label=f"{LABEL[mode]} frontier (interior best LRs)")
        for i, size in enumerate(sizes):
            curve = mean_curve(sweeps.get((size, mode), {}))
            if curve:
                right.plot(*zip(*curve), "-" if mode == "adamw" else "--", marker=MARKERS[i % len(MARKERS)], ms=4,
                           color=COLOR[mode], label=f"{LABEL[mode]}, {size}")
    log_compute_axis(left)
    left.set(xlabel="training FLOPs (model, without NS)", ylabel="final val loss (nats/token)",
             title="frontier (hollow: best LR at a grid edge)")
    lr_axis(right, lrs)
    right.set(xlabel="peak learning rate", ylabel="final val loss (nats/token)", title="LR sweeps (mean over seeds)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=6)
    # one entry per sweep: beside the axes, where it hides no curve
    right.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    return save(fig, out, "paper_scaling.png", "configs/paper_base.yaml; one point per run cell, seeds averaged")


def scaling_section(records: dict, out: Path) -> str:
    """Section 1: sizes and token budgets, the LR sweeps per size and optimizer, their best cells, the figure."""
    sweeps = cells(records, "scaling")
    groups = sorted(sweeps, key=lambda g: (size_order(g[0]), g[1]))
    if not groups:
        return "## 1. Scaling: loss vs training compute\n\nNo scaling records yet."
    rows, lrs = sweep_table(sweeps, groups)
    by_size = {r["size"]: r for r in records.values() if r["study"] == "scaling"}
    sizes = sorted(by_size, key=size_order)
    size_rows = [[s, f"{r['non_embedding_params']:,}", f"{r['params']:,}", f"{r['tokens']:,}",
                  f"{r['tokens'] / r['non_embedding_params']:.2f}", f"{r['train_flops']:.3e}"]
                 for s, r in ((s, by_size[s]) for s in sizes)]
    flops = {(r["size"], mode_of(r)): r["train_flops"] for r in records.values() if r["study"] == "scaling"}
    best_rows = [[g[0], LABEL[g[1]], f"{b.lr:g}", "yes" if b.interior else "no", len(b.losses), fmt(b.mean),
                  fmt(b.std), f"{flops[g]:.3e}"] for g, b in ((g, best_lr(sweeps[g])) for g in groups)]
    return "\n".join([
        "## 1. Scaling: loss vs training compute",
        "",
        "Sizes and token budgets (every scaling run of a size trains the same tokens in the same order per seed):",
        "",
        table(["size", "non-embedding params", "params", "tokens", "tokens / non-emb param", "train FLOPs"], size_rows),
        "",
        "Final validation loss per peak LR (mean over seeds; the number of seeds in brackets when > 1; bold: the "
        "best LR of the row; `(edge)`: the best LR is at the edge of the grid tried so far):",
        "",
        table(["size", "optimizer", *[f"lr {lr:g}" for lr in lrs], "best LR"], rows),
        "",
        table(["size", "optimizer", "best LR", "interior", "seeds", "mean loss", "std over seeds", "train FLOPs"],
              best_rows),
        "",
        scaling_figure(sweeps, flops, sizes, lrs, out),
    ])


def ratio_section(records: dict) -> tuple[str, dict]:
    """Section 2: the compute ratio with and without NS FLOPs, its CI and method; and results.json's part."""
    ratios = compute_ratios(records)
    without, with_ns = ratios["model"], ratios["with_ns"]
    lines = ["## 2. Compute ratio at matched loss", "", RATIO_METHOD, ""]
    if without["muon_over_adamw"] is None:
        lines.append("Not computable yet: no frontier point of one optimizer lies inside the other's loss range "
                     "(or a frontier has no size with an interior best LR). Nothing is extrapolated.")
    else:
        for name, r in (("model FLOPs (6·N + attention)", without), ("model FLOPs + Newton–Schulz", with_ns)):
            ci = r["ci95"]
            lines.append(f"- {name}: Muon needs **{r['muon_over_adamw']:.3f}×** AdamW's training FLOPs at matched "
                         f"loss, 95% CI [{fmt(ci[0])}, {fmt(ci[1])}] (width {fmt(ci[1] - ci[0])}) from {r['points']} "
                         f"matched points; {r['replicates_in_range']}/{r['replicates']} replicates had overlapping "
                         "ranges.")
        r = without
        verdict = ("below" if r["ci95"][1] < PAPER_COMPUTE_RATIO else "above" if r["ci95"][0] > PAPER_COMPUTE_RATIO
                   else "consistent with")
        lines.append(f"- Against the paper's {PAPER_COMPUTE_RATIO} (a compute-optimal frontier at 0.4B–16B "
                     f"parameters): the CI lies {verdict} it" + (" (the CI contains it)." if verdict ==
                                                                  "consistent with" else "."))
    return "\n".join(lines), {**{k: without[k] for k in ("muon_over_adamw", "ci95", "points")},
                              "method": RATIO_METHOD, "with_ns": {k: with_ns[k] for k in ("muon_over_adamw", "ci95",
                                                                                           "points")}}


def transfer_figure(sweeps: dict, best: dict, sizes: list[str], steps: str, out: Path) -> str:
    """One panel per mode (loss vs LR, a line per width), and the best LR against width for every mode."""
    fig, axes = figure(len(best) + 1)
    for ax, mode in zip(axes[0], sorted(best)):
        lrs = [lr for s in sizes for lr in sweeps.get((s, mode), {})]
        for i, size in enumerate(sizes):
            curve = mean_curve(sweeps.get((size, mode), {}))
            if curve:
                ax.plot(*zip(*curve), "-o", ms=4, color=f"C{i}", label=size)
        lr_axis(ax, lrs)
        ax.set(title=LABEL[mode], xlabel="peak learning rate", ylabel="final val loss (nats/token)")
    drift = axes[0][-1]
    for mode, by in sorted(best.items()):
        widths = sorted(by, key=size_order)
        drift.plot([size_order(s)[0] for s in widths], [by[s].lr for s in widths], "-o", color=COLOR[mode],
                   label=LABEL[mode])
    drift.set(xscale="log", yscale="log", title="best LR vs width", xlabel="d_model", ylabel="best peak LR")
    drift.xaxis.set_major_locator(FixedLocator(sorted({size_order(s)[0] for s in sizes})))
    drift.xaxis.set_major_formatter(ScalarFormatter())
    drift.xaxis.set_minor_locator(NullLocator())
    found = sorted({b.lr for by in best.values() for b in by.values()})
    drift.set_yticks(found[::max(1, len(found) // 6)], [f"{x:g}" for x in found[::max(1, len(found) // 6)]])
    drift.yaxis.set_minor_locator(NullLocator())
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save(fig, out, "paper_lr_transfer.png", f"configs/paper_base.yaml, {steps} steps, one seed")


def transfer_section(records: dict, out: Path) -> tuple[str, dict]:
    """Section 3: the best LR per width and mode, its drift across widths, the figure; and results.json's part."""
    best = lr_transfer(records)
    sweeps = cells(records, "lr_transfer")
    if not best:
        return "## 3. LR transfer across width\n\nNo LR-transfer records yet.", {}
    sizes = sorted({s for by in best.values() for s in by}, key=size_order)
    steps = "/".join(map(str, sorted({r["steps"] for r in records.values() if r["study"] == "lr_transfer"})))
    rows, lines = [], []
    for mode in sorted(best):
        by = best[mode]
        rows.append([LABEL[mode], *[(f"{by[s].lr:g}" + ("" if by[s].interior else " (edge)")) if s in by else "—"
                                    for s in sizes]])
        found = [by[s].lr for s in sizes if s in by]
        if len(found) > 1:
            spread = max(found) / min(found)
            lines.append(f"- {LABEL[mode]}: " + (f"the best LR is the same at all {len(found)} widths (within the "
                         "grid's ×2 steps)." if spread == 1 else f"the best LR moves ×{spread:g} across {len(found)} "
                         f"widths (narrowest → widest: ×{found[-1] / found[0]:g})."))
    text = "\n".join([
        "## 3. LR transfer across width",
        "",
        f"Fixed depth ({values(records, lambda r: r['layers'], 'lr_transfer')} layers), {steps} steps of "
        f"{values(records, lambda r: r['tokens'], 'lr_transfer')} tokens per run (the same for every width, so "
        "wider models see fewer tokens per parameter), one seed, ×2 LR grids extended until the best is interior. "
        "Best LR per width:",
        "",
        table(["mode", *sizes], rows),
        "",
        *lines,
        "",
        transfer_figure(sweeps, best, sizes, steps, out),
    ])
    return text, {mode: {s: by[s].lr for s in sorted(by, key=size_order)} for mode, by in sorted(best.items())}


def sft_section(records: dict) -> tuple[str, dict]:
    """Section 4: the SFT 2×2 (mean ± std over seeds at each cell's best LR); and results.json's part."""
    result = sft_2x2(records)
    if not result:
        return "## 4. SFT 2×2\n\nNo SFT records yet.", {}
    initial = {}
    for r in records.values():
        if r["study"] == "sft" and r["initial_val_loss"] is not None:
            initial.setdefault(r["pretrain_optimizer"], r["initial_val_loss"])
    rows = [[f"pretrained with {LABEL[pre if pre == 'adamw' else 'muon-moonlight']}", fmt(initial.get(pre)),
             *[(lambda b: f"{fmt(b.mean)} ± {fmt(b.std)} ({len(b.losses)} seed{'s' * (len(b.losses) > 1)}, lr {b.lr:g}"
                + ("" if b.interior else ", edge") + ")")(result[pre, mode]) if (pre, mode) in result else "—"
               for mode in ("adamw", "muon-moonlight")]]
            for pre in ("adamw", "muon")]
    text = "\n".join([
        "## 4. SFT 2×2",
        "",
        "Held-out assistant-token loss on the bundled chat data (configs/paper_sft.yaml), starting from the "
        "scaling study's best seed-0 runs; mean ± std over seeds at each cell's best LR:",
        "",
        table(["", "before SFT", "fine-tuned with AdamW", "fine-tuned with Muon"], rows),
        "",
        *sft_comparisons(result),
    ])
    out = {f"{pre}->{mode}": {"mean": b.mean, "std": b.std, "seeds": len(b.losses), "lr": b.lr,
                              "interior": b.interior} for (pre, mode), b in result.items()}
    return text, out


def difference(a, b) -> str:
    """'Δ nats (k standard errors)': b's mean minus a's, and |Δ| over the standard error of that difference from
    the seed spreads (the standard errors are left out where neither cell has a spread, e.g. one seed each)."""
    delta = b.mean - a.mean
    se = math.sqrt(a.std ** 2 / len(a.losses) + b.std ** 2 / len(b.losses))
    return f"{delta:+.3f} nats ({abs(delta) / se:.1f} standard errors)" if se > 0 else f"{delta:+.3f} nats"


def sft_comparisons(result: dict) -> list[str]:
    """The 2×2's comparing sentences: the lowest cell, then each factor's effect with the other held fixed."""
    if len(result) < 4:
        return []
    name = {"adamw": "AdamW", "muon": "Muon", "muon-moonlight": "Muon"}
    pre, mode = min(result, key=lambda k: result[k].mean)
    lines = [f"- Lowest held-out SFT loss: pretrained with {name[pre]}, fine-tuned with {name[mode]} "
             f"({fmt(result[pre, mode].mean)})."]
    for p in ("adamw", "muon"):
        lines.append(f"- Pretrained with {name[p]}: fine-tuning with Muon instead of AdamW changes the loss by "
                     f"{difference(result[p, 'adamw'], result[p, 'muon-moonlight'])}.")
    for m in ("adamw", "muon-moonlight"):
        lines.append(f"- Fine-tuned with {name[m]}: pretraining with Muon instead of AdamW changes the loss by "
                     f"{difference(result['adamw', m], result['muon', m])}.")
    return lines


def runs_section(records: dict) -> str:
    """Every run with its size, tokens, loss, evaluation size, time and commit; the total time."""
    rows = []
    for k in sorted(records):
        r = records[k]
        rows.append([k, f"{r['non_embedding_params']:,}", f"{r['tokens']:,}", "diverged" if r["diverged"] else fmt(r["final_val_loss"]), f"{r['val_tokens']:,}",
                     f"{r['seconds']:.0f}", r["commit"][:10] + ("*" if r.get("dirty_files") else "")])
    total = sum(r["seconds"] for r in records.values())
    return "\n".join(["## Runs", "",
                      f"{len(records)} runs, {total:.0f} s ({total / 3600:.2f} h) of training in total. Commit: HEAD "
                      "when the run started (`*`: tracked files differed from it; the record lists them).", "",
                      table(["run", "non-emb params", "tokens", "final val loss", "val tokens", "seconds", "commit"],
                            rows)])


def missing_section(plan: Plan, records: dict) -> tuple[str, list[str]]:
    """The plan's sweeps that still need runs (each with the next run it needs)."""
    pending = []
    for sweep in plan.sweeps(records):
        nxt = sweep_state(sweep, records)[1]
        if nxt is not None:
            pending.append(f"{sweep.study} {sweep.size.name} {sweep.mode} (next: {nxt.key})")
    if not plan.sft_sweeps(records):
        pending.append("sft 2×2 (starts when the scaling sweeps at " + plan.sft_size.name + " are complete)")
    text = ("## Status\n\n" + ("All runs of the plan are recorded." if not pending else
            f"**Partial report**: {len(pending)} sweeps of the plan are incomplete; every number above is from the "
            "records so far.\n\n" + "\n".join(f"- {p}" for p in pending)))
    return text, pending


def values(records: dict, get, study: str | None = None) -> str:
    """The distinct values of `get(record)` over the (study's) records, as 'a/b/c'."""
    found = sorted({get(r) for r in records.values() if study is None or r["study"] == study})
    return "/".join(f"{v:g}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)
                    for v in found) or "—"


def header(plan: Plan, records: dict) -> str:
    """Title, provenance, the regime (from the records' configs), FLOP accounting and machines."""
    machines = sorted({r["machine"] + " / " + r["device"] for r in records.values()})
    scaling = [r for r in records.values() if r["study"] == "scaling"]
    ratios = [r["tokens"] / r["non_embedding_params"] for r in scaling]
    return "\n".join([
        "# Muon vs AdamW at CPU scale: a measured compute ratio",
        "",
        "Generated by `python -m bench.paper --report-only` from the run records (one JSON per finished run, "
        "`bench/paper/records/`); every number and every comparing sentence below is computed from them. Claims "
        "checked: Liu et al. 2025, *Muon is Scalable for LLM Training* (arXiv 2502.16982).",
        "",
        *(["> **Quick mode**: a miniature of the pipeline with toy sizes and a handful of steps. Its numbers only "
           "show that the report is produced; they say nothing about the claims.", ""] if plan.quick else []),
        "Regime: Llama models (head dim 32, GQA, MLP 3·d, untied embeddings) on the bundled `medium` corpus (four "
        f"sources), a {values(records, lambda r: r['vocab_size'])}-token byte-level BPE, sequences of "
        f"{values(records, lambda r: r['seq_len'], 'scaling')}, batch {values(records, lambda r: r['global_batch'], 'scaling')}, "
        "cosine schedule with 5% warmup decayed to 10% of the peak at the end of every run, weight decay "
        f"{values(records, lambda r: r['weight_decay'])} for both optimizers, gradient clip 1.0, Newton–Schulz "
        "(standard, 5 Moonlight steps) in float32. Validation: "
        f"{values(records, lambda r: r['val_tokens'], 'scaling')} target tokens of held-out documents (held out by "
        f"hash, data.val_fraction={values(records, lambda r: r['config']['data']['val_fraction'], 'scaling')}"
        + ("; the whole split" if all(r["config"]["log"]["eval_batches"] >= 10**6 for r in scaling) else "")
        + "), evaluated once at the end of each run; only end-of-run losses count. "
        + (f"Scaling runs train {min(ratios):.2f}–{max(ratios):.2f} tokens per non-embedding parameter: an "
           "under-trained regime (compute-optimal is ~20), 3–4 orders of magnitude below the paper's models."
           if ratios else ""),
        "",
        "Training FLOPs: steps × batch × seq × `train.mfu.flops_per_token` (6 × matmul weights + attention, PaLM's "
        "accounting); *with NS* adds standard Newton–Schulz on every Muon matrix at every step "
        "(`bench.optimizer.ns_flops`).",
        "",
        "Machines: " + ("; ".join(machines) or "—") + ".",
    ])


def limitations() -> str:
    """What the study cannot show."""
    return "\n".join([
        "## Limitations",
        "",
        "- Tiny models (tens of thousands to a few hundred thousand non-embedding parameters) and short runs; the "
        "paper's ratio is read on compute-optimal runs at 0.4B–16B parameters.",
        "- Seeds change the initial weights and the data order together; LR grids have ×2 spacing, so a best LR "
        "is known to within that factor.",
        "- The old steps-to-target, weight-decay, SVD-entropy and update-RMS sections were dropped: they were not "
        "computed from committed records.",
    ])


def kept_sections(text: str) -> list[str]:
    """The `## ` sections of an existing results.md that other scripts maintain (each holds a
    `<!-- script:begin -->` marker, e.g. bench/gram_ns.py's): rewriting the report keeps them, after its own."""
    return [part.rstrip() for part in re.split(r"(?m)^(?=## )", text) if re.search(r"<!-- \S+:begin -->", part)]


def rounded(x):
    """JSON-ready copy of `x` with floats to 6 significant digits (stable text)."""
    if isinstance(x, float):
        return None if not math.isfinite(x) else float(f"{x:.6g}")
    if isinstance(x, dict):
        return {str(k): rounded(v) for k, v in sorted(x.items())}
    if isinstance(x, (list, tuple)):
        return [rounded(v) for v in x]
    return x


def write_report(plan: Plan, records: dict, out: Path) -> Path:
    """Write out/results.md, out/results.json and out/paper_*.png from `records`."""
    out.mkdir(parents=True, exist_ok=True)
    scaling = scaling_section(records, out)
    ratio, ratio_json = ratio_section(records)
    transfer, transfer_json = transfer_section(records, out)
    sft, sft_json = sft_section(records)
    status, pending = missing_section(plan, records)
    doc = "\n\n".join([header(plan, records), status, scaling, ratio, transfer, sft, runs_section(records), limitations()])
    path = out / "results.md"
    kept = kept_sections(path.read_text()) if path.exists() else []
    path.write_text("\n\n".join([doc, *kept]) + "\n")
    regime = {"vocab_size": sorted({r["vocab_size"] for r in records.values()}),
              "tokens_per_non_embedding_param": sorted({round(r["tokens"] / r["non_embedding_params"], 2)
                                                        for r in records.values() if r["study"] == "scaling"}),
              "sizes": sorted({r["size"] for r in records.values() if r["study"] == "scaling"}, key=size_order)}
    summary = {"regime": regime, "compute_ratio": ratio_json, "lr_transfer": transfer_json, "sft_2x2": sft_json,
               "incomplete": pending, "records": len(records),
               "training_seconds": sum(r["seconds"] for r in records.values())}
    (out / "results.json").write_text(json.dumps(rounded(summary), indent=1, sort_keys=True) + "\n")
    return path

