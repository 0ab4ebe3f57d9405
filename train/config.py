"""The one config object of a run: YAML file + dotted command-line overrides, validated strictly.

A run is described by nested dataclasses (`Config` and its sections). `load_config(path, overrides)` reads the
YAML, applies `a.b.c=value` overrides (values parsed as YAML scalars), and builds the dataclasses; an unknown key
anywhere fails with the closest valid names, a value of the wrong type names the key and the expected type, and a
value outside an option's fixed set (a `Literal` field, or an enumerated key of the model section) names the key,
the value and the closest valid one. `model` is a Hugging Face-style model config dict (its enumerated keys are
checked here, the rest by `train.models.model_config_from_dict`). This module is the bottom of `train/`: it imports
nothing of the project (nor JAX: data-preparing worker processes import it), so every other module may import it.
Without a path, `load_config` reads the bundled `tiny.yaml` (package data `train.configs`, the repository's
`configs/` directory), so it works from any directory after `pip install`.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

MESH_AXES = ("data", "fsdp", "tensor", "expert")
BUNDLED_CONFIGS = "train.configs"     # the package that ships configs/*.yaml (see pyproject.toml)
DEFAULT_CONFIG = "tiny.yaml"

# Options with a fixed set of values. The muon_jax ones restate muon_jax.NS_MODES, NS_METHODS, NS_SCHEDULES and
# LR_SCALES so that this module stays free of JAX; tests/test_config.py asserts that they are equal.
OptimizerName = Literal["muon", "adamw"]
ScheduleName = Literal["cosine", "wsd", "constant"]
NanPolicy = Literal["halt", "skip"]
DataFormat = Literal["auto", "text", "jsonl", "tokens"]
NsMode = Literal["placed", "balanced", "gather"]
NsMethod = Literal["auto", "standard", "gram"]
NsCoeffs = Literal["moonlight", "polar_express"]
LrScale = Literal["moonlight", "spectral", "none"]
FloatDtype = Literal["float32", "bfloat16", "float16"]
# The model section's enumerated keys; train/models/model_config.py annotates its fields with these types.
ModelType = Literal["llama", "qwen2", "deepseek_v3"]
RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]
RopeType = Literal["default", "linear", "llama3", "yarn"]
HiddenAct = Literal["silu"]                # SwiGLU only
ScoringFunc = Literal["sigmoid"]           # DeepSeek-V3 routing only
TopkMethod = Literal["noaux_tc"]
MODEL_CHOICES = {"model_type": ModelType, "remat": RematPolicy, "hidden_act": HiddenAct, "dtype": FloatDtype,
                 "param_dtype": FloatDtype, "scoring_func": ScoringFunc, "topk_method": TopkMethod}


class ConfigError(ValueError):
    """A config that cannot describe a run; the message names the key and the fix."""


def did_you_mean(key: str, valid) -> str:
    """The closest valid names to a mistyped `key` (or the full list), for error messages."""
    close = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.5)
    return f"did you mean {', '.join(repr(c) for c in close)}?" if close else f"valid keys: {', '.join(sorted(valid))}"


def choices(options) -> tuple:
    """The valid values of a `Literal[...]` type (or of a sequence of values)."""
    return typing.get_args(options) if typing.get_origin(options) is Literal else tuple(options)


def check_choice(where: str, value, options) -> None:
    """Raises ConfigError unless `value` is one of `options` (a `Literal` type or a sequence); the one line names the
    key `where`, the value and the closest valid one (difflib's similarity ratio), e.g.
    ``optimizer.ns_mode='plced' is not one of 'placed', 'balanced', 'gather' (did you mean 'placed'?)``."""
    valid = choices(options)
    if isinstance(value, str) and value in valid:
        return
    closest = difflib.get_close_matches(str(value), valid, n=1, cutoff=0.0)
    hint = f" (did you mean {closest[0]!r}?)" if closest else ""
    raise ConfigError(f"{where}={value!r} is not one of {', '.join(repr(v) for v in valid)}{hint}")


def check_choices(obj, prefix: str = "") -> None:
    """`check_choice` on every `Literal`-annotated field of the dataclass instance `obj`, named `prefix + field`."""
    hints = typing.get_type_hints(type(obj))
    for field in dataclasses.fields(obj):
        if typing.get_origin(hints[field.name]) is Literal:
            check_choice(prefix + field.name, getattr(obj, field.name), hints[field.name])


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The pretraining corpus and its tokenizer (see train/data/)."""
    source: str = "tinyshakespeare"   # bundled name ("tinyshakespeare" | "medium"), a file / directory / glob, or
                                      # a directory made by python -m train.prepare_data
    format: DataFormat = "auto"       # "auto" (by extension) | "text" | "jsonl" | "tokens" (.npy ids)
    text_field: str = "text"          # the JSONL field holding a document
    tokenizer: str = "bpe"            # "byte" | "bpe" | "gpt2" | path to a tokenizer.json
    vocab_size: int = 4096            # size of the trained "bpe" vocabulary
    val_fraction: float = 0.05        # held-out share of documents, chosen by hash (text files: ~8 KB pieces); a
                                      # prepared directory keeps the split it was prepared with
    shuffle: bool = True
    skip_bad_lines: bool = False      # preparing: malformed JSONL lines are skipped and counted instead of an error
    workers: int = 0                  # grain threads building batches ahead (0: in the training thread)
    prefetch: int = 2                 # batches built ahead per worker thread

    def __post_init__(self):
        if self.workers < 0 or self.prefetch < 0:
            raise ConfigError(f"data.workers={self.workers}, data.prefetch={self.prefetch}: must be >= 0")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction={self.val_fraction}: must be in (0, 1)")
        if self.tokenizer == "bpe" and self.vocab_size <= 257:
            raise ConfigError(f"data.vocab_size={self.vocab_size}: a byte-level BPE needs more than 257 "
                              "(256 bytes + eos)")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """`muon` (muon_jax.muon: Muon for hidden matrices, AdamW for the rest) or `adamw` (optax.adamw on all)."""
    name: OptimizerName = "muon"
    learning_rate: float = 3e-3          # peak LR; shared by both Muon branches (Moonlight's 0.2-RMS matching)
    weight_decay: float = 0.1
    b1: float = 0.9                      # AdamW betas (the Adam branch of muon, or adamw)
    b2: float = 0.95
    eps: float = 1e-8
    momentum: float = 0.95               # Muon
    nesterov: bool = True
    ns_steps: int = 5
    ns_coeffs: NsCoeffs = "moonlight"    # muon_jax.NS_SCHEDULES: "moonlight" | "polar_express"
    ns_dtype: FloatDtype = "bfloat16"
    ns_method: NsMethod = "auto"         # Newton–Schulz: "auto" | "standard" | "gram" (muon_jax.muon)
    lr_scale: LrScale = "moonlight"      # "moonlight" | "spectral" | "none" (muon_jax.scale_by_shape)
    ns_mode: NsMode = "placed"           # distributed Muon when params are sharded: "placed" | "balanced" | "gather"
    grad_clip: float = 1.0               # global-norm clip; 0 disables
    z_loss: float = 0.0                  # coefficient of log(Z)^2 (PaLM); 0 disables


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """`cosine`: linear warmup then cosine to `final_fraction`·peak. `wsd`: warmup, stable, then a linear decay
    over the last `decay_fraction` of the steps. `constant`: warmup then flat."""
    name: ScheduleName = "cosine"
    warmup_steps: int = 100
    final_fraction: float = 0.1
    decay_fraction: float = 0.2


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; logical axis rules map params onto them (see train/runtime.py's `make_mesh`).

    `data`, `fsdp`, `tensor`, `expert` are the axes within a slice (ICI, the fast chip-to-chip links; one may be -1:
    all remaining devices of a slice). `dcn_*` multiply them across slices (DCN, the data-centre network between
    TPU slices, or between GPU hosts): axis `a` spans `a * dcn_a` devices. MaxText's `ici_*`/`dcn_*` split: put
    only data (or fsdp) across slices, whose collectives are few and large."""
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    dcn_expert: int = 1

    def __post_init__(self):
        bad = [f"mesh.dcn_{a}={getattr(self, f'dcn_{a}')}" for a in MESH_AXES if getattr(self, f"dcn_{a}") < 1]
        if bad:
            raise ConfigError(f"{', '.join(bad)}: a dcn_* size counts slices and must be >= 1 "
                              "(1: the axis stays within a slice)")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 500                     # steps between saves; the last step is always saved
    keep: int = 3                        # newest checkpoints kept
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class LogConfig:
    every: int = 10                      # steps between metrics lines
    eval_every: int = 200                # steps between validation passes (and at the end)
    eval_batches: int = 8
    sample_prompt: str = "\n"            # text generated from at the end of the run
    sample_tokens: int = 200
    tensorboard: bool = True


@dataclasses.dataclass(frozen=True)
class MuonClipConfig:
    """QK-clip (Kimi K2): after each step, rescale W_q/W_k of every head whose max logit exceeded `tau`."""
    enabled: bool = False
    tau: float = 100.0


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning on chat data (`python -m train.sft`, see train/sft.py); pretraining ignores it."""
    init_from: str = ""                  # a trainer run_dir or a Hugging Face checkpoint dir; "" = random init
    train_file: str = "chat_tiny"        # chat JSONL ({"messages": [{"role", "content"}, ...]}) or "chat_tiny"
    val_file: str = ""                   # held-out chat JSONL; "" = hold out val_fraction of train_file
    val_fraction: float = 0.1
    skip_bad_lines: bool = False         # malformed lines: skipped and counted instead of an error
    export_hf: str = ""                  # Hugging Face export of the final model; "" = run_dir/hf


@dataclasses.dataclass(frozen=True)
class Config:
    run_dir: str = "runs/tiny"
    steps: int = 1000
    seed: int = 0
    seq_len: int = 256
    global_batch: int = 32               # sequences per optimizer step, over all processes and micro-batches
    grad_accum: int = 1                  # micro-batches per step
    nan_policy: NanPolicy = "halt"       # "halt": stop with a clear error; "skip": drop the step's update
    max_consecutive_skips: int = 5
    compile_cache_dir: str = ""          # jax's persistent compilation cache ("" = jax's own setting, e.g. the
                                         # JAX_COMPILATION_CACHE_DIR variable); a path or gs:// URL is reused by reruns
    model: dict = dataclasses.field(default_factory=dict)
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    muon_clip: MuonClipConfig = MuonClipConfig()
    sft: SFTConfig = SFTConfig()

    def to_dict(self) -> dict:
        """The plain dict that `config_from_dict` turns back into this config."""
        return dataclasses.asdict(self)


def _check_type(where: str, value, annotation):
    """Coerce/validate one scalar against its field annotation (ints are valid floats; None only if Optional; a
    `Literal` field takes one of its values)."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        check_choice(where, value, annotation)
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        annotation = next(a for a in options if a is not type(None))
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is dict and isinstance(value, dict):
        return value
    if isinstance(annotation, type) and isinstance(value, annotation) and not (
            annotation is int and isinstance(value, bool)):
        return value
    name = getattr(annotation, "__name__", str(annotation))
    raise ConfigError(f"config key {where!r} must be {name}, got {value!r} ({type(value).__name__})")


def _build(cls, d: dict, prefix: str):
    if not isinstance(d, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'!r} must be a mapping, got {d!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in d.items():
        if key not in fields:
            raise ConfigError(f"unknown config key {prefix + key!r}: {did_you_mean(key, fields)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _check_type(prefix + key, value, hint)
    return cls(**kwargs)


def _check_model_choices(model: dict) -> None:
    """The model section's enumerated keys (MODEL_CHOICES, rope_scaling's type), checked before any model is built."""
    if "model_type" not in model:
        raise ConfigError("config section 'model' needs a model_type ('llama', 'qwen2' or 'deepseek_v3')")
    for key, options in MODEL_CHOICES.items():
        if key in model:
            check_choice(f"model.{key}", model[key], options)
    scaling = model.get("rope_scaling")
    if isinstance(scaling, dict):
        check_choice("model.rope_scaling.rope_type", scaling.get("rope_type", "default"), RopeType)


def _validate(c: Config) -> Config:
    for key in ("steps", "seq_len", "global_batch", "grad_accum"):
        if getattr(c, key) < 1:
            raise ConfigError(f"{key}={getattr(c, key)} must be ≥ 1")
    if c.global_batch % c.grad_accum:
        raise ConfigError(f"global_batch={c.global_batch} is not divisible by grad_accum={c.grad_accum}")
    sizes = [getattr(c.mesh, a) for a in MESH_AXES]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: each must be ≥ 1, at most one may be -1")
    o, s = c.optimizer, c.schedule
    if not (math.isfinite(o.learning_rate) and o.learning_rate > 0):
        raise ConfigError(f"optimizer.learning_rate={o.learning_rate} must be a positive number (the peak LR, "
                          "e.g. 3e-3): zero never moves the weights, a negative one ascends the loss")
    for key in ("weight_decay", "grad_clip", "z_loss"):
        if not (math.isfinite(getattr(o, key)) and getattr(o, key) >= 0):
            raise ConfigError(f"optimizer.{key}={getattr(o, key)} must be ≥ 0 (0 disables it)")
    if s.warmup_steps < 0:
        raise ConfigError(f"schedule.warmup_steps={s.warmup_steps} must be ≥ 0")
    for key in ("final_fraction", "decay_fraction"):
        if not 0 <= getattr(s, key) <= 1:
            raise ConfigError(f"schedule.{key}={getattr(s, key)} must be in [0, 1] (a fraction of the peak LR / "
                              "of the steps)")
    if not 0 < c.sft.val_fraction < 1:
        raise ConfigError(f"sft.val_fraction={c.sft.val_fraction} must be in (0, 1)")
    _check_model_choices(c.model)
    return c


def set_dotted(d: dict, dotted: str, value) -> None:
    """d['a']['b'] = value for 'a.b' (creating sections as needed)."""
    *parents, leaf = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
    d[leaf] = value


def parse_overrides(overrides) -> list[tuple[str, Any]]:
    """[(dotted key, YAML-parsed value)] from `key=value` strings."""
    pairs = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optimizer.learning_rate=0.01)")
        pairs.append((key.strip(), yaml.safe_load(raw) if raw.strip() else "")) 
    return pairs


def config_from_dict(d: dict, overrides=()) -> Config:
    """A validated run `Config` from a plain dict plus `key=value` overrides."""
    d = dict(d)
    for key, value in parse_overrides(overrides):
        set_dotted(d, key, value)
    return _validate(_build(Config, d, ""))


def bundled_config(name: str = DEFAULT_CONFIG):
    """The shipped config `name` (e.g. "tiny.yaml"), read through importlib.resources: it works in a checkout, an
    editable install and a wheel alike. Raises ConfigError naming the shipped configs when there is none such."""
    configs = importlib.resources.files(BUNDLED_CONFIGS)
    shipped = sorted(f.name for f in configs.iterdir() if f.name.endswith(".yaml"))
    if name not in shipped:
        raise ConfigError(f"there is no bundled config {name!r}; bundled: {', '.join(shipped)}")
    return configs / name


def load_config(path=None, overrides=()) -> Config:
    """Config from a YAML file (a path, or a `bundled_config` resource; default: the bundled tiny.yaml) plus
    `key=value` overrides."""
    source = bundled_config() if not path else Path(path) if isinstance(path, str) else path
    if not source.is_file():
        raise ConfigError(f"config file {str(source)!r} does not exist; pass the path of a YAML config, or leave "
                          "--config out for the bundled tiny.yaml")
    return config_from_dict(yaml.safe_load(source.read_text()) or {}, overrides)
