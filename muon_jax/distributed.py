"""Newton–Schulz on sharded parameters: ``ns_mode`` "placed" (default: each matrix whole on one device,
cost-balanced), "balanced" (same-shape batches padded to the device count) and "gather" (Moonlight).

Design, data movement, costs and how to choose ``ns_axis``: docs/distributed.md.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from muon_jax.placement import Group, Layout, LeafPlan, MeshAxes, Placement, plan_leaves
from muon_jax.views import MatrixView

try:  # removed in jax 0.11; there the results are tied to their parameters by spec (param_specs) only
    from jax.experimental.shard_alike import shard_alike
except ImportError:
    shard_alike = None

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


def tie(x: jax.Array, anchor: Optional[jax.Array], spec: Optional[P], mesh: Mesh) -> jax.Array:
    """``x`` laid out as its parameter: by its spec where known, else like ``anchor`` (``shard_alike``,
    where this jax has it), else as XLA's propagation decides."""
    if spec is not None:
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    if anchor is None or shard_alike is None:
        return x
    return shard_alike(anchor, x)[1]


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


def _window_dims(piece: int):
    gather = jax.lax.GatherDimensionNumbers(offset_dims=(1,), collapsed_slice_dims=(), start_index_map=(0,))
    scatter = jax.lax.ScatterDimensionNumbers(
        update_window_dims=(1,), inserted_window_dims=(), scatter_dims_to_operand_dims=(0,))
    return gather, scatter


def pack(pieces: list[jax.Array], starts: list[np.ndarray], size: int, dtype) -> jax.Array:
    """A flat ``[size]`` buffer with row ``k`` of ``pieces[i]`` written at element ``starts[i][k]``."""
    flat = jnp.zeros((size,), dtype)
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


def assemble(x: jax.Array, lay: Layout) -> jax.Array:
    """``[n, count, piece]`` pieces (row ``q`` from device ``q`` of the exchange) → ``[count, a, b]``."""
    n, count, piece = x.shape
    (gr, gc), (a, b) = lay.grid, lay.shape
    if lay.order != tuple(range(n)):
        x = x[np.argsort(lay.order)]
    x = x.reshape(gr, gc, lay.reps, count, piece).transpose(3, 0, 1, 2, 4).reshape(count, gr, gc, -1)
    x = x[..., :lay.block].reshape(count, gr, gc, a // gr, b // gc)
    return x.transpose(0, 1, 3, 2, 4).reshape(count, a, b)


def disassemble(y: jax.Array, lay: Layout) -> jax.Array:
    """The inverse of :func:`assemble`: ``[count, a, b]`` → ``[n, count, piece]``."""
    count, (gr, gc), (a, b) = y.shape[0], lay.grid, lay.shape
    x = y.reshape(count, gr, a // gr, gc, b // gc).transpose(0, 1, 3, 2, 4).reshape(count, gr, gc, lay.block)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, lay.reps * lay.piece - lay.block)))
    x = x.reshape(count, gr, gc, lay.reps, lay.piece).transpose(1, 2, 3, 0, 4).reshape(-1, count, lay.piece)
    return x if lay.order == tuple(range(len(lay.order))) else x[np.asarray(lay.order)]


# A device orthogonalises its matrices of one shape in at most this many slabs, one after the other (more
# would shrink the working set little and lengthen the program).
MAX_SLABS = 4


def in_slabs(ns: Callable, x: jax.Array, slab: int) -> jax.Array:
    """``ns`` over the ``[count, a, b]`` matrices of ``x``, as many at a time as fit in ``slab`` elements
    (at least one, at most :data:`MAX_SLABS` slabs): the Newton–Schulz working set is then one slab's,
    not that of all of them. Unrolled rather than a loop, whose FLOPs XLA's cost analysis counts once."""
    count = x.shape[0]
    per = max(1, slab // math.prod(x.shape[-2:]), -(-count // MAX_SLABS))
    return ns(x) if per >= count else jnp.concatenate([ns(x[i:i + per]) for i in range(0, count, per)])


def orthogonalize_groups(blocks: dict, ns: Callable, slab: int) -> dict:
    """``ns`` on every ``[count, a, b]`` block, one batch per shape (a shape and its transpose together),
    at most a ``slab`` of elements at a time."""
    by_key: dict[tuple[int, int], list] = {}
    for key, m in blocks.items():
        by_key.setdefault(tuple(sorted(m.shape[1:])), []).append(key)
    out = {}
    for shape, keys in by_key.items():
        batch = [blocks[k] if blocks[k].shape[1:] == shape else jnp.swapaxes(blocks[k], 1, 2) for k in keys]
        done = in_slabs(ns, jnp.concatenate(batch) if len(batch) > 1 else batch[0], slab)
        for k, part in zip(keys, jnp.split(done, np.cumsum([blocks[k].shape[0] for k in keys])[:-1])):
            out[k] = part if blocks[k].shape[1:] == shape else jnp.swapaxes(part, 1, 2)
    return out


def run_role(recvs: list[jax.Array], role: tuple[tuple[Group, ...], ...], ns: Callable, result_dtype,
             slab: int) -> tuple:
    """One device role: its owned matrices reassembled from every exchange's ``[n, width]`` receive
    buffer, orthogonalised per shape (``slab`` elements at a time), and written back in place as
    ``result_dtype`` (its bits, unsigned)."""
    blocks = {}
    for k, (recv, groups) in enumerate(zip(recvs, role)):
        for g in groups:
            piece = g.layout.piece
            x = recv[:, g.offset:g.offset + g.count * piece].reshape(recv.shape[0], g.count, piece)
            blocks[k, g] = assemble(x, g.layout)
    done = orthogonalize_groups(blocks, ns, slab)
    outs = []
    for k, (recv, groups) in enumerate(zip(recvs, role)):
        n, width = recv.shape
        # As unsigned bits, so that XLA cannot move the conversion to ``result_dtype`` past the concatenation.
        rows = [unsigned(disassemble(done[k, g].astype(result_dtype), g.layout)).reshape(n, -1) for g in groups]
        rows.append(jnp.zeros((n, width - sum(g.count * g.layout.piece for g in groups)), bits_of(result_dtype)))
        outs.append(jnp.concatenate(rows, axis=1))
    return tuple(outs)


def to_piece(x: jax.Array, lp: LeafPlan) -> jax.Array:
    """This device's ``[count, piece]`` share of a leaf's local block (a slice of it when replicated)."""
    lay = lp.leaf.layout
    x = x.reshape(lp.leaf.count, -1)
    if lp.flat or lay.reps == 1:
        return x
    x = jnp.pad(x, ((0, 0), (0, lay.reps * lay.piece - lay.block)))
    return jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(lp.reps_axes) * lay.piece, lay.piece, axis=1)


def from_pieces(pieces: list[jax.Array], plans: list[LeafPlan]) -> list[jax.Array]:
    """Inverse of :func:`to_piece` for all leaves: one all-gather per set of replica axes."""
    out = list(pieces)
    by_axes: dict[tuple[str, ...], list[int]] = {}
    for i, lp in enumerate(plans):
        if not lp.flat and lp.leaf.layout.reps > 1:
            by_axes.setdefault(lp.reps_axes, []).append(i)
    for axes, members in by_axes.items():
        flat = jnp.concatenate([pieces[i].reshape(-1) for i in members])
        full = unsigned(jax.lax.all_gather(unsigned(flat), axes), flat.dtype)
        splits = np.cumsum([pieces[i].size for i in members])[:-1]
        for i, part in zip(members, jnp.split(full, splits, axis=1)):
            lay, count = plans[i].leaf.layout, plans[i].leaf.count
            part = part.reshape(lay.reps, count, lay.piece).transpose(1, 0, 2).reshape(count, -1)
            out[i] = part[:, :lay.block]
    return out


def bits_of(dtype) -> np.dtype:
    """The unsigned integer dtype as wide as ``dtype``."""
    return np.dtype(f"uint{8 * jnp.dtype(dtype).itemsize}")


def unsigned(x: jax.Array, dtype=None) -> jax.Array:
    """``x``'s bits as unsigned integers of its width (or, with ``dtype``, back): a collective on them
    cannot be widened by XLA hoisting a later float conversion above it."""
    return jax.lax.bitcast_convert_type(x, bits_of(x.dtype) if dtype is None else dtype)


def frobenius_norms(pieces: list[jax.Array], plans: list[LeafPlan], axes: MeshAxes) -> list[jax.Array]:
    """Inside ``shard_map``: ``‖M‖_F`` of every matrix of each leaf (``[count, 1]``) from its ``[count,
    piece]`` pieces, in one all-reduce. The pieces of a matrix are disjoint (replicas send different slices
    of their block), so their sums of squares add up; a leaf whose batch axis is sharded writes its sums at
    its group's place in the reduced vector, so that groups holding different matrices do not mix."""
    sizes, names = dict(axes), tuple(a for a, _ in axes)
    parts, at = [], []
    for x, lp in zip(pieces, plans):
        batch = tuple(a for a in names if a not in lp.leaf.exchange)
        sums = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=1)
        at.append(jax.lax.axis_index(batch) * lp.leaf.count if batch else 0)
        zeros = jnp.zeros(math.prod(sizes[a] for a in batch) * lp.leaf.count, jnp.float32)
        parts.append(jax.lax.dynamic_update_slice(zeros, sums, (at[-1],)))
    total = jax.lax.psum(jnp.concatenate(parts), names)
    starts = np.cumsum([0] + [p.shape[0] for p in parts])
    return [jnp.sqrt(jax.lax.dynamic_slice(total, (start + a,), (lp.leaf.count,)))[:, None]
            for start, a, lp in zip(starts, at, plans)]


def exchange(local: list[jax.Array], ns: Callable, placement: Placement, plans: list[LeafPlan],
             axes: MeshAxes, result_dtype, x0: Optional[Callable] = None) -> list[jax.Array]:
    """Inside ``shard_map``: every device sends its pieces to their owners (one all-to-all per exchange),
    each owner runs its role, the results come back the same way (as ``result_dtype``) and replicas
    gather theirs. Leaves whose devices already hold whole matrices (an empty exchange) are
    orthogonalised where they lie. With ``x0`` (``M, ‖M‖_F → X_0``, Newton–Schulz's normalised input in
    its own dtype) the pieces travel as ``X_0``, the norms summed first in one all-reduce."""
    pieces = [to_piece(x, lp) for x, lp in zip(local, plans)]
    # NS's working set grows with a matrix's short-side square (its Gram matrix; standard NS updates a
    # wide matrix in column blocks): the largest such square is the unit smaller matrices are batched up to.
    slab = max(min(lp.leaf.layout.shape) ** 2 for lp in plans)
    out: list = [None] * len(plans)
    moving = []
    for k, ex in enumerate(placement.exchanges):
        idx = [i for i, lp in enumerate(plans) if lp.leaf.exchange == ex]
        if not ex:
            for i in idx:
                done = in_slabs(ns, pieces[i].reshape(-1, *plans[i].leaf.layout.shape), slab).astype(result_dtype)
                out[i] = done.reshape(pieces[i].shape)
            continue
        moving.append((k, ex, idx, [np.asarray(placement.starts[i]) for i in idx]))
    if x0 is not None and moving:
        movers = [i for *_, idx, _ in moving for i in idx]
        for i, norm in zip(movers, frobenius_norms([pieces[i] for i in movers], [plans[i] for i in movers], axes)):
            pieces[i] = x0(pieces[i], norm)
        ns = functools.partial(ns, normalized=True)
    recvs = []
    for k, ex, idx, starts in moving:
        # Packed as unsigned bits: XLA would otherwise move a narrowing conversion past the packing and the
        # all-to-all, which then widens the buffers.
        n, width, dtype = placement.sizes[k], placement.widths[k], pieces[idx[0]].dtype
        send = pack([unsigned(pieces[i]) for i in idx], starts, n * width, bits_of(dtype))
        recvs.append(unsigned(jax.lax.all_to_all(send.reshape(n, width), ex, 0, 0, tiled=True), dtype))
    roles = [tuple(role[k] for k, *_ in moving) for role in placement.roles]
    branches = [lambda r, role=role: run_role(r, role, ns, result_dtype, slab) for role in roles]
    if len(set(roles)) == 1:
        done = branches[0](recvs) if moving else ()
    else:
        me = jax.lax.axis_index(tuple(a for a, _ in axes))
        done = jax.lax.switch(jnp.asarray(placement.role_of, jnp.int32)[me], branches, recvs)
    for (k, ex, idx, starts), result in zip(moving, done):
        back = unsigned(jax.lax.all_to_all(result, ex, 0, 0, tiled=True), result_dtype).reshape(-1)
        for i, x in zip(idx, unpack(back, starts, [pieces[i].shape[1] for i in idx])):
            out[i] = x
    return [x.reshape(y.shape) for x, y in zip(from_pieces(out, plans), local)]


def placed(mats: list[jax.Array], ns: Callable, mesh: Mesh, ns_axes: tuple[str, ...],
           specs: Sequence[Optional[P]], anchors: Optional[list[jax.Array]] = None,
           ns_dtype=None, ns_input: Optional[Callable] = None) -> list[jax.Array]:
    """Cost-balanced mode: every matrix whole on the one device of ``ns_axes`` that :func:`plan` gives
    it, one all-to-all out and one back per exchange (docs/distributed.md). ``specs``: each leaf's
    partition spec (matrix axes last) where known; a leaf without one is resharded by XLA first, and
    tied back to its ``anchor`` (a leaf with one comes out in its own layout, and an anchor there only
    makes XLA move things about). Results travel back in ``ns_dtype`` when it is narrower than the
    updates' (NS computes in it, so nothing is lost: half the bytes and buffers of the way back), and
    then, given ``ns_input`` (``M, ‖M‖_F → X_0``), travel out as ``X_0``, in ``ns_dtype`` too."""
    if not mats:
        return []
    plans, placement = plan_leaves([m.shape for m in mats], specs, mesh, ns_axes)
    dtype = jnp.result_type(*mats)
    inputs = []
    for m, lp in zip(mats, plans):
        x = m.astype(dtype)
        if lp.flat:
            x = (jnp.swapaxes(x, -1, -2) if lp.transpose else x).reshape(lp.leaf.count, -1)
            x = jnp.pad(x, ((0, 0), (0, lp.leaf.layout.reps * lp.leaf.layout.piece - x.shape[1])))
            x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, lp.spec))
        inputs.append(x)
    specs_in = [lp.spec for lp in plans]
    narrow = ns_dtype is not None and jnp.dtype(ns_dtype).itemsize < jnp.dtype(dtype).itemsize
    result_dtype = jnp.dtype(ns_dtype) if narrow else dtype
    axes, x0 = tuple((a, mesh.shape[a]) for a in ns_axes), ns_input if narrow else None
    outs = jax.shard_map(lambda xs: exchange(xs, ns, placement, plans, axes, result_dtype, x0), mesh=mesh,
                         in_specs=(specs_in,), out_specs=specs_in, check_vma=False)(inputs)
    results = []
    for i, (o, m, lp) in enumerate(zip(outs, mats, plans)):
        if lp.flat:
            o = o[:, :lp.leaf.layout.block].reshape(m.shape[:-2] + lp.leaf.layout.shape)
            o = jnp.swapaxes(o, -1, -2) if lp.transpose else o
            o = tie(o, None if anchors is None else anchors[i], None, mesh)
        results.append(o.astype(m.dtype))
    return results


def orthogonalize_sharded(leaves: list[jax.Array], views: list[MatrixView], ns: Callable, *, mesh: Mesh,
                          ns_axes: tuple[str, ...], ns_mode: str, anchors: Optional[list[jax.Array]] = None,
                          specs: Optional[Sequence[Optional[P]]] = None, ns_dtype=None,
                          ns_input: Optional[Callable] = None) -> list[jax.Array]:
    """Applies ``ns`` (NS over the last two axes) to the matrices of every leaf, each seen through its
    :class:`~muon_jax.views.MatrixView` (``[*batch, A, B]``: rows and columns moved last and merged), distributed
    over ``ns_axes`` of ``mesh`` as ``ns_mode`` says; returns the leaves' results in their own shapes.

    ``anchors``: arrays of the leaves' shapes whose layout the results must take, normally the
    parameters (jit inputs, so their layout is fixed); see docs/distributed.md. ``specs``: the
    partition spec of each leaf where known (read from the types on ``Explicit`` meshes); a view's spec
    is :meth:`~muon_jax.views.MatrixView.spec` (a merged axis group sharded beyond its first member is
    resharded). ``ns_dtype``: the dtype ``ns`` computes in, if known (results then travel back in it).
    ``ns_input``: ``M, ‖M‖_F → X_0``, NS's normalised input, with ``ns(X_0, normalized=True)`` taking it from
    there; if given, ``"placed"`` sends ``X_0`` in ``ns_dtype`` rather than ``M``.
    """
    auto = _auto_axes_mesh(mesh)
    explicit = any(t != AxisType.Auto for t in mesh.axis_types)
    if explicit:
        specs = [jax.typeof(x).sharding.spec for x in leaves]
    specs = [None] * len(leaves) if specs is None else list(specs)
    mat_specs = [v.spec(s) for v, s in zip(views, specs)]

    def run(leaves, anchors):
        mats = [v.to_matrices(x) for v, x in zip(views, leaves)]
        mat_anchors = None if anchors is None else [v.to_matrices(a) for v, a in zip(views, anchors)]
        if ns_mode == "placed":
            out = placed(mats, ns, auto, ns_axes, mat_specs, mat_anchors, ns_dtype, ns_input)
        else:
            out = gathered(mats, ns, auto) if ns_mode == "gather" else balanced(mats, ns, auto, ns_axes)
            out = [tie(o, None if mat_anchors is None else mat_anchors[i], mat_specs[i], auto)
                   for i, o in enumerate(out)]
        # A view that moves or merges axes comes back in the leaf's own layout (its spec or its anchor).
        return [o if v.is_identity else tie(v.from_matrices(o), None if anchors is None else anchors[i], specs[i], auto)
                for i, (o, v) in enumerate(zip(out, views))]

    if explicit:
        # Explicit axes: the shardings are in the types; compute in Auto axes and come back to them.
        return jax.sharding.auto_axes(lambda xs: run(xs, None),
                                      out_sharding=[jax.typeof(x).sharding for x in leaves])(leaves)
    return run(leaves, anchors)
