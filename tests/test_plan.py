"""The memory planner: its per-device param bytes against the trainer's real layout on 8 CPU devices."""
import jax
import numpy as np
from flax import nnx

from train.models import DeepseekV3Config, abstract_model, state_shardings
from train.plan import main, plan, state_bytes

CONFIG = DeepseekV3Config(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                          num_hidden_layers=3, num_attention_heads=4, n_shared_experts=1, n_routed_experts=8,
                          num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=16,
                          q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)


def test_param_bytes_equal_the_real_sharded_layout():
    sizes = {"data": 1, "fsdp": 2, "tensor": 2, "expert": 2}
    mesh = jax.make_mesh(tuple(sizes.values()), tuple(sizes))
    state = nnx.state(abstract_model(CONFIG), nnx.Param)
    shardings = state_shardings(state, mesh)
    real = sum(np.prod(s.shard_shape(v.shape)) * v.dtype.itemsize
               for v, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)))
    params, optimizer = state_bytes(CONFIG, sizes, "muon")
    assert params == real
    assert params < optimizer < 2 * params  # Muon: one buffer per matrix, AdamW's two for the embeddings/norms
    assert state_bytes(CONFIG, sizes, "adamw")[1] == 2 * params


def test_plan_ranks_meshes_and_prints(capsys):
    rows = plan(CONFIG, 8, seq=64, global_batch=8, grad_accum=1, optimizer="muon")
    assert [r["total"] for r in rows] == sorted(r["total"] for r in rows)
    assert all(np.prod(list(r["mesh"].values())) == 8 for r in rows)
    full_replica = next(r for r in rows if r["mesh"]["data"] == 8)
    assert rows[0]["params"] < full_replica["params"]  # sharding beats replicating
    main(["configs/moonlight_tiny.yaml", "--devices", "8", "--mesh", "fsdp=8"])
    out = capsys.readouterr().out
    assert "| 1, 8, 1, 1 |" in out and "DeepseekV3ForCausalLM" in out
