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
  On any other backend the same kernel runs in the Pallas interpreter (slow; for tests).

Pallas (splash) and cuDNN kernels are custom calls that GSPMD cannot partition: given sharded q/k/v it would gather
them whole onto every device. So when a mesh is current (`jax.set_mesh`, as the trainer's steps run), every
implementation runs per device inside `jax.shard_map` (`on_mesh_shards`): batch split over the "batch" rule's axes
(data, fsdp), query and key heads over "heads"/"kv_heads" (tensor), packing segment ids split with the batch, as
MaxText does. Each device then attends over its own rows and heads, with no collective at all.

MUON_JAX_ATTENTION=xla|cudnn_mask|splash overrides the choice (e.g. to rule out a kernel when a run fails).

`max_logit` gives MuonClip its per-head max pre-softmax logit over query blocks: memory O(B·N·block·T) instead of
the [B, N, T, T] float32 logits. Kimi K2 computes the same max inside its attention kernel.
"""
from __future__ import annotations

import functools
import inspect
import math
import os

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec

from train.models.sharding import DEFAULT_RULES, logical_to_spec

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


def local_attention(q, k, v, segment_ids, scale, implementation: str):
    """Causal attention [B, T, N, D] of the arrays one device holds, by `implementation` (see `attention_path`);
    q, k, v share one head dim."""
    if implementation == "splash":
        return splash_attention(q, k, v, segment_ids, scale, interpret=jax.default_backend() != "tpu")
    if implementation == "cudnn" and segment_ids is not None:
        segments = dict(zip(SEGMENT_PARAMS, (segment_ids, segment_ids)))
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="cudnn",
                                            **segments)
    mask = None if segment_ids is None else same_segment_mask(segment_ids)
    impl = "xla" if implementation == "xla" else "cudnn"
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=True, implementation=impl)


def axes_size(mesh, axes) -> int:
    """Devices along a PartitionSpec entry (None, one mesh axis or a tuple of them)."""
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def attention_specs(q_shape, kv_shape, mesh, rules=DEFAULT_RULES) -> tuple[PartitionSpec, PartitionSpec]:
    """(q spec, k/v spec) of [B, T, heads, D] arrays on `mesh`: batch by the "batch" rule, heads by "heads" and
    "kv_heads". Query head i reads key head i // G (G = N / K), so a device must hold the key heads of its query
    heads: N and K split into the same number of contiguous blocks (block j of the queries reads block j of the
    keys); or, when fewer key heads than devices along the heads axis divide that count, query heads split and k/v
    whole, each device then using its one key head (`on_mesh_shards`); otherwise heads stay whole."""
    q_spec = logical_to_spec(("batch", None, "heads", None), q_shape, mesh, rules)
    kv_spec = logical_to_spec(("batch", None, "kv_heads", None), kv_shape, mesh, rules)
    if q_spec[2] == kv_spec[2]:
        return q_spec, kv_spec
    whole = PartitionSpec(q_spec[0], None, None, None)   # (q and k/v share B, so their batch entries agree)
    if q_spec[2] is not None and kv_spec[2] is None and axes_size(mesh, q_spec[2]) % kv_shape[2] == 0:
        return q_spec, whole
    return whole, whole


def on_mesh_shards(kernel, q, k, v, segment_ids):
    """`kernel(q, k, v, segment_ids)` run per device under `jax.shard_map` over the current mesh (`jax.set_mesh`),
    with `attention_specs` layouts and segment ids split like the batch; without a mesh of several devices (or
    inside a shard_map already), `kernel` on the whole arrays.

    With query heads split and k/v whole (K smaller than the heads axis), a device's query heads all read one key
    head, number (device index along the heads axes) // (devices per key head): it slices that head out.
    check_vma is off: a pallas_call (splash) declares no per-axis variance of its outputs, so jax could not check
    them; every output is per-device by construction (no collective inside; the gradient of whole k/v is summed
    over the heads axes by shard_map's transpose)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or AxisType.Manual in mesh.axis_types:
        return kernel(q, k, v, segment_ids)
    q_spec, kv_spec = attention_specs(q.shape, k.shape, mesh)
    per_device = kernel
    if q_spec[2] is not None and kv_spec[2] is None:
        devices_per_head = axes_size(mesh, q_spec[2]) // k.shape[2]

        def per_device(q, k, v, segment_ids):
            head = jax.lax.axis_index(q_spec[2]) // devices_per_head
            own = lambda a: jax.lax.dynamic_slice_in_dim(a, head, 1, axis=2)
            return kernel(q, own(k), own(v), segment_ids)
    if segment_ids is None:
        args, specs = (q, k, v), (q_spec, kv_spec, kv_spec)
        run = lambda q, k, v: per_device(q, k, v, None)
    else:
        args, specs = (q, k, v, segment_ids), (q_spec, kv_spec, kv_spec, PartitionSpec(q_spec[0], None))
        run = per_device
    return jax.shard_map(run, mesh=mesh, in_specs=specs, out_specs=q_spec, check_vma=False)(*args)


def fused_attention(q, k, v, segment_ids, scale, implementation: str):
    """Causal attention [B, T, N, D] by `implementation` (see `attention_path`), per device on the current mesh
    (`on_mesh_shards`); q, k, v share one head dim."""
    kernel = functools.partial(local_attention, scale=scale, implementation=implementation)
    return on_mesh_shards(kernel, q, k, v, segment_ids)


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
