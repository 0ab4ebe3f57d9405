"""Newton–Schulz on sharded parameters: ``ns_mode`` "placed" (default: each matrix whole on one device,
cost-balanced), "balanced" (same-shape batches padded to the device count) and "gather" (Moonlight).

Design, data movement, costs and how to choose ``ns_axis``: docs/distributed.md.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.shard_alike import shard_alike
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from muon_jax.placement import Group, Placement, plan

NS_MODES = ("placed", "balanced", "gather")
NsAxis = Union[None, str, Sequence[str]]
UNCONSTRAINED = P.UNCONSTRAINED


def resolve_ns_axes(mesh: Optional[Mesh], ns_axis: NsAxis, ns_mode: str) -> tuple[str, ...]:
    """Validates the distribution arguments and returns ``ns_axis`` as a tuple of mesh axis names
    (every axis of the mesh when ``ns_axis`` is None; empty without a mesh)."""
    if ns_mode not in NS_MODES:
        raise ValueError(f"Unknown ns_mode {ns_mode!r}; choose one of {NS_MODES}.")
    if mesh is None:
        if ns_axis is not None:
            raise ValueError(f"ns_axis={ns_axis!r} needs the mesh it names axes of: pass mesh=.")
        return ()
    if not isinstance(mesh, Mesh):
        raise ValueError(
            f"mesh must be a jax.sharding.Mesh; got {type(mesh).__name__}. Under "
            "optax.inject_hyperparams pass static_args=('mesh',): a Mesh is callable (a context "
            "decorator) and would be taken for a schedule.")
    axes = tuple(mesh.axis_names) if ns_axis is None else (
        (ns_axis,) if isinstance(ns_axis, str) else tuple(ns_axis))
    unknown = [a for a in axes if a not in mesh.axis_names]
    if unknown or not axes or len(set(axes)) != len(axes):
        raise ValueError(
            f"ns_axis={ns_axis!r} must name distinct axes of the mesh {tuple(mesh.axis_names)}; "
            f"not in the mesh: {unknown}.")
    return axes


def _auto_axes_mesh(mesh: Mesh) -> Mesh:
    """The mesh with every axis ``Auto``: constraints with unconstrained dimensions need them."""
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def gathered(mats: list[jax.Array], ns: Callable, mesh: Mesh) -> list[jax.Array]:
    """Moonlight's gather mode: every leaf whole (replicated) on every device, orthogonalised there;
    the caller's anchor slices each device's part back out."""
    def replicate(x):
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P()))

    # The result is constrained too: otherwise XLA may shard the NS between two replicated ends.
    return [replicate(ns(replicate(m))) for m in mats]


def balanced(mats: list[jax.Array], ns: Callable, mesh: Mesh, ns_axes: tuple[str, ...]):
    """Zero-redundancy mode: same-shape matrices batched, padded, all-to-all'd so that each device of
    ``ns_axes`` holds whole matrices, orthogonalised, and returned (docs/distributed.md)."""
    n = math.prod(mesh.shape[a] for a in ns_axes)
    on_ns_axes = NamedSharding(mesh, P(ns_axes, UNCONSTRAINED, UNCONSTRAINED))
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, m in enumerate(mats):
        by_shape.setdefault(m.shape[-2:], []).append(i)
    out: list[Optional[jax.Array]] = [None] * len(mats)
    for shape, members in by_shape.items():
        flat = [mats[i].reshape(-1, *shape) for i in members]
        batch = jnp.concatenate(flat) if len(flat) > 1 else flat[0]
        size = batch.shape[0]
        padded = jnp.pad(batch, ((0, -size % n), (0, 0), (0, 0)))
        spread = jax.lax.with_sharding_constraint(padded, on_ns_axes)
        result = jax.lax.with_sharding_constraint(ns(spread), on_ns_axes)[:size]
        pieces = jnp.split(result, np.cumsum([f.shape[0] for f in flat])[:-1])
        for i, piece in zip(members, pieces):
            out[i] = piece.reshape(mats[i].shape)
    return out


def hidden_first(shapes: list[tuple[int, int]]) -> list[bool]:
    """Which matrices to transpose so that the dimension most matrices share (a transformer's hidden
    size, the axis FSDP rules shard) comes first: then flattening a row-sharded matrix is local."""
    sizes = [d for s in shapes for d in set(s)]
    hidden = max(set(sizes), key=lambda d: (sizes.count(d), d)) if sizes else 0
    return [s[1] == hidden and s[0] != hidden for s in shapes]


def _window_dims(piece: int):
    gather = jax.lax.GatherDimensionNumbers(offset_dims=(1,), collapsed_slice_dims=(), start_index_map=(0,))
    scatter = jax.lax.ScatterDimensionNumbers(
        update_window_dims=(1,), inserted_window_dims=(), scatter_dims_to_operand_dims=(0,))
    return gather, scatter


def pack(pieces: list[jax.Array], starts: list[np.ndarray], size: int) -> jax.Array:
    """A flat ``[size]`` buffer with row ``k`` of ``pieces[i]`` written at element ``starts[i][k]``."""
    flat = jnp.zeros((size,), pieces[0].dtype)
    for x, at in zip(pieces, starts):
        _, dims = _window_dims(x.shape[1])
        flat = jax.lax.scatter(flat, jnp.asarray(at[:, None], jnp.int32), x, dims, indices_are_sorted=False,
                               unique_indices=True, mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)
    return flat


def unpack(flat: jax.Array, starts: list[np.ndarray], piece: list[int]) -> list[jax.Array]:
    """The inverse of :func:`pack`: ``[len(starts[i]), piece[i]]`` windows read from ``flat``."""
    out = []
    for at, p in zip(starts, piece):
        dims, _ = _window_dims(p)
        out.append(jax.lax.gather(flat, jnp.asarray(at[:, None], jnp.int32), dims, (p,),
                                  mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS))
    return out


def run_role(recv: jax.Array, role: tuple[Group, ...], ns: Callable) -> jax.Array:
    """One device role: its owned matrices reassembled from ``recv`` (``[n, width]``, row ``i`` from
    device ``i``), orthogonalised per shape (a shape and its transpose in one batch), written back."""
    n, width = recv.shape
    blocks = {}
    for g in role:
        flat = recv[:, g.offset:g.offset + g.count * g.piece].reshape(n, g.count, g.piece)
        mats = flat.transpose(1, 0, 2).reshape(g.count, n * g.piece)[:, :math.prod(g.shape)]
        blocks[g] = mats.reshape(g.count, *g.shape)
    by_key: dict[tuple[int, int], list[Group]] = {}
    for g in role:
        by_key.setdefault(tuple(sorted(g.shape)), []).append(g)
    for key, groups in by_key.items():
        batch = [blocks[g] if g.shape == key else jnp.swapaxes(blocks[g], 1, 2) for g in groups]
        done = ns(jnp.concatenate(batch) if len(batch) > 1 else batch[0])
        for g, part in zip(groups, jnp.split(done, np.cumsum([g.count for g in groups])[:-1])):
            blocks[g] = part if g.shape == key else jnp.swapaxes(part, 1, 2)
    rows = []
    for g in role:
        flat = jnp.pad(blocks[g].reshape(g.count, -1), ((0, 0), (0, n * g.piece - math.prod(g.shape))))
        rows.append(flat.reshape(g.count, n, g.piece).transpose(1, 0, 2).reshape(n, -1))
    used = sum(g.count * g.piece for g in role)
    rows.append(jnp.zeros((n, width - used), recv.dtype))
    return jnp.concatenate(rows, axis=1)


def exchange(local: list[jax.Array], ns: Callable, placement: Placement, starts: list[np.ndarray],
             ns_axes: tuple[str, ...]) -> list[jax.Array]:
    """Inside ``shard_map``: this device's pieces (``[B_i, piece_i]`` per leaf) go to their owners in
    one all-to-all, each owner runs its role, and one all-to-all brings the results back."""
    n, width = placement.n, placement.width
    send = pack(local, starts, n * width).reshape(n, width)
    recv = jax.lax.all_to_all(send, ns_axes, 0, 0, tiled=True)
    branches = [lambda r, role=role: run_role(r, role, ns) for role in placement.roles]
    if len(branches) == 1:
        done = branches[0](recv)
    else:
        me = jax.lax.axis_index(ns_axes)
        done = jax.lax.switch(jnp.asarray(placement.role_of, jnp.int32)[me], branches, recv)
    back = jax.lax.all_to_all(done, ns_axes, 0, 0, tiled=True).reshape(-1)
    return unpack(back, starts, [x.shape[1] for x in local])


def placed(mats: list[jax.Array], ns: Callable, mesh: Mesh, ns_axes: tuple[str, ...]) -> list[jax.Array]:
    """Cost-balanced mode: every matrix whole on the one device of ``ns_axes`` that :func:`plan`
    gives it, one all-to-all out and one back for all leaves together (docs/distributed.md)."""
    n = math.prod(mesh.shape[a] for a in ns_axes)
    flip = hidden_first([m.shape[-2:] for m in mats])
    canon = [jnp.swapaxes(m, -1, -2) if f else m for m, f in zip(mats, flip)]
    shapes = tuple(tuple(c.shape[-2:]) for c in canon)
    counts = tuple(math.prod(c.shape[:-2]) for c in canon)
    placement = plan(shapes, counts, n)
    flat_spec = NamedSharding(mesh, P(None, ns_axes))
    flats = []
    for c, s, b in zip(canon, shapes, counts):
        x = c.reshape(b, math.prod(s))
        x = jnp.pad(x, ((0, 0), (0, -x.shape[1] % n)))
        flats.append(jax.lax.with_sharding_constraint(x, flat_spec))
    bounds = np.cumsum((0,) + counts)
    starts = [np.asarray(placement.owner[lo:hi]) * placement.width + np.asarray(placement.offset[lo:hi])
              for lo, hi in zip(bounds[:-1], bounds[1:])]
    dtype = jnp.result_type(*flats)
    mapped = jax.shard_map(
        lambda xs: exchange([x.astype(dtype) for x in xs], ns, placement, starts, ns_axes),
        mesh=mesh, in_specs=(P(None, ns_axes),), out_specs=P(None, ns_axes), check_vma=False)
    outs = mapped(flats)
    results = []
    for o, m, c, s, f in zip(outs, mats, canon, shapes, flip):
        r = o[:, :math.prod(s)].reshape(c.shape).astype(m.dtype)
        results.append(jnp.swapaxes(r, -1, -2) if f else r)
    return results


def orthogonalize_sharded(mats: list[jax.Array], ns: Callable, *, mesh: Mesh, ns_axes: tuple[str, ...],
                          ns_mode: str, anchors: Optional[list[jax.Array]] = None) -> list[jax.Array]:
    """Applies ``ns`` (NS over the last two axes) to every array of ``mats`` (matrix axes last, any
    leading batch axes), distributed over ``ns_axes`` of ``mesh`` as ``ns_mode`` says.

    ``anchors``: arrays of the same shapes whose layout the results must take, normally the
    parameters (jit inputs, so their layout is fixed); see docs/distributed.md.
    """
    auto = _auto_axes_mesh(mesh)

    def run(mats):
        if ns_mode == "gather":
            return gathered(mats, ns, auto)
        if ns_mode == "balanced":
            return balanced(mats, ns, auto, ns_axes)
        return placed(mats, ns, auto, ns_axes)

    if any(t != AxisType.Auto for t in mesh.axis_types):
        # Explicit axes: the shardings are in the types; compute in Auto axes and come back to them.
        return jax.sharding.auto_axes(run, out_sharding=[jax.typeof(m).sharding for m in mats])(mats)
    out = run(mats)
    return out if anchors is None else [shard_alike(a, o)[1] for a, o in zip(anchors, out)]
