"""DeepSeek-V3 / Moonlight: multi-head latent attention (MLA) and a sigmoid-routed MoE with shared experts.

The first `first_k_dense_replace` layers use a dense SwiGLU and form one stack (`dense_layers`); the rest form
the MoE stack (`moe_layers`), so each stack scans one compiled body.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from train.models.attention import LOGIT_BLOCK
from train.models.model_config import DeepseekV3Config
from train.models.rope import yarn_mscale
from train.models.layers import (MLP, CausalLM, Linear, RMSNorm, apply_rope, attention, cache_mask, decode_stack,
                                 make_stack, param, rope_angles)


class ExpertBias(nnx.Variable):
    """The auxiliary-loss-free balancing bias: used for expert selection only, updated outside the gradient.

    Not an `nnx.Param`, so optimizers and `nnx.grad(..., wrt=nnx.Param)` never touch it."""


def softmax_mscale(config: DeepseekV3Config) -> float:
    """DeepSeek-V3's extra softmax temperature under scaled rope: mscale(factor, mscale_all_dim)**2 (1 without
    mscale_all_dim), applied to the logits scale whenever a rope scaling is configured, as transformers does."""
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type", "default") == "default" or not scaling.get("mscale_all_dim"):
        return 1.0
    return yarn_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2


class MLAttention(nnx.Module):
    """Multi-head latent attention: keys/values are expanded from a `kv_lora_rank` latent (+ one shared RoPE key)."""

    def __init__(self, config: DeepseekV3Config, *, rngs):
        c, d, h = config, config.hidden_size, config.num_attention_heads
        self.num_heads, self.nope_dim, self.rope_dim = h, c.qk_nope_head_dim, c.qk_rope_head_dim
        self.v_dim = c.v_head_dim
        self.kv_lora_rank, self.interleave = c.kv_lora_rank, c.rope_interleave
        bias = c.attention_bias
        if c.q_lora_rank is None:
            self.q_proj = Linear(d, h * c.qk_head_dim, ("embed", "heads"), c, rngs=rngs)
        else:
            self.q_proj = None
            self.q_a_proj = Linear(d, c.q_lora_rank, ("embed", "q_lora"), c, rngs=rngs, bias=bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c, eps=1e-6)  # transformers uses the default eps here
            self.q_b_proj = Linear(c.q_lora_rank, h * c.qk_head_dim, ("q_lora", "heads"), c, rngs=rngs)
        self.kv_a_proj_with_mqa = Linear(d, c.kv_lora_rank + c.qk_rope_head_dim, ("embed", "kv_lora"), c,
                                         rngs=rngs, bias=bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c, eps=1e-6)
        self.kv_b_proj = Linear(c.kv_lora_rank, h * (c.qk_nope_head_dim + c.v_head_dim), ("kv_lora", "heads"), c,
                                rngs=rngs)
        self.o_proj = Linear(h * c.v_head_dim, d, ("heads", "embed"), c, rngs=rngs, bias=bias)
        self.scale = c.qk_head_dim ** -0.5 * softmax_mscale(c)

    def queries(self, x, rope):
        """(q_nope [B, T, H, nope], q_rot [B, T, H, rope] with RoPE applied)."""
        b, t, _ = x.shape
        q = self.q_proj(x) if self.q_proj is not None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rot = jnp.split(q.reshape(b, t, self.num_heads, -1), [self.nope_dim], axis=-1)
        return q_nope, apply_rope(q_rot, *rope, interleaved=self.interleave)

    def latent(self, x, rope):
        """What MLA caches per position: the normalised latent c_kv [B, T, kv_lora_rank] and the shared rope key
        [B, T, rope] (RoPE applied)."""
        latent, k_rot = jnp.split(self.kv_a_proj_with_mqa(x), [self.kv_lora_rank], axis=-1)
        k_rot = apply_rope(k_rot[:, :, None, :], *rope, interleaved=self.interleave)[:, :, 0]
        return self.kv_a_layernorm(latent), k_rot

    def __call__(self, x, segment_ids, rope, with_aux, max_logit_block=LOGIT_BLOCK):
        b, t, _ = x.shape
        h = self.num_heads
        q_nope, q_rot = self.queries(x, rope)
        c_kv, k_rot = self.latent(x, rope)
        k_nope, v = jnp.split(self.kv_b_proj(c_kv).reshape(b, t, h, self.nope_dim + self.v_dim), [self.nope_dim],
                              axis=-1)
        q = jnp.concatenate([q_nope, q_rot], axis=-1)
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rot[:, :, None], (b, t, h, self.rope_dim))], axis=-1)
        out, max_logit = attention(q, k, v, segment_ids, self.scale, max_logit_block if with_aux else None)
        return self.o_proj(out.reshape(b, t, -1)), max_logit

    def decode(self, x, rope, cache, index):
        """x [B, T, D] at positions index.. index + T - 1 with a latent cache (c_kv [B, S, r], k_rot [B, S, rope]):
        writes this x's latents at `index`, attends over the cache; returns (output [B, T, D], updated cache).

        Keys and values are never expanded per head: kv_b_proj's key half is absorbed into the queries (scores
        against c_kv directly) and its value half is applied after the weighted sum of c_kv, as DeepSeek-V2/V3
        inference does, so a step costs O(S * H * r) instead of re-projecting every cached position."""
        b, t, _ = x.shape
        q_nope, q_rot = self.queries(x, rope)
        c_cache, r_cache = (jax.lax.dynamic_update_slice_in_dim(c, new.astype(c.dtype), index, axis=1)
                            for c, new in zip(cache, self.latent(x, rope)))
        dtype = c_cache.dtype
        w = self.kv_b_proj.kernel[...].astype(dtype).reshape(self.kv_lora_rank, self.num_heads, -1)
        w_k, w_v = jnp.split(w, [self.nope_dim], axis=-1)
        q_latent = jnp.einsum("bthd,rhd->bthr", q_nope.astype(dtype), w_k)
        logits = (jnp.einsum("bthr,bsr->bhts", q_latent, c_cache, preferred_element_type=jnp.float32)
                  + jnp.einsum("bthd,bsd->bhts", q_rot.astype(dtype), r_cache, preferred_element_type=jnp.float32))
        logits = jnp.where(cache_mask(t, c_cache.shape[1], index)[None, None], logits * self.scale, -jnp.inf)
        probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
        out = jnp.einsum("bthr,rhd->bthd", jnp.einsum("bhts,bsr->bthr", probs, c_cache), w_v)
        return self.o_proj(out.reshape(b, t, -1)), (c_cache, r_cache)


class Router(nnx.Module):
    """Sigmoid scores; group-limited top-k on score + correction bias; weights from the unbiased scores.

    Kept in float32 whatever the param dtype (as transformers does), since routing decisions are discrete.
    """

    def __init__(self, config: DeepseekV3Config, *, rngs):
        e = config.n_routed_experts
        self.kernel = param(rngs, (config.hidden_size, e), ("embed", None), jnp.float32,
                            stddev=config.initializer_range)
        self.e_score_correction_bias = ExpertBias(jnp.zeros((e,), jnp.float32), out_sharding=(None,),
                                                  eager_sharding=False)
        self.top_k, self.n_group, self.topk_group = config.num_experts_per_tok, config.n_group, config.topk_group
        self.norm_topk_prob, self.scaling = config.norm_topk_prob, config.routed_scaling_factor

    def __call__(self, x):
        """x [N, D] -> (expert indices [N, k] int32, weights [N, k] float32)."""
        scores = jax.nn.sigmoid(x.astype(jnp.float32) @ self.kernel[...])
        choice = scores + self.e_score_correction_bias[...]
        if self.topk_group < self.n_group:  # keep the experts of the topk_group best groups (top-2 sum each)
            n, e = choice.shape
            grouped = choice.reshape(n, self.n_group, e // self.n_group)
            group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)
            best = jax.lax.top_k(group_scores, self.topk_group)[1]
            keep = jnp.zeros((n, self.n_group), bool).at[jnp.arange(n)[:, None], best].set(True)
            choice = jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(n, e)
        idx = jax.lax.top_k(choice, self.top_k)[1]
        weights = jnp.take_along_axis(scores, idx, axis=-1)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
        return idx, weights * self.scaling


class Experts(nnx.Module):
    """Routed SwiGLU experts stacked [E, in, out] (each expert one matrix for Muon)."""

    def __init__(self, config: DeepseekV3Config, *, rngs):
        e, d, f = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        p = lambda shape, axes: param(rngs, shape, axes, config.param_dtype, stddev=config.initializer_range)
        self.gate_proj = p((e, d, f), ("expert", "embed", "mlp"))
        self.up_proj = p((e, d, f), ("expert", "embed", "mlp"))
        self.down_proj = p((e, f, d), ("expert", "mlp", "embed"))
        self.dtype = jnp.dtype(config.dtype)

    def __call__(self, x_sorted, group_sizes):
        """Grouped SwiGLU over rows sorted by expert; rows past sum(group_sizes) come out zero."""
        w = lambda v: v[...].astype(self.dtype)
        x_sorted = x_sorted.astype(self.dtype)
        h = jax.nn.silu(jax.lax.ragged_dot(x_sorted, w(self.gate_proj), group_sizes)) * jax.lax.ragged_dot(
            x_sorted, w(self.up_proj), group_sizes)
        return jax.lax.ragged_dot(h, w(self.down_proj), group_sizes)


def dispatch(x, idx, weights, experts: Experts, num_experts: int, capacity: int | None):
    """Sort token-slots by expert, run the experts as one grouped matmul, scatter weighted outputs back.

    x [N, D], idx/weights [N, k]. Memory is O(N k D), never O(N E D). With a `capacity`, each expert keeps its
    first `capacity` slots in token order; the rest are dropped (moved past the groups, so they compute to 0).
    Returns (y [N, D], slots per expert [E] before dropping, dropped slot count).
    """
    n, k = idx.shape
    flat_expert = idx.reshape(-1)
    order = jnp.argsort(flat_expert, stable=True)
    counts = jnp.bincount(flat_expert, length=num_experts)
    group_sizes, dropped = counts, jnp.zeros((), jnp.int32)
    if capacity is not None:
        sorted_expert = flat_expert[order]
        rank = jnp.arange(n * k) - (jnp.cumsum(counts) - counts)[sorted_expert]
        order = order[jnp.argsort(jnp.where(rank < capacity, sorted_expert, num_experts), stable=True)]
        group_sizes = jnp.minimum(counts, capacity)
        dropped = n * k - group_sizes.sum()
    token = order // k
    out = experts(x[token], group_sizes.astype(jnp.int32))
    out = out * weights.reshape(-1)[order][:, None].astype(out.dtype)
    return jnp.zeros_like(x, out.dtype).at[token].add(out), counts, dropped


class MoE(nnx.Module):
    """Routed experts (top-k of n_routed_experts) plus always-on shared experts."""

    def __init__(self, config: DeepseekV3Config, *, rngs):
        self.gate = Router(config, rngs=rngs)
        self.experts = Experts(config, rngs=rngs)
        self.shared_experts = (MLP(config, config.moe_intermediate_size * config.n_shared_experts, rngs=rngs)
                               if config.n_shared_experts else None)
        self.num_experts, self.top_k, self.capacity_factor = (config.n_routed_experts, config.num_experts_per_tok,
                                                              config.capacity_factor)

    def __call__(self, x):
        """x [B, T, D] -> (y [B, T, D], aux with expert_load [E] and, with a capacity, dropped_tokens)."""
        flat = x.reshape(-1, x.shape[-1])
        idx, weights = self.gate(flat)
        capacity = None if self.capacity_factor is None else math.ceil(
            self.capacity_factor * flat.shape[0] * self.top_k / self.num_experts)
        y, counts, dropped = dispatch(flat, idx, weights, self.experts, self.num_experts, capacity)
        y = y.reshape(x.shape).astype(x.dtype)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        aux = {"expert_load": counts.astype(jnp.float32) / idx.size}
        if capacity is not None:
            aux["dropped_tokens"] = dropped.astype(jnp.float32)
        return y, aux


class DeepseekV3DecoderLayer(nnx.Module):
    def __init__(self, config: DeepseekV3Config, moe: bool, *, rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config)
        self.self_attn = MLAttention(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config)
        self.mlp = MoE(config, rngs=rngs) if moe else MLP(config, config.intermediate_size, rngs=rngs)

    def __call__(self, x, segment_ids, rope, with_aux, max_logit_block=LOGIT_BLOCK):
        h, max_logit = self.self_attn(self.input_layernorm(x), segment_ids, rope, with_aux, max_logit_block)
        x, moe_aux = self.feed_forward(x + h)
        aux = {"max_attn_logit": max_logit} if max_logit is not None else {}
        return x, ({**aux, **moe_aux} if with_aux else {})

    def feed_forward(self, x):
        """x + mlp(post_attention_layernorm(x)), and the MoE's aux ({} for a dense layer)."""
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            h, aux = self.mlp(h)
            return x + h, aux
        return x + self.mlp(h), {}

    def decode(self, x, *, rope, cache, index):
        """One layer of the latent-cache path (see `DeepseekV3.decode`)."""
        h, cache = self.self_attn.decode(self.input_layernorm(x), rope, cache, index)
        return self.feed_forward(x + h)[0], cache


class DeepseekV3(CausalLM):
    """DeepSeek-V3 / Moonlight causal LM; `model(tokens, segment_ids=None, positions=None, return_aux=False)`."""

    def __init__(self, config: DeepseekV3Config, *, rngs: nnx.Rngs):
        self._init_io(config, rngs)
        self.rotary_dim = config.qk_rope_head_dim
        layer = lambda moe: (lambda r: DeepseekV3DecoderLayer(config, moe, rngs=r))
        k = config.first_k_dense_replace
        self.dense_layers = make_stack(layer(False), k, rngs) if k else None
        self.moe_layers = make_stack(layer(True), config.num_moe_layers, rngs) if config.num_moe_layers else None

    def stacks(self):
        return [s for s in (self.dense_layers, self.moe_layers) if s is not None]

    def init_cache(self, batch: int, max_len: int):
        """An empty latent cache: per stack, (c_kv [L, batch, max_len, kv_lora_rank], k_rot [L, batch, max_len,
        qk_rope_head_dim]) in the compute dtype: (kv_lora_rank + rope) numbers per position and layer, against
        2 * heads * head_dim for an expanded KV cache."""
        c = self.config
        return tuple((jnp.zeros((n, batch, max_len, c.kv_lora_rank), c.dtype),
                      jnp.zeros((n, batch, max_len, c.qk_rope_head_dim), c.dtype))
                     for n in (c.first_k_dense_replace, c.num_moe_layers) if n)

    def decode(self, tokens, cache, index):
        """Incremental forward for generation, as `Llama.decode`: tokens [B, T] at positions index .. index + T - 1
        over a cache from `init_cache`; returns (logits [B, T, vocab] float32, updated cache)."""
        positions = jnp.broadcast_to(index + jnp.arange(tokens.shape[1]), tokens.shape)
        rope = rope_angles(self.config, self.rotary_dim, positions)
        x, new_cache = self.embed_tokens(tokens), []
        for stack, stack_cache in zip(self.stacks(), cache):
            x, stack_cache = decode_stack(stack, x, stack_cache, rope=rope, index=index)
            new_cache.append(stack_cache)
        return self.output_logits(x), tuple(new_cache)


def update_balancing_bias(model: DeepseekV3, expert_load, rate: float | None = None) -> None:
    """Auxiliary-loss-free balancing, in place: bias_e += rate * sign(mean_load - load_e) per MoE layer.

    expert_load [num_moe_layers, E] is `aux["expert_load"]` (averaged over steps/micro-batches if you like);
    rate defaults to the config's `balance_rate`. Overloaded experts become less likely to be selected.
    """
    if getattr(model, "moe_layers", None) is None:
        raise ValueError("update_balancing_bias needs a model with MoE layers (DeepseekV3 with n_routed_experts)")
    rate = model.config.balance_rate if rate is None else rate
    bias = model.moe_layers.mlp.gate.e_score_correction_bias
    load = jnp.asarray(expert_load, jnp.float32)
    if load.shape != bias.shape:
        raise ValueError(f"expert_load has shape {load.shape}; expected [num_moe_layers, E] = {bias.shape}")
    bias[...] = bias[...] + rate * jnp.sign(load.mean(-1, keepdims=True) - load)
