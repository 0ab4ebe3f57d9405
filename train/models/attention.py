"""Causal attention over packed rows, per backend, and the per-head max attention logit computed blockwise.

Which kernel runs (`attention_path`, logged once at start by the trainer):

* CPU (and any backend not named below): XLA's `jax.nn.dot_product_attention`, packing as a dense [B, 1, T, T]
  same-segment mask. XLA forms the T×T logits itself there.
* GPU: cuDNN flash attention (`implementation="cudnn"`) for bf16/fp16 and head dims ≤ 256. `jax.nn.
  dot_product_attention` has no segment ids up to jax 0.11 (its `query_seq_lengths` only trims padding at the end
  of a row, it cannot separate documents inside one), so packing reaches cuDNN as the [B, 1, T, T] mask, which jax
  turns into an additive bias of the fused kernel; should a later jax accept segment ids, they are passed instead.
  Other dtypes/head dims fall back to the XLA path.
* TPU: splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) with segment ids, no T×T mask.
  The kernel is single-device: on a multi-chip mesh it still needs a shard_map over the batch axes (not done yet).

MUON_JAX_ATTENTION=xla|cudnn_mask|splash overrides the choice (e.g. to rule out a kernel when a run fails).

`max_logit` gives MuonClip its per-head max pre-softmax logit over query blocks: memory O(B·N·block·T) instead of
the [B, N, T, T] float32 logits. Kimi K2 computes the same max inside its attention kernel.
"""
from __future__ import annotations

import inspect
import os

import jax
import jax.numpy as jnp

LOGIT_BLOCK = 256      # query rows per block of `max_logit`
SPLASH_BLOCK = 512     # splash attention tile (clamped to T)
CUDNN_MAX_HEAD_DIM = 256
# parameter names under which a future jax.nn.dot_product_attention may take segment ids (none up to jax 0.11)
SEGMENT_PARAMS = ("query_segment_ids", "key_value_segment_ids")
IMPLEMENTATIONS = ("xla", "cudnn", "cudnn_mask", "splash")


def cudnn_takes_segment_ids() -> bool:
    """Whether the installed `jax.nn.dot_product_attention` accepts segment ids (checked by signature)."""
    params = inspect.signature(jax.nn.dot_product_attention).parameters
    return all(p in params for p in SEGMENT_PARAMS)


def attention_path(backend: str, dtype, head_dim: int) -> tuple[str, str]:
    """(implementation, why) of the attention used for `backend` ('cpu', 'gpu', 'tpu'), compute dtype and head dim.

    implementation is one of 'xla', 'cudnn' (segment ids), 'cudnn_mask' (packing as a mask) and 'splash'."""
    forced = os.environ.get("MUON_JAX_ATTENTION")
    if forced:
        if forced not in IMPLEMENTATIONS:
            raise ValueError(f"MUON_JAX_ATTENTION={forced!r} is not one of {IMPLEMENTATIONS}; unset it or pick one")
        return forced, "set by MUON_JAX_ATTENTION"
    if backend == "tpu":
        return "splash", "TPU: splash attention with segment ids (no T×T mask)"
    if backend in ("gpu", "cuda"):
        if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            return "xla", f"GPU: cuDNN flash attention needs bf16/fp16, the compute dtype is {jnp.dtype(dtype)}; " \
                          "XLA attention with a dense [B, 1, T, T] packing mask"
        if head_dim > CUDNN_MAX_HEAD_DIM:
            return "xla", f"GPU: head dim {head_dim} > {CUDNN_MAX_HEAD_DIM} is beyond cuDNN flash attention; " \
                          "XLA attention with a dense [B, 1, T, T] packing mask"
        if cudnn_takes_segment_ids():
            return "cudnn", "GPU: cuDNN flash attention with segment ids"
        return "cudnn_mask", (f"GPU: cuDNN flash attention; jax {jax.__version__}'s dot_product_attention takes no "
                              "segment ids, so packing goes to cuDNN as a [B, 1, T, T] mask (an additive bias)")
    return "xla", f"{backend}: XLA attention with a dense [B, 1, T, T] packing mask"


def same_segment_mask(segment_ids):
    """[B, 1, T, T] bool: query t may see key s only within its own document."""
    return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def splash_attention(q, k, v, segment_ids, scale, interpret: bool = False):
    """Causal splash attention with segment ids on TPU: q [B, T, N, D], k/v [B, T, K, D] (GQA: one MQA kernel per
    key head), returns [B, T, N, D]. Single-device kernel, vmapped over batch and key heads; `interpret` runs the
    Pallas kernel in interpret mode (any backend, for tests)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    b, t, n, d = q.shape
    kv = k.shape[2]
    block = min(SPLASH_BLOCK, t)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel = splash.make_splash_mqa_single_device(masks.MultiHeadMask([masks.CausalMask((t, t))] * (n // kv)),
                                                  block_sizes=sizes, interpret=interpret)
    segment_ids = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids
    qh = (q * scale).reshape(b, t, kv, n // kv, d).transpose(0, 2, 3, 1, 4)   # [B, K, G, T, D]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)                 # [B, K, T, D]
    one = lambda qx, kx, vx, seg: kernel(qx, kx, vx, segment_ids=splash.SegmentIds(q=seg, kv=seg))
    out = jax.vmap(jax.vmap(one, in_axes=(0, 0, 0, None)))(qh, kh, vh, segment_ids)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, -1)


def fused_attention(q, k, v, segment_ids, scale, implementation: str):
    """Causal attention [B, T, N, D] by `implementation` (see `attention_path`); q, k, v share one head dim."""
    if implementation == "splash":
        return splash_attention(q, k, v, segment_ids, scale)
    if implementation == "cudnn" and segment_ids is not None:
        segments = dict(zip(SEGMENT_PARAMS, (segment_ids, segment_ids)))
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="cudnn",
                                            **segments)
    mask = None if segment_ids is None else same_segment_mask(segment_ids)
    impl = "xla" if implementation == "xla" else "cudnn"
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=True, implementation=impl)


def max_logit(q, k, segment_ids, scale, block: int = LOGIT_BLOCK):
    """Max pre-softmax logit per head [N] (float32) over allowed (causal, same-segment) pairs, as a metric and
    for QK-Clip: no gradient flows through it.

    q [B, T, N, D], k [B, T, K, D] (GQA: N a multiple of K). Query rows are taken `block` at a time in a scan,
    so the largest temporary is [B, N, block, T]; with block >= T this is the dense computation."""
    b, t, n, d = q.shape
    kv, block = k.shape[2], min(block, t)
    blocks = -(-t // block)
    pad = blocks * block - t
    q = jnp.pad(jax.lax.stop_gradient(q).astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
    q = q.reshape(b, blocks, block, kv, n // kv, d).swapaxes(0, 1)           # [blocks, B, block, K, G, D]
    k = jax.lax.stop_gradient(k).astype(jnp.float32)
    seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids
    seg_q = jnp.pad(seg, ((0, 0), (0, pad))).reshape(b, blocks, block).swapaxes(0, 1)

    def one(running, xs):
        qi, si, start = xs
        logits = jnp.einsum("btkgd,bskd->bkgts", qi, k) * scale           # [B, K, G, block, T]
        pos = start + jnp.arange(block)
        allowed = ((pos[:, None] >= jnp.arange(t)[None, :]) & (pos < t)[:, None])[None] \
            & (si[:, :, None] == seg[:, None, :])                           # [B, block, T]
        m = jnp.where(allowed[:, None, None], logits, -jnp.inf).max(axis=(0, 3, 4))
        return jnp.maximum(running, m.reshape(n)), None

    starts = jnp.arange(blocks) * block
    return jax.lax.scan(one, jnp.full((n,), -jnp.inf, jnp.float32), (q, seg_q, starts))[0]
