"""Attention per backend and the max attention logit: the step holds no T×T tensor of its own (compiled figures,
not timings), the blockwise max equals a float64 reference, and the CPU path equals the pre-issue-16 attention.
On a mesh (8 simulated devices) attention runs per device under shard_map: splash (Pallas interpreter) equals the
XLA path on one device, values and gradients, and neither the call nor the sharded train step gathers q/k/v."""
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import train.models.layers as layers
from bench.accelerator import build_step
from train.config import load_config
from train.models.attention import (LOGIT_BLOCK, attention_path, attention_specs, fused_attention, local_attention,
                                    max_logit, splash_attention)
from train.runtime import make_mesh, on_mesh

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


# an all-gather and its result type, e.g. "%all-gather.3 = f32[8,128,4,16]{3,2,1,0} all-gather(...)"
ALL_GATHER = re.compile(r"^\s*\S+ = \w+\[([\d,]*)\]\S* all-gather(?:-start)?\(", re.M)


def gathered_qkv(hlo: str, t: int, head_dim: int) -> list[str]:
    """Result shapes of the all-gathers in compiled `hlo` that carry attention inputs: rank >= 4 with a sequence
    (`t`) and a head (`head_dim`) dimension, whatever the transposes (the kernel's [B, K, G, T, D] included)."""
    shapes = [tuple(int(d) for d in dims.split(",") if d) for dims in ALL_GATHER.findall(hlo)]
    return [s for s in shapes if len(s) >= 4 and t in s and head_dim in s]


def auto_axes_mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


def sharded_qkv(mesh, q, k, v, seg):
    specs = attention_specs(q.shape, k.shape, mesh)
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    return put(q, specs[0]), put(k, specs[1]), put(v, specs[1]), put(seg, P(specs[0][0], None))


def test_splash_under_shard_map_equals_xla_on_8_devices():
    # batch 4 over data x fsdp, 4 query / 2 key heads over tensor: each device holds 1 row and 1 GQA group
    mesh = auto_axes_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    t, d = 128, 16
    q, k, v = (jnp.concatenate([x, x[::-1] * 0.5]) for x in qkv(t, dqk=d, dv=d, seed=1))    # batch 4
    seg = jnp.concatenate([packed_segments(t), packed_segments(t)[::-1]])
    loss = lambda f: lambda q, k, v, s: jnp.sum(f(q, k, v, s) * jnp.cos(jnp.arange(d)))
    splash = loss(lambda q, k, v, s: fused_attention(q, k, v, s, 0.1, "splash"))
    args = sharded_qkv(mesh, q, k, v, seg)
    with jax.set_mesh(mesh):
        run = jax.jit(jax.value_and_grad(splash, argnums=(0, 1, 2)))
        (value, grads), hlo = run(*args), run.lower(*args).compile().as_text()
    # the reference: XLA's attention on one device, no mesh
    xla = loss(lambda q, k, v, s: local_attention(q, k, v, s, 0.1, "xla"))
    ref_value, ref_grads = jax.jit(jax.value_and_grad(xla, argnums=(0, 1, 2)))(q, k, v, seg)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for got, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(jax.jit(lambda *a: fused_attention(*a, 0.1, "splash"))(*args),
                               local_attention(q, k, v, seg, 0.1, "xla"), atol=1e-5)
    assert grads[0].sharding.spec == args[0].sharding.spec
    assert gathered_qkv(hlo, t, d) == []
    # the detector sees the gathers GSPMD needs for the same kernel without the mesh (no shard_map)
    no_mesh = jax.jit(jax.value_and_grad(splash, argnums=(0, 1, 2))).lower(*args).compile().as_text()
    assert gathered_qkv(no_mesh, t, d)


@pytest.mark.parametrize("kv_heads", [2, 1])   # 1 key head for 2 tensor devices: each slices it from whole k/v
@pytest.mark.parametrize("packed", [True, False])
def test_shard_map_wrapper_equals_one_device(kv_heads, packed):
    mesh = auto_axes_mesh((4, 2), ("fsdp", "tensor"))
    q, k, v = (jnp.concatenate([x, 0.5 * x[::-1]]) for x in qkv(24, kv=kv_heads))
    seg = jnp.concatenate([packed_segments(24)] * 2)
    loss = lambda f: lambda q, k, v, s: jnp.sum(jnp.sin(f(q, k, v, s if packed else None, 0.3, "xla")))
    args = sharded_qkv(mesh, q, k, v, seg)
    with jax.set_mesh(mesh):
        value, grads = jax.jit(jax.value_and_grad(loss(fused_attention), argnums=(0, 1, 2)))(*args)
    ref_value, ref_grads = jax.value_and_grad(loss(local_attention), argnums=(0, 1, 2))(q, k, v, seg)
    # the same ops per device; float32 summation order
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for got, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(got, ref, atol=1e-5)


def test_attention_specs_keep_gqa_groups_whole():
    mesh = auto_axes_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    assert attention_specs((4, 8, 4, 16), (4, 8, 2, 16), mesh) == (
        P(("data", "fsdp"), None, "tensor", None), P(("data", "fsdp"), None, "tensor", None))
    # 1 key head for 2 tensor devices: query heads split, k/v whole (each device slices its key head)
    assert attention_specs((4, 8, 4, 16), (4, 8, 1, 16), mesh) == (
        P(("data", "fsdp"), None, "tensor", None), P(("data", "fsdp"), None, None, None))
    # 3 key heads neither split in 2 nor divide 2: heads stay whole (a device needs each of its groups' keys)
    assert attention_specs((4, 8, 6, 16), (4, 8, 3, 16), mesh) == (P(("data", "fsdp"), None, None, None),) * 2
    # a batch of 2 does not split over data x fsdp = 4; tensor still splits the heads
    assert attention_specs((2, 8, 4, 16), (2, 8, 2, 16), mesh) == (P(None, None, "tensor", None),) * 2
    one = auto_axes_mesh((1, 8), ("data", "expert"))
    assert attention_specs((4, 8, 4, 16), (4, 8, 2, 16), one) == (P(None, None, None, None),) * 2


def test_sharded_step_gathers_no_qkv(monkeypatch):
    # the trainer's step (one layer, splash in the Pallas interpreter) on data x fsdp x tensor, compiled on its
    # mesh as train/loop.py runs it: weights are gathered (FSDP), attention inputs never
    monkeypatch.setenv("MUON_JAX_ATTENTION", "splash")
    t, head_dim = 128, 16
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        "model.hidden_size=64", "model.intermediate_size=96", "model.num_hidden_layers=1",
        "model.num_attention_heads=4", "model.num_key_value_heads=2", "model.vocab_size=256", f"seq_len={t}",
        "global_batch=8", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    step, state, batch, model_cfg, _ = build_step(cfg)
    assert model_cfg.attention_head_dim == head_dim
    hlo = on_mesh(make_mesh(cfg), step.lower)(state, batch).compile().as_text()
    assert ALL_GATHER.search(hlo)              # FSDP's weight gathers: the pattern matches this HLO
    assert gathered_qkv(hlo, t, head_dim) == []


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
