"""Model behaviour that transformers parity (tests/test_hf.py) does not cover: MoE dispatch, capacity dropping,
load balancing, packing, aux outputs, sharding, remat, configs and parameter counts."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from train.models import (
    DeepseekV3Config,
    ExpertBias,
    LlamaConfig,
    build_model,
    model_config_from_dict,
    logical_to_spec,
    param_counts,
    state_shardings,
    update_balancing_bias,
)

LLAMA = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
MOE = DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                       num_hidden_layers=3, num_attention_heads=4, n_shared_experts=1, n_routed_experts=8,
                       num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1, kv_lora_rank=16,
                       q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                       initializer_range=0.2)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(2, 16)))


@pytest.fixture(scope="module")
def llama():
    return build_model(LLAMA, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def moe_model():
    return build_model(MOE, rngs=nnx.Rngs(0))


def first_layer(stack):
    graphdef, state = nnx.split(stack)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))


def naive_moe(moe, x, capacity=None):
    """Per-token loop over the chosen experts; with a capacity, an expert serves its first slots in token order."""
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    idx, weights = (np.asarray(a) for a in moe.gate(jnp.asarray(x, jnp.float32)))
    gate, up, down = (np.asarray(p[...], np.float64) for p in (moe.experts.gate_proj, moe.experts.up_proj,
                                                             moe.experts.down_proj))
    served, dropped, y = np.zeros(moe.num_experts, int), 0, np.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(idx[t], weights[t]):
            if capacity is not None and served[e] >= capacity:
                dropped += 1
                continue
            served[e] += 1
            g = x[t] @ gate[e]
            y[t] += w * ((g / (1 + np.exp(-g)) * (x[t] @ up[e])) @ down[e])
    return y, dropped


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_moe_dispatch_matches_per_token_loop(capacity_factor, moe_model):
    moe = first_layer(moe_model.moe_layers).mlp
    moe.capacity_factor, moe.shared_experts = capacity_factor, None  # the loop covers routed experts only
    moe.gate.e_score_correction_bias.set_value(jnp.linspace(-0.2, 0.2, 8))
    x = jax.random.normal(jax.random.key(2), (2, 16, 32))
    y, aux = jax.jit(lambda x: moe(x))(x)
    capacity = None if capacity_factor is None else math.ceil(capacity_factor * 32 * 2 / 8)
    expected, dropped = naive_moe(moe, x, capacity)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 32), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(aux["expert_load"].sum(), 1.0, rtol=1e-6)
    if capacity_factor is None:
        assert "dropped_tokens" not in aux
    else:
        assert dropped > 0 and aux["dropped_tokens"] == dropped


def test_balancing_bias_evens_out_a_skewed_router(moe_model):
    model = nnx.clone(moe_model)
    gate = model.moe_layers.mlp.gate
    # a direction shared by all hidden states that the router maps onto experts 0 and 1: they win every slot
    shared = jnp.ones(32)
    model.embed_tokens.embedding.set_value(model.embed_tokens.embedding[...] + 0.5 * shared)
    gate.kernel.set_value(gate.kernel[...].at[..., :2].add(0.5 * shared[:, None] / math.sqrt(32)))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, size=(8, 32)))
    load_of = nnx.jit(lambda m: m(tokens, return_aux=True)[1]["expert_load"])
    imbalance = lambda load: float((load.max(-1) / load.mean(-1)).max())
    before = imbalance(load_of(model))
    for _ in range(40):
        update_balancing_bias(model, load_of(model), rate=0.02)
    after = imbalance(load_of(model))
    assert before > 3.5 and after < 0.5 * before, (before, after)  # 4.0 = two of eight experts take all
    # the bias is state, not a trainable parameter
    assert isinstance(gate.e_score_correction_bias, ExpertBias)
    assert not isinstance(gate.e_score_correction_bias, nnx.Param)
    grads = nnx.jit(nnx.grad(lambda m: m(tokens[:1, :8]).mean(), argnums=nnx.DiffState(0, nnx.Param)))(model)
    assert not any("e_score_correction_bias" in ".".join(map(str, k)) for k, _ in nnx.to_flat_state(grads))


def test_packed_segments_equal_separate_sequences(llama):
    model = llama
    first, second = TOKENS[:1, :10], TOKENS[1:, :6]
    packed = jnp.concatenate([first, second], axis=1)
    segment_ids = jnp.asarray([[1] * 10 + [2] * 6])
    logits = model(packed, segment_ids=segment_ids)  # positions restart at the segment boundary
    np.testing.assert_allclose(logits[:, :10], model(first), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[:, 10:], model(second), rtol=1e-5, atol=1e-5)


def test_max_attention_logit_matches_explicit_scores(llama):
    model = llama
    segment_ids = jnp.asarray([[1] * 9 + [2] * 7] * 2)
    _, aux = model(TOKENS, segment_ids=segment_ids, return_aux=True)
    assert aux["max_attn_logit"].shape == (2, 4)
    layer = first_layer(model.layers)  # explicit reference math for the first layer
    from train.models.layers import apply_rope, rope_angles, segment_positions

    attn, x = layer.self_attn, layer.input_layernorm(model.embed_tokens(TOKENS))
    rope = rope_angles(LLAMA, 8, segment_positions(segment_ids))
    q = apply_rope(attn.q_proj(x).reshape(2, 16, 4, 8), *rope)
    k = jnp.repeat(apply_rope(attn.k_proj(x).reshape(2, 16, 2, 8), *rope), 2, axis=2)  # GQA: 2 q heads per kv
    scores = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(8)
    allowed = np.tril(np.ones((16, 16), bool)) & (np.asarray(segment_ids)[:, :, None] == segment_ids[:, None, :])
    expected = np.where(allowed[:, None], scores, -np.inf).max(axis=(0, 2, 3))
    np.testing.assert_allclose(aux["max_attn_logit"][0], expected, rtol=1e-5)


def test_layout_stacked_weights_and_logical_axes(moe_model):
    params = dict(nnx.to_flat_state(nnx.state(moe_model, nnx.Param)))
    path = lambda *p: params[p][...].shape
    assert path("moe_layers", "mlp", "experts", "gate_proj") == (2, 8, 32, 16)  # [L, E, in, out]
    assert path("dense_layers", "mlp", "down_proj", "kernel") == (1, 48, 32)  # [L, in, out]
    assert path("embed_tokens", "embedding") == (64, 32) and path("lm_head", "kernel") == (32, 64)
    for key, var in params.items():
        axes = var.get_metadata()["out_sharding"]
        assert len(axes) == var[...].ndim, key
        assert ("embed" in key[0]) == (key[0] == "embed_tokens")  # only the embedding path says "embed"


def test_sharded_forward_equals_single_device(llama, moe_model):
    assert jax.device_count() == 8, "tests/conftest.py sets 8 simulated CPU devices"
    for single, mesh_shape in ((llama, dict(fsdp=4, tensor=2)), (moe_model, dict(fsdp=2, tensor=2, expert=2))):
        mesh = jax.make_mesh(tuple(mesh_shape.values()), tuple(mesh_shape))
        if single is moe_model:  # created sharded inside jit; the same seed gives the same weights
            sharded = build_model(MOE, rngs=nnx.Rngs(0), mesh=mesh)
            for (key, a), (_, b) in zip(nnx.to_flat_state(nnx.state(sharded)),
                                        nnx.to_flat_state(nnx.state(single))):
                np.testing.assert_array_equal(a[...], b[...], err_msg=str(key))
        else:  # or placed from an existing state
            sharded = nnx.clone(single)
            nnx.update(sharded, jax.device_put(nnx.state(single), state_shardings(nnx.state(single), mesh)))
        if single is moe_model:
            spec = sharded.moe_layers.mlp.experts.gate_proj[...].sharding.spec
            assert tuple(spec) == (None, "expert", "fsdp", "tensor")
        assert tuple(sharded.embed_tokens.embedding[...].sharding.spec) == ("tensor", "fsdp")
        forward = nnx.jit(lambda m, t: m(t, return_aux=True))
        (got, got_aux), (want, want_aux) = forward(sharded, TOKENS), forward(single, TOKENS)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), got_aux, want_aux)


def test_logical_to_spec_drops_unusable_mesh_axes():
    mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"))
    assert logical_to_spec(("vocab", "embed"), (64, 32), mesh) == jax.P("tensor", "fsdp")
    assert logical_to_spec(("vocab", "embed"), (63, 30), mesh) == jax.P(None, None)  # not divisible
    assert logical_to_spec(("expert", "mlp"), (8, 16), mesh) == jax.P(None, "tensor")  # no expert axis
    # a layer-stacked weight is split within each layer, never across layers (the scan reads one layer at a time)
    assert logical_to_spec(("layers", "embed", "mlp"), (4, 32, 16), mesh) == jax.P(None, "fsdp", "tensor")


def test_remat_recomputes_the_layers_and_keeps_gradients(llama):
    loss = lambda m: jnp.mean(m(TOKENS) ** 2)
    rematted = nnx.clone(llama)
    rematted.config = dataclasses.replace(LLAMA, remat="full")
    # the backward pass of the rematted model holds a checkpoint (remat) region; the plain one does not
    traced = []
    for m in (llama, rematted):
        graphdef, state = nnx.split(m)
        text = str(jax.make_jaxpr(jax.grad(lambda s: loss(nnx.merge(graphdef, s))))(state))
        traced.append("remat" in text or "checkpoint[" in text)
    assert traced == [False, True]
    grads = [nnx.jit(nnx.grad(loss))(m) for m in (llama, rematted)]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), *grads)


def test_configs_are_strict_and_round_trip():
    with pytest.raises(ValueError, match="unknown LlamaConfig key 'hiden_size': did you mean 'hidden_size'"):
        model_config_from_dict({"model_type": "llama", "hiden_size": 8})
    with pytest.raises(ValueError, match=r"model_type='gpt2' is not one of 'llama', 'qwen2', 'deepseek_v3'"):
        model_config_from_dict({"model_type": "gpt2"})
    assert model_config_from_dict(MOE.to_dict()) == MOE
    qwen = model_config_from_dict({**LLAMA.to_dict(), "model_type": "qwen2", "attention_bias": True})
    assert qwen.model_type == "qwen2" and isinstance(qwen, LlamaConfig)
    hf = qwen.to_hf_dict()
    assert hf["architectures"] == ["Qwen2ForCausalLM"] and "dtype" not in hf and "remat" not in hf
    assert type(qwen).from_hf_dict({**hf, "some_new_hub_key": 1}) == qwen


def test_param_counts_match_models_and_moonlight():
    for config in (LLAMA, dataclasses.replace(LLAMA, tie_word_embeddings=True, attention_bias=True), MOE,
                   dataclasses.replace(MOE, q_lora_rank=8, attention_bias=True, first_k_dense_replace=0)):
        model = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
        total = sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
        assert param_counts(config)[0] == total
    assert param_counts(LLAMA)[0] == param_counts(LLAMA)[1]
    moonlight = DeepseekV3Config(
        vocab_size=163840, hidden_size=2048, intermediate_size=11264, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, n_shared_experts=2, n_routed_experts=64,
        num_experts_per_tok=6, n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=512,
        q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)
    total, active = param_counts(moonlight)
    embeddings = 2 * 163840 * 2048  # the Moonlight paper's 15.29B / 2.24B exclude embedding and lm_head
    assert round((total - embeddings) / 1e9, 2) == 15.29 and round((active - embeddings) / 1e9, 2) == 2.24
