"""What every part of a run shares: the device mesh, the cache directory, the model config that fits the tokenizer,
and moving batches and metrics between the hosts' numpy and the mesh's global arrays."""
from __future__ import annotations

import math
import os
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from train.config import MESH_AXES, Config, ConfigError
from train.models import model_config_from_dict
from train.models.sharding import DEFAULT_RULES, auto_mesh, logical_to_spec


def cache_dir() -> Path:
    """Where tokenizers and tokenized corpora are cached (shared across runs; MUON_JAX_CACHE overrides)."""
    return Path(os.environ.get("MUON_JAX_CACHE", Path.home() / ".cache" / "muon-jax"))


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


def make_mesh(cfg: Config) -> jax.sharding.Mesh:
    """The run's mesh (axes MESH_AXES, Auto axis types); one axis may be -1 and absorbs the remaining devices."""
    sizes = {a: getattr(cfg.mesh, a) for a in MESH_AXES}
    n = jax.device_count()
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if -1 in sizes.values():
        if n % fixed:
            raise ConfigError(f"mesh {sizes}: {n} devices are not divisible by the fixed axes' product {fixed}")
        sizes = {a: n // fixed if s == -1 else s for a, s in sizes.items()}
    used = math.prod(sizes.values())
    if used > n or (used < n and jax.process_count() > 1):
        raise ConfigError(f"mesh {sizes} needs {used} devices but {n} are present; "
                          "set one axis to -1 to absorb the rest")
    # fewer devices than present (single process only): the mesh takes the first `used`, e.g. 1 of 8 to compare
    devices = np.asarray(jax.devices()[:used]).reshape(tuple(sizes.values()))
    return auto_mesh(jax.sharding.Mesh(devices, MESH_AXES))


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
