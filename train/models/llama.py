"""Dense Llama / Qwen2 decoder: GQA attention with RoPE, SwiGLU, RMSNorm, layers stacked [L, ...]."""
from __future__ import annotations

from flax import nnx

from train.models.config import LlamaConfig
from train.models.layers import MLP, CausalLM, Linear, RMSNorm, apply_rope, attention, make_stack


class LlamaAttention(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs):
        d, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        bias = config.attention_bias
        self.q_proj = Linear(d, self.num_heads * hd, ("embed", "heads"), config, rngs=rngs, bias=bias)
        self.k_proj = Linear(d, self.num_kv_heads * hd, ("embed", "kv_heads"), config, rngs=rngs, bias=bias)
        self.v_proj = Linear(d, self.num_kv_heads * hd, ("embed", "kv_heads"), config, rngs=rngs, bias=bias)
        self.o_proj = Linear(self.num_heads * hd, d, ("heads", "embed"), config, rngs=rngs, bias=config.o_proj_bias)

    def __call__(self, x, segment_ids, rope, with_aux):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out, max_logit = attention(q, k, v, segment_ids, self.head_dim ** -0.5, with_aux)
        return self.o_proj(out.reshape(b, t, -1)), max_logit


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config)
        self.self_attn = LlamaAttention(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config)
        self.mlp = MLP(config, config.intermediate_size, rngs=rngs)

    def __call__(self, x, segment_ids, rope, with_aux):
        h, max_logit = self.self_attn(self.input_layernorm(x), segment_ids, rope, with_aux)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, ({"max_attn_logit": max_logit} if with_aux else {})


class Llama(CausalLM):
    """Llama / Qwen2 causal LM; `model(tokens, segment_ids=None, positions=None, return_aux=False)`."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self._init_io(config, rngs)
        self.rotary_dim = config.head_dim
        self.layers = make_stack(lambda r: LlamaDecoderLayer(config, rngs=r), config.num_hidden_layers, rngs)

    def stacks(self):
        return [self.layers]
