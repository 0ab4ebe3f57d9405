"""Static cost-balanced placement of matrices on devices for ``ns_mode="placed"`` (docs/distributed.md).

Pure Python on shapes and partition specs only: computed once at trace time, cached, no per-step host work.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

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
