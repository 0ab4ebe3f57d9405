"""Model FLOPs per token and device peak FLOP/s, for model-FLOPs utilisation (MFU).

FLOPs/token (training: forward + backward = 3 × forward) follow PaLM's accounting (Chowdhery et al. 2022, App. B):
`6·N + 6·L·T·(attention width of QKᵀ + AV)`, where N counts the weights a token is multiplied by (active experts
only; the input embedding is a lookup, not a matmul) and T is the sequence length. Causal masking is not
subtracted, as is customary.
"""
from __future__ import annotations

import os

import jax

from train.models import DeepseekV3Config, param_counts

# Dense peak FLOP/s per device in the compute dtype (bf16 for accelerators; CPU: float32 FMA estimate per core).
PEAK_FLOPS = {
    "H100": 989e12,     # H100 SXM bf16 dense
    "H200": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "cpu": 50e9,        # per core: a rough AVX2/AVX-512 f32 FMA figure; MFU on CPU is an estimate
}


def flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token of a model config at sequence length `seq_len`."""
    _, active = param_counts(config)
    matmul_params = active - config.vocab_size * config.hidden_size * (0 if config.tie_word_embeddings else 1)
    if isinstance(config, DeepseekV3Config):
        width = config.num_attention_heads * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)
    else:
        width = 2 * config.num_attention_heads * config.head_dim
    return 6.0 * matmul_params + 6.0 * config.num_hidden_layers * seq_len * width


def peak_flops(device: jax.Device | None = None) -> float:
    """Peak FLOP/s of one device, matched on its `device_kind` (longest key first); CPU: per-core figure × cores."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return PEAK_FLOPS["cpu"] * (os.cpu_count() or 1) / max(1, len(jax.local_devices()))
    kind = device.device_kind
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key.lower() in kind.lower():
            return PEAK_FLOPS[key]
    return float("nan")
