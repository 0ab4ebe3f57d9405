"""The report's seven sections: each takes the study (and the best runs), makes its measurements and figure, and
returns its markdown, whose comparing sentences are generated from the measured numbers."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from bench.optimizer import ns_flops
from bench.paper.measures import (entropies_of, fit_power_law, init_params, matrix_entropies,
                                  optimizer_step_seconds, restore_for_update, steps_to_reach, update_rms_by_shape,
                                  weight_rms)
from bench.paper.plan import OPTIMIZERS, Plan, Spec, base_caption
from bench.paper.plots import COLOR, LABEL, figure, plot_val, save
from bench.paper.runs import Study
from bench.paper.tables import fmt, table

PAPER_COMPUTE_RATIO = 0.52   # Moonlight, Fig. 3 / Sec. 3.2: Muon matches AdamW with ~52% of the training FLOPs
HIDDEN_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def section_update_rms(study: Study, bests: dict, out: Path) -> str:
    """Section 1: per-shape update RMS of the best Muon and AdamW runs at the main size."""
    plan, main = study.plan, study.plan.main
    muon_run, adam_run = bests[main, "muon"], bests[main, "adamw"]
    none = update_rms_by_shape(muon_run.run_dir, "none")
    moon = update_rms_by_shape(muon_run.run_dir, "moonlight")
    adam = update_rms_by_shape(adam_run.run_dir)
    rows, lemma_ratios, moon_rms, adam_rms = [], [], [], []
    for shape in moon:
        a, b = shape
        e = moon[shape]
        if e["branch"] == "Muon":
            predicted = math.sqrt(1 / max(a, b))
            ratio = none[shape]["rms"] / predicted
            lemma_ratios.append(ratio)
            moon_rms.append(e["rms"])
            cells = [fmt(predicted, 4), fmt(none[shape]["rms"], 4), fmt(ratio, 2), fmt(e["rms"], 3)]
        else:
            cells = ["—", "—", "—", f"{e['rms']:.3f} (AdamW branch)"]
        adam_rms.append(adam[shape]["rms"])
        rows.append([f"[{a}, {b}]", ", ".join(e["roles"]), *cells, fmt(adam[shape]["rms"], 3)])
    hidden_adam = [adam[s]["rms"] for s in moon if moon[s]["branch"] == "Muon"]
    text = [
        "## 1. Update RMS per matrix shape (Lemma 1 and the 0.2 match)",
        "",
        f"The next update of the best Muon and AdamW runs at {main.name} (step {plan.steps}), from each run's own "
        "optimizer state and the gradient of the batch the trainer would have taken next, at LR 1 and without "
        "weight decay. `lr_scale=none` is Muon's orthogonalised update O; Lemma 1 predicts RMS(O) = √(1/max(A, B)) "
        "for a full-rank matrix. Moonlight's 0.2·√max(A, B) scaling should then give 0.2 for every shape, which "
        "the paper says matches AdamW's typical update RMS.",
        "",
        table(["shape [A, B]", "matrices", "√(1/max(A,B))", "Muon, lr_scale=none", "ratio", "Muon, moonlight",
               "AdamW run"], rows),
        "",
        f"Measured: RMS(O)/√(1/max(A, B)) is {min(lemma_ratios):.2f}–{max(lemma_ratios):.2f} over the "
        f"{len(lemma_ratios)} hidden shapes ({'within' if max(abs(r - 1) for r in lemma_ratios) <= 0.1 else 'not within'} "
        "±10% of Lemma 1; five Newton–Schulz steps with Moonlight's coefficients only bring the singular values "
        "near 1, so the ratio is the RMS of the computed singular values). With the Moonlight scaling the hidden "
        f"matrices' update RMS is {min(moon_rms):.3f}–{max(moon_rms):.3f}; AdamW's update RMS on the same matrices is "
        f"{min(hidden_adam):.3f}–{max(hidden_adam):.3f} (all shapes: {min(adam_rms):.3f}–{max(adam_rms):.3f}), i.e. "
        f"Muon/AdamW = {np.mean(moon_rms) / np.mean(hidden_adam):.2f}× on average at this point of training.",
    ]
    fig, axes = figure(2)
    for ax, r in zip(axes[0], (muon_run, adam_run)):
        for key, style in (("update_rms_muon", "-"), ("update_rms_adam", "--")):
            pts = [(row["step"], row[key]) for row in r.rows if key in row]
            if pts:
                ax.plot(*zip(*pts), style, label=key.replace("update_rms_", "") + " leaves")
        ax.axhline(0.2, color="gray", lw=0.8, ls=":")
        ax.set(title=f"{LABEL[r.spec.optimizer]}, lr {r.spec.lr:g}", xlabel="step", ylabel="update RMS / LR")
        ax.legend()
        ax.grid(alpha=0.3)
    text += ["", "During training (the trainer's `update_rms_*` metrics: all leaves of a group pooled, weight-decay "
             "term included, divided by the scheduled LR):", "",
             save(fig, out, "paper_update_rms.png", f"{main.name}, {plan.steps} steps, best LR each; {base_caption(plan)}")]
    return "\n".join(text)


def section_sweeps(study: Study, sweeps: dict, bests: dict, out: Path) -> str:
    """Section 2: final val loss against the LR per size and optimizer."""
    plan = study.plan
    swept = plan.swept_sizes
    lrs = sorted({r.spec.lr for rs in sweeps.values() for r in rs})
    rows = []
    for size in swept:
        for opt in OPTIMIZERS:
            by_lr = {r.spec.lr: r for r in sweeps[size, opt]}
            b = bests[size, opt]
            rows.append([size.name, LABEL[opt], *[("**" + fmt(by_lr[lr].final_val) + "**" if by_lr[lr] is b
                                                   else fmt(by_lr[lr].final_val)) if lr in by_lr else "" for lr in lrs]])
    fig, axes = figure(len(swept))
    for ax, size in zip(axes[0], swept):
        for opt in OPTIMIZERS:
            pts = [(r.spec.lr, r.final_val) for r in sweeps[size, opt] if math.isfinite(r.final_val)]
            if pts:
                ax.plot(*zip(*pts), "-o", color=COLOR[opt], label=LABEL[opt])
        ax.set(xscale="log", title=size.name, xlabel="peak learning rate", ylabel="final val loss (nats/token)")
        ax.legend()
        ax.grid(alpha=0.3)
    best_lr = {(s, o): bests[s, o].spec.lr for s in swept for o in OPTIMIZERS}
    lines = []
    for opt in OPTIMIZERS:
        found = [best_lr[s, opt] for s in swept]
        spread = max(found) / min(found)
        lines.append(f"- {LABEL[opt]}: best LR " + ", ".join(f"{best_lr[s, opt]:g} at {s.name}" for s in swept) + (
            " — the same at every swept size (transfers within the grid's ×"
            f"{plan.lr_grid[1] / plan.lr_grid[0]:g} resolution)." if spread == 1 else
            f" — it moves by ×{spread:g} across sizes."))
    for s in swept:
        a_best, m_best = bests[s, "adamw"], bests[s, "muon"]
        muon_at_adam = next((r for r in sweeps[s, "muon"] if r.spec.lr == a_best.spec.lr), None)
        same = a_best.spec.lr == m_best.spec.lr
        lines.append(
            f"- {s.name}: AdamW's best LR ({a_best.spec.lr:g}) "
            + ("is also Muon's best" if same else f"differs from Muon's ({m_best.spec.lr:g})")
            + (f"; Muon at AdamW's best LR reaches {fmt(muon_at_adam.final_val)} vs its best {fmt(m_best.final_val)} "
               f"(+{muon_at_adam.final_val - m_best.final_val:.3f} nats)" if muon_at_adam is not None and not same else "")
            + f". Best final val loss: Muon {fmt(m_best.final_val)}, AdamW {fmt(a_best.final_val)} "
            f"(Muon − AdamW = {m_best.final_val - a_best.final_val:+.3f} nats).")
    return "\n".join([
        "## 2. Learning-rate sweeps",
        "",
        f"Final validation loss after {plan.steps} steps against the peak LR (same cosine schedule, batch, weight "
        "decay 0.1, data order and initial weights for both optimizers; Muon's Adam branch shares the LR, as in "
        f"Moonlight). Bold: the best LR of each row. The grid starts at {', '.join(f'{x:g}' for x in plan.lr_grid)} "
        f"and is extended (at most {plan.max_extend}×) while the best LR is at an edge.",
        "",
        table(["size", "optimizer", *[f"lr {lr:g}" for lr in lrs]], rows),
        "",
        *lines,
        "",
        save(fig, out, "paper_lr_sweep.png", f"{plan.steps} steps; {base_caption(plan)}"),
    ])


def section_steps_to_target(study: Study, bests: dict, noise: dict, out: Path) -> str:
    """Section 3: the step at which best Muon reaches best AdamW's final loss; loss vs step and vs FLOPs."""
    plan = study.plan
    swept = plan.swept_sizes
    rows, ratios = [], []
    for s in swept:
        a, m = bests[s, "adamw"], bests[s, "muon"]
        reach = steps_to_reach(m, a.final_val)
        ratio = None if reach is None else reach / a.spec.steps
        if ratio is not None:
            ratios.append(ratio)
        rows.append([s.name, f"{a.spec.lr:g}", fmt(a.final_val), f"{m.spec.lr:g}", fmt(m.final_val),
                     "not reached" if reach is None else f"{reach:.0f} of {m.spec.steps}",
                     "> 1" if ratio is None else f"{ratio:.2f}"])
    fig, axes = figure(2, len(swept), height=3.6)
    for row_axes, s in zip(axes, swept):
        for opt in OPTIMIZERS:
            r = bests[s, opt]
            style = {"ms": 3, "color": COLOR[opt], "label": f"{LABEL[opt]} lr {r.spec.lr:g}"}
            plot_val(row_axes[0], r, "-o", **style)
            plot_val(row_axes[1], r, "-o", x=r.flops_at, **style)
        row_axes[0].axhline(bests[s, "adamw"].final_val, color="gray", lw=0.8, ls=":")
        row_axes[0].set(title=f"{s.name}: val loss vs step", xlabel="step", ylabel="val loss")
        row_axes[1].set(title=f"{s.name}: val loss vs training FLOPs", xlabel="FLOPs (6N + attention per token)",
                        xscale="log")
        for ax in row_axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    noise_line = noise_sentence(noise, plan)
    if ratios:
        mean = float(np.mean(ratios))
        verdict = (f"Muon reached AdamW's best final loss in {mean:.2f}× the steps on average "
                   f"(paper: ~{PAPER_COMPUTE_RATIO}); {'at or below' if mean <= PAPER_COMPUTE_RATIO + 0.05 else 'above'} "
                   "the paper's figure.")
    else:
        verdict = "Muon did not reach AdamW's best final loss within the run at any swept size."
    return "\n".join([
        "## 3. Steps to reach AdamW's best loss",
        "",
        "Each optimizer at its own best LR (section 2). The step at which Muon's validation loss first reaches "
        "AdamW's final one is interpolated between evals; the ratio is that step over AdamW's run length, and is "
        "also the FLOPs ratio (same model, same tokens per step; the Newton–Schulz FLOPs are not counted, as in "
        "the paper — section 7 has their wall-clock cost). Muon's intermediate losses are taken mid-schedule, "
        "before its LR has decayed, so this ratio overstates the steps a Muon run *planned* for that length "
        "would need (the paper compares fitted compute-optimal runs instead; section 6 does the fit).",
        "",
        table(["size", "AdamW lr", "AdamW final val", "Muon lr", "Muon final val", "Muon reaches it at step",
               "steps ratio"], rows),
        "",
        verdict + " " + noise_line,
        "",
        save(fig, out, "paper_steps_to_target.png", f"{plan.steps} steps, best LR each; {base_caption(plan)}"),
    ])


def noise_sentence(noise: dict[str, float], plan: Plan) -> str:
    """The seed-to-seed spread of the best runs at the main size, as a sentence ('' when not measured)."""
    if not noise:
        return ""
    return (f"Seed-to-seed spread of the final val loss at {plan.main.name} (seed 0 vs "
            f"{', '.join(map(str, plan.noise_seeds))}): " + ", ".join(f"{LABEL[o]} {d:.3f}" for o, d in noise.items())
            + " nats; differences smaller than this are not resolved.")


def section_weight_decay(study: Study, bests: dict, out: Path) -> str:
    """Section 4: Muon with and without weight decay over `plan.wd_steps`."""
    plan, main = study.plan, study.plan.main
    lr = bests[main, "muon"].spec.lr
    runs = {wd: study.run(Spec(main, "muon", lr, plan.wd_steps, weight_decay=wd)) for wd in (0.1, 0.0)}
    rms = {wd: weight_rms(r.run_dir) for wd, r in runs.items()}
    fig, axes = figure(1)
    for wd, r in runs.items():
        plot_val(axes[0][0], r, "-o", ms=3, label=f"weight decay {wd:g}")
    axes[0][0].set(title=f"Muon {main.name}, lr {lr:g}", xlabel="step", ylabel="val loss")
    axes[0][0].legend()
    axes[0][0].grid(alpha=0.3)
    with_wd, without = dict(runs[0.1].val), dict(runs[0.0].val)
    common = sorted(set(with_wd) & set(without))
    diff = [(s, without[s] - with_wd[s]) for s in common]   # > 0: weight decay is ahead
    ahead = [s for s, d in diff if d > 0]
    rows = [[f"{wd:g}", fmt(r.final_val), f"{rms[wd]:.4f}"] for wd, r in runs.items()]
    final_diff = diff[-1][1]
    lead = (f"Weight decay is ahead from step {ahead[0]} on" if ahead and all(d > 0 for s, d in diff if s >= ahead[0])
            else "Weight decay is ahead at steps " + ", ".join(map(str, ahead)) if ahead
            else "The run without weight decay is ahead at every eval")
    return "\n".join([
        "## 4. Weight decay over a longer run",
        "",
        f"Muon at {main.name}, its best LR from section 2 ({lr:g}), {plan.wd_steps} steps (×{plan.wd_steps / plan.steps:g} "
        "the sweep length, same cosine shape), with weight decay 0.1 and 0 (for both branches).",
        "",
        table(["weight decay", "final val loss", "final RMS of hidden weights"], rows),
        "",
        f"{lead}; at the end, val loss without − with weight decay = {final_diff:+.3f} nats, and the hidden weights' "
        f"RMS without / with weight decay = {rms[0.0] / rms[0.1]:.2f}. The paper's claim (weight decay matters for long, "
        "over-trained runs) is about far more tokens per parameter than fit here: "
        f"{runs[0.1].spec.steps * runs[0.1].tokens_per_step / runs[0.1].params:.1f} tokens per parameter.",
        "",
        save(fig, out, "paper_weight_decay.png", f"{main.name}, {plan.wd_steps} steps; {base_caption(plan)}"),
    ])


def section_svd_entropy(study: Study, bests: dict, out: Path) -> str:
    """Section 5: SVD entropy per matrix and layer of the best runs, against the initial weights."""
    plan, main = study.plan, study.plan.main
    swept = plan.swept_sizes
    ent = {(s, o): entropies_of(bests[s, o].run_dir) for s in swept for o in OPTIMIZERS}
    init = matrix_entropies(init_params(study.config(bests[main, "muon"].spec)))
    roles = [r for r in HIDDEN_ROLES if r in init] + [r for r in ("embed_tokens", "lm_head") if r in init]
    rows = []
    for role in roles:
        m, a = ent[main, "muon"][role], ent[main, "adamw"][role]
        rows.append([role, fmt(float(init[role].mean())), fmt(float(a.mean())), fmt(float(m.mean())),
                     f"{int((m > a).sum())}/{m.size}"])
    hidden = [r for r in roles if r in HIDDEN_ROLES]
    per_size = []
    for s in swept:
        m = np.concatenate([ent[s, "muon"][r] for r in hidden])
        a = np.concatenate([ent[s, "adamw"][r] for r in hidden])
        per_size.append([s.name, fmt(float(a.mean())), fmt(float(m.mean())), f"{int((m > a).sum())}/{m.size}"])
    m_all = np.concatenate([ent[main, "muon"][r] for r in hidden])
    a_all = np.concatenate([ent[main, "adamw"][r] for r in hidden])
    fig, axes = figure(math.ceil(len(roles) / 2), 2, width=3.6, height=3.0)
    for ax, role in zip(axes.flat, roles):
        x = np.arange(init[role].size)
        ax.plot(x, init[role], ":", color="gray", label="init")
        for opt in OPTIMIZERS:
            ax.plot(x, ent[main, opt][role], "-o", ms=4, color=COLOR[opt], label=opt)
        ax.set(title=role, xlabel="layer", ylabel="SVD entropy", xticks=x)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(roles):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    higher = int((m_all > a_all).sum())
    return "\n".join([
        "## 5. SVD entropy of the trained weights",
        "",
        "Normalised entropy of each weight matrix's squared singular values, H = −Σ pᵢ log pᵢ / log n with "
        "pᵢ = σᵢ²/Σσⱼ² (1: energy spread evenly over all directions), at the end of the best-LR runs; `init` is the "
        f"shared random initialisation. Per matrix type at {main.name} (mean over layers; last column: layers where "
        "Muon's entropy is higher):",
        "",
        table(["matrix", "init", "AdamW", "Muon", "Muon > AdamW"], rows),
        "",
        "Mean over all hidden matrices, per swept size:",
        "",
        table(["size", "AdamW", "Muon", "Muon > AdamW"], per_size),
        "",
        f"At {main.name}, Muon's hidden matrices have higher SVD entropy than AdamW's in {higher} of {m_all.size} "
        f"cases (mean {m_all.mean():.3f} vs {a_all.mean():.3f}) — "
        + ("consistent with" if higher > m_all.size / 2 else "not consistent with")
        + " the paper's observation that Muon spreads the weights over more diverse directions.",
        "",
        save(fig, out, "paper_svd_entropy.png", f"{main.name}, {plan.steps} steps, best LR each; {base_caption(plan)}"),
    ])


def section_scaling(study: Study, bests: dict, out: Path) -> str:
    """Section 6: final loss against training FLOPs over all sizes, a power law per optimizer."""
    plan = study.plan
    fits, rows = {}, []
    fig, axes = figure(1, width=7, height=4.5)
    ax = axes[0][0]
    for opt in OPTIMIZERS:
        pts = [(bests[s, opt].flops_at(bests[s, opt].spec.steps), bests[s, opt].final_val) for s in plan.sizes]
        for s in plan.sizes:
            plot_val(ax, bests[s, opt], "-", x=bests[s, opt].flops_at, lw=0.8, alpha=0.5, color=COLOR[opt])
        c, l = np.array(pts).T
        finite = np.isfinite(l)
        fits[opt] = fit_power_law(c[finite], l[finite]) if finite.sum() >= 2 else None
        ax.plot(c, l, "o", color=COLOR[opt], label=LABEL[opt])
        if fits[opt]:
            a, b, r2 = fits[opt]
            grid = np.geomspace(c.min(), c.max(), 50)
            ax.plot(grid, a * grid ** -b, "--", color=COLOR[opt], label=f"fit {a:.3g}·C^−{b:.3f} (R² {r2:.2f})")
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs", ylabel="val loss (nats/token)",
           title="loss vs compute over model sizes (final points fitted)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ratios = []
    for s in plan.sizes:
        a, m = bests[s, "adamw"], bests[s, "muon"]
        ratio = None
        if fits["muon"] and math.isfinite(a.final_val):
            fa, fb, _ = fits["muon"]
            ratio = (fa / a.final_val) ** (1 / fb) / a.flops_at(a.spec.steps)   # Muon's fitted compute at AdamW's loss
            ratios.append(ratio)
        rows.append([s.name, f"{a.params / 1e6:.2f}M", f"{a.flops_at(a.spec.steps):.3g}",
                     "swept" if s in plan.swept_sizes else f"transferred ({a.spec.lr:g} / {m.spec.lr:g})",
                     fmt(a.final_val), fmt(m.final_val), fmt(ratio, 2)])
    fit_rows = [[LABEL[o], *(([f"{f[0]:.3g}", f"{f[1]:.4f}", f"{f[2]:.3f}"]) if f else ["—"] * 3)]
                for o, f in fits.items()]
    summary = (f"The fitted Muon curve reaches AdamW's final loss with {np.median(ratios):.2f}× AdamW's FLOPs "
               f"(median over sizes; paper: ~{PAPER_COMPUTE_RATIO})." if ratios else "Too few finite points to fit.")
    return "\n".join([
        "## 6. Scaling: loss vs compute",
        "",
        f"All {len(plan.sizes)} sizes for {plan.steps} steps each, each optimizer at its best LR (swept sizes) or "
        "at the best LR of the largest swept size (larger sizes). FLOPs = steps × tokens × `train.mfu.flops_per_token`. "
        "Fit: loss = a·C^(−b) through the final points. The last column is the FLOPs at which the fitted Muon "
        "curve reaches that size's AdamW loss, over AdamW's FLOPs. The sizes share a token budget, so this is a "
        "model-size sweep at fixed data, not the compute-optimal frontier the paper fits.",
        "",
        table(["size", "params", "FLOPs", "LR (AdamW / Muon)", "AdamW val", "Muon val", "Muon FLOPs / AdamW FLOPs"],
              rows),
        "",
        table(["optimizer", "a", "b", "R²"], fit_rows),
        "",
        summary,
        "",
        save(fig, out, "paper_scaling.png", f"{plan.steps} steps per size; {base_caption(plan)}"),
    ])


def section_optimizer_cost(study: Study, bests: dict) -> str:
    """Section 7: the optimizer update's share of the train step per size."""
    plan = study.plan
    rows, shares = [], []
    for s in plan.sizes:
        row = [s.name]
        for opt in OPTIMIZERS:
            r = bests[s, opt]
            step_s = r.tokens_per_step / r.tokens_per_s
            opt_s = optimizer_step_seconds(r.run_dir)
            row += [f"{1e3 * step_s:.0f}", f"{1e3 * opt_s:.1f}", f"{100 * opt_s / step_s:.1f}%"]
            if opt == "muon":
                shares.append(opt_s / step_s)
                cfg, params, _, _ = restore_for_update(r.run_dir)
                ns = ns_flops(params, cfg.optimizer.ns_steps)
                row.append(f"{100 * ns / (r.flops_per_token * r.tokens_per_step):.1f}%")
        rows.append(row)
    tokens = bests[plan.main, "muon"].tokens_per_step
    return "\n".join([
        "## 7. Optimizer cost",
        "",
        "Train-step time from each best run's throughput (median over the logging intervals that hold no "
        "compilation and no evaluation), and one jitted optimizer update + apply timed alone on the run's final "
        "params, optimizer state and a real gradient. The last column counts Newton–Schulz FLOPs "
        "(`bench.optimizer.ns_flops`) against the model's training FLOPs per step "
        f"({tokens} tokens; NS FLOPs do not grow with the batch, so this share shrinks as the batch grows).",
        "",
        table(["size", "AdamW step ms", "AdamW update ms", "AdamW share", "Muon step ms", "Muon update ms",
               "Muon share", "NS FLOPs / model FLOPs"], rows),
        "",
        f"Muon's update takes {100 * min(shares):.1f}–{100 * max(shares):.1f}% of the train step over these sizes.",
    ])

