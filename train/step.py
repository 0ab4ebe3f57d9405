"""One optimizer step and one evaluation step, as pure functions of (state, batch) ready for `jax.jit`.

State is a plain dict `{step, params, opt_state, variables}` of nnx `State`s split from the model: `params` are the
`nnx.Param`s, `variables` the rest (e.g. the MoE balancing bias). A step whose loss or gradient norm is not finite
leaves the state unchanged (`metrics["finite"]` says so; the loop applies the NaN policy).

The step holds no T×T tensor of its own. With MuonClip on, it computes the per-head max attention logit blockwise
(train/models/attention.py:max_logit, O(T·block) memory). With MuonClip off it does no max-logit work at all: the
loop logs `max_attn_logit` only at logging steps, through `make_logit_probe` (the same blockwise computation, a
separate forward pass on the first micro-batch of that step's batch, with the updated params).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from train.config import Config
from train.models import update_balancing_bias
from train.models.attention import LOGIT_BLOCK
from train.models.qk_clip import attn_logit_metrics, qk_clip_params, qk_clip_stats

MAX_LOGIT = "max_attn_logit"  # the aux output that is a max over micro-batches (the others are sums)


def cross_entropy(logits, targets, mask, z_loss: float):
    """Mean token NLL over `mask` and the z-loss term `z_loss · mean(log Z²)`."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    nll = logz - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    denom = jnp.maximum(mask.sum(), 1.0)
    loss = (nll * mask).sum() / denom
    return loss, z_loss * (jnp.square(logz) * mask).sum() / denom


def is_moe(model_cfg) -> bool:
    """Whether the model has routed-expert layers (and so a balancing bias to update)."""
    return bool(getattr(model_cfg, "n_routed_experts", 0)) and model_cfg.num_moe_layers > 0


def make_loss_fn(graphdef, z_loss: float, max_logit_block: int | None = None):
    """loss(params, variables, batch) -> (loss + z-loss, (loss, aux)) for `jax.value_and_grad(has_aux=True)`;
    aux has the max attention logits only when `max_logit_block` is set."""
    def loss_fn(params, variables, batch):
        model = nnx.merge(graphdef, params, variables)
        logits, aux = model(batch["inputs"], batch["segment_ids"], batch["positions"], return_aux=True,
                            max_logit_block=max_logit_block)
        loss, z = cross_entropy(logits, batch["targets"], batch["loss_mask"], z_loss)
        return loss + z, (loss, aux)
    return loss_fn


def accumulate_gradients(grad_fn, params, variables, batch: dict, accum: int):
    """Mean gradients, loss and aux over `accum` micro-batches of `batch`, scanned so memory holds one of them."""
    micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

    def add(carry, mb):
        (_, (loss, aux)), grads = grad_fn(params, variables, mb)
        c_grads, c_loss, c_aux = carry
        c_aux = {k: jnp.maximum(c_aux[k], v) if k == MAX_LOGIT else c_aux[k] + v for k, v in aux.items()}
        return (jax.tree.map(jnp.add, c_grads, grads), c_loss + loss, c_aux), None

    (_, (loss0, aux0)), grads0 = jax.eval_shape(
        lambda: grad_fn(params, variables, jax.tree.map(lambda x: x[0], micro)))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grads0, loss0, aux0))
    if MAX_LOGIT in aux0:
        zeros[2][MAX_LOGIT] = jnp.full(aux0[MAX_LOGIT].shape, -jnp.inf, aux0[MAX_LOGIT].dtype)
    (grads, loss, aux), _ = jax.lax.scan(add, zeros, micro)
    grads, loss = jax.tree.map(lambda x: x / accum, (grads, loss))
    return grads, loss, {k: v if k == MAX_LOGIT else v / accum for k, v in aux.items()}


def update_rms(updates, labels, lr) -> dict:
    """Update RMS per label group ("muon", "adam"), relative to the LR (Moonlight: ≈ 0.2 for each)."""
    metrics = {}
    for group in ("muon", "adam"):
        leaves = [u for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(labels)) if g == group]
        if leaves:
            sq = sum(jnp.sum(jnp.square(u.astype(jnp.float32))) for u in leaves)
            metrics[f"update_rms_{group}"] = jnp.sqrt(sq / sum(u.size for u in leaves)) / jnp.maximum(lr, 1e-12)
    return metrics


def make_train_step(cfg: Config, graphdef, tx, schedule, labels, model_cfg, max_logit_block: int | None = None):
    """train_step(state, batch) -> (state, metrics): accumulate gradients, update, QK-clip, MoE bias, NaN guard.

    `max_logit_block`: query rows per block of the max-logit computation. None: `LOGIT_BLOCK` with MuonClip, no
    max-logit work without. Set, the metrics carry the max logit whatever MuonClip says; `seq_len` lowers the
    dense computation the step did before issue 16 (a [B, K, G, T, T] float32 tensor per layer)."""
    clip, moe = cfg.muon_clip, is_moe(model_cfg)
    if max_logit_block is None and clip.enabled:
        max_logit_block = LOGIT_BLOCK
    grad_fn = jax.value_and_grad(make_loss_fn(graphdef, cfg.optimizer.z_loss, max_logit_block), has_aux=True)

    def train_step(state, batch):
        params, variables = state["params"], state["variables"]
        grads, loss, aux = accumulate_gradients(grad_fn, params, variables, batch, cfg.grad_accum)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        if clip.enabled:
            new_params = qk_clip_params(new_params, aux[MAX_LOGIT], tau=clip.tau, config=model_cfg)
        new_variables = variables
        if moe:
            model = nnx.merge(graphdef, new_params, variables)
            update_balancing_bias(model, aux["expert_load"])
            new_variables = nnx.split(model, nnx.Param, ...)[2]

        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = {"step": state["step"] + 1, "params": keep(new_params, params),
                     "opt_state": keep(opt_state, state["opt_state"]), "variables": keep(new_variables, variables)}
        lr = schedule(state["step"])
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr, "finite": finite, **update_rms(updates, labels, lr)}
        if clip.enabled:
            metrics.update(qk_clip_stats(aux[MAX_LOGIT], clip.tau))
        elif MAX_LOGIT in aux:
            metrics.update(attn_logit_metrics(aux[MAX_LOGIT]))
        if moe:
            load = aux["expert_load"]
            metrics["expert_load_max_over_mean"] = (load.max(-1) / jnp.maximum(load.mean(-1), 1e-9)).max()
        return new_state, metrics

    return train_step


def make_eval_step(graphdef):
    """jitted eval_step(params, variables, batch) -> mean token NLL of the batch."""
    def eval_step(params, variables, batch):
        model = nnx.merge(graphdef, params, variables)
        logits = model(batch["inputs"], batch["segment_ids"], batch["positions"])
        return cross_entropy(logits, batch["targets"], batch["loss_mask"], 0.0)[0]
    return jax.jit(eval_step)


def make_logit_probe(graphdef, rows: int):
    """jitted probe(params, variables, batch) -> `attn_logit_metrics` of the first `rows` rows of `batch`: the
    max attention logit, blockwise, for runs whose step does not compute it (MuonClip off)."""
    def probe(params, variables, batch):
        model = nnx.merge(graphdef, params, variables)
        part = {k: batch[k][:rows] for k in ("inputs", "segment_ids", "positions")}
        _, aux = model(part["inputs"], part["segment_ids"], part["positions"], return_aux=True,
                       max_logit_block=LOGIT_BLOCK)
        return attn_logit_metrics(aux[MAX_LOGIT])
    return jax.jit(probe)
