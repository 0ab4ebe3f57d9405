"""Hugging Face checkpoint import/export for LlamaForCausalLM, Qwen2ForCausalLM and DeepseekV3ForCausalLM.

    model, config = load_hf_checkpoint(path, dtype=jnp.float32)   # config.json + *.safetensors (+ index)
    save_hf_checkpoint(model, config, path)                       # what transformers' from_pretrained reads

Our module tree mirrors the transformers one, so the mapping is mechanical: `layers.<sub>.kernel` [L, in, out] is
`model.layers.{i}.<sub>.weight` [out, in] for each layer i; routed experts [L, E, in, out] are
`model.layers.{i}.mlp.experts.{e}.<proj>.weight` (the hub and `save_pretrained` layout; the fused transformers
in-memory layout `mlp.experts.gate_up_proj` / `down_proj` is accepted too). Safetensors files are parsed here
(memory-mapped, read tensor by tensor), which also covers bfloat16 without torch.
"""
from __future__ import annotations

import json
import math
import re
import struct
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from train.models import DEFAULT_RULES, abstract_model, model_class, model_config_from_hf, state_shardings

SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16,
                      "I64": np.int64, "I32": np.int32}
_DTYPE_NAMES = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}
_FUSED_EXPERT = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


class _SafetensorsReader:
    """Lazy tensor access over a checkpoint directory: headers parsed up front, data memory-mapped per shard."""

    def __init__(self, path: Path):
        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors files (or model.safetensors.index.json) in {path}")
        self.entries = {}  # tensor name -> (file, header entry, data start)
        for file in files:
            with open(path / file, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            for name, entry in header.items():
                self.entries[name] = (path / file, entry, 8 + n)
        self.used: set[str] = set()
        self._maps: dict[Path, np.memmap] = {}

    def __contains__(self, name):
        return name in self.entries or self._fused(name) is not None

    def _fused(self, name):
        m = _FUSED_EXPERT.match(name)
        if m is None or name in self.entries:
            return None
        prefix, expert, proj = m.groups()
        fused = f"{prefix}.gate_up_proj" if proj in ("gate", "up") else f"{prefix}.down_proj"
        return (fused, int(expert), proj) if fused in self.entries else None

    def get(self, name: str) -> np.ndarray:
        fused = self._fused(name)
        if fused is not None:  # transformers' in-memory layout: gate_up [E, 2F, D] (gate rows first), down [E, D, F]
            tensor, expert, proj = fused
            w = self.get(tensor)[expert]
            return w if proj == "down" else np.split(w, 2, axis=0)[proj == "up"]
        if name not in self.entries:
            raise KeyError(f"checkpoint has no tensor {name!r}")
        file, entry, start = self.entries[name]
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r} has unsupported dtype {entry['dtype']}; "
                             f"supported: {sorted(SAFETENSORS_DTYPES)}")
        if file not in self._maps:
            self._maps[file] = np.memmap(file, dtype=np.uint8, mode="r")
        begin, end = entry["data_offsets"]
        self.used.add(name)
        raw = self._maps[file][start + begin:start + end]
        return raw.view(SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def _hf_tensors(path: tuple, shape: tuple, config):
    """Where one of our params lives in a HF checkpoint: (name per stacked slice, leading dims, transpose)."""
    names = [str(p) for p in path]
    if names[0] in ("embed_tokens", "norm", "lm_head"):
        hf = {"embed_tokens": "model.embed_tokens.weight", "norm": "model.norm.weight", "lm_head": "lm_head.weight"}
        return (lambda: hf[names[0]]), 0, names[0] == "lm_head"
    offset = config.first_k_dense_replace if names[0] == "moe_layers" else 0
    *module, leaf = names[1:]
    leaf = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
    if module[-1] == "experts":  # [L, E, in, out] <- model.layers.{i}.mlp.experts.{e}.{proj}.weight
        stem = ".".join(module)
        return (lambda i, e: f"model.layers.{offset + i}.{stem}.{e}.{leaf}.weight"), 2, True
    stem = ".".join(module + [leaf])
    return (lambda i: f"model.layers.{offset + i}.{stem}"), 1, len(shape) == 3


def load_hf_checkpoint(path, dtype=jnp.float32, *, mesh: jax.sharding.Mesh | None = None, rules=DEFAULT_RULES,
                       **overrides):
    """Load a local Hugging Face checkpoint directory (config.json + safetensors, sharded or not).

    Returns (model, config). `dtype` is the param and compute dtype; `overrides` set our own config fields
    (e.g. remat='full', capacity_factor=1.25). With a mesh, each param is placed sharded as it is read.
    """
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json (expected a Hugging Face checkpoint directory)")
    config = model_config_from_hf(json.loads((path / "config.json").read_text()), dtype=jnp.dtype(dtype).name,
                                 param_dtype=jnp.dtype(dtype).name, **overrides)
    reader = _SafetensorsReader(path)
    graphdef, state = nnx.split(abstract_model(config))
    shardings = state_shardings(state, mesh, rules) if mesh is not None else None
    flat_shardings = dict(nnx.to_flat_state(shardings)) if mesh is not None else {}
    for key, var in nnx.to_flat_state(state):
        name_of, n_lead, transpose = _hf_tensors(key, var.shape, config)
        lead, inner = var.shape[:n_lead], var.shape[n_lead:]
        expected = inner[::-1] if transpose else inner
        slices = []
        for index in np.ndindex(*lead):
            name = name_of(*index)
            if name not in reader:
                raise KeyError(f"checkpoint {path} lacks tensor {name!r} (needed for {'.'.join(map(str, key))})")
            tensor = reader.get(name)
            if tuple(tensor.shape) != tuple(expected):
                raise ValueError(f"tensor {name!r}: expected shape {tuple(expected)}, found {tuple(tensor.shape)} "
                                 f"(check config.json against the weights)")
            slices.append(tensor.T if transpose else tensor)
        value = np.stack(slices).reshape(var.shape) if lead else slices[0]
        value = value.astype(var.dtype)  # param_dtype, but float32 for the router and balancing bias
        var.set_value(jnp.asarray(value) if mesh is None else jax.device_put(value, flat_shardings[key].get_value()))
    unused = sorted(set(reader.entries) - reader.used)
    if unused:
        warnings.warn(f"{len(unused)} checkpoint tensors not used by {type(config).__name__}, e.g. {unused[:3]}")
    return nnx.merge(graphdef, state), config


def _write_safetensors(file: Path, tensors: dict[str, np.ndarray]):
    header, offset = {}, 0
    for name, a in tensors.items():
        header[name] = {"dtype": _DTYPE_NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for a in tensors.values():
            f.write(np.ascontiguousarray(a).tobytes())


def save_hf_checkpoint(model, config, path, *, max_shard_size: int = 5 * 2**30):
    """Write config.json + safetensors (sharded with an index above `max_shard_size` bytes) for transformers."""
    if not isinstance(model, model_class(config)):
        raise TypeError(f"model is {type(model).__name__} but config is {type(config).__name__}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    plan = []  # (hf name, our Variable, index into its leading dims, transpose, nbytes)
    for key, var in nnx.to_flat_state(nnx.state(model)):
        name_of, n_lead, transpose = _hf_tensors(key, var.shape, config)
        lead = var.shape[:n_lead]
        nbytes = math.prod(var.shape[n_lead:]) * var.dtype.itemsize
        plan += [(name_of(*index), var, index, transpose, nbytes) for index in np.ndindex(*lead)]
    shards, size = [[]], 0
    for item in plan:
        if shards[-1] and size + item[-1] > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item[-1]
    weight_map = {}
    for k, shard in enumerate(shards):
        file = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, var, index, transpose, _ in shard:
            value = np.asarray(jax.device_get(var[...][index] if index else var[...]))
            tensors[name] = np.ascontiguousarray(value.T if transpose else value)
            weight_map[name] = file
        _write_safetensors(path / file, tensors)
    if len(shards) > 1:
        total = sum(item[-1] for item in plan)
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
