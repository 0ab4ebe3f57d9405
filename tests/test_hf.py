"""Logit parity with transformers (the reference implementation) for every supported family, both directions."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch  # the `dev` extra: parity needs the reference implementation, so no skip when it is missing
import transformers

from train.models.hf import load_hf_checkpoint, save_hf_checkpoint

FAMILIES = ["llama", "qwen2", "deepseek_v3", "deepseek_v3_qlora"]  # see conftest.hf_config
VOCAB = 97
TOKENS = np.random.default_rng(0).integers(0, VOCAB, size=(2, 12))


def reference_logits(model):
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


def relative_error(ours, ref):
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("family", FAMILIES)
def test_parity_and_export_round_trip(family, tmp_path, reference_model):
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


def test_load_errors_name_the_problem(tmp_path, reference_model):
    reference_model("qwen2").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 40}))
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.down_proj.weight': expected shape "
                                         r"\(32, 40\), found \(32, 48\)"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="supported: \\['deepseek_v3', 'llama', 'qwen2'\\]"):
        load_hf_checkpoint(tmp_path)


def test_bfloat16_checkpoint_loads(tmp_path, reference_model):
    ref_model = reference_model("llama")
    ref = reference_logits(ref_model)
    ref_model.to(torch.bfloat16).save_pretrained(tmp_path)
    model, config = load_hf_checkpoint(tmp_path, dtype=jnp.float32)
    assert model.layers.self_attn.q_proj.kernel[...].dtype == jnp.float32
    # bf16 weight rounding (8 mantissa bits) bounds the error, not the implementation
    assert relative_error(model(jnp.asarray(TOKENS)), ref) <= 3e-2


def test_load_places_params_sharded(tmp_path, reference_model):
    import jax

    reference_model("deepseek_v3").save_pretrained(tmp_path)
    mesh = jax.make_mesh((2, 2, 2), ("fsdp", "tensor", "expert"))
    sharded, _ = load_hf_checkpoint(tmp_path, mesh=mesh)
    single, _ = load_hf_checkpoint(tmp_path)
    experts = sharded.moe_layers.mlp.experts.gate_proj[...]
    assert tuple(experts.sharding.spec) == (None, "expert", "fsdp", "tensor")
    np.testing.assert_array_equal(experts, single.moe_layers.mlp.experts.gate_proj[...])
