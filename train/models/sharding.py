"""Logical-axis sharding (MaxText style): every Param names its axes, one rules table maps names to mesh axes.

Params keep their logical names in the nnx `out_sharding` metadata (with `eager_sharding=False`, so flax never
reads them as mesh axes itself); `state_shardings` resolves them against a concrete mesh.
"""
from __future__ import annotations

import math

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("q_lora", None),
    ("kv_lora", None),
    ("expert", "expert"),
    ("layers", None),
    ("norm", None),
)


def logical_to_spec(names, shape, mesh: Mesh, rules=DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose axes carry logical `names`.

    A mesh axis is dropped when the mesh lacks it, its size is 1, an earlier dimension already uses it, or the
    dimension is not divisible by it, so every spec is valid for every mesh (those dims stay replicated).
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
        if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def with_auto_axes(mesh: Mesh) -> Mesh:
    """The same devices and axis names with Auto axis types: the models rely on GSPMD propagation, not on
    explicit-sharding types (`jax.make_mesh` defaults to Explicit axes in recent jax)."""
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def state_shardings(state, mesh: Mesh, rules=DEFAULT_RULES):
    """The `NamedSharding` tree (on `with_auto_axes(mesh)`) for an nnx state or abstract state, following each
    Variable's logical axes."""
    mesh = with_auto_axes(mesh)

    def one(var):
        names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
        return var.replace(NamedSharding(mesh, logical_to_spec(names, var.shape, mesh, rules)))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
