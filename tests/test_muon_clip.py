"""QK-Clip: the reported max logits against an independent numpy computation (causal, same-segment pairs), and
after clipping every head's max logit (same layer inputs) is <= tau, the clipped heads' exactly tau, and the
weights of the heads that stayed below tau bit-identical."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from train.models import DeepseekV3Config, LlamaConfig, model_class
from train.models.layers import rope_angles
from train.models.qk_clip import clip_factors, qk_clip, qk_clip_params, qk_clip_stats

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
MLA = dict(moe_intermediate_size=16, n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
           topk_group=1, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
CONFIGS = {
    "llama_gqa_bias": LlamaConfig(**SMALL, num_key_value_heads=2, head_dim=8, attention_bias=True),
    # a dense then a MoE stack (two rows blocks in max_attn_logit), plain q_proj
    "deepseek_mla": DeepseekV3Config(**SMALL, **MLA, q_lora_rank=None, first_k_dense_replace=1),
    # q_lora (q_b_proj) and DeepSeek's non-interleaved rope variant, MoE only
    "deepseek_mla_qlora": DeepseekV3Config(**SMALL, **MLA, q_lora_rank=12, first_k_dense_replace=0,
                                           rope_interleave=False),
}
# (layer, head) pairs whose queries get boosted: layer 0 has a fully boosted GQA group (heads 0, 1) and a mixed
# one (head 3 but not 2), layer 1 a single head
BOOSTED = [(0, 0), (0, 1), (0, 3), (1, 2)]
BOOST = 6.0
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(2, 12)))
SEGMENTS = jnp.asarray([[1] * 7 + [2] * 5, [1] * 12])


def q_module(attn):
    return attn.q_proj if getattr(attn, "q_proj", None) is not None else attn.q_b_proj


def q_width(config):
    return config.head_dim if isinstance(config, LlamaConfig) else config.qk_head_dim


def layers(model):
    """(stack, index in stack) for every layer, in the order of aux["max_attn_logit"] rows."""
    return [(s, i) for s in model.stacks() for i in range(s.input_layernorm.scale.shape[0])]


def layer_at(stack, i):
    graphdef, state = nnx.split(stack)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))


@functools.cache
def boosted_model(name, random_model):
    """A tiny random model (from the `random_model` factory) with the BOOSTED heads' query columns (and biases)
    scaled up."""
    config = CONFIGS[name]
    model = random_model(config)
    w = q_width(config)
    for row, head in BOOSTED:
        stack, i = layers(model)[row]
        q = q_module(stack.self_attn)
        cols = slice(head * w, (head + 1) * w)
        q.kernel[...] = q.kernel[...].at[i, :, cols].multiply(BOOST)
        if q.bias is not None:
            q.bias[...] = q.bias[...].at[i, cols].multiply(BOOST)
    return model


@nnx.jit  # one compiled program instead of op-by-op dispatch (the clipped model reuses it: same structure)
def per_layer_max_logits(model, inputs_from):
    """[num_layers, heads]: each layer of `model` fed the hidden states that `inputs_from` produces there (the
    clip bound is a statement about the inputs the max logits were measured on)."""
    rope = rope_angles(model.config, model.rotary_dim, jnp.broadcast_to(jnp.arange(12), TOKENS.shape))
    x, rows = inputs_from.embed_tokens(TOKENS), []
    for (stack, i), (src_stack, _) in zip(layers(model), layers(inputs_from)):
        rows.append(layer_at(stack, i)(x, None, rope, True)[1]["max_attn_logit"])
        x = layer_at(src_stack, i)(x, None, rope, False)[0]
    return jnp.stack(rows)


def np_rms(x, scale, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * scale


def np_rope(x, positions, theta, interleaved):
    """Reference RoPE on x [T, H, D] (float64): pairs (i, i + D/2), or (2i, 2i + 1) returned de-interleaved."""
    d = x.shape[-1]
    angles = positions[:, None] * (1.0 / theta ** (np.arange(0, d, 2) / d))[None]
    cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]
    x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., :d // 2], x[..., d // 2:])
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def np_first_layer_max_logits(model):
    """max over rows, causal same-segment pairs of q.k * scale for the first layer, in float64 numpy."""
    c = model.config
    p = lambda v: np.asarray(v[...], np.float64)[0]  # the first layer's slice of a stacked param
    stack = model.stacks()[0]
    attn = stack.self_attn
    out = np.full(c.num_attention_heads, -np.inf)
    for b in range(TOKENS.shape[0]):
        seg = np.asarray(SEGMENTS[b])
        positions = np.arange(12) - np.searchsorted(seg, seg)  # restart at each segment (segments are sorted)
        x = np_rms(np.asarray(model.embed_tokens.embedding[...], np.float64)[np.asarray(TOKENS[b])],
                   p(stack.input_layernorm.scale), c.rms_norm_eps)
        if isinstance(c, LlamaConfig):
            q = (x @ p(attn.q_proj.kernel) + p(attn.q_proj.bias)).reshape(12, -1, c.head_dim)
            k = (x @ p(attn.k_proj.kernel) + p(attn.k_proj.bias)).reshape(12, -1, c.head_dim)
            q, k = np_rope(q, positions, c.rope_theta, False), np_rope(k, positions, c.rope_theta, False)
            k = np.repeat(k, c.num_attention_heads // c.num_key_value_heads, axis=1)
            scale = c.head_dim ** -0.5
        else:
            q = (x @ p(attn.q_proj.kernel) if c.q_lora_rank is None else
                 np_rms(x @ p(attn.q_a_proj.kernel), p(attn.q_a_layernorm.scale), 1e-6) @ p(attn.q_b_proj.kernel))
            q = q.reshape(12, -1, c.qk_head_dim)
            kv_a = x @ p(attn.kv_a_proj_with_mqa.kernel)
            latent = np_rms(kv_a[:, :c.kv_lora_rank], p(attn.kv_a_layernorm.scale), 1e-6)
            k_nope = (latent @ p(attn.kv_b_proj.kernel)).reshape(12, -1, c.qk_nope_head_dim + c.v_head_dim)
            k_rot = np_rope(kv_a[:, None, c.kv_lora_rank:], positions, c.rope_theta, c.rope_interleave)
            q_rot = np_rope(q[..., c.qk_nope_head_dim:], positions, c.rope_theta, c.rope_interleave)
            q = np.concatenate([q[..., :c.qk_nope_head_dim], q_rot], -1)
            k = np.concatenate([k_nope[..., :c.qk_nope_head_dim],
                                np.broadcast_to(k_rot, (12, c.num_attention_heads, c.qk_rope_head_dim))], -1)
            scale = c.qk_head_dim ** -0.5
        scores = np.einsum("thd,shd->hts", q, k) * scale
        allowed = np.tril(np.ones((12, 12), bool)) & (seg[:, None] == seg[None, :])
        out = np.maximum(out, np.where(allowed, scores, -np.inf).max(axis=(1, 2)))
    return out


def attention_columns(model):
    """{(row, module path): [in, out] kernel or [out] bias} for every per-layer q/k/kv param, as numpy."""
    out = {}
    for row, (stack, i) in enumerate(layers(model)):
        for path, v in nnx.to_flat_state(nnx.state(stack.self_attn, nnx.Param)):
            out[row, ".".join(map(str, path))] = np.asarray(v[...][i])
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_qk_clip_bounds_every_head_and_leaves_the_rest(name, random_model):
    model = boosted_model(name, random_model)
    config = model.config
    # what the clip acts on: the model's reported max logit equals an independent float64 computation
    _, aux = model(TOKENS, segment_ids=SEGMENTS, return_aux=True)
    np.testing.assert_allclose(aux["max_attn_logit"][0], np_first_layer_max_logits(model), rtol=1e-5)

    _, aux = model(TOKENS, return_aux=True)
    before = aux["max_attn_logit"]
    measured = np.asarray(per_layer_max_logits(model, model))
    np.testing.assert_allclose(measured, before, rtol=1e-5)
    boosted = np.zeros(before.shape, bool)
    boosted[tuple(zip(*BOOSTED))] = True
    # tau between the boosted and the ordinary heads, so exactly the boosted ones are clipped
    low, high = float(before[~boosted].max()), float(before[boosted].min())
    assert high > 1.5 * low > 0
    tau = (low * high) ** 0.5

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    new_params = jax.jit(functools.partial(qk_clip_params, tau=tau, config=config))(params, before)
    clipped = nnx.merge(graphdef, new_params, rest)
    after = np.asarray(per_layer_max_logits(clipped, inputs_from=model))
    assert np.all(after <= tau * (1 + 1e-4))
    np.testing.assert_allclose(after[boosted], tau, rtol=1e-4)  # each clipped head lands exactly on tau
    np.testing.assert_array_equal(after[~boosted], measured[~boosted])  # bit-identical weights and inputs

    gamma = np.asarray(clip_factors(before, tau))
    old, new = attention_columns(model), attention_columns(clipped)
    for (row, path), w in old.items():
        v = new[row, path]
        if isinstance(config, LlamaConfig):
            width, groups = config.head_dim, config.num_attention_heads // config.num_key_value_heads
            if path.startswith("q_proj"):
                k_factor = np.sqrt(gamma[row].reshape(-1, groups).max(-1)).repeat(groups)
                factor = (gamma[row] / k_factor).repeat(width)
            elif path.startswith("k_proj"):
                factor = np.sqrt(gamma[row].reshape(-1, groups).max(-1)).repeat(width)
            else:
                factor = np.ones(w.shape[-1])
        else:
            nope, rope, vd = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
            g = gamma[row][:, None]
            if path.startswith(("q_proj", "q_b_proj")):
                factor = np.concatenate([np.sqrt(g).repeat(nope, 1), g.repeat(rope, 1)], 1).reshape(-1)
            elif path.startswith("kv_b_proj"):
                factor = np.concatenate([np.sqrt(g).repeat(nope, 1), np.ones((len(g), vd))], 1).reshape(-1)
            else:  # q_a_proj, kv_a_proj_with_mqa (the shared rotary key), norms, o_proj
                factor = np.ones(w.shape[-1])
        same = factor == 1
        np.testing.assert_array_equal(v[..., same], w[..., same])  # untouched columns: bit-identical
        np.testing.assert_allclose(v[..., ~same], w[..., ~same] * factor[~same], rtol=1e-6)
    if isinstance(config, LlamaConfig):  # the fully clipped GQA group moved its shared key, the mixed one did not
        assert not np.array_equal(new[0, "k_proj.kernel"][:, :8], old[0, "k_proj.kernel"][:, :8])
        np.testing.assert_array_equal(new[0, "k_proj.kernel"][:, 8:], old[0, "k_proj.kernel"][:, 8:])
    # nothing outside attention changes
    others = lambda m: {k: v for k, v in nnx.to_flat_state(nnx.state(m, nnx.Param)) if "self_attn" not in k}
    for key, var in others(model).items():
        np.testing.assert_array_equal(others(clipped)[key][...], var[...])


def test_in_place_clip_and_stats(random_model):
    model = boosted_model("llama_gqa_bias", random_model)
    _, aux = model(TOKENS, return_aux=True)
    s = aux["max_attn_logit"]
    tau = float(jnp.median(s))
    expected = qk_clip_params(nnx.state(model, nnx.Param), s, tau=tau, config=model.config)
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
    stats = qk_clip(copy, s, tau=tau)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(copy, nnx.Param), expected)
    assert float(stats["max_attn_logit"]) == float(s.max()) > tau
    assert float(stats["max_attn_logit_after_clip"]) == tau
    s64 = np.asarray(s, np.float64)  # the stats against numpy, not against the function that made them
    assert float(stats["qk_clip_fraction"]) == pytest.approx(np.mean(s64 > tau))
    assert float(stats["max_attn_logit"]) == pytest.approx(s64.max(), rel=1e-6)
    assert float(stats["max_attn_logit_after_clip"]) == pytest.approx(tau, rel=1e-6)  # tau is the median
    np.testing.assert_allclose(stats["max_attn_logit_per_layer_after_clip"], np.minimum(s64, tau).max(-1), rtol=1e-6)
    with pytest.raises(ValueError, match="expected"):
        qk_clip_params(nnx.state(model, nnx.Param), s[:1], tau=tau, config=model.config)
