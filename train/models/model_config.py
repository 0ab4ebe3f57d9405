"""Model configs: dataclasses whose fields carry the Hugging Face `config.json` names.

`from_dict` is strict (our YAML/JSON configs: a typo is an error), `from_hf_dict` is lenient (hub configs carry
many keys we do not need). Both families also carry our own fields: compute `dtype`, `param_dtype`, `remat`
policy and, for MoE, `capacity_factor` and `balance_rate`. Enumerated fields are `Literal` types of train.config
(the same ones `load_config` checks the model section against), checked here by `check_choices`. RoPE/YaRN maths:
train/models/rope.py.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax.numpy as jnp
from flax.core import FrozenDict

from train.config import (FloatDtype, HiddenAct, ModelType, RematPolicy, RopeType, ScoringFunc, TopkMethod,
                          check_choice, check_choices, did_you_mean)
# Our own fields: never written to a Hugging Face config.json.
OWN_FIELDS = ("dtype", "param_dtype", "remat", "capacity_factor", "balance_rate")


def _normalise_rope(d: dict) -> dict:
    """Map transformers>=5 `rope_parameters` (or old `rope_scaling`+`rope_theta`) onto our two fields."""
    d = dict(d)
    params = d.pop("rope_parameters", None)
    if params:
        params = dict(params)
        d.setdefault("rope_theta", params.pop("rope_theta", 10000.0))
        d.setdefault("rope_scaling", params)
    scaling = d.get("rope_scaling")
    if scaling is not None:
        scaling = dict(scaling)
        scaling["rope_type"] = scaling.pop("type", scaling.get("rope_type", "default"))
        d["rope_scaling"] = None if scaling["rope_type"] == "default" and len(scaling) == 1 else scaling
    return d


@dataclasses.dataclass(frozen=True)
class _Config:
    """The fields both families share (Hugging Face names, plus our dtype/param_dtype/remat)."""
    model_type: ClassVar[str]
    architecture: ClassVar[str]

    hidden_act: HiddenAct = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Any = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: Any = None
    eos_token_id: Any = None
    pad_token_id: Any = None
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    remat: RematPolicy = "none"

    def __post_init__(self):
        for name in ("dtype", "param_dtype"):  # accept jnp dtypes, store names so the config stays serialisable
            value = getattr(self, name)
            check_choice(name, value if isinstance(value, str) else jnp.dtype(value).name, FloatDtype)
            object.__setattr__(self, name, jnp.dtype(value).name)
        if self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", FrozenDict(self.rope_scaling))
            check_choice("rope_scaling.rope_type", self.rope_scaling.get("rope_type", "default"), RopeType)
        check_choices(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "_Config":
        """Strict constructor: an unknown key raises ValueError naming the closest valid keys."""
        d = dict(d)
        model_type = d.pop("model_type", cls.model_type)
        if model_type not in cls.supported_model_types:
            raise ValueError(f"model_type {model_type!r} does not belong to {cls.__name__}")
        valid = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in valid:
                raise ValueError(f"unknown {cls.__name__} key {key!r}: {did_you_mean(key, valid)}")
        return cls._make(model_type, d)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **overrides) -> "_Config":
        """Lenient constructor from a Hugging Face config.json dict (unknown keys are ignored)."""
        d = _normalise_rope(d)
        model_type = d.get("model_type", cls.model_type)
        cls._check_hf(d)
        valid = {f.name for f in dataclasses.fields(cls)} - set(OWN_FIELDS)
        kept = {k: v for k, v in d.items() if k in valid}
        if "torch_dtype" in d or "dtype" in d:  # the checkpoint's storage dtype is a good default for params
            stored = d.get("dtype") or d.get("torch_dtype")
            kept["param_dtype"] = kept["dtype"] = stored
        kept.update(overrides)
        return cls._make(model_type, kept)

    @classmethod
    def _make(cls, model_type, d):
        return cls(**d) if model_type == cls.model_type else cls._subtype(model_type, d)

    @classmethod
    def _check_hf(cls, d):
        pass

    def to_hf_dict(self) -> dict[str, Any]:
        """The Hugging Face config.json dict (our own fields are dropped)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in OWN_FIELDS}
        d["rope_scaling"] = None if self.rope_scaling is None else dict(self.rope_scaling)
        return {"architectures": [self.architecture], "model_type": self.model_type,
                "torch_dtype": self.param_dtype, **d}

    def to_dict(self) -> dict[str, Any]:
        """All fields (ours included), the inverse of `from_dict`."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["rope_scaling"] = None if self.rope_scaling is None else dict(self.rope_scaling)
        return {"model_type": self.model_type, **d}


@dataclasses.dataclass(frozen=True)
class LlamaConfig(_Config):
    """Dense Llama / Qwen2 decoder. Qwen2 is `Qwen2Config` (model_type 'qwen2'): q/k/v bias, no o_proj bias."""

    model_type: ClassVar[str] = "llama"
    architecture: ClassVar[str] = "LlamaForCausalLM"
    supported_model_types: ClassVar[tuple[str, ...]] = ("llama", "qwen2")

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads} (GQA groups)")
        super().__post_init__()

    @property
    def attention_head_dim(self) -> int:
        """The head dim the attention kernel sees."""
        return self.head_dim

    @property
    def o_proj_bias(self) -> bool:
        """Llama's attention_bias covers o_proj too; Qwen2 biases only q/k/v."""
        return self.attention_bias and self.model_type == "llama"

    @classmethod
    def _subtype(cls, model_type, d):
        return Qwen2Config(**d)

    @classmethod
    def _check_hf(cls, d):
        if d.get("mlp_bias"):
            raise ValueError("mlp_bias=True is not supported (SwiGLU without biases only)")
        if d.get("use_sliding_window"):
            raise ValueError("use_sliding_window=True is not supported (full causal attention only)")


@dataclasses.dataclass(frozen=True)
class Qwen2Config(LlamaConfig):
    """Qwen2: a `LlamaConfig` whose q/k/v projections carry a bias (attention_bias defaults to True)."""

    model_type: ClassVar[str] = "qwen2"
    architecture: ClassVar[str] = "Qwen2ForCausalLM"
    supported_model_types: ClassVar[tuple[str, ...]] = ("qwen2",)
    attention_bias: bool = True

    @classmethod
    def _check_hf(cls, d):
        super()._check_hf(d)
        d.setdefault("attention_bias", True)  # Qwen2 configs do not carry the key; the bias is implied

    def to_hf_dict(self):
        d = super().to_hf_dict()
        if not self.attention_bias:
            raise ValueError("Qwen2ForCausalLM always has q/k/v biases; export attention_bias=False as llama")
        del d["attention_bias"]
        return d


@dataclasses.dataclass(frozen=True)
class DeepseekV3Config(_Config):
    """DeepSeek-V3 / Moonlight: MLA attention, sigmoid-routed MoE with shared experts, first-k dense layers."""

    model_type: ClassVar[str] = "deepseek_v3"
    architecture: ClassVar[str] = "DeepseekV3ForCausalLM"
    supported_model_types: ClassVar[tuple[str, ...]] = ("deepseek_v3",)

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = None
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    routed_scaling_factor: float = 2.5
    n_group: int = 8
    topk_group: int = 4
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    scoring_func: ScoringFunc = "sigmoid"   # DeepSeek-V3 routing only
    topk_method: TopkMethod = "noaux_tc"
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    max_position_embeddings: int = 4096
    rope_interleave: bool = True
    capacity_factor: float | None = None
    balance_rate: float = 1e-3

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.n_routed_experts % self.n_group or self.n_routed_experts // self.n_group < 2:
            raise ValueError(f"n_routed_experts={self.n_routed_experts} must split into n_group={self.n_group} "
                             "groups of at least 2 experts (group score = sum of its top-2)")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ValueError(f"first_k_dense_replace={self.first_k_dense_replace} must lie in "
                             f"[0, num_hidden_layers={self.num_hidden_layers}]")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor={self.capacity_factor} must be positive (or None: no dropping)")
        super().__post_init__()

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def attention_head_dim(self) -> int:
        """The head dim the attention kernel sees: the larger of the q/k and v widths (the other is padded)."""
        return max(self.qk_head_dim, self.v_head_dim)

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @classmethod
    def _check_hf(cls, d):
        if d.get("moe_layer_freq", 1) != 1:
            raise ValueError(f"moe_layer_freq={d['moe_layer_freq']} is not supported (every layer after "
                             "first_k_dense_replace is MoE)")
        if d.get("quantization_config"):
            raise ValueError("quantised (e.g. FP8) checkpoints are not supported; dequantise to bf16 first")
        d.setdefault("n_group", 1)
        d.setdefault("topk_group", 1)

    def to_hf_dict(self):
        return {**super().to_hf_dict(), "moe_layer_freq": 1, "num_nextn_predict_layers": 0}


CONFIG_CLASSES = {"llama": LlamaConfig, "qwen2": Qwen2Config, "deepseek_v3": DeepseekV3Config}


def _config_class(model_type):
    check_choice("model_type", model_type, ModelType)
    return CONFIG_CLASSES[model_type]


def model_config_from_dict(d: dict[str, Any]) -> LlamaConfig | DeepseekV3Config:
    """Strict config from our dict form; `d["model_type"]` picks the family."""
    return _config_class(d.get("model_type")).from_dict(d)


def model_config_from_hf(d: dict[str, Any], **overrides) -> LlamaConfig | DeepseekV3Config:
    """Lenient config from a Hugging Face config.json dict; `overrides` set our own fields (e.g. dtype)."""
    return _config_class(d.get("model_type")).from_hf_dict(d, **overrides)


def param_counts(config) -> tuple[int, int]:
    """(total, active-per-token) parameter counts from the config alone; embeddings and lm_head count in both."""
    c = config
    d = c.hidden_size
    embed = c.vocab_size * d * (1 if c.tie_word_embeddings else 2) + d  # + final norm
    mlp = lambda width: 3 * d * width
    if isinstance(c, DeepseekV3Config):
        h = c.num_attention_heads
        q = d * h * c.qk_head_dim if c.q_lora_rank is None else (
            d * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * h * c.qk_head_dim)
        attn = (q + d * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
                + c.kv_lora_rank * h * (c.qk_nope_head_dim + c.v_head_dim) + h * c.v_head_dim * d)
        if c.attention_bias:
            attn += (c.q_lora_rank or 0) + c.kv_lora_rank + c.qk_rope_head_dim + d
        shared = mlp(c.moe_intermediate_size * c.n_shared_experts) + d * c.n_routed_experts  # + router
        per_expert = mlp(c.moe_intermediate_size)
        dense_layer = attn + mlp(c.intermediate_size) + 2 * d
        moe_total = attn + shared + c.n_routed_experts * per_expert + 2 * d
        moe_active = attn + shared + c.num_experts_per_tok * per_expert + 2 * d
        dense = embed + c.first_k_dense_replace * dense_layer
        return dense + c.num_moe_layers * moe_total, dense + c.num_moe_layers * moe_active
    qkv = d * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    attn = qkv + c.num_attention_heads * c.head_dim * d
    if c.attention_bias:
        attn += (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim + (d if c.o_proj_bias else 0)
    total = embed + c.num_hidden_layers * (attn + mlp(c.intermediate_size) + 2 * d)
    return total, total
