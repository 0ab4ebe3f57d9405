"""Logit parity with transformers (the reference implementation) for every supported family, both directions."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch  # the `dev` extra: parity needs the reference implementation, so no skip when it is missing
import transformers

from train.hf import load_hf_checkpoint, save_hf_checkpoint

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, rms_norm_eps=1e-5)
FAMILIES = {
    # GQA, untied embeddings, Llama-3 rope scaling, attention bias (q/k/v and o), head_dim != hidden/heads
    "llama": lambda: transformers.LlamaConfig(
        **SMALL, num_key_value_heads=2, head_dim=16, attention_bias=True, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    # q/k/v bias only, tied embeddings
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, num_key_value_heads=1, tie_word_embeddings=True,
                                              rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
    # Moonlight-like MLA (no q_lora), 4 groups of 2 experts with 2 groups kept, a dense first layer
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        **{**SMALL, "num_hidden_layers": 3}, num_key_value_heads=4, moe_intermediate_size=16, n_shared_experts=2,
        n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2, first_k_dense_replace=1,
        routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8,
        v_head_dim=12, tie_word_embeddings=False),
    # DeepSeek-V3 proper: q_lora, no groups, no normalisation, non-interleaved rope, attention bias
    "deepseek_v3_qlora": lambda: transformers.DeepseekV3Config(
        **SMALL, num_key_value_heads=4, moe_intermediate_size=16, n_shared_experts=1, n_routed_experts=4,
        num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=0, norm_topk_prob=False,
        kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
        rope_interleave=False, attention_bias=True),
}
TOKENS = np.random.default_rng(0).integers(0, SMALL["vocab_size"], size=(2, 12))


def reference_model(family):
    """A transformers model with O(1)-scale random weights (the default 0.02 init makes logits ~0, hiding bugs)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family](), attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.3 * torch.randn_like(p))
            else:  # fan-in scaling; the embedding gets unit scale
                p.copy_(torch.randn_like(p) / (1 if "embed" in name else p.shape[-1] ** 0.5))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # large enough to change which experts win
                b.copy_(0.5 * torch.randn_like(b))
    return model.eval()


def reference_logits(model):
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


def relative_error(ours, ref):
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_parity_and_export_round_trip(family, tmp_path):
    ref_model = reference_model(family)
    ref = reference_logits(ref_model)
    ref_model.save_pretrained(tmp_path / "hf")

    model, config = load_hf_checkpoint(tmp_path / "hf", dtype=jnp.float32)
    assert config.model_type == family.split("_qlora")[0]
    assert relative_error(model(jnp.asarray(TOKENS)), ref) <= 1e-4

    # export (forced into several shards + index) and let transformers read it back
    save_hf_checkpoint(model, config, tmp_path / "ours", max_shard_size=20_000)
    assert (tmp_path / "ours" / "model.safetensors.index.json").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager")
    assert relative_error(reference_logits(reloaded), ref) <= 1e-4


def test_load_errors_name_the_problem(tmp_path):
    reference_model("qwen2").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 40}))
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.down_proj.weight': expected shape "
                                         r"\(32, 40\), found \(32, 48\)"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="supported: \\['deepseek_v3', 'llama', 'qwen2'\\]"):
        load_hf_checkpoint(tmp_path)


def test_bfloat16_checkpoint_loads(tmp_path):
    ref_model = reference_model("llama")
    ref = reference_logits(ref_model)
    ref_model.to(torch.bfloat16).save_pretrained(tmp_path)
    model, config = load_hf_checkpoint(tmp_path, dtype=jnp.float32)
    assert model.layers.self_attn.q_proj.kernel[...].dtype == jnp.float32
    # bf16 weight rounding (8 mantissa bits) bounds the error, not the implementation
    assert relative_error(model(jnp.asarray(TOKENS)), ref) <= 3e-2


def test_load_places_params_sharded(tmp_path):
    import jax

    reference_model("deepseek_v3").save_pretrained(tmp_path)
    mesh = jax.make_mesh((2, 2, 2), ("fsdp", "tensor", "expert"))
    sharded, _ = load_hf_checkpoint(tmp_path, mesh=mesh)
    single, _ = load_hf_checkpoint(tmp_path)
    experts = sharded.moe_layers.mlp.experts.gate_proj[...]
    assert tuple(experts.sharding.spec) == (None, "expert", "fsdp", "tensor")
    np.testing.assert_array_equal(experts, single.moe_layers.mlp.experts.gate_proj[...])
