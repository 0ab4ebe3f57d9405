"""Building blocks shared by the dense and MoE families: params with logical axes, norms, RoPE, attention,
SwiGLU, and the scan over a stack of identical layers.

Module and attribute names follow the Hugging Face module tree (`self_attn.q_proj`, `mlp.gate_proj`, ...) so the
checkpoint mapping in `train/hf.py` is mechanical. Kernels are stored `[in, out]` (the transpose of torch).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from train.models.attention import LOGIT_BLOCK, attention_path, fused_attention, max_logit
from train.models.rope import rope_attention_factor, rope_inv_freq


def param(rngs: nnx.Rngs | None, shape, axes, dtype, init="normal", stddev=0.02) -> nnx.Param:
    """An nnx.Param with logical axis names; init is 'normal' (stddev), 'ones' or 'zeros'."""
    if init == "normal":
        value = stddev * jax.random.normal(rngs.params(), shape, dtype)
    else:
        value = (jnp.ones if init == "ones" else jnp.zeros)(shape, dtype)
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel [in, out] in param_dtype, computed in the config's dtype."""

    def __init__(self, d_in, d_out, axes, config, *, rngs, bias=False):
        self.dtype = jnp.dtype(config.dtype)
        self.kernel = param(rngs, (d_in, d_out), axes, config.param_dtype, stddev=config.initializer_range)
        self.bias = param(None, (d_out,), axes[1:], config.param_dtype, init="zeros") if bias else None

    def __call__(self, x):
        y = x.astype(self.dtype) @ self.kernel[...].astype(self.dtype)
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32 (as transformers does), scaled after casting back to the compute dtype."""

    def __init__(self, dim, config, eps=None):
        self.eps = config.rms_norm_eps if eps is None else eps
        self.dtype = jnp.dtype(config.dtype)
        self.scale = param(None, (dim,), ("norm",), config.param_dtype, init="ones")

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * x32.astype(self.dtype)


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config, width, *, rngs):
        d = config.hidden_size
        self.gate_proj = Linear(d, width, ("embed", "mlp"), config, rngs=rngs)
        self.up_proj = Linear(d, width, ("embed", "mlp"), config, rngs=rngs)
        self.down_proj = Linear(width, d, ("mlp", "embed"), config, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


def segment_positions(segment_ids):
    """Positions that restart at 0 at every segment boundary of packed rows [B, T]."""
    t = jnp.arange(segment_ids.shape[-1])
    is_start = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                                segment_ids[:, 1:] != segment_ids[:, :-1]], axis=-1)
    return t - jax.lax.cummax(jnp.where(is_start, t, 0), axis=1)


def rope_angles(config, rotary_dim, positions):
    """(cos, sin) [B, T, rotary_dim // 2] in float32 (times yarn's attention factor, as transformers does)."""
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(rope_inv_freq(config, rotary_dim))
    factor = rope_attention_factor(config)
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rope(x, cos, sin, interleaved=False):
    """Rotate x [B, T, H, D] by position. Pairs are (i, i + D/2) (Llama), or (2i, 2i + 1) when interleaved
    (DeepSeek); the interleaved result is returned de-interleaved, as transformers does (q and k alike)."""
    x32 = x.astype(jnp.float32)
    if interleaved:
        x1, x2 = x32[..., 0::2], x32[..., 1::2]
    else:
        x1, x2 = jnp.split(x32, 2, axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention(q, k, v, segment_ids, scale, max_logit_block=None):
    """Causal (and same-segment) attention by the backend's kernel (train/models/attention.py).

    q [B, T, N, Dqk], k [B, T, K, Dqk] (GQA: N a multiple of K), v [B, T, K, Dv]. Returns the output
    [B, T, N, Dv] and, when `max_logit_block` is set, the max pre-softmax logit per head [N] (float32) over allowed
    pairs, computed `max_logit_block` query rows at a time (else None: no logit work at all).
    """
    dqk, dv = q.shape[-1], v.shape[-1]
    implementation, _ = attention_path(jax.default_backend(), q.dtype, max(dqk, dv))
    qp, kp, vp = q, k, v
    if dv != dqk:  # the fused kernels want one head dim: zero-pad the smaller side (logits/outputs unchanged)
        pad = lambda a, to: jnp.pad(a, [(0, 0)] * 3 + [(0, to - a.shape[-1])])
        width = max(dv, dqk)
        qp, kp, vp = pad(q, width), pad(k, width), pad(v, width)
    out = fused_attention(qp, kp, vp, segment_ids, scale, implementation)[..., :dv]
    if max_logit_block is None:
        return out, None
    return out, max_logit(q, k, segment_ids, scale, max_logit_block)


def cached_attention(q, k_cache, v_cache, index, scale):
    """Attention of new queries over a fixed-size KV cache (the decode path of generation).

    q [B, T, N, D] holds the queries of positions index .. index + T - 1; k_cache / v_cache [B, S, K, D] already
    contain their keys/values. Query t sees cache slots <= index + t, so slots past the written prefix (stale or
    padding) are never attended, and one compiled step serves every position of a cache of size S.
    """
    mask = cache_mask(q.shape[1], k_cache.shape[1], index)
    return jax.nn.dot_product_attention(q, k_cache, v_cache, mask=mask[None, None], scale=scale)


REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def make_stack(make_layer, num_layers, rngs):
    """`num_layers` copies of a layer with params stacked on a leading 'layers' axis ([L, ...])."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(rngs):
        return make_layer(rngs)

    return create(rngs)


def run_stack(stack, x, remat, **kwargs):
    """Scan x through a stacked layer (one compiled body whatever the depth); returns x and stacked aux."""
    graphdef, state = nnx.split(stack)

    def body(h, layer_state):
        return nnx.merge(graphdef, layer_state)(h, **kwargs)

    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT[remat])
    return jax.lax.scan(body, x, state)


def decode_stack(stack, x, cache: tuple, **kwargs):
    """Scan x through a stacked layer's `decode(x, cache=..., **kwargs)`, each layer with its slice of `cache`
    (a tuple of arrays with a leading [L] axis); returns x and the updated cache."""
    graphdef, state = nnx.split(stack)

    def body(h, layer):
        layer_state, *layer_cache = layer
        return nnx.merge(graphdef, layer_state).decode(h, cache=tuple(layer_cache), **kwargs)

    return jax.lax.scan(body, x, (state, *cache))


def cache_mask(t: int, s: int, index):
    """[t, s] bool: query t (at position index + t) sees cache slots <= index + t."""
    return jnp.arange(s)[None, :] <= index + jnp.arange(t)[:, None]


class Embed(nnx.Module):
    """Token embedding [vocab, embed] (also the output head when tie_word_embeddings)."""

    def __init__(self, config, *, rngs):
        self.dtype = jnp.dtype(config.dtype)
        self.embedding = param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"),
                               config.param_dtype, stddev=config.initializer_range)

    def __call__(self, tokens):
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)


class CausalLM(nnx.Module):
    """Shared skeleton: embed -> layer stacks -> norm -> lm_head (or tied embedding), float32 logits.

    Subclasses set `self.rotary_dim` and define `self.stacks()`: the stacked layers in depth order; each layer
    maps (x, segment_ids, rope, with_aux) -> (x, aux dict).
    """

    def _init_io(self, config, rngs):
        self.config = config
        self.embed_tokens = Embed(config, rngs=rngs)
        self.norm = RMSNorm(config.hidden_size, config)
        self.lm_head = None if config.tie_word_embeddings else Linear(
            config.hidden_size, config.vocab_size, ("embed", "vocab"), config, rngs=rngs)

    def __call__(self, tokens, segment_ids=None, positions=None, return_aux=False, max_logit_block=LOGIT_BLOCK):
        """tokens [B, T] int -> logits [B, T, vocab] float32 (and an aux dict when `return_aux`).

        aux holds "max_attn_logit" [num_layers, num_heads] when `max_logit_block` is set (query rows per block of
        its computation, train/models/attention.py:max_logit); None leaves it out and does no logit work."""
        if positions is None:
            positions = (jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape) if segment_ids is None
                         else segment_positions(segment_ids))
        rope = rope_angles(self.config, self.rotary_dim, positions)
        x = self.embed_tokens(tokens)
        aux = []
        for stack in self.stacks():
            x, layer_aux = run_stack(stack, x, self.config.remat, segment_ids=segment_ids, rope=rope,
                                     with_aux=return_aux, max_logit_block=max_logit_block)
            aux.append(layer_aux)
        logits = self.output_logits(x)
        if not return_aux:
            return logits
        merged = {}
        for key in ("max_attn_logit", "expert_load", "dropped_tokens"):
            parts = [a[key] for a in aux if key in a]
            if parts:
                merged[key] = jnp.concatenate(parts)
        return logits, merged

    def output_logits(self, x):
        """Final norm and output projection: hidden [B, T, D] -> logits [B, T, vocab] float32 (even for bf16)."""
        x = self.norm(x)
        head = self.embed_tokens.embedding[...].T if self.lm_head is None else self.lm_head.kernel[...]
        return jnp.dot(x, head.astype(x.dtype), preferred_element_type=jnp.float32)
