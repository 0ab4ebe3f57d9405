"""Rotary position embeddings (Su et al. 2021, arXiv 2104.09864): the inverse frequencies of a model config's
`rope_theta` / `rope_scaling` (default, linear, Llama-3's band-wise interpolation, and YaRN, Peng et al. 2023,
arXiv 2309.00071, as DeepSeek-V3 and transformers compute it) and YaRN's attention temperature.

A position `p` rotates the pair `(x_{2i}, x_{2i+1})` (or the half-split pair) of a head by the angle `p · inv_freq_i`,
`inv_freq_i = rope_theta^(-2i/d)` for a rotary dimension `d`; the scalings change `inv_freq` only, and YaRN also
multiplies cos/sin by `rope_attention_factor`.
"""
from __future__ import annotations

import math

import numpy as np


def rope_inv_freq(config, rotary_dim: int):
    """Inverse RoPE frequencies [rotary_dim // 2] (float32), with linear or Llama-3 scaling when configured."""
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, rotary_dim, 2, dtype=np.float32) / rotary_dim))
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":  # smooth interpolation between high- and low-frequency bands (Llama 3.1)
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling.get("original_max_position_embeddings", config.max_position_embeddings)
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = np.where(medium, smoothed, scaled)
    elif rope_type == "yarn":
        inv_freq = _yarn_inv_freq(config, rotary_dim, scaling)
    return inv_freq.astype(np.float32)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_factor(config, scaling) -> float:
    """The yarn `factor`; without one, DeepSeek's max_position_embeddings / original_max_position_embeddings."""
    factor = scaling.get("factor")
    return config.max_position_embeddings / scaling["original_max_position_embeddings"] if factor is None else factor


def _yarn_inv_freq(config, dim: int, scaling) -> np.ndarray:
    """YaRN (as DeepSeek-V3 and transformers compute it): high-frequency dims keep their frequency
    (extrapolation), low-frequency dims are divided by `factor` (interpolation), with a linear ramp between the
    dims that turn beta_fast and beta_slow times over original_max_position_embeddings."""
    base, factor = config.rope_theta, _yarn_factor(config, scaling)
    old_len = scaling.get("original_max_position_embeddings") or config.max_position_embeddings
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1
    correction_dim = lambda rotations: dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))
    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / ((high + 0.001 if low == high else high) - low),
                   0, 1)
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    extrapolation = 1 - ramp
    return (1 / (factor * pos_freqs)) * (1 - extrapolation) + (1 / pos_freqs) * extrapolation


def rope_attention_factor(config) -> float:
    """The factor on cos/sin: yarn's `attention_factor`, or mscale(factor, mscale) / mscale(factor,
    mscale_all_dim) when both are given (DeepSeek-V3), else mscale(factor); 1 for other rope types."""
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type", "default") != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor, mscale, mscale_all_dim = _yarn_factor(config, scaling), scaling.get("mscale"), scaling.get(
        "mscale_all_dim")
    if mscale and mscale_all_dim:
        return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    return yarn_mscale(factor)
