"""What every part of a run shares: the device mesh, the cache directories, the model config that fits the
tokenizer, and moving batches and metrics between the hosts' numpy and the mesh's global arrays."""
from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from train.config import MESH_AXES, Config, ConfigError
from train.models import model_config_from_dict
from train.models.sharding import DEFAULT_RULES, logical_to_spec

AUTO_AXES = (AxisType.Auto,) * len(MESH_AXES)   # the models rely on GSPMD propagation, not explicit sharding


def cache_dir() -> Path:
    """Where tokenizers and tokenized corpora are cached (shared across runs; MUON_JAX_CACHE overrides)."""
    return Path(os.environ.get("MUON_JAX_CACHE", Path.home() / ".cache" / "muon-jax"))


def use_compile_cache(cfg: Config) -> None:
    """Point jax's persistent compilation cache at `cfg.compile_cache_dir` (a path, `~` expanded, or a gs:// URL),
    so that a rerun (a resume, a preempted job, the next process of a sweep) loads its compiled steps instead of
    compiling them again. Must run before the first compile: jax opens the cache once. "" leaves jax's own setting
    (JAX_COMPILATION_CACHE_DIR, else no cache). jax stores only programs that took over
    `jax_persistent_cache_min_compile_time_secs` (1 s) to compile."""
    if cfg.compile_cache_dir:
        where = cfg.compile_cache_dir
        jax.config.update("jax_compilation_cache_dir", where if "://" in where else str(Path(where).expanduser()))


def model_config_for(cfg: Config, tokenizer):
    """The model config, with `vocab_size` taken from the tokenizer when the config leaves it out."""
    d = dict(cfg.model)
    d.setdefault("vocab_size", tokenizer.vocab_size)
    d.setdefault("max_position_embeddings", max(cfg.seq_len, 2048))
    if d["vocab_size"] < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size={d['vocab_size']} is smaller than the tokenizer's vocabulary "
            f"({tokenizer.name}: {tokenizer.vocab_size}); remove model.vocab_size to use the tokenizer's size")
    return model_config_from_dict(d)


def mesh_shape(mesh_cfg, device_count: int, slice_count: int = 1, process_count: int = 1
               ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(ICI shape, DCN shape) over MESH_AXES for `device_count` devices in `slice_count` slices.

    DCN shape: the `dcn_*` sizes; their product must be `slice_count` (1: a single-slice mesh). ICI shape: the
    per-slice sizes, a -1 absorbing the devices of a slice left by the others. A single-slice mesh may use fewer
    devices than present in a single process (the first ones, e.g. 1 of 8 to compare); a multi-slice mesh uses all."""
    ici = {a: getattr(mesh_cfg, a) for a in MESH_AXES}
    dcn = tuple(getattr(mesh_cfg, f"dcn_{a}") for a in MESH_AXES)
    slices = math.prod(dcn)
    dcn_keys = {f"dcn_{a}": d for a, d in zip(MESH_AXES, dcn) if d > 1}
    if slices > 1 and slices != slice_count:
        raise ConfigError(f"mesh {dcn_keys} spans {slices} slices but the devices form {slice_count}; "
                          f"make the dcn_* product {slice_count}")
    per_slice = device_count // slices
    fixed = math.prod(s for s in ici.values() if s != -1)
    if -1 in ici.values():
        if per_slice % fixed:
            raise ConfigError(f"mesh {ici}: {per_slice} devices per slice are not divisible by the fixed axes' "
                              f"product {fixed}")
        ici = {a: per_slice // fixed if s == -1 else s for a, s in ici.items()}
    used = math.prod(ici.values())
    if slices > 1 and used != per_slice:
        raise ConfigError(f"mesh {ici} needs {used} devices per slice but each of the {slices} slices has "
                          f"{per_slice}; set one axis to -1 to absorb the rest")
    if used > device_count or (used < device_count and process_count > 1):
        raise ConfigError(f"mesh {ici} needs {used} devices but {device_count} are present; "
                          "set one axis to -1 to absorb the rest")
    return tuple(ici.values()), dcn


def slice_granules(devices) -> tuple[str, int]:
    """(attribute, count) of the units that DCN connects: TPU slices (`slice_index`) when the devices span several,
    else processes (GPU hosts; a single TPU slice is one process group as well)."""
    if hasattr(devices[0], "slice_index"):
        count = len({d.slice_index for d in devices})
        if count > 1:
            return "slice_index", count
    return "process_index", len({d.process_index for d in devices})


def hybrid_device_grid(ici: tuple[int, ...], dcn: tuple[int, ...], devices) -> np.ndarray:
    """Devices arranged [ici[i] * dcn[i], ...]: `dcn` blocks, one per slice (or process), each laid out over the
    slice's topology (mesh_utils.create_hybrid_device_mesh), so that only the dcn_* axes cross slices."""
    attr, _ = slice_granules(devices)
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=attr == "process_index",
                                                allow_split_physical_axes=True)


def make_mesh(cfg: Config, devices=None) -> Mesh:
    """The run's mesh (axes MESH_AXES, Auto axis types) over `devices` (default: all), topology-aware:
    `jax.make_mesh` orders a slice's devices over its ICI torus (rings for the inner axes); with `mesh.dcn_*` > 1,
    `hybrid_device_grid` tiles one such block per slice. Sizes per `mesh_shape`."""
    devices = jax.devices() if devices is None else list(devices)
    granule, slices = slice_granules(devices)
    ici, dcn = mesh_shape(cfg.mesh, len(devices), slices, jax.process_count())
    if math.prod(dcn) == 1:
        if granule == "slice_index":
            raise ConfigError(f"the devices form {slices} TPU slices; set mesh.dcn_data={slices} (or another dcn_* "
                              "axis) so that only that axis crosses slices")
        return jax.make_mesh(ici, MESH_AXES, axis_types=AUTO_AXES, devices=devices)
    return Mesh(hybrid_device_grid(ici, dcn, devices), MESH_AXES, axis_types=AUTO_AXES)


def on_mesh(mesh: Mesh, fn):
    """`fn` called with `mesh` as jax's current mesh (`jax.set_mesh`). Jitted steps trace inside the call, so their
    attention finds the mesh and runs per device under shard_map (train/models/attention.py's `on_mesh_shards`)."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        with jax.set_mesh(mesh):
            return fn(*args, **kwargs)
    return call


def batch_axes(mesh: jax.sharding.Mesh, rules=DEFAULT_RULES) -> tuple[str, ...]:
    """The mesh axes (of more than one device) that the logical "batch" axis is split over."""
    target = dict(rules)["batch"]
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    return tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)


def data_parallel_size(mesh: jax.sharding.Mesh, rules=DEFAULT_RULES) -> int:
    """How many ways a batch is split: the product of the batch axes' sizes."""
    return math.prod(mesh.shape[a] for a in batch_axes(mesh, rules))


def batch_sharding(mesh: jax.sharding.Mesh, shape: tuple[int, ...], rules=DEFAULT_RULES) -> NamedSharding:
    """The layout of a [batch, ...] array: rows split by the "batch" logical rule."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (len(shape) - 1), shape, mesh, rules))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    """The same value on every device of the mesh."""
    return NamedSharding(mesh, P())


def global_batch_array(local: dict, sharding) -> dict:
    """Assemble each process's rows into one global array laid out by `sharding`."""
    process_count = jax.process_count()
    return {k: jax.make_array_from_process_local_data(
        sharding, np.asarray(v), (v.shape[0] * process_count, *v.shape[1:])) for k, v in local.items()}


def to_host(tree):
    """Replicated device values → numpy, on every process (`device_get` refuses arrays spanning processes)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x, tree)


def local_rows(batch: dict) -> dict:
    """This process's share of the rows of a global batch held whole on every process."""
    n, p = jax.process_count(), jax.process_index()
    return {k: v[p * len(v) // n:(p + 1) * len(v) // n] for k, v in batch.items()}
