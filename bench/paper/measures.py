"""What the report measures on finished runs beyond their metrics: the next update from a restored optimizer
state, its cost, SVD entropy and RMS of the weights, and fits to the validation curves.

Every restore goes through the trainer's own path: `train.checkpoint.Checkpointer.restore` into the abstract
model of `train.models.abstract_model`, or `train.pretrained.load_run_dir` for the weights alone."""
from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import muon_jax
from bench.paper.runs import Result
from bench.train_throughput import time_update
from train import data as data_lib
from train.checkpoint import Checkpointer
from train.config import load_config
from train.models import abstract_model, build_model
from train.optim import make_optimizer, make_schedule
from train.pretrained import load_run_dir
from train.runtime import cache_dir, make_mesh, model_config_for
from train.step import cross_entropy


@functools.lru_cache(maxsize=None)
def restore_for_update(run_dir: Path):
    """(cfg, params, opt_state, grads) of a finished run: its last checkpoint's parameters and optimizer state,
    and the gradient of the batch the trainer would have taken next (data iterator restored exactly)."""
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


def role_of(path) -> str:
    """'q_proj', 'embed_tokens', 'lm_head', ... from a parameter path."""
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    names = [n for n in names if n not in ("value", "kernel", "embedding", "scale")]
    return names[-1]


def update_rms_by_shape(run_dir: Path, lr_scale: str | None = None) -> dict[tuple[int, int], dict]:
    """RMS of the next update per matrix shape [A, B] of a finished run, at LR 1 and without weight decay (so it
    is the update direction the paper's Lemma 1 is about), from the run's own optimizer state. `lr_scale`
    replaces Muon's shape scaling (the momentum state does not depend on it). Each entry: rms, roles, branch."""
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
    cfg, params, opt_state, grads = restore_for_update(run_dir)
    return time_update(make_optimizer(cfg, make_schedule(cfg), make_mesh(cfg)), params, opt_state, grads, repeats)


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


def final_params(run_dir: Path):
    """The parameters of a run's last checkpoint."""
    return nnx.state(load_run_dir(run_dir)[0], nnx.Param)


def entropies_of(run_dir: Path) -> dict[str, np.ndarray]:
    """`matrix_entropies` of a run's final weights."""
    return matrix_entropies(final_params(run_dir))


def init_params(cfg):
    """The initial weights every run of this size starts from (same seed, same init)."""
    model_cfg = model_config_for(cfg, data_lib.load_tokenizer(cfg.data, cache_dir()))
    return nnx.state(build_model(model_cfg, rngs=nnx.Rngs(params=cfg.seed)), nnx.Param)


def weight_rms(run_dir: Path) -> float:
    """RMS over all hidden (Muon-routed) matrices of a run's final weights."""
    params = final_params(run_dir)
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
