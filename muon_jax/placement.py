"""Static planning for ``ns_mode="placed"`` (docs/distributed.md): how each leaf enters the exchange
(:func:`leaf_plan`, from its shape and partition spec) and the cost-balanced placement of its matrices on
the devices (:func:`plan`).

Pure Python on shapes and partition specs only: computed once at trace time, cached, no per-step host work.
The collectives that carry it out are in :mod:`muon_jax.distributed`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Sequence

import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

Shape = tuple[int, int]
MeshAxes = tuple[tuple[str, int], ...]  # (name, size) of each ``ns_axis``, major first


def ns_cost(shape: Shape, steps: int = 5) -> int:
    """FLOPs of Newton–Schulz on one ``[a, b]`` matrix (Gram on the short side, 3 matmuls a step)."""
    a, b = sorted(shape)
    return steps * (4 * a * a * b + 2 * a ** 3)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the devices of one exchange hold a leaf's ``shape`` matrices: each device holds block ``(i, j)``
    of a ``grid[0] × grid[1]`` cut of every matrix (flattened), ``reps`` devices hold the same block and
    each sends ``1/reps`` of it; ``order[q]`` is the index ``(i·grid[1] + j)·reps + ρ`` of the piece that
    device ``q`` of the exchange sends."""
    shape: Shape
    grid: tuple[int, int]
    reps: int
    order: tuple[int, ...]

    @property
    def block(self) -> int:
        """Elements of one device's block of a matrix."""
        return math.prod(self.shape) // math.prod(self.grid)

    @property
    def piece(self) -> int:
        """Elements one device sends of a matrix (its block split ``reps`` ways, padded)."""
        return -(-self.block // self.reps)


@dataclasses.dataclass(frozen=True)
class Leaf:
    """``count`` matrices per exchange group, laid out as ``layout``, exchanged over the mesh axes
    ``exchange`` (``ns_axis`` less the axes that shard the leaf's batch dimensions)."""
    layout: Layout
    count: int
    exchange: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Group:
    """``count`` matrices of one layout owned by one device, their pieces stored from element ``offset``
    of every row of the all-to-all buffer."""
    layout: Layout
    count: int
    offset: int

    @property
    def shape(self) -> Shape:
        return self.layout.shape


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where every matrix lives while it is orthogonalised.

    Leaves with the same ``exchange`` axes form one exchange ``k``: ``sizes[k]`` devices, an
    ``[sizes[k], widths[k]]`` all-to-all buffer. ``starts[i][m]`` is where in that buffer (flattened)
    the device's piece of matrix ``m`` of leaf ``i`` goes: the owner's row, the matrix's offset.
    ``roles[r][k]`` lists the groups a device of role ``r`` owns in exchange ``k``; ``role_of[d]`` is
    the role of device ``d`` of ``ns_axis``.
    """
    exchanges: tuple[tuple[str, ...], ...]
    sizes: tuple[int, ...]
    widths: tuple[int, ...]
    starts: tuple[tuple[int, ...], ...]
    roles: tuple[tuple[tuple[Group, ...], ...], ...]
    role_of: tuple[int, ...]

    def load(self, device: int) -> int:
        """NS FLOPs of one device."""
        return sum(ns_cost(g.shape) * g.count for groups in self.roles[self.role_of[device]] for g in groups)

    def owned_elements(self) -> int:
        """Elements of the matrices the busiest (in bytes) device orthogonalises."""
        return max(sum(g.count * math.prod(g.shape) for gs in role for g in gs) for role in self.roles)

    def buffer_elements(self) -> int:
        """Elements of one device's all-to-all buffers, all exchanges together (an empty exchange, whose
        matrices are orthogonalised where they lie, has none)."""
        return sum(n * w for ex, n, w in zip(self.exchanges, self.sizes, self.widths) if ex)


def positions(axes: MeshAxes, exchange: tuple[str, ...]) -> np.ndarray:
    """For every device of ``axes`` (linear index, major first), its index among the devices of its
    exchange group (the devices that differ from it only along ``exchange``)."""
    names, sizes = [a for a, _ in axes], [s for _, s in axes]
    coords = np.indices(sizes).reshape(len(sizes), -1) if sizes else np.zeros((0, 1), int)
    keep = [names.index(a) for a in exchange]
    return np.ravel_multi_index(coords[keep], [sizes[i] for i in keep]) if keep else np.zeros(coords.shape[1], int)


def assign(items: list[tuple[int, int, np.ndarray]], n: int) -> list[int]:
    """Greedy largest-first bin packing (as Megatron's ``layer_sharded`` mode) of ``(cost, bytes, members)``
    items onto ``n`` devices, where ``members[p]`` lists the devices that position ``p`` of the item's
    exchange stands for (a batch-sharded stack's matrix lands on one device of every group): each item goes
    to the position whose busiest device is least loaded, ties to the fewest bytes, then the lowest index.
    Returns each item's position."""
    loads, sizes = np.zeros(n, np.int64), np.zeros(n, np.int64)
    owner = [0] * len(items)
    for m in sorted(range(len(items)), key=lambda m: (-items[m][0], -items[m][1], m)):
        cost, size, members = items[m]
        load, held = loads[members].max(axis=1), sizes[members].max(axis=1)
        p = int(np.lexsort((np.arange(len(members)), held, load))[0])
        owner[m] = p
        loads[members[p]] += cost
        sizes[members[p]] += size
    return owner


def group_owned(mats: list[tuple[int, int, Layout]], owner: list[int], n: int):
    """Per exchange position, its matrices as groups of one layout (a fixed layout order, so devices
    owning the same mix read their buffers at the same offsets), and every matrix's offset."""
    order = sorted({lay for _, _, lay in mats}, key=lambda lay: (-ns_cost(lay.shape), repr(lay)))
    owned: list[list[int]] = [[] for _ in range(n)]
    for m in sorted(range(len(mats)), key=lambda m: (order.index(mats[m][2]), m)):
        owned[owner[m]].append(m)
    offset, groups = [0] * len(mats), []
    for p in range(n):
        mine, at = [], 0
        for m in owned[p]:
            lay = mats[m][2]
            offset[m] = at
            at += lay.piece
            if mine and mine[-1][0] == lay:
                mine[-1][1] += 1
            else:
                mine.append([lay, 1, offset[m]])
        groups.append(tuple(Group(lay, c, o) for lay, c, o in mine))
    return groups, offset


@functools.lru_cache(maxsize=64)
def plan(leaves: tuple[Leaf, ...], axes: MeshAxes) -> Placement:
    """The placement of every matrix of ``leaves`` on the devices of ``axes``.

    Leaves exchanged over fewer than all of ``axes`` (stacks sharded along a batch axis, such as experts
    over ``expert``) repeat one placement in every group of devices; all matrices are placed together,
    largest first, so that the big ones find devices that the many small ones have not filled yet.
    """
    exchanges = sorted({leaf.exchange for leaf in leaves}, key=lambda e: (len(e), e))
    n = math.prod(s for _, s in axes)
    pos = {ex: positions(axes, ex) for ex in exchanges}
    members = {ex: np.argsort(pos[ex], kind="stable").reshape(pos[ex].max() + 1, -1) for ex in exchanges}
    mats = [(i, m, leaf.layout) for i, leaf in enumerate(leaves) for m in range(leaf.count)]
    owner = assign([(ns_cost(lay.shape), lay.piece, members[leaves[i].exchange]) for i, _, lay in mats], n)
    sizes, widths, groups_of, starts = [], [], [], [None] * len(leaves)
    for ex in exchanges:
        mine = [j for j, (i, _, _) in enumerate(mats) if leaves[i].exchange == ex]
        groups, offset = group_owned([mats[j] for j in mine], [owner[j] for j in mine], len(members[ex]))
        width = max([sum(g.count * g.layout.piece for g in gs) for gs in groups] + [1])
        for i in {mats[j][0] for j in mine}:
            starts[i] = tuple(owner[j] * width + offset[k] for k, j in enumerate(mine) if mats[j][0] == i)
        sizes.append(len(members[ex])), widths.append(width), groups_of.append((groups, pos[ex]))
    roles, role_index, role_of = [], {}, []
    for d in range(n):
        role = tuple(groups[p[d]] for groups, p in groups_of)
        role_of.append(role_index.setdefault(role, len(roles)))
        if role_of[-1] == len(roles):
            roles.append(role)
    return Placement(tuple(exchanges), tuple(sizes), tuple(widths), tuple(starts), tuple(roles), tuple(role_of))


def hidden_first(shapes: list[tuple[int, int]]) -> list[bool]:
    """Which matrices to transpose so that the dimension most matrices share (a transformer's hidden
    size, the axis FSDP rules shard) comes first: then flattening a row-sharded matrix is local."""
    sizes = [d for s in shapes for d in set(s)]
    hidden = max(set(sizes), key=lambda d: (sizes.count(d), d)) if sizes else 0
    return [s[1] == hidden and s[0] != hidden for s in shapes]


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """How one leaf enters the exchange. With its partition spec known (``flat`` False) the leaf goes in
    as it lies, ``spec`` (its spec on ``ns_axis``); devices holding the same block (``reps_axes``) each
    send a slice of it and gather the results. Otherwise (``flat``) it is transposed if ``transpose``,
    flattened to ``[matrices, a·b]`` and laid out ``P(None, ns_axis)`` first, which XLA reshards to."""
    leaf: Leaf
    spec: P
    reps_axes: tuple[str, ...] = ()
    flat: bool = False
    transpose: bool = False


def _linear(coords: dict, axes, sizes: dict) -> int:
    """The linear index of a device along ``axes`` (first major), as ``axis_index`` and specs count."""
    index = 0
    for a in axes:
        index = index * sizes[a] + int(coords[a])
    return index


def leaf_plan(shape: tuple[int, ...], spec: Optional[P], axes: MeshAxes) -> Optional[LeafPlan]:
    """The plan of a leaf (matrix axes last) sharded as ``spec``; None if ``spec`` is unknown or does
    not divide the leaf evenly."""
    if spec is None:
        return None
    sizes = dict(axes)
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    kept = [tuple(a for a in ((e,) if isinstance(e, str) else tuple(e or ())) if a in sizes) for e in entries]
    if len(entries) != len(shape) or any(d % math.prod(sizes[a] for a in k) for d, k in zip(shape, kept)):
        return None
    batch = {a for k in kept[:-2] for a in k}
    exchange = tuple(a for a, _ in axes if a not in batch)
    rows, cols = kept[-2], kept[-1]
    reps_axes = tuple(a for a in exchange if a not in rows + cols)
    grid = (math.prod(sizes[a] for a in rows), math.prod(sizes[a] for a in cols))
    reps = math.prod(sizes[a] for a in reps_axes)
    order = []
    for q in range(math.prod(sizes[a] for a in exchange)):
        coords = dict(zip(exchange, np.unravel_index(q, [sizes[a] for a in exchange]))) if exchange else {}
        block = _linear(coords, rows, sizes) * grid[1] + _linear(coords, cols, sizes)
        order.append(block * reps + _linear(coords, reps_axes, sizes))
    layout = Layout(tuple(shape[-2:]), grid, reps, tuple(order))
    count = math.prod(shape[:-2]) // math.prod(sizes[a] for a in batch)
    in_spec = P(*[k[0] if len(k) == 1 else (k or None) for k in kept])
    return LeafPlan(Leaf(layout, count, exchange), in_spec, reps_axes)


def flat_plan(shape: tuple[int, ...], transpose: bool, axes: MeshAxes) -> LeafPlan:
    """The plan of a leaf whose layout is unknown: flattened, every device of ``axes`` holds 1/n of it."""
    names, n = tuple(a for a, _ in axes), math.prod(s for _, s in axes)
    a, b = shape[-1:-3:-1] if transpose else shape[-2:]
    layout = Layout((a, b), (1, 1), n, tuple(range(n)))
    return LeafPlan(Leaf(layout, math.prod(shape[:-2]), names), P(None, names), flat=True, transpose=transpose)


def plan_leaves(shapes: Sequence[tuple[int, ...]], specs: Sequence[Optional[P]], mesh: Mesh,
                ns_axes: tuple[str, ...]) -> tuple[list[LeafPlan], Placement]:
    """Every leaf's plan (matrix axes last, ``specs`` where known) and the placement of their matrices
    on the devices of ``ns_axes``."""
    axes = tuple((a, mesh.shape[a]) for a in ns_axes)
    flip = hidden_first([tuple(s[-2:]) for s in shapes])
    plans = [leaf_plan(s, p, axes) or flat_plan(s, f, axes) for s, p, f in zip(shapes, specs, flip)]
    return plans, plan(tuple(lp.leaf for lp in plans), axes)
