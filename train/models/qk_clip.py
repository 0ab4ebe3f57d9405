"""QK-Clip, the weight rescaling of MuonClip (Kimi K2, arXiv 2507.20534, section 2.1).

After each optimizer step, every attention head h whose max pre-softmax logit S_h (over the step's batch)
exceeded the threshold tau gets gamma_h = tau / S_h folded into its query/key weights, so that the same inputs
would now give a max logit of exactly tau; heads at or below tau keep bit-identical weights. Logits are
bilinear in (q, k), so scaling q by a and k by b scales head h's logits by a * b: we make a * b = gamma_h.

    params = nnx.state(model, nnx.Param)
    logits, aux = model(tokens, return_aux=True)        # aux["max_attn_logit"]: [num_layers, num_heads]
    ... optimizer step on params ...
    params = qk_clip_params(params, aux["max_attn_logit"], tau=100.0, config=model.config)   # jit-friendly
    metrics.update(qk_clip_stats(aux["max_attn_logit"], tau=100.0))

How gamma_h is split between q and k:

* MLA (DeepSeek-V3 / Kimi K2), as in the paper: the per-head non-rotary parts q^C (q_proj or q_b_proj
  columns) and k^C (the key half of kv_b_proj's columns) by sqrt(gamma_h) each, the per-head rotary query q^R
  by gamma_h, and the rotary key k^R (from kv_a_proj_with_mqa) untouched, because it is shared by all heads and
  scaling it would also shrink heads that never exceeded tau. The value half of kv_b_proj is never touched.
* MHA: q_h and k_h by sqrt(gamma_h) each, the paper's rule (alpha = 1/2).
* GQA, where the G query heads of a group share one key head: the paper's principle for the shared k^R
  applied to the shared key head. The key head g is scaled by sqrt(max_{h in g} gamma_h) and each query head
  by gamma_h / sqrt(max_{h in g} gamma_h). Every head's logits are then scaled by exactly gamma_h (so each
  clipped head's new max is tau and no head is over-clipped); the key moves only when every head of its group
  exceeded tau (otherwise max gamma = 1), so heads at or below tau keep bit-identical q and k; and for G = 1 it is
  the MHA rule. Scaling the key by sqrt(min gamma) instead would over-clip the group's other heads and change
  the keys of heads that never exceeded tau.

Qwen2-style q/k biases are scaled with their weights (q = x W + b, so both carry the factor). The bound holds
for the inputs the max logits were measured on: a head's new max logit on that batch, given the same layer
input, is min(S_h, tau) (`qk_clip_stats`). Clipping an earlier layer changes later layers' inputs, as in K2.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from train.models import DeepseekV3Config, LlamaConfig


def clip_factors(max_logits, tau: float):
    """gamma = tau / S where S > tau, else exactly 1 (float32, shape of max_logits)."""
    s = jnp.asarray(max_logits, jnp.float32)
    return jnp.where(s > tau, tau / jnp.where(s > tau, s, 1.0), 1.0)


def attn_logit_metrics(max_logits) -> dict:
    """The step's max attention logit, overall and per layer, from max_logits [num_layers, num_heads]."""
    s = jnp.asarray(max_logits, jnp.float32)
    per_layer = s.max(-1)
    return {"max_attn_logit": per_layer.max(), "max_attn_logit_per_layer": per_layer}


def qk_clip_stats(max_logits, tau: float) -> dict:
    """`attn_logit_metrics` plus the bound after clipping (min(S_h, tau): a clipped head's max logit on the same
    layer input, overall and per layer) and the fraction of (layer, head) pairs that were clipped."""
    s = jnp.asarray(max_logits, jnp.float32)
    after = attn_logit_metrics(jnp.minimum(s, tau))
    return {**attn_logit_metrics(s), "max_attn_logit_after_clip": after["max_attn_logit"],
            "max_attn_logit_per_layer_after_clip": after["max_attn_logit_per_layer"],
            "qk_clip_fraction": (s > tau).mean()}


def _column_scales(gamma, config):
    """Per-output-column factors {(module, leaf kind): [L, out]} for one stack, from its gamma [L, H]."""
    num_layers, h = gamma.shape
    root = jnp.sqrt(gamma)
    if isinstance(config, DeepseekV3Config):
        nope, rope, v = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        per_head = lambda parts: jnp.concatenate(
            [jnp.broadcast_to(f[..., None], (num_layers, h, width)) for f, width in parts], -1).reshape(num_layers, -1)
        q = per_head([(root, nope), (gamma, rope)])
        kv_b = per_head([(root, nope), (jnp.ones_like(gamma), v)])
        return {"q_proj": q, "q_b_proj": q, "kv_b_proj": kv_b}
    groups = h // config.num_key_value_heads
    k_head = jnp.sqrt(gamma.reshape(num_layers, -1, groups).max(-1))   # [L, K]
    q_head = gamma / jnp.repeat(k_head, groups, axis=-1)                # [L, H]
    return {"q_proj": jnp.repeat(q_head, config.head_dim, axis=-1), "k_proj": jnp.repeat(k_head, config.head_dim, -1)}


def _stack_sizes(config):
    """The model's layer stacks in the order their rows appear in aux["max_attn_logit"]."""
    if isinstance(config, DeepseekV3Config):
        return {"dense_layers": config.first_k_dense_replace, "moe_layers": config.num_moe_layers}
    if isinstance(config, LlamaConfig):
        return {"layers": config.num_hidden_layers}
    raise TypeError(f"qk_clip supports LlamaConfig and DeepseekV3Config, not {type(config).__name__}")


def qk_clip_params(params, max_logits, *, tau: float, config):
    """Return params with QK-Clip applied (a pure function: use it inside the jitted train step).

    params: `nnx.state(model, nnx.Param)` (or its pure dict) with layer-stacked [L, ...] weights; max_logits:
    [num_layers, num_heads], `aux["max_attn_logit"]` of the step's forward pass; config: the model config.
    Every leaf other than the per-head q/k kernels and biases is returned as is.
    """
    max_logits = jnp.asarray(max_logits)
    sizes = _stack_sizes(config)
    if max_logits.shape != (sum(sizes.values()), config.num_attention_heads):
        raise ValueError(f"max_logits has shape {max_logits.shape}; expected [num_layers, num_heads] = "
                         f"{(sum(sizes.values()), config.num_attention_heads)}")
    gamma, start, scales = clip_factors(max_logits, tau), 0, {}
    for stack, n in sizes.items():
        if n:
            scales[stack] = _column_scales(gamma[start:start + n], config)
        start += n

    def clip(path, w):
        # e.g. layers/self_attn/q_proj/kernel; an nnx.State path also ends in the Variable's `.value` attribute
        names = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
        if len(names) != 4 or names[1] != "self_attn" or names[2] not in scales.get(names[0], {}):
            return w
        s = scales[names[0]][names[2]]  # [L, out]; kernels are [L, in, out], biases [L, out]
        s = s[:, None, :] if names[3] == "kernel" else s
        return (w.astype(jnp.float32) * s).astype(w.dtype)  # factor 1 leaves w bit-identical

    return jax.tree_util.tree_map_with_path(clip, params)


def qk_clip(model: nnx.Module, max_logits, *, tau: float) -> dict:
    """In place on an nnx model (eager use, e.g. after `nnx.Optimizer.update`); returns `qk_clip_stats`."""
    params = nnx.state(model, nnx.Param)
    nnx.update(model, qk_clip_params(params, max_logits, tau=tau, config=model.config))
    return qk_clip_stats(max_logits, tau)
