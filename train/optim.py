"""The learning-rate schedule and the optimizer of a run (muon_jax.muon or optax.adamw), from its config."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import muon_jax
from train.config import Config


def make_schedule(cfg: Config) -> optax.Schedule:
    """Linear warmup, then cosine decay, constant, or warmup-stable-decay (wsd) over `cfg.steps`."""
    s, peak, steps = cfg.schedule, cfg.optimizer.learning_rate, cfg.steps
    warmup = max(1, min(s.warmup_steps, steps - 1))
    final = peak * s.final_fraction
    ramp = optax.linear_schedule(0.0, peak, warmup)
    if s.name == "cosine":  # decay_steps > warmup even for a 1-step run
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(steps, warmup + 1), final)
    if s.name == "constant":
        return optax.join_schedules([ramp, optax.constant_schedule(peak)], [warmup])
    decay = max(1, int(steps * s.decay_fraction))  # wsd: warmup, stable, linear decay over the last steps
    return optax.join_schedules([ramp, optax.constant_schedule(peak), optax.linear_schedule(peak, final, decay)],
                                [warmup, steps - decay])


def make_optimizer(cfg: Config, schedule, mesh: jax.sharding.Mesh | None, param_specs=None,
                   routing: muon_jax.Routing | None = None) -> optax.GradientTransformation:
    """The configured optimizer, after global-norm clipping when `optimizer.grad_clip` > 0. `param_specs`: the
    parameters' PartitionSpecs (a pytree like them), which let distributed Muon skip XLA's reshards. `routing`:
    Muon's labels and matrix axes (`muon_jax.infer_routing`; None: `muon_jax.default_labels`)."""
    o = cfg.optimizer
    if o.name == "adamw":
        # decay on every leaf, as muon_jax.muon does for its Adam branch, so the two compare like for like
        tx = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    else:
        tx = muon_jax.muon(schedule, momentum=o.momentum, nesterov=o.nesterov, ns_coeffs=o.ns_coeffs,
                           ns_steps=o.ns_steps, ns_dtype=jnp.dtype(o.ns_dtype), lr_scale=o.lr_scale,
                           ns_method=o.ns_method, ns_mode=o.ns_mode, weight_decay=o.weight_decay, adam_b1=o.b1,
                           adam_b2=o.b2, adam_eps=o.eps, **routing_args(routing),
                           **distributed_muon_args(cfg, mesh, param_specs))
    return optax.chain(optax.clip_by_global_norm(o.grad_clip), tx) if o.grad_clip > 0 else tx


def routing_args(routing: muon_jax.Routing | None) -> dict:
    """muon's `labels` and `matrix_axes` from a routing (none: its defaults)."""
    return {} if routing is None else {"labels": routing.labels, "matrix_axes": routing.matrix_axes}


def distributed_muon_args(cfg: Config, mesh: jax.sharding.Mesh | None, param_specs=None) -> dict:
    """Spread Newton–Schulz over every mesh axis of more than one device (data, fsdp, expert, tensor): each
    matrix is orthogonalised whole by one device, wherever its pieces lie. No mesh: single-device Muon."""
    axes = () if mesh is None else tuple(a for a in mesh.axis_names if mesh.shape[a] > 1)
    if not axes:
        return {}
    return {"mesh": mesh, "ns_axis": axes, "param_specs": param_specs}
