"""Model FLOPs per token and device peak FLOP/s, for model-FLOPs utilisation (MFU).

FLOPs/token (training: forward + backward = 3 × forward) follow PaLM's accounting (Chowdhery et al. 2022, App. B):
`6·N + 6·L·T·(attention width of QKᵀ + AV)`, where N counts the weights a token is multiplied by (active experts
only; the input embedding is a lookup, not a matmul) and T is the sequence length. Causal masking is not
subtracted, as is customary. Peak FLOP/s: a table of accelerators, a rate measured once on CPU, and None
('MFU n/a') for any other device.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from train.data.sources import atomic_write
from train.models import DeepseekV3Config, param_counts

# Dense bf16 peak FLOP/s per device, matched on `device_kind` (longest key first). CPU is measured, not listed.
PEAK_FLOPS = {
    "H100": 989e12,        # H100 SXM
    "H200": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e reports itself as "TPU v5 lite"
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
}
CPU_MATMUL_SIZE = 2048      # n of the n×n float32 matmuls timed to measure a CPU's peak
CPU_PEAK_FILE = "cpu_peak_flops.json"


def flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token of a model config at sequence length `seq_len`."""
    _, active = param_counts(config)
    matmul_params = active - config.vocab_size * config.hidden_size * (0 if config.tie_word_embeddings else 1)
    if isinstance(config, DeepseekV3Config):
        width = config.num_attention_heads * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)
    else:
        width = 2 * config.num_attention_heads * config.head_dim
    return 6.0 * matmul_params + 6.0 * config.num_hidden_layers * seq_len * width


def cpu_key() -> str:
    """The CPU model and core count: what a measured CPU peak is valid for."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    return f"{model} x{os.cpu_count()}"


def measure_cpu_flops(n: int = CPU_MATMUL_SIZE, repeats: int = 3) -> float:
    """FLOP/s of the fastest of `repeats` n×n float32 matmuls (after a compile-and-warm-up call) on the CPU."""
    cpu = jax.devices("cpu")[0]
    a, b = (jax.device_put(jax.random.normal(jax.random.key(i), (n, n), jnp.float32), cpu) for i in (0, 1))
    matmul = jax.jit(jnp.matmul)
    jax.block_until_ready(matmul(a, b))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


def cpu_peak_flops(cache: Path | None = None) -> float:
    """This machine's CPU matmul rate, measured once and cached in `cache`/cpu_peak_flops.json by `cpu_key()`."""
    path, key = (Path(cache) / CPU_PEAK_FILE if cache else None), cpu_key()
    known = {}
    if path is not None and path.is_file():
        try:
            known = json.loads(path.read_text())
        except ValueError:
            known = {}  # a torn write: measure again
    if key not in known:
        known[key] = measure_cpu_flops()
        if path is not None:  # atomic: concurrent runs never read half a file
            atomic_write(path, lambda tmp: tmp.write_text(json.dumps(known, indent=1)))
    return known[key]


def peak_flops(device: jax.Device | None = None, cache: Path | None = None) -> float | None:
    """Peak FLOP/s of one device: the table's dense bf16 figure for a known accelerator; on CPU the measured
    matmul rate (`cpu_peak_flops`) shared by the process's CPU devices; None for an unknown device ("MFU n/a")."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return cpu_peak_flops(cache) / max(1, len(jax.local_devices(backend="cpu")))
    kind = device.device_kind.lower()
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key.lower() in kind:
            return PEAK_FLOPS[key]
    return None
