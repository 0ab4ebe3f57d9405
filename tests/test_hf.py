"""Logit parity with transformers (the reference implementation) for every supported family, both directions."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch  # the `dev` extra: parity needs the reference implementation, so no skip when it is missing
import transformers

from train.models.hf import load_hf_checkpoint, save_hf_checkpoint

FAMILIES = ["llama", "qwen2", "deepseek_v3", "deepseek_v3_qlora", "deepseek_v3_yarn"]  # see conftest.hf_config
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
    assert config.model_type == family.split("_qlora")[0].split("_yarn")[0]
    assert relative_error(model(jnp.asarray(TOKENS)), ref) <= 1e-4

    # export (forced into several shards + index) and let transformers read it back
    save_hf_checkpoint(model, config, tmp_path / "ours", max_shard_size=20_000)
    assert (tmp_path / "ours" / "model.safetensors.index.json").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager")
    assert relative_error(reference_logits(reloaded), ref) <= 1e-4


def test_yarn_rope_parity_beyond_original_length(tmp_path, reference_model):
    """yarn (DeepSeek-V3's rope_scaling) at positions 0..39, five times original_max_position_embeddings=8:
    logits equal transformers'; without the scaling they would not (so the test sees the yarn terms)."""
    import dataclasses

    import jax

    ref_model = reference_model("deepseek_v3_yarn")
    tokens = np.random.default_rng(1).integers(0, VOCAB, size=(1, 40))
    with torch.no_grad():
        ref = ref_model(torch.tensor(tokens)).logits.numpy()
    ref_model.save_pretrained(tmp_path)
    model, config = load_hf_checkpoint(tmp_path)
    assert config.rope_scaling["rope_type"] == "yarn"
    assert relative_error(model(jnp.asarray(tokens)), ref) <= 1e-4
    from flax import nnx
    from train.models import abstract_model
    plain = nnx.merge(nnx.graphdef(abstract_model(dataclasses.replace(config, rope_scaling=None))),
                      nnx.state(model))
    assert relative_error(jax.jit(lambda m, t: m(t))(plain, jnp.asarray(tokens)), ref) > 1e-2


def test_block_reads_equal_whole_reads(tmp_path, reference_model, monkeypatch):
    """With a 256-byte read block every tensor is read in many row blocks (lm_head transposed on the way, the
    shard unmapped between blocks): the model is the same as read whole, on one device and on a mesh."""
    import jax

    import train.models.hf as hf

    reference_model("deepseek_v3").save_pretrained(tmp_path)
    whole, _ = load_hf_checkpoint(tmp_path)
    monkeypatch.setattr(hf, "READ_CHUNK", 256)
    blocks, _ = load_hf_checkpoint(tmp_path)
    sharded, _ = load_hf_checkpoint(tmp_path, mesh=jax.make_mesh((2, 2, 2), ("fsdp", "tensor", "expert")))
    for a, b, c in zip(*(jax.tree.leaves(nnx_state(m)) for m in (whole, blocks, sharded))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


def nnx_state(model):
    from flax import nnx
    return nnx.state(model)


def test_load_errors_name_the_problem(tmp_path, reference_model):
    reference_model("qwen2").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 40}))
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.down_proj.weight': expected shape "
                                         r"\(32, 40\), found \(32, 48\)"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type='gpt2' is not one of 'llama', 'qwen2', 'deepseek_v3'"):
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


def test_bfloat16_export_keeps_bfloat16(tmp_path, reference_model):
    """A bf16 model exports bf16 tensors (safetensors numpy framework via ml_dtypes) that reload bit-exactly."""
    from safetensors import safe_open

    reference_model("deepseek_v3").to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    model, config = load_hf_checkpoint(tmp_path / "hf", dtype=jnp.bfloat16)
    save_hf_checkpoint(model, config, tmp_path / "ours")
    with safe_open(tmp_path / "ours" / "model.safetensors", framework="numpy") as f:
        assert f.get_slice("model.layers.1.mlp.experts.3.up_proj.weight").get_dtype() == "BF16"
        assert f.get_slice("model.layers.1.mlp.gate.weight").get_dtype() == "F32"  # the router stays float32
    again, _ = load_hf_checkpoint(tmp_path / "ours", dtype=jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(again.moe_layers.mlp.experts.up_proj[...], np.float32),
                                  np.asarray(model.moe_layers.mlp.experts.up_proj[...], np.float32))


MULTI_HOST_LOAD = """
import json, sys, jax, numpy as np
jax.distributed.initialize(sys.argv[2], 2, int(sys.argv[3]))
import train.models.hf as hf
read = []
original = hf._Shards.read
def counting(self, name, index=()):
    out = original(self, name, index)
    read.append(out.size)
    return out
hf._Shards.read = counting
mesh = jax.make_mesh((2, 2, 2), ("fsdp", "tensor", "expert"))
model, config = hf.load_hf_checkpoint(sys.argv[1], mesh=mesh)
read_total = sum(read)
hf._Shards.read = original
single, _ = hf.load_hf_checkpoint(sys.argv[1])  # on this process's first device, for the comparison
pairs = zip(jax.tree.leaves(jax.tree.map(lambda v: v, __import__('flax').nnx.state(model))),
            jax.tree.leaves(__import__('flax').nnx.state(single)))
for sharded, full in pairs:
    for shard in sharded.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(full)[shard.index])
hf.save_hf_checkpoint(model, config, sys.argv[4] + "/sharded")  # both processes gather, process 0 writes
hf.save_hf_checkpoint(single, config, sys.argv[4] + "/single")
print(json.dumps({"read": read_total}))
"""


@pytest.mark.slow
def test_two_processes_read_and_write_only_their_parts(tmp_path, reference_model, free_port, cpu_env):
    """2 CPU processes × 4 devices load one checkpoint onto a (2, 2, 2) mesh: each process's shards equal the
    single-device load, and each reads (element count) well under the whole checkpoint. Saving the sharded model
    from both processes writes the same bytes as saving the single-device one."""
    import subprocess
    import sys
    from pathlib import Path

    source, out = tmp_path / "source", tmp_path / "out"
    reference_model("deepseek_v3").save_pretrained(source)
    total = sum(p.numel() for p in reference_model("deepseek_v3").state_dict().values())
    env = {**cpu_env(4), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", MULTI_HOST_LOAD, str(source), f"127.0.0.1:{free_port}", str(i),
                               str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-3000:] for o in outs]
    for file in ("model.safetensors", "config.json"):
        assert (out / "sharded" / file).read_bytes() == (out / "single" / file).read_bytes(), file
    reads = [json.loads(o[0].strip().splitlines()[-1])["read"] for o in outs]
    # replicated params (norms, router, biases) are read by both; the sharded bulk only by its holders
    assert all(r < 0.75 * total for r in reads), (reads, total)
