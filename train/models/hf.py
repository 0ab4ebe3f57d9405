"""Hugging Face checkpoint import/export for LlamaForCausalLM, Qwen2ForCausalLM and DeepseekV3ForCausalLM.

    model, config = load_hf_checkpoint(path, dtype=jnp.float32)   # config.json + *.safetensors (+ index)
    save_hf_checkpoint(model, config, path)                       # what transformers' from_pretrained reads

Our module tree mirrors the transformers one, so the mapping is mechanical: `layers.<sub>.kernel` [L, in, out] is
`model.layers.{i}.<sub>.weight` [out, in] for each layer i; routed experts [L, E, in, out] are
`model.layers.{i}.mlp.experts.{e}.<proj>.weight` (the hub and `save_pretrained` layout; the fused transformers
in-memory layout `mlp.experts.gate_up_proj` / `down_proj` is accepted too).

I/O goes through the `safetensors` library (numpy framework, so bfloat16 stays bfloat16 via ml_dtypes without
torch). Loading is lazy: each param is built with `jax.make_array_from_callback`, whose callback reads, through
`safe_open(...).get_slice`, only the part of each tensor that one addressable device holds, so a process of a
multi-host job reads only what its own devices need, and host memory beyond the model stays within one open
(memory-mapped) shard plus one device's slice of one param.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import save_file

from train.models import DEFAULT_RULES, abstract_model, model_class, model_config_from_hf, state_shardings

SUPPORTED_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4}  # name -> bytes per element
READ_CHUNK = 16 * 2**20  # bytes of a mapping touched before it is unmapped again (big tensors are read in blocks;
# a block is held twice, as mapped pages and as its copy: 64 MiB blocks left 226 MiB beyond the model, 16 MiB 67)
_FUSED_EXPERT = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


class _Shards:
    """Lazy tensor access over a checkpoint directory: an index of (file, dtype, shape) per tensor from the
    headers, and at most one shard open (memory-mapped) at a time, so reading never maps more than one shard;
    `close()` unmaps it (its touched pages count as resident memory while mapped)."""

    def __init__(self, path: Path):
        index = path / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors files (or model.safetensors.index.json) in {path}")
        self.entries = {}  # tensor name -> (file, dtype name, shape)
        for file in files:
            with safe_open(path / file, framework="numpy") as f:
                for name in f.keys():
                    s = f.get_slice(name)
                    self.entries[name] = (path / file, s.get_dtype(), tuple(s.get_shape()))
        self._open_file, self._handle = None, None

    def __contains__(self, name):
        return name in self.entries or self._fused(name) is not None

    def _fused(self, name):
        m = _FUSED_EXPERT.match(name)
        if m is None or name in self.entries:
            return None
        prefix, expert, proj = m.groups()
        fused = f"{prefix}.gate_up_proj" if proj in ("gate", "up") else f"{prefix}.down_proj"
        return (fused, int(expert), proj) if fused in self.entries else None

    def stored_name(self, name: str) -> str:
        """The tensor in the files that holds `name` (itself, or the fused experts tensor)."""
        fused = self._fused(name)
        return name if fused is None else fused[0]

    def shape(self, name: str) -> tuple:
        """The shape of tensor `name` (a fused expert's slice shape for the per-expert names)."""
        fused = self._fused(name)
        if fused is None:
            return self.entries[name][2]
        shape = self.entries[fused[0]][2][1:]
        return shape if fused[2] == "down" else (shape[0] // 2, *shape[1:])

    def _slice(self, name):
        file, dtype, _ = self.entries[name]
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"tensor {name!r} has unsupported dtype {dtype}; supported: {sorted(SUPPORTED_DTYPES)}")
        if file != self._open_file:  # close the previous shard first: one mapping at a time
            self.close()
            self._handle = safe_open(file, framework="numpy").__enter__()
            self._open_file = file
        return self._handle.get_slice(name)

    def read(self, name: str, index: tuple = ()) -> np.ndarray:
        """Tensor `name`, or only its part `index` (a tuple of slices), read from the mapped file."""
        fused = self._fused(name)
        if fused is None:
            return self._slice(name)[index] if index else self._slice(name)[:]
        tensor, expert, proj = fused  # transformers' in-memory layout: gate_up [E, 2F, D] (gate rows first)
        w = self._slice(tensor)[expert]
        w = w if proj == "down" else np.split(w, 2, axis=0)[proj == "up"]
        return w[index]

    def read_into(self, name: str, index: tuple, dest: np.ndarray, transpose: bool) -> None:
        """dest[...] = tensor[index] (transposed if asked), in row blocks of about READ_CHUNK bytes with the shard
        unmapped after each, so a big tensor never has more than one block of its pages resident."""
        shape = self.shape(name)
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        rows = range(*index[0].indices(shape[0])) if shape else range(1)
        row_bytes = math.prod(len(range(*s.indices(n))) for s, n in zip(index[1:], shape[1:])) * SUPPORTED_DTYPES.get(
            self.entries[self.stored_name(name)][1], 8)
        step = max(1, READ_CHUNK // max(row_bytes, 1))
        if len(rows) <= step or self._fused(name) is not None or rows.step != 1:
            part = self.read(name, index)
            dest[...] = part.T if transpose else part
            return
        for start in range(0, len(rows), step):
            block = self.read(name, (slice(rows.start + start, rows.start + min(start + step, len(rows))),
                                     *index[1:]))
            if transpose:
                dest[..., start:start + len(block)] = block.T
            else:
                dest[start:start + len(block)] = block
            self.close()

    def close(self):
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
        self._open_file, self._handle = None, None


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


def _param_source(shards: _Shards, key, var, config, path: Path):
    """(callback for `jax.make_array_from_callback`, the checkpoint tensors it reads) for one of our params.

    The callback gets the index (slices) of one device's part of the param and reads just that part: the
    layer/expert tensors its leading slices cover, each cut by the inner slices (transposed to torch's order).
    Holds the parts it read (this process's share of one param) until the param is placed."""
    name_of, n_lead, transpose = _hf_tensors(key, var.shape, config)
    lead, inner = var.shape[:n_lead], var.shape[n_lead:]
    expected = inner[::-1] if transpose else inner
    names = {index: name_of(*index) for index in np.ndindex(*lead)}
    for name in names.values():
        if name not in shards:
            raise KeyError(f"checkpoint {path} lacks tensor {name!r} (needed for {'.'.join(map(str, key))})")
        if shards.shape(name) != tuple(expected):
            raise ValueError(f"tensor {name!r}: expected shape {tuple(expected)}, found {shards.shape(name)} "
                             f"(check config.json against the weights)")

    done = {}  # devices holding the same part (replicas on other mesh axes) share one read

    def read(index):
        index = tuple(index) + (slice(None),) * (len(var.shape) - len(index))
        part_key = tuple(s.indices(n) for s, n in zip(index, var.shape))
        if part_key not in done:
            done[part_key] = read_part(index)
        return done[part_key]

    def read_part(index):
        ranges = [range(*s.indices(n)) for s, n in zip(index[:n_lead], lead)]
        inner_index = index[n_lead:][::-1] if transpose else index[n_lead:]
        shape = [len(range(*s.indices(n))) for s, n in zip(index, var.shape)]
        out = _aligned_empty(shape, var.dtype)  # param_dtype, but float32 for the router and balancing bias
        flat = out.reshape(-1, *shape[n_lead:])
        for pos, idx in enumerate(np.ndindex(*map(len, ranges))):
            shards.read_into(names[tuple(r[i] for r, i in zip(ranges, idx))], inner_index, flat[pos], transpose)
        return out

    return read, set(names.values())


def _aligned_empty(shape, dtype, align: int = 4096) -> np.ndarray:
    """An uninitialised page-aligned array: the CPU backend can then adopt it as the device buffer instead of
    copying it (the host copy of a param would otherwise double its memory while it is placed)."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + align, np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def load_hf_checkpoint(path, dtype=jnp.float32, *, mesh: jax.sharding.Mesh | None = None, rules=DEFAULT_RULES,
                       **overrides):
    """Load a local Hugging Face checkpoint directory (config.json + safetensors, sharded or not).

    Returns (model, config). `dtype` is the param and compute dtype; `overrides` set our own config fields
    (e.g. remat='full', capacity_factor=1.25). With a mesh, each param is placed sharded as it is read, each
    process reading only its addressable devices' parts; without one, on the first local device.
    """
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json (expected a Hugging Face checkpoint directory)")
    config = model_config_from_hf(json.loads((path / "config.json").read_text()), dtype=jnp.dtype(dtype).name,
                                  param_dtype=jnp.dtype(dtype).name, **overrides)
    shards = _Shards(path)
    graphdef, state = nnx.split(abstract_model(config))
    flat_shardings = dict(nnx.to_flat_state(state_shardings(state, mesh, rules))) if mesh is not None else {}
    single = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    used = set()
    try:
        for key, var in nnx.to_flat_state(state):
            read, names = _param_source(shards, key, var, config, path)
            used |= {shards.stored_name(n) for n in names}
            sharding = flat_shardings[key].get_value() if mesh is not None else single
            var.set_value(jax.make_array_from_callback(var.shape, sharding, read))
            shards.close()  # unmap: the pages this param touched would otherwise stay resident
    finally:
        shards.close()
    unused = sorted(set(shards.entries) - used)
    if unused:
        warnings.warn(f"{len(unused)} checkpoint tensors not used by {type(config).__name__}, e.g. {unused[:3]}")
    return nnx.merge(graphdef, state), config


def _to_host(x) -> np.ndarray:
    """The whole of `x` as a numpy array, also where other processes hold parts of it (every process must call
    this for the same arrays in the same order: the parts are gathered with a collective)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def save_hf_checkpoint(model, config, path, *, max_shard_size: int = 5 * 2**30):
    """Write config.json + safetensors (sharded with an index above `max_shard_size` bytes) for transformers.

    Multi-process: every process calls it with the same (sharded) model; each layer/expert slice is gathered in
    turn and process 0 writes the files, so no host holds more than one output shard."""
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
    weight_map, writer = {}, jax.process_index() == 0
    for k, shard in enumerate(shards):  # one shard's tensors on the host at a time
        file = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, var, index, transpose, _ in shard:
            value = _to_host(var[...][index] if index else var[...])
            if writer:
                tensors[name] = np.ascontiguousarray(value.T if transpose else value)
            weight_map[name] = file
        if writer:
            save_file(tensors, str(path / file), metadata={"format": "pt"})
    if not writer:
        return
    if len(shards) > 1:
        total = sum(item[-1] for item in plan)
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
