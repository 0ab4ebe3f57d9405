"""Static cost-balanced placement of matrices on devices for ``ns_mode="placed"`` (docs/distributed.md).

Pure Python on shapes only: computed once at trace time, cached, no per-step host work.
"""
from __future__ import annotations

import dataclasses
import functools
import heapq
import math

Shape = tuple[int, int]


def ns_cost(shape: Shape, steps: int = 5) -> int:
    """FLOPs of Newton–Schulz on one ``[a, b]`` matrix (Gram on the short side, 3 matmuls a step)."""
    a, b = sorted(shape)
    return steps * (4 * a * a * b + 2 * a ** 3)


@dataclasses.dataclass(frozen=True)
class Group:
    """``count`` same-shape matrices owned by one role, stored from element ``offset`` of each buffer
    row, each as one ``piece`` elements long per sending device."""
    shape: Shape
    count: int
    offset: int
    piece: int


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where every matrix lives while it is orthogonalised.

    Matrices are numbered leaf by leaf (leaf ``i`` holds ``counts[i]`` matrices of ``shapes[i]``).
    Matrix ``m`` goes to device ``owner[m]`` and its pieces sit at element ``offset[m]`` of the rows
    of a ``[n, width]`` all-to-all buffer. Devices with the same list of groups share a role.
    """
    n: int
    width: int
    owner: tuple[int, ...]
    offset: tuple[int, ...]
    roles: tuple[tuple[Group, ...], ...]
    role_of: tuple[int, ...]

    def load(self, device: int) -> int:
        """NS FLOPs of one device."""
        return sum(ns_cost(g.shape) * g.count for g in self.roles[self.role_of[device]])


def piece_size(shape: Shape, n: int) -> int:
    """Elements of one device's share of a flattened matrix, padded to a multiple of ``n``."""
    return -(-math.prod(shape) // n)


def assign(costs: list[int], sizes: list[int], n: int) -> list[int]:
    """Greedy largest-first bin packing (as Megatron's ``layer_sharded`` mode): each matrix goes to the
    least-loaded device, ties to the one holding the fewest bytes, then the lowest index."""
    heap = [(0, 0, d) for d in range(n)]
    owner = [0] * len(costs)
    for m in sorted(range(len(costs)), key=lambda m: (-costs[m], -sizes[m], m)):
        load, size, d = heapq.heappop(heap)
        owner[m] = d
        heapq.heappush(heap, (load + costs[m], size + sizes[m], d))
    return owner


@functools.lru_cache(maxsize=64)
def plan(shapes: tuple[Shape, ...], counts: tuple[int, ...], n: int) -> Placement:
    """The placement of ``counts[i]`` matrices of ``shapes[i]`` (leaf order) on ``n`` devices."""
    mats = [s for s, c in zip(shapes, counts) for _ in range(c)]
    pieces = [piece_size(s, n) for s in mats]
    owner = assign([ns_cost(s) for s in mats], pieces, n)
    # Per device, owned matrices go shape by shape (a fixed shape order), so a role is a list of
    # (shape, count) and every device of a role reads its buffer at the same offsets.
    order = sorted(set(mats), key=lambda s: (-ns_cost(s), s))
    owned: list[list[int]] = [[] for _ in range(n)]
    for m in sorted(range(len(mats)), key=lambda m: (order.index(mats[m]), m)):
        owned[owner[m]].append(m)
    offset, roles, role_index, role_of = [0] * len(mats), [], {}, []
    for d in range(n):
        groups, at = [], 0
        for m in owned[d]:
            offset[m] = at
            at += pieces[m]
            if groups and groups[-1][0] == mats[m]:
                groups[-1][1] += 1
            else:
                groups.append([mats[m], 1, offset[m], pieces[m]])
        role = tuple(Group(s, c, o, p) for s, c, o, p in groups)
        role_of.append(role_index.setdefault(role, len(roles)))
        if role_of[-1] == len(roles):
            roles.append(role)
    width = max([sum(g.count * g.piece for g in r) for r in roles] + [1])
    return Placement(n, width, tuple(owner), tuple(offset), tuple(roles), tuple(role_of))
