r"""Newton–Schulz on sharded parameters: Moonlight's gather mode and a zero-redundancy balanced mode.

Newton–Schulz (NS) needs each matrix whole: ``X Xᵀ`` contracts a full row, so a matrix split across
devices (FSDP / ZeRO shards ``[A, B]`` along ``A`` or ``B``) either has to be reassembled or has its
Gram matrices all-reduced inside every one of its 15 matmuls, which is what XLA does when nothing
is said (``optax.contrib.muon`` on sharded parameters). Usage::

    mesh = jax.sharding.Mesh(devices.reshape(2, 4), ("data", "fsdp"))   # Auto axes
    tx = muon_jax.muon(lr, mesh=mesh, ns_axis=("data", "fsdp"), ns_mode="balanced")
    # params: NamedSharding on `mesh`; tx.update(grads, state, params) inside the jitted train step.

What the user passes: the mesh the parameters are sharded on, ``ns_axis`` — the mesh axes (a name
or a tuple; default all) over which NS is spread, typically the data/FSDP axes — and, as
:func:`muon_jax.muon` always does, the parameters to ``update``. The parameters' shardings are not
passed: inside ``jit`` an ``Auto``-axis tracer's sharding is not observable (``jax.typeof`` reads it
as unconstrained), and a ``jax.jit(tx.init)`` need not record it either. Instead every result is
tied to the layout of its parameter with ``jax.experimental.shard_alike``: parameters are inputs of
the jitted step, so their layout is fixed, and "back to the parameter's sharding" needs no spec.
Without that anchor XLA's propagation may keep the update in the NS layout and move the parameter
there for the weight decay and the apply, one all-to-all more per leaf. On meshes with ``Explicit``
axes the shardings are in the types: the same code runs under ``jax.sharding.auto_axes`` and
returns to them directly.

``ns_mode="gather"`` (Moonlight: Liu et al. 2025, arXiv 2502.16982, "Distributed Muon", on
ZeRO-1): each leaf is all-gathered (constrained replicated), every device runs NS on all the full
matrices and keeps its own slice (a local dynamic slice). Per device: ``n×`` the ideal NS FLOPs
(``n`` devices) and an all-gather of every Muon parameter. It is the faithful reference. The gather is over every
axis a leaf is sharded on, which for FSDP/ZeRO is ``ns_axis``; gathering along ``ns_axis`` only
would need each leaf's spec or a partially manual ``shard_map``, which XLA rejects for some
layouts.

``ns_mode="balanced"`` (zero redundancy): every matrix — each layer of a stacked ``[L, A, B]``
weight, each expert of ``[L, E, A, B]``, each separate 2-D leaf — is orthogonalised by exactly one
device of ``ns_axis``, whole:

1. *Batch.* Matrix axes go last, leading axes are flattened into one batch axis, and leaves with
   matrices of the same shape are concatenated along it, so separate ``[A, B]`` leaves (batch 1)
   are spread across devices instead of each being padded to the axis size.
2. *Pad.* Each batch gets zero matrices at its end up to a multiple of ``n = |ns_axis|`` (NS maps
   0 to 0), so that it splits into equal tiles. This happens in the parameters' layout, where the
   batch axis is not sharded, so it is local. (Every device runs the same program on its tile, so
   a padding slot costs the FLOPs of a real matrix wherever it is placed.)
3. *All-to-all out.* ``with_sharding_constraint(batch, P(ns_axis, U, U))`` (``U`` unconstrained)
   moves the ``ns_axis`` sharding from a matrix axis to the batch axis. Both layouts cut the batch
   into ``n`` equal tiles, so XLA lowers the move to one all-to-all: each device sends ``(n−1)/n``
   of its shard and receives whole matrices. A gather-then-slice would move ``n − 1`` shards
   instead of one. Axes outside ``ns_axis`` (tensor, expert) are left to XLA: a matrix sharded
   over ``"tensor"`` stays so, and its NS is tensor-parallel.
4. *NS* runs on the local whole matrices; its result is constrained to the same layout.
5. *All-to-all back* to the parameter's layout (the ``shard_alike`` anchor above); unpadding,
   splitting and reshaping are then local again.

Per device, balanced mode computes ``⌈B/n⌉`` of the ``B`` matrices of each shape — the ideal when
``n`` divides ``B`` — and moves two parameter shards (padding included): one all-to-all out, one
back. With fewer matrices of a shape than devices (``B < n``) the padding dominates: 8 matrices on
64 devices leave 56 tiles holding zeros. Both modes give the numbers of one device up to matmul
summation order.

Choosing ``ns_axis`` (compiled HLO, 8 devices): the axes that shard the matrices should all be in it.
FSDP ``P(None, "fsdp", None)`` stacks with ``ns_axis="fsdp"``: two all-to-alls, 2.00 shards moved
(bench/distributed.py). Experts ``P(None, "expert", "fsdp", "tensor")`` with ``ns_axis=("fsdp",
"expert", "tensor")``: two all-to-alls, 2.00 shards. An axis left out (``"tensor"``) keeps the
matrices split, and XLA all-reduces their Gram matrices inside NS (correct, more traffic). Moving
sharding from *both* matrix axes onto the batch axis, or a layer axis already sharded over
``ns_axis``, can make XLA reshard by gathering instead (its "involuntary full rematerialization"
warning); the numbers stay exact.
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

NS_MODES = ("balanced", "gather")
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
    ``ns_axes`` holds whole matrices, orthogonalised, and returned (module docstring)."""
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


def orthogonalize_sharded(mats: list[jax.Array], ns: Callable, *, mesh: Mesh, ns_axes: tuple[str, ...],
                          ns_mode: str, anchors: Optional[list[jax.Array]] = None) -> list[jax.Array]:
    """Applies ``ns`` (NS over the last two axes) to every array of ``mats`` (matrix axes last, any
    leading batch axes), distributed over ``ns_axes`` of ``mesh`` as ``ns_mode`` says.

    ``anchors``: arrays of the same shapes whose layout the results must take, normally the
    parameters (jit inputs, so their layout is fixed); see the module docstring.
    """
    auto = _auto_axes_mesh(mesh)

    def run(mats):
        if ns_mode == "gather":
            return gathered(mats, ns, auto)
        return balanced(mats, ns, auto, ns_axes)

    if any(t != AxisType.Auto for t in mesh.axis_types):
        # Explicit axes: the shardings are in the types; compute in Auto axes and come back to them.
        return jax.sharding.auto_axes(run, out_sharding=[jax.typeof(m).sharding for m in mats])(mats)
    out = run(mats)
    return out if anchors is None else [shard_alike(a, o)[1] for a, o in zip(anchors, out)]
