"""Moonlight's claims about Muon (Liu et al. 2025, arXiv 2502.16982), measured at CPU scale.

    python -m bench.paper [--quick] [--out docs/] [--runs runs/paper]

Every run goes through the real trainer (`train.loop.train`) from `configs/paper_base.yaml` (bundled `medium`
corpus, held-out documents for validation, 4k BPE, seq 128, batch 32, cosine schedule, weight decay 0.1, seed 0,
one device), so Muon and AdamW see the same initial weights and the same batches in the same order. The study
writes `OUT/results.md` (tables, and interpretation generated from the measured numbers) and `OUT/paper_*.png`:

1. update RMS per matrix shape (Lemma 1 and the 0.2 match), from the optimizer state of finished runs;
2. LR sweeps for both optimizers on the swept sizes (does the best LR transfer across sizes and optimizers?);
3. steps Muon needs to reach AdamW's best final validation loss, and loss vs step / vs FLOPs;
4. Muon with and without weight decay over a longer run;
5. SVD entropy of every weight matrix at the end of training, per layer;
6. loss vs compute over all sizes with a fitted power law per optimizer;
7. the optimizer update's share of the train step per size.

Runs live in `--runs` (one directory per run, named by its settings). A run whose directory already holds a
finished run is not trained again, so a killed study continues where it stopped when started again; the best-LR
runs of the sweep are reused by sections 1, 3, 5, 6 and 7. `--quick` runs a minutes-long miniature of the whole
pipeline (for CI: it checks that the report is produced, not the claims).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BASE_CONFIG = ROOT / "configs" / "paper_base.yaml"
OPTIMIZERS = ("adamw", "muon")
LABEL = {"adamw": "AdamW", "muon": "Muon (Moonlight scaling)"}
COLOR = {"adamw": "C0", "muon": "C3"}
PAPER_COMPUTE_RATIO = 0.52   # Moonlight, Fig. 3 / Sec. 3.2: Muon matches AdamW with ~52% of the training FLOPs
HIDDEN_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ------------------------------------------------------------------------------------------------- the plan

@dataclasses.dataclass(frozen=True)
class Size:
    """A Llama of width `hidden` and depth `layers`: head dim 32, grouped-query attention with half as many
    KV heads (so k/v projections have their own shape), MLP width 3·hidden."""
    hidden: int
    layers: int

    @property
    def name(self) -> str:
        return f"d{self.hidden}-L{self.layers}"

    def overrides(self) -> list[str]:
        heads = max(1, self.hidden // 32)
        return [f"model.hidden_size={self.hidden}", f"model.intermediate_size={3 * self.hidden}",
                f"model.num_hidden_layers={self.layers}", f"model.num_attention_heads={heads}",
                f"model.num_key_value_heads={max(1, heads // 2)}"]


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the study runs. The first `swept` sizes get a full LR sweep per optimizer; larger sizes run at the
    best LR of the largest swept size (the transfer the sweep tests). `lr_grid` is extended geometrically, at
    most `max_extend` times, while the best LR sits at its edge."""
    sizes: tuple[Size, ...]
    swept: int
    lr_grid: tuple[float, ...]
    max_extend: int
    steps: int            # every sweep / scaling run
    wd_steps: int         # the weight-decay comparison's longer runs
    noise_seeds: tuple[int, ...]  # extra seeds of the best runs at the largest swept size: the noise floor
    overrides: tuple[str, ...]    # on top of configs/paper_base.yaml, for every run

    @property
    def main(self) -> Size:
        """The largest swept size: its best runs feed sections 1, 4 and 5."""
        return self.sizes[self.swept - 1]


# Sizes from measured CPU throughput (the run table at the end of the report has each run's tokens/s): a 300-step
# run (1.2M tokens) of the two swept sizes takes ~1.5–2 min on 2 idle cores, d192-L2 ~3.5 min, d256-L3 ~4.5 min;
# 12–18 sweep runs + 4 scaling + 2 noise + 2 weight-decay runs then fit in ~60 min.
FULL = Plan(
    sizes=(Size(64, 2), Size(128, 2), Size(192, 2), Size(256, 3)),
    swept=2, lr_grid=(4e-3, 8e-3, 1.6e-2), max_extend=2, steps=300, wd_steps=600, noise_seeds=(1,),
    overrides=())
QUICK = Plan(
    sizes=(Size(32, 1), Size(64, 1)),
    swept=1, lr_grid=(4e-3, 1.6e-2), max_extend=0, steps=8, wd_steps=8, noise_seeds=(),
    overrides=("seq_len=64", "global_batch=8", "schedule.warmup_steps=2", "log.every=2", "log.eval_every=4",
               "log.eval_batches=2", "checkpoint.every=8"))


@dataclasses.dataclass(frozen=True)
class Spec:
    """One training run; its directory name is a function of these fields, which is what makes reuse work."""
    size: Size
    optimizer: str
    lr: float
    steps: int
    weight_decay: float = 0.1
    seed: int = 0

    @property
    def key(self) -> str:
        return (f"{self.size.name}-{self.optimizer}-lr{self.lr:g}-wd{self.weight_decay:g}-s{self.steps}"
                f"-seed{self.seed}")

    def overrides(self, plan: Plan, runs: Path) -> list[str]:
        return [*plan.overrides, *self.size.overrides(), f"run_dir={runs / self.key}", f"steps={self.steps}",
                f"seed={self.seed}", f"optimizer.name={self.optimizer}", f"optimizer.learning_rate={self.lr}",
                f"optimizer.weight_decay={self.weight_decay}"]


@dataclasses.dataclass
class Result:
    """A finished run: its metrics rows (`train.plot.read_metrics`), whether it diverged, its training time, and
    what converts steps into FLOPs."""
    spec: Spec
    run_dir: Path
    rows: list[dict]
    diverged: bool
    seconds: float
    flops_per_token: float
    tokens_per_step: int
    params: int

    @property
    def val(self) -> list[tuple[int, float]]:
        """(step, validation loss) at every eval."""
        return [(r["step"], r["val_loss"]) for r in self.rows if "val_loss" in r]

    @property
    def final_val(self) -> float:
        """The final validation loss; +inf for a run that diverged (so it never wins a sweep)."""
        return math.inf if self.diverged or not self.val else self.val[-1][1]

    @property
    def tokens_per_s(self) -> float:
        """Median throughput over the logging intervals free of compilation (the first) and of evaluation (the
        trainer evaluates after taking a row's time, so the eval lands in the next row's interval)."""
        steady = [r["tokens_per_s"] for prev, r in zip(self.rows, self.rows[1:]) if "val_loss" not in prev]
        steady = steady or [r["tokens_per_s"] for r in self.rows[1:]] or [r["tokens_per_s"] for r in self.rows]
        return float(np.median(steady)) if steady else math.nan

    def flops_at(self, step: int) -> float:
        """Training FLOPs up to `step` (the trainer's FLOPs-per-token accounting)."""
        return step * self.tokens_per_step * self.flops_per_token


# ------------------------------------------------------------------------------------------------- running

class Study:
    """Runs (or reuses) trainer runs for a plan, keyed by `Spec`."""

    def __init__(self, plan: Plan, runs: Path):
        self.plan, self.runs = plan, runs
        self.results: dict[Spec, Result] = {}

    def config(self, spec: Spec):
        from train.config import load_config
        return load_config(BASE_CONFIG, spec.overrides(self.plan, self.runs))

    def run(self, spec: Spec) -> Result:
        """Train `spec` unless its run directory holds a finished run; a diverged run counts as finished."""
        if spec in self.results:
            return self.results[spec]
        from train.mfu import flops_per_token
        from train.models import param_counts
        from train.plot import read_metrics
        from train.data import load_tokenizer
        from train.loop import NonFiniteLoss, train
        from train.runtime import cache_dir, model_config_for

        cfg = self.config(spec)
        run_dir = Path(cfg.run_dir)
        marker = run_dir / "paper.json"   # written only once the trainer has returned (or diverged)
        if not marker.is_file():
            print(f"[bench.paper] training {spec.key}", flush=True)
            t0, diverged = time.perf_counter(), False
            try:
                train(cfg)
            except NonFiniteLoss as e:   # an LR too high for an optimizer is a result of the sweep, not a failure
                print(f"[bench.paper] {spec.key} diverged: {e}", flush=True)
                diverged = True
            marker.write_text(json.dumps({"seconds": time.perf_counter() - t0, "diverged": diverged}))
        status = json.loads(marker.read_text())
        model_cfg = model_config_for(cfg, load_tokenizer(cfg.data, cache_dir()))
        result = Result(spec, run_dir, read_metrics(run_dir), status["diverged"], status["seconds"],
                        flops_per_token(model_cfg, cfg.seq_len), cfg.global_batch * cfg.seq_len,
                        param_counts(model_cfg)[0])
        self.results[spec] = result
        return result

    def sweep(self, size: Size, optimizer: str) -> list[Result]:
        """The LR sweep of one optimizer at one size, extended while the best LR is at the grid's edge."""
        lrs = list(self.plan.lr_grid)
        factor = lrs[1] / lrs[0] if len(lrs) > 1 else 2.0
        for extension in range(self.plan.max_extend + 1):
            results = [self.run(Spec(size, optimizer, lr, self.plan.steps)) for lr in lrs]
            best = int(np.argmin([r.final_val for r in results]))
            if extension == self.plan.max_extend or 0 < best < len(lrs) - 1:
                break
            if best == 0:
                lrs.insert(0, lrs[0] / factor)
            else:
                lrs.append(lrs[-1] * factor)
        return sorted(results, key=lambda r: r.spec.lr)


def best(results: list[Result]) -> Result:
    """The run with the lowest final validation loss."""
    return min(results, key=lambda r: r.final_val)


# ------------------------------------------------------------------------------------------------- measures

@functools.lru_cache(maxsize=None)
def restore_for_update(run_dir: Path):
    """(cfg, params, opt_state, grads) of a finished run: its last checkpoint's parameters and optimizer state,
    and the gradient of the batch the trainer would have taken next (data iterator restored exactly)."""
    from flax import nnx

    from train import data as data_lib
    from train.checkpoint import Checkpointer
    from train.config import load_config
    from train.models import abstract_model
    from train.optim import make_optimizer, make_schedule
    from train.runtime import cache_dir, make_mesh, model_config_for
    from train.step import cross_entropy

    cfg = load_config(run_dir / "config.yaml")
    corpus = data_lib.load_corpus(cfg.data, cache_dir())
    model_cfg = model_config_for(cfg, corpus.tokenizer)
    # abstract targets (shapes only) for the restore: nothing is initialised or compiled just to be overwritten
    graphdef, params, variables = nnx.split(abstract_model(model_cfg), nnx.Param, ...)
    opt_state = jax.eval_shape(make_optimizer(cfg, make_schedule(cfg), make_mesh(cfg)).init, params)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params, opt_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                     (params, opt_state))
    ckpt = Checkpointer(run_dir, keep=cfg.checkpoint.keep, async_save=False)
    try:
        items = ckpt.restore(ckpt.steps()[-1], params=params, opt_state=opt_state, variables=variables)
    finally:
        ckpt.close()
    it = data_lib.make_train_iterator(corpus, seq_len=cfg.seq_len, global_batch=cfg.global_batch, seed=cfg.seed,
                                      shuffle=cfg.data.shuffle)
    data_lib.restore_iterator(it, items["data"])
    batch = {k: jnp.asarray(v) for k, v in next(it).items()}

    def loss(p):
        logits = nnx.merge(graphdef, p, items["variables"])(batch["inputs"], batch["segment_ids"], batch["positions"])
        return cross_entropy(logits, batch["targets"], batch["loss_mask"], 0.0)[0]

    return cfg, items["params"], items["opt_state"], jax.jit(jax.grad(loss))(items["params"])


def is_matrix(path, x) -> bool:
    """A weight matrix (the last two axes): not a vector, nor a layer-stacked [L, d] norm scale."""
    return x.ndim >= 2 and "norm" not in jax.tree_util.keystr(path)


def update_rms_by_shape(run_dir: Path, lr_scale: str | None = None) -> dict[tuple[int, int], dict]:
    """RMS of the next update per matrix shape [A, B] of a finished run, at LR 1 and without weight decay (so it
    is the update direction the paper's Lemma 1 is about), from the run's own optimizer state. `lr_scale`
    replaces Muon's shape scaling (the momentum state does not depend on it). Each entry: rms, roles, branch."""
    import optax

    import muon_jax
    from train.optim import make_optimizer
    from train.runtime import make_mesh

    cfg, params, opt_state, grads = restore_for_update(run_dir)
    o = dataclasses.replace(cfg.optimizer, weight_decay=0.0, **({"lr_scale": lr_scale} if lr_scale else {}))
    cfg = dataclasses.replace(cfg, optimizer=o)
    # a constant *schedule* (not a float) keeps the optimizer state's structure that of the training run
    tx = make_optimizer(cfg, optax.constant_schedule(1.0), make_mesh(cfg))
    updates, _ = jax.jit(tx.update)(grads, opt_state, params)
    labels = jax.tree.leaves(muon_jax.default_labels(params))
    out: dict[tuple[int, int], dict] = {}
    for (path, u), label in zip(jax.tree_util.tree_flatten_with_path(updates)[0], labels):
        if not is_matrix(path, u):
            continue
        shape = tuple(u.shape[-2:])
        entry = out.setdefault(shape, {"sq": 0.0, "n": 0, "roles": set(), "branch": set()})
        entry["sq"] += float(jnp.sum(jnp.square(u.astype(jnp.float32))))
        entry["n"] += u.size
        entry["roles"].add(role_of(path))
        entry["branch"].add("Muon" if cfg.optimizer.name == "muon" and label == "muon" else "AdamW")
    return {s: {"rms": math.sqrt(e["sq"] / e["n"]), "roles": sorted(e["roles"]), "branch": "/".join(sorted(e["branch"]))}
            for s, e in sorted(out.items())}


def optimizer_step_seconds(run_dir: Path, repeats: int = 5) -> float:
    """Seconds of one jitted optimizer update + apply, as the run trained it, on its final params, optimizer
    state and a real gradient."""
    from bench.train_throughput import time_update
    from train.optim import make_optimizer, make_schedule
    from train.runtime import make_mesh
    cfg, params, opt_state, grads = restore_for_update(run_dir)
    return time_update(make_optimizer(cfg, make_schedule(cfg), make_mesh(cfg)), params, opt_state, grads, repeats)


def role_of(path) -> str:
    """'q_proj', 'embed_tokens', 'lm_head', ... from a parameter path."""
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    names = [n for n in names if n not in ("value", "kernel", "embedding", "scale")]
    return names[-1]


def svd_entropy(w: np.ndarray) -> np.ndarray:
    """Normalised SVD entropy of each matrix over the last two axes (Moonlight Sec. 3.3, after Alter et al.
    2000): H = −Σ pᵢ log pᵢ / log n with pᵢ = σᵢ² / Σ σⱼ², n = min(A, B); 1 = all directions used equally."""
    s = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)
    p = np.square(s) / np.square(s).sum(-1, keepdims=True)
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(-1) / math.log(s.shape[-1])


def matrix_entropies(params) -> dict[str, np.ndarray]:
    """Role → SVD entropy per layer (hidden matrices), or a 1-element array (embedding, head)."""
    out = {}
    for path, w in jax.tree_util.tree_flatten_with_path(params)[0]:
        if is_matrix(path, w):
            out[role_of(path)] = np.atleast_1d(svd_entropy(w))
    return out


def entropies_of(run_dir: Path) -> dict[str, np.ndarray]:
    """`matrix_entropies` of a run's final weights."""
    from flax import nnx

    from train.pretrained import load_run_dir
    model, _ = load_run_dir(run_dir)
    return matrix_entropies(nnx.state(model, nnx.Param))


def init_params(cfg):
    """The initial weights every run of this size starts from (same seed, same init)."""
    from flax import nnx

    from train.data import load_tokenizer
    from train.models import build_model
    from train.runtime import cache_dir, model_config_for
    model_cfg = model_config_for(cfg, load_tokenizer(cfg.data, cache_dir()))
    return nnx.state(build_model(model_cfg, rngs=nnx.Rngs(params=cfg.seed)), nnx.Param)


def weight_rms(run_dir: Path) -> float:
    """RMS over all hidden (Muon-routed) matrices of a run's final weights."""
    from flax import nnx

    import muon_jax
    from train.pretrained import load_run_dir
    params = nnx.state(load_run_dir(run_dir)[0], nnx.Param)
    mats = [w for w, l in zip(jax.tree.leaves(params), jax.tree.leaves(muon_jax.default_labels(params)))
            if l == "muon"]
    return math.sqrt(sum(float(jnp.sum(jnp.square(w))) for w in mats) / sum(w.size for w in mats))


def steps_to_reach(result: Result, target: float) -> float | None:
    """First step at which the validation curve reaches `target`, linearly interpolated between evals; None if
    it never does."""
    prev = (0, math.inf)
    for step, val in result.val:
        if val <= target:
            if not math.isfinite(prev[1]):
                return float(step)
            return prev[0] + (step - prev[0]) * (prev[1] - target) / (prev[1] - val)
        prev = (step, val)
    return None


def fit_power_law(compute, loss) -> tuple[float, float, float]:
    """(a, b, R²) of loss = a · C^(−b), least squares in log-log space."""
    x, y = np.log(compute), np.log(loss)
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    r2 = 1 - residual.var() / y.var() if y.var() > 0 else 1.0
    return float(math.exp(intercept)), float(-slope), float(r2)


# ------------------------------------------------------------------------------------------------- plots

def figure(ncols: int = 1, nrows: int = 1, width: float = 6.0, height: float = 4.0):
    """A matplotlib figure (Agg backend, no display) and its 2-D array of axes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), dpi=110, squeeze=False)
    return fig, axes


def save(fig, out: Path, name: str, caption: str) -> str:
    """Save a figure (caption = its config, as a footer) and return its markdown image line."""
    import matplotlib.pyplot as plt
    fig.text(0.01, 0.005, caption, fontsize=7, ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(out / name)
    plt.close(fig)
    return f"![{name}]({name})"


# ------------------------------------------------------------------------------------------------- sections

def fmt(x: float | None, digits: int = 3) -> str:
    """A table cell: 'diverged' for +inf (a diverged run's loss), '—' for a missing or undefined number."""
    return "diverged" if x == math.inf else "—" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def table(header: list[str], rows: list[list]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


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
    swept = plan.sizes[:plan.swept]
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
    swept = plan.sizes[:plan.swept]
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
            if not r.val:   # diverged before its first eval
                continue
            steps, vals = zip(*r.val)
            label = f"{LABEL[opt]} lr {r.spec.lr:g}"
            row_axes[0].plot(steps, vals, "-o", ms=3, color=COLOR[opt], label=label)
            row_axes[1].plot([r.flops_at(x) for x in steps], vals, "-o", ms=3, color=COLOR[opt], label=label)
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
        if not r.val:   # diverged before its first eval
            continue
        steps, vals = zip(*r.val)
        axes[0][0].plot(steps, vals, "-o", ms=3, label=f"weight decay {wd:g}")
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
    swept = plan.sizes[:plan.swept]
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
            r = bests[s, opt]
            if not r.val:   # diverged before its first eval
                continue
            steps, vals = zip(*r.val)
            ax.plot([r.flops_at(x) for x in steps], vals, "-", lw=0.8, alpha=0.5, color=COLOR[opt])
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
                     "swept" if s in plan.sizes[:plan.swept] else f"transferred ({a.spec.lr:g} / {m.spec.lr:g})",
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
    from bench.optimizer import ns_flops
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


def base_caption(plan: Plan) -> str:
    """The config every run of the plan shares, for figure footers."""
    extra = f" + {' '.join(plan.overrides)}" if plan.overrides else ""
    return f"configs/paper_base.yaml{extra}"


# ------------------------------------------------------------------------------------------------- main

def run_study(plan: Plan, out: Path, runs: Path, quick: bool) -> Path:
    """Run (or reuse) every run of the plan and write out/results.md and out/paper_*.png."""
    from bench.report import device_line
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    study = Study(plan, runs)
    swept = plan.sizes[:plan.swept]
    sweeps = {(s, o): study.sweep(s, o) for s in swept for o in OPTIMIZERS}
    bests = {k: best(v) for k, v in sweeps.items()}
    for s in plan.sizes[plan.swept:]:
        for o in OPTIMIZERS:
            bests[s, o] = study.run(Spec(s, o, bests[plan.main, o].spec.lr, plan.steps))
    noise: dict[str, float] = {}   # optimizer → largest |Δ final val| over the extra seeds
    for seed in plan.noise_seeds:
        for o in OPTIMIZERS:
            b = bests[plan.main, o]
            other = study.run(dataclasses.replace(b.spec, seed=seed))
            noise[o] = max(noise.get(o, 0.0), abs(other.final_val - b.final_val))
    sections = [
        section_update_rms(study, bests, out),
        section_sweeps(study, sweeps, bests, out),
        section_steps_to_target(study, bests, noise, out),
        section_weight_decay(study, bests, out),
        section_svd_entropy(study, bests, out),
        section_scaling(study, bests, out),
        section_optimizer_cost(study, bests),
    ]
    cfg = study.config(bests[plan.main, "muon"].spec)
    run_rows = [[r.spec.key, f"{r.params / 1e6:.2f}M", fmt(r.final_val), f"{r.tokens_per_s:.0f}", f"{r.seconds:.0f}"]
                for r in sorted(study.results.values(), key=lambda r: r.spec.key)]
    header = [
        "# Muon vs AdamW: Moonlight's claims at CPU scale",
        "",
        "Generated by `python -m bench.paper" + (" --quick" if quick else "") + "`; every number and every "
        "sentence that compares them below is computed from the runs. Claims checked: Liu et al. 2025, *Muon is "
        "Scalable for LLM Training* (arXiv 2502.16982).",
        "",
        *(["> **Quick mode**: a miniature of the pipeline with toy sizes and a handful of steps. Its numbers "
           "only show that the report is produced; they say nothing about the claims.", ""] if quick else []),
        f"Machine: {device_line()}. Study wall time: {time.perf_counter() - t0:.0f} s "
        f"({len(study.results)} runs; runs reused from an earlier invocation count their original time in the "
        "table at the end).",
        "",
        f"Common config: `{base_caption(plan)}` — bundled `medium` corpus (validation on held-out documents), "
        "4k byte-level BPE, Llama with head dim 32 and GQA (KV heads = heads/2), MLP 3·d, untied embeddings, "
        "cosine schedule, weight decay 0.1, gradient clip 1.0, seed 0, Newton–Schulz in float32. Model sizes: "
        + ", ".join(s.name for s in plan.sizes) + ".",
    ]
    doc = "\n\n".join(["\n".join(header), *sections, "## Runs\n\n" + table(
        ["run", "params", "final val loss", "tokens/s", "train s"], run_rows), limitations(plan, cfg)])
    path = out / "results.md"
    path.write_text(doc + "\n")
    print(f"[bench.paper] wrote {path} in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def limitations(plan: Plan, cfg) -> str:
    """What the study cannot show, from the plan and the shared config."""
    return "\n".join([
        "## Limitations",
        "",
        f"- Scale: {plan.sizes[0].name}…{plan.sizes[-1].name} models and {plan.steps} steps of "
        f"{cfg.global_batch}×{cfg.seq_len} tokens, against the paper's 0.4B–16B models and up to 5.7T tokens. The "
        f"{cfg.data.vocab_size}-token vocabulary makes the output head a large share of the compute at these widths.",
        "- One seed per configuration" + (" (plus the noise-floor reruns of section 3)" if plan.noise_seeds else "")
        + f"; the LR grid has a ×{plan.lr_grid[1] / plan.lr_grid[0]:g} spacing, so \"same best LR\" means within that "
        "factor.",
        "- Section 3 reads Muon's loss mid-schedule; section 6 fits final points at a fixed token budget, not "
        "compute-optimal runs.",
        "- Not reproduced yet: Muon pretraining + Muon SFT (the paper's 2×2 of optimizers). `python -m train.sft` "
        "can start from a pretraining run_dir with a fresh optimizer (`sft.init_from`); the study does not run it.",
    ])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.paper", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="minutes-long miniature of the pipeline (CI)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where results.md and the PNGs go")
    parser.add_argument("--runs", type=Path, default=None,
                        help="run directories (default runs/paper, or runs/paper-quick with --quick)")
    args = parser.parse_args(argv)
    runs = args.runs or ROOT / "runs" / ("paper-quick" if args.quick else "paper")
    if args.quick:
        # a quick run's 8-step trainings are compile-bound: XLA's cheapest CPU code generation halves compile
        # time (set before the first computation, when the backend reads XLA_FLAGS)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    # runs of one size share compiled programs (model init, eval step, optimizer init); a restarted study too
    jax.config.update("jax_compilation_cache_dir", str(runs / "jax-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    run_study(QUICK if args.quick else FULL, args.out, runs, args.quick)


if __name__ == "__main__":
    main()
