"""Flax nnx models: dense Llama/Qwen2 and DeepSeek-V3/Moonlight MoE, with logical-axis sharding."""
from __future__ import annotations

import jax
from flax import nnx

from train.models.model_config import (
    DeepseekV3Config,
    LlamaConfig,
    Qwen2Config,
    model_config_from_dict,
    model_config_from_hf,
    param_counts,
)
from train.models.attention import attention_path
from train.models.deepseek import DeepseekV3, ExpertBias, update_balancing_bias
from train.models.llama import Llama
from train.models.sharding import DEFAULT_RULES, logical_to_spec, state_shardings


def model_class(config):
    """The nnx model class for a config."""
    if isinstance(config, DeepseekV3Config):
        return DeepseekV3
    if isinstance(config, LlamaConfig):
        return Llama
    raise TypeError(f"no model for config type {type(config).__name__}; use LlamaConfig or DeepseekV3Config")


def abstract_model(config, key=None) -> nnx.Module:
    """The model of `config` with ShapeDtypeStructs for arrays: its structure without allocating anything."""
    key = jax.random.key(0) if key is None else key
    return nnx.eval_shape(lambda: model_class(config)(config, rngs=nnx.Rngs(params=key)))


def build_model(config, *, rngs: nnx.Rngs, mesh: jax.sharding.Mesh | None = None, rules=DEFAULT_RULES):
    """Create a randomly initialised model. With a mesh, params are created already sharded inside one jit
    (no full host copy); the same `rngs` seed gives the same weights with or without a mesh."""
    cls = model_class(config)
    key = rngs.params()
    graphdef, abstract_state = nnx.split(abstract_model(config, key))
    shardings = None if mesh is None else state_shardings(abstract_state, mesh, rules)
    # one compiled init is also much faster than creating the stacked layers op by op
    state = jax.jit(lambda k: nnx.state(cls(config, rngs=nnx.Rngs(params=k))), out_shardings=shardings)(key)
    return nnx.merge(graphdef, state)


__all__ = [
    "DEFAULT_RULES", "DeepseekV3", "DeepseekV3Config", "ExpertBias", "Llama", "LlamaConfig", "Qwen2Config",
    "abstract_model", "attention_path", "build_model", "logical_to_spec", "model_class", "model_config_from_dict",
    "model_config_from_hf", "param_counts",
    "state_shardings", "update_balancing_bias",
]
