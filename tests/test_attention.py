"""Attention per backend and the max attention logit: the step holds no T×T tensor of its own (compiled figures,
not timings), the blockwise max equals a float64 reference, and the CPU path equals the pre-issue-16 attention."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train.models.layers as layers
from bench.accelerator import build_step
from train.config import load_config
from train.models.attention import LOGIT_BLOCK, attention_path, fused_attention, max_logit, splash_attention

ROOT = Path(__file__).resolve().parent.parent
B, N, K, D = 1, 4, 2, 16   # batch, query heads, key heads, head dim of the compiled-memory tests


def qkv(t, n=N, kv=K, dqk=D, dv=D, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (2, t, n, dqk)), 3 * jax.random.normal(keys[1], (2, t, kv, dqk)),
            jax.random.normal(keys[2], (2, t, kv, dv)))


def packed_segments(t):
    return jnp.asarray([[1] * (t // 3) + [2] * (t - t // 3), [5] * t], jnp.int32)


@pytest.mark.parametrize("dv", [D, 12])  # 12: MLA-style v narrower than q/k, zero-padded for the kernel
def test_cpu_attention_equals_todays_xla_attention(dv):
    q, k, v = qkv(20, dv=dv)
    seg = packed_segments(20)
    out, none = layers.attention(q, k, v, seg, 0.3)
    assert none is None
    # the pre-issue-16 path: one head dim for the kernel, dense same-segment mask, XLA
    width = max(D, dv)
    vp = jnp.pad(v, [(0, 0)] * 3 + [(0, width - dv)])
    mask = (seg[:, :, None] == seg[:, None, :])[:, None]
    today = jax.nn.dot_product_attention(q, k, vp, mask=mask, scale=0.3, is_causal=True)[..., :dv]
    np.testing.assert_array_equal(out, today)


@pytest.mark.parametrize("block", [1, 7, 64])  # 7 does not divide T: the last block is padded
def test_blockwise_max_logit_matches_float64(block):
    t = 30
    q, k, _ = qkv(t)
    seg = packed_segments(t)
    got = max_logit(q, k, seg, 0.25, block)
    q64, k64 = np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), N // K, axis=2)
    scores = np.einsum("bthd,bshd->bhts", q64, k64) * 0.25
    s = np.asarray(seg)
    allowed = np.tril(np.ones((t, t), bool)) & (s[:, :, None] == s[:, None, :])
    expected = np.where(allowed[:, None], scores, -np.inf).max(axis=(0, 2, 3))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_tpu_splash_path_equals_xla_in_interpret_mode():
    # the TPU kernel (segment ids, GQA as one MQA kernel per key head), run by the Pallas interpreter on CPU
    t = 128
    q, k, v = qkv(t, dqk=128, dv=128)
    seg = packed_segments(t)
    np.testing.assert_allclose(splash_attention(q, k, v, seg, 0.1, interpret=True),
                               fused_attention(q, k, v, seg, 0.1, "xla"), atol=1e-5)


def test_attention_path_per_backend(monkeypatch):
    assert attention_path("cpu", jnp.bfloat16, 64)[0] == "xla"
    assert attention_path("tpu", jnp.bfloat16, 64)[0] == "splash"
    gpu, why = attention_path("gpu", jnp.bfloat16, 192)
    assert gpu in ("cudnn", "cudnn_mask") and "cuDNN" in why
    assert attention_path("gpu", jnp.float32, 64)[0] == "xla"        # cuDNN flash wants bf16/fp16
    assert attention_path("gpu", jnp.bfloat16, 512)[0] == "xla"      # beyond cuDNN's head dim
    monkeypatch.setenv("MUON_JAX_ATTENTION", "xla")
    assert attention_path("gpu", jnp.bfloat16, 64) == ("xla", "set by MUON_JAX_ATTENTION")
    monkeypatch.setenv("MUON_JAX_ATTENTION", "flash")
    with pytest.raises(ValueError, match="MUON_JAX_ATTENTION='flash' is not one of"):
        attention_path("cpu", jnp.bfloat16, 64)


def step_temp_bytes(t: int, max_logit_block, clip: bool) -> int:
    """Compiled temporary bytes of a one-layer train step at seq_len t (batch B)."""
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        "model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=1",
        f"model.num_attention_heads={N}", f"model.num_key_value_heads={K}", "model.vocab_size=256", f"seq_len={t}",
        f"global_batch={B}", "mesh.data=1", "mesh.fsdp=1", "optimizer.ns_dtype=float32",
        f"muon_clip.enabled={str(clip).lower()}"])
    step, state, batch, _, _ = build_step(cfg, max_logit_block)
    return step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes


def causal_mean(q, k, v, segment_ids, scale, implementation):
    """A stand-in attention kernel with O(T) memory, like a flash kernel: on CPU XLA's own attention forms T×T
    logits of its own, which would hide the max-logit tensor the step holds on top of the kernel."""
    v = jnp.repeat(v, q.shape[2] // v.shape[2], axis=2)
    return jnp.cumsum(v, axis=1) / jnp.arange(1, v.shape[1] + 1)[None, :, None, None]


def test_step_without_muon_clip_holds_no_logits(monkeypatch, capsys):
    monkeypatch.setattr(layers, "fused_attention", causal_mean)
    t = 1024
    logits_bytes = B * N * t * t * 4                            # the removed float32 [B, K, G, T, T]
    today = step_temp_bytes(t, max_logit_block=t, clip=False)   # the pre-issue-16 step: dense max logit, always
    no_clip = step_temp_bytes(t, max_logit_block=None, clip=False)
    clip = step_temp_bytes(t, max_logit_block=None, clip=True)  # blockwise, LOGIT_BLOCK query rows at a time
    with capsys.disabled():
        print(f"\nstep temp bytes at T={t}: pre-issue-16 {today:,}, MuonClip off {no_clip:,}, "
              f"MuonClip on (block {LOGIT_BLOCK}) {clip:,}; float32 logits {logits_bytes:,}")
    assert today - no_clip >= logits_bytes
    assert clip < today - logits_bytes // 2


def test_max_logit_memory_grows_linearly_in_t(capsys):
    def temp(t, block):
        q, k = jnp.zeros((B, t, N, D)), jnp.zeros((B, t, K, D))
        seg = jnp.zeros((B, t), jnp.int32)
        fn = jax.jit(lambda q, k, s: max_logit(q, k, s, 0.25, block))
        return fn.lower(q, k, seg).compile().memory_analysis().temp_size_in_bytes

    sizes = {t: temp(t, LOGIT_BLOCK) for t in (512, 1024, 2048)}
    dense = {t: temp(t, t) for t in (512, 2048)}
    with capsys.disabled():
        print(f"\nmax-logit temp bytes, block {LOGIT_BLOCK}: {sizes}; dense (block = T): {dense}")
    assert sizes[1024] / sizes[512] < 2.5 and sizes[2048] / sizes[1024] < 2.5   # linear: 2x per doubling
    assert dense[2048] / dense[512] > 10                                          # quadratic: 16x
    assert sizes[2048] < dense[2048] / 4
