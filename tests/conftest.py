"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere; and the model factories that several
test files share, as fixtures (`reference_model`, `random_model`)."""
import os
import socket
import tempfile

import numpy as np
import pytest

# The tests' programs are tiny and compiled once or twice each, so compiling is most of their time: XLA's cheapest
# CPU code generation halves it (the GEMMs call the same library kernels either way).
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count=8 {FAST_COMPILE}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the session, shared by the xdist workers and the trainer subprocesses
# the tests start (they inherit the environment): most tests compile the same tiny programs again and again, and
# compiling, not running, is what a CPU test spends its time on. The key is the HLO, flags and jax version, so a
# stale entry cannot be hit; the size bound turns on jax's LRU eviction and, with it, the file lock that keeps
# concurrent writers from exposing half-written entries.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"muon-jax-tests-xla-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 * 2**30))


def ns_reference(m, steps=5):
    """Moonlight's quintic Newton–Schulz (zeropower_via_newtonschulz5) on one matrix, in float64 numpy, with the
    paper's coefficients written out: independent of muon_jax."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = m / (np.linalg.norm(m) + 1e-7)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    for _ in range(steps):
        g = x @ x.T
        x = a * x + (b * g + c * g @ g) @ x
    return x.T if tall else x


# The one small trainer config of the end-to-end tests (test_train, test_reliability, test_prepare's runs may use it
# too). Everything the jitted step and init see is the same in every run: model, seq_len, batch, optimizer, and a
# constant LR after a fixed warmup (a cosine schedule's constants depend on `steps`, so each run length compiled
# its own step). The step then compiles once and every run of any length (steps > warmup_steps) loads it from the
# persistent cache. Tests vary only what the step does not see (steps, logging, checkpoints, eval) or what they
# test (mesh, grad_accum, MuonClip, the model).
SMALL_TRAINER = ["model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=2",
                 "model.num_attention_heads=4", "model.num_key_value_heads=2", "seq_len=64", "global_batch=16",
                 "data.tokenizer=byte", "log.eval_batches=1", "log.eval_every=1000", "log.tensorboard=false",
                 "log.sample_tokens=0", "optimizer.ns_dtype=float32", "optimizer.learning_rate=0.02",
                 "schedule.name=constant", "schedule.warmup_steps=3", "mesh.data=1"]


def hf_config(family):
    """A tiny transformers config of each family (and variant) we import and export."""
    import transformers

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
        # DeepSeek-V3's yarn rope (with mscale != mscale_all_dim, so both the cos/sin factor and the softmax
        # mscale are exercised), trained length 8, used up to 64
        "deepseek_v3_yarn": lambda: transformers.DeepseekV3Config(
            **SMALL, num_key_value_heads=4, moe_intermediate_size=16, n_shared_experts=1, n_routed_experts=4,
            num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, kv_lora_rank=16,
            q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "beta_fast": 32,
                             "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 1.0,
                             "original_max_position_embeddings": 8}),
        # Moonlight-16B-A3B's structure, tiny: MLA without q-LoRA, interleaved rope, 1 dense layer, sigmoid noaux_tc
        # routing without groups, 2 shared experts; vocab = 512 ranks + Moonlight's 256 special slots
        "moonlight_tiny": lambda: transformers.DeepseekV3Config(
            **{**SMALL, "vocab_size": 768, "max_position_embeddings": 256}, num_key_value_heads=4,
            moe_intermediate_size=16, n_shared_experts=2, n_routed_experts=8, num_experts_per_tok=3, n_group=1,
            topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.446, kv_lora_rank=16, q_lora_rank=None,
            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, tie_word_embeddings=False, bos_token_id=512,
            eos_token_id=513, rope_parameters={"rope_type": "default", "rope_theta": 50000.0}),
        # DeepSeek-V3 proper: q_lora, no groups, no normalisation, non-interleaved rope, attention bias
        "deepseek_v3_qlora": lambda: transformers.DeepseekV3Config(
            **SMALL, num_key_value_heads=4, moe_intermediate_size=16, n_shared_experts=1, n_routed_experts=4,
            num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=0, norm_topk_prob=False,
            kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
            rope_interleave=False, attention_bias=True),
    }
    return FAMILIES[family]()


def make_reference_model(family):
    """A transformers model with O(1)-scale random weights (the default 0.02 init makes logits ~0, hiding bugs)."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family), attn_implementation="eager")
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


def make_random_model(config, seed=0, stddev=0.2):
    """A model with N(0, stddev) weights, N(0, 0.5) biases (nonzero, so code that dropped them would show), unit
    norm scales and a zero balancing bias. Filled from numpy into the abstract model: much faster than
    build_model's compiled init, which would dominate these tests."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from train.models import abstract_model

    graphdef, state = nnx.split(abstract_model(config))
    rng = np.random.default_rng(seed)

    def fill(path, v):
        name = jax.tree_util.keystr(path)
        if "scale" in name or "e_score_correction_bias" in name:
            return jnp.full(v.shape, "scale" in name, v.dtype)
        return jnp.asarray(rng.normal(0, 0.5 if "bias" in name else stddev, v.shape), v.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def pytest_collection_modifyitems(config, items):
    """The `slow` tests (end-to-end runs and subprocess jobs of up to minutes) first, the rest in file order after
    them: under `-n 2` the longest tests start at once while the other worker takes the short ones, instead of one
    worker finishing a 2-minute test alone at the end of the run. Fixtures that a slow test shares with the rest of
    its file are session-scoped, so the split order computes none of them twice."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order within each group


@pytest.fixture(scope="session")
def reference_model():
    """The `make_reference_model(family)` factory."""
    return make_reference_model


@pytest.fixture(scope="session")
def random_model():
    """The `make_random_model(config, seed=0, stddev=0.2)` factory."""
    return make_random_model


@pytest.fixture
def free_port():
    """A localhost TCP port that is free now, for a jax.distributed coordinator."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def cpu_env():
    """`cpu_env(devices)`: the environment for a subprocess (trainer, loader) with `devices` CPU devices and the
    tests' compile settings."""
    def env(devices: int) -> dict:
        return {**os.environ, "JAX_PLATFORMS": "cpu",
                "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"}
    return env
