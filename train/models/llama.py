"""Dense Llama / Qwen2 decoder: GQA attention with RoPE, SwiGLU, RMSNorm, layers stacked [L, ...]."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from train.models.attention import LOGIT_BLOCK
from train.models.model_config import LlamaConfig
from train.models.layers import (
    MLP,
    CausalLM,
    Linear,
    RMSNorm,
    apply_rope,
    attention,
    cached_attention,
    decode_stack,
    make_stack,
    rope_angles,
)


class LlamaAttention(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs):
        d, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        bias = config.attention_bias
        self.q_proj = Linear(d, self.num_heads * hd, ("embed", "heads"), config, rngs=rngs, bias=bias)
        self.k_proj = Linear(d, self.num_kv_heads * hd, ("embed", "kv_heads"), config, rngs=rngs, bias=bias)
        self.v_proj = Linear(d, self.num_kv_heads * hd, ("embed", "kv_heads"), config, rngs=rngs, bias=bias)
        self.o_proj = Linear(self.num_heads * hd, d, ("heads", "embed"), config, rngs=rngs, bias=config.o_proj_bias)

    def qkv(self, x, rope):
        """Per-head q [B, T, N, hd] and k, v [B, T, K, hd], with RoPE applied to q and k."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        return apply_rope(q, *rope), apply_rope(k, *rope), v

    def __call__(self, x, segment_ids, rope, with_aux, max_logit_block=LOGIT_BLOCK):
        b, t, _ = x.shape
        q, k, v = self.qkv(x, rope)
        out, max_logit = attention(q, k, v, segment_ids, self.head_dim ** -0.5,
                                   max_logit_block if with_aux else None)
        return self.o_proj(out.reshape(b, t, -1)), max_logit

    def decode(self, x, rope, cache, index):
        """x [B, T, D] at positions index.. index + T - 1: write its k/v into `cache` = (k, v) [B, S, K, hd] at
        `index`, attend over the cache; returns (output [B, T, D], updated cache)."""
        b, t, _ = x.shape
        q, k, v = self.qkv(x, rope)
        k_cache, v_cache = (jax.lax.dynamic_update_slice_in_dim(c, new.astype(c.dtype), index, axis=1)
                            for c, new in zip(cache, (k, v)))
        out = cached_attention(q, k_cache, v_cache, index, self.head_dim ** -0.5)
        return self.o_proj(out.reshape(b, t, -1)), (k_cache, v_cache)


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config)
        self.self_attn = LlamaAttention(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config)
        self.mlp = MLP(config, config.intermediate_size, rngs=rngs)

    def __call__(self, x, segment_ids, rope, with_aux, max_logit_block=LOGIT_BLOCK):
        h, max_logit = self.self_attn(self.input_layernorm(x), segment_ids, rope, with_aux, max_logit_block)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, ({"max_attn_logit": max_logit} if max_logit is not None else {})

    def decode(self, x, *, rope, cache, index):
        """One layer of the KV-cache path (see `Llama.decode`)."""
        h, cache = self.self_attn.decode(self.input_layernorm(x), rope, cache, index)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class Llama(CausalLM):
    """Llama / Qwen2 causal LM; `model(tokens, segment_ids=None, positions=None, return_aux=False)`, plus
    `init_cache` / `decode` for KV-cache generation (train/generate.py)."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self._init_io(config, rngs)
        self.rotary_dim = config.head_dim
        self.layers = make_stack(lambda r: LlamaDecoderLayer(config, rngs=r), config.num_hidden_layers, rngs)

    def stacks(self):
        return [self.layers]

    def init_cache(self, batch: int, max_len: int):
        """An empty KV cache (k, v), each [L, batch, max_len, num_kv_heads, head_dim] in the compute dtype."""
        c = self.config
        shape = (c.num_hidden_layers, batch, max_len, c.num_key_value_heads, c.head_dim)
        return jnp.zeros(shape, c.dtype), jnp.zeros(shape, c.dtype)

    def decode(self, tokens, cache, index):
        """Incremental forward for generation: tokens [B, T] sit at positions index .. index + T - 1 (index may be
        traced), all earlier positions are already in `cache` (from `init_cache`). Returns (logits [B, T, vocab]
        float32, updated cache). Prefill is a call with the prompt at index 0; a step is a call with T = 1.
        The cache size is fixed, so a jitted caller compiles once per (T, cache size); index + T must not
        exceed the cache size (dynamic_update_slice would clamp the write)."""
        positions = jnp.broadcast_to(index + jnp.arange(tokens.shape[1]), tokens.shape)
        rope = rope_angles(self.config, self.rotary_dim, positions)
        x, cache = decode_stack(self.layers, self.embed_tokens(tokens), tuple(cache), rope=rope, index=index)
        return self.output_logits(x), cache
