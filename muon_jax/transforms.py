"""The three Muon-specific optax transforms: momentum, orthogonalisation, shape scaling.

Each is a small ``optax.GradientTransformation`` usable on its own; :func:`muon_jax.muon` chains them
with ``optax.add_decayed_weights`` and ``optax.scale_by_learning_rate``.

Matrix axes. Every leaf these transforms see is treated as a batch of matrices: by default the last
two axes are the matrix ``[A, B]`` (``A`` = fan-in, ``B`` = fan-out for ``y = x @ W``) and every leading
axis (stacked layers, experts) indexes independent matrices. ``matrix_axes`` overrides this with a
pytree like the updates whose entries are ``(rows, cols)`` pairs, each an axis or a tuple of axes (the
matrix is the leaf transposed to ``batch + rows + cols`` and reshaped to ``[..., prod(rows), prod(cols)]``:
``((0, 1, 2), (3,))`` makes a ``[3, 3, c_in, c_out]`` conv kernel one ``[9·c_in, c_out]`` matrix),
``optax.contrib.MuonDimensionNumbers`` or ``None`` (the last two axes), or a callable returning such a
pytree from the updates (see ``muon_jax.views``). Inside :func:`muon_jax.muon` the updates are
``optax.partition``-masked, so non-Muon leaves appear as ``optax.MaskedNode`` and their entries are ignored.
"""
from __future__ import annotations

import collections
import math
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from muon_jax.distributed import NsAxis, orthogonalize_sharded, resolve_ns_axes
from muon_jax.newton_schulz import (CoeffsSpec, newton_schulz_iterate, ns_input, resolve_coeffs, resolve_method,
                                    resolve_restarts)
from muon_jax.views import MatrixView, is_function, is_masked, matrix_views

MatrixAxes = Union[None, Any, Callable[[Any], Any]]
ParamSpecs = Union[None, Any, Callable[[Any], Any]]
LR_SCALES = ("moonlight", "spectral", "none")


def leaf_specs(param_specs: ParamSpecs, updates, params) -> Optional[list]:
    """The partition spec of every unmasked leaf of ``updates`` (a ``NamedSharding`` read as its spec), in
    leaf order; None without ``param_specs``."""
    if param_specs is None:
        return None
    tree = param_specs(params) if is_function(param_specs) else param_specs
    is_spec = lambda x: x is None or isinstance(x, (PartitionSpec, NamedSharding))  # noqa: E731
    specs = jax.tree.leaves(tree, is_leaf=is_spec)
    leaves = jax.tree.leaves(updates, is_leaf=is_masked)
    if len(specs) != len(leaves) or not all(map(is_spec, specs)):
        raise ValueError(f"param_specs must give one PartitionSpec (or NamedSharding, or None) per parameter "
                         f"leaf: got {len(specs)} specs for {len(leaves)} leaves. Pass a pytree shaped like "
                         "the parameters, e.g. jax.tree.map(lambda x: x.sharding.spec, params).")
    return [s.spec if isinstance(s, NamedSharding) else s for s, x in zip(specs, leaves) if not is_masked(x)]


def static_dtype(dtype) -> Optional[jnp.dtype]:
    """``dtype`` as a numpy dtype, or None when it is not static (an array under ``inject_hyperparams``)."""
    try:
        return None if isinstance(dtype, jax.Array) else jnp.dtype(dtype)
    except TypeError:
        return None


def map_matrices(fn: Callable[[jax.Array, MatrixView], jax.Array], updates, matrix_axes):
    """Applies ``fn(leaf, view)`` to every array leaf (its :class:`~muon_jax.views.MatrixView` from
    ``matrix_axes``); masked leaves pass through."""
    leaves, treedef = jax.tree.flatten(updates, is_leaf=is_masked)
    views = matrix_views(updates, matrix_axes)
    return jax.tree.unflatten(treedef, [x if v is None else fn(x, v) for x, v in zip(leaves, views)])


def check_views(matrix_axes) -> Callable[[Any], optax.EmptyState]:
    """An init that validates every leaf's matrix view (so a bad ``matrix_axes`` fails at init)."""
    def init_fn(params):
        matrix_views(params, matrix_axes)
        return optax.EmptyState()
    return init_fn


# A plain namedtuple (no field annotation) with its field undocumented: the field is described under
# Attributes, and Sphinx would otherwise describe it a second time.
class ScaleByMomentumState(collections.namedtuple("ScaleByMomentumState", ["mu"])):
    """The state of :func:`scale_by_momentum`: the momentum buffer ``M``, one per parameter.

    Attributes:
      mu: a pytree like the parameters (in ``mu_dtype``, else their dtype), zeros at ``init``.

    Example:
        >>> state = muon_jax.scale_by_momentum().init({"w": jnp.ones((2, 3))})
        >>> state.mu["w"].shape
        (2, 3)
    """
    __slots__ = ()


ScaleByMomentumState.mu.__doc__ = None


def scale_by_momentum(
    momentum: float = 0.95, nesterov: bool = True, mu_dtype: Optional[Any] = None
) -> optax.GradientTransformation:
    r"""Heavy-ball momentum exactly as in Moonlight's Muon (no dampening, no bias correction).

    .. math::
        M_t = \mu M_{t-1} + G_t, \qquad
        \text{out}_t = G_t + \mu M_t \ \text{(Nesterov)} \quad\text{or}\quad M_t.

    ``optax.contrib.muon`` instead uses a bias-corrected EMA ``(1-\beta)``-weighted Nesterov average;
    after Newton–Schulz (which normalises scale) the two differ only in the relative weight of the
    newest gradient.

    Args:
      momentum: ``μ``.
      nesterov: use the Nesterov look-ahead ``G + μM``.
      mu_dtype: dtype of the buffer (default: the parameter's). The output keeps the gradient's dtype.

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`ScaleByMomentumState`.

    Example:
        >>> tx = muon_jax.scale_by_momentum(0.9)
        >>> g = jnp.array([1.0, 2.0])
        >>> out, state = tx.update(g, tx.init(g))
        >>> [round(float(v), 4) for v in state.mu], [round(float(v), 4) for v in out]   # M = G, then G + μM
        ([1.0, 2.0], [1.9, 3.8])

    References:
      Liu et al., *Muon is Scalable for LLM Training*, arXiv 2502.16982, Algorithm 1.
    """
    mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

    def zeros_sharded_like(p):
        # Zeros computed from p rather than created (jnp.zeros_like): under jit (jax.jit(tx.init)) a
        # constant has no layout of its own, XLA merges the zeros of same-shape leaves into one array, and
        # the buffers would end up replicated or on one device instead of sharded like their parameters.
        # |nan_to_num(p)|·0 is +0 for every p, NaN and ±inf included, so a bad parameter never poisons M.
        return (jnp.abs(jnp.nan_to_num(p)) * 0).astype(mu_dtype or p.dtype)

    def init_fn(params):
        return ScaleByMomentumState(mu=jax.tree.map(zeros_sharded_like, params))

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda g, m: (momentum * m + g).astype(m.dtype), updates, state.mu)
        out = jax.tree.map(
            lambda g, m: (g + momentum * m if nesterov else m).astype(g.dtype), updates, mu)
        return out, ScaleByMomentumState(mu=mu)

    return optax.GradientTransformation(init_fn, update_fn)


def orthogonalize(
    *,
    steps: int = 5,
    coeffs: CoeffsSpec = "moonlight",
    eps: float = 1e-7,
    dtype: Any = jnp.dtype(jnp.bfloat16),
    matrix_axes: MatrixAxes = None,
    mesh: Optional[jax.sharding.Mesh] = None,
    ns_axis: NsAxis = None,
    ns_mode: str = "placed",
    method: str = "auto",
    restarts: Optional[tuple[int, ...]] = None,
    param_specs: ParamSpecs = None,
) -> optax.GradientTransformation:
    r"""Replaces each matrix ``M`` of the updates by ``NS(M) ≈ U Vᵀ`` (``M = U S Vᵀ``).

    Stateless. Runs :func:`muon_jax.newton_schulz` over the matrix axes of every leaf, all other axes
    being independent matrices. The result has the update's dtype.

    With a ``mesh`` the updates are taken to be sharded on it (``NamedSharding``, inside a jitted
    step) and the NS work is distributed over the mesh axes ``ns_axis`` (default: all), either by
    gathering each matrix everywhere (``ns_mode="gather"``, Moonlight's distributed Muon) or by
    giving each matrix to exactly one device (``"placed"``, cost-balanced, the default, or
    ``"balanced"``, padded per shape); see docs/distributed.md.

    Args:
      steps, coeffs, eps, dtype, method, restarts: as in :func:`muon_jax.newton_schulz`
        (``method="auto"``, the default as in :func:`muon_jax.muon`, picks per matrix shape).
      matrix_axes: the ``(rows, cols)`` axes of each leaf's matrix; see the module docstring. A bad entry,
        a leaf below 2-D or a zero-size leaf fails at ``init``.
      mesh: the ``jax.sharding.Mesh`` the updates are sharded on; None: single-device semantics.
      ns_axis: a mesh axis name or a tuple of names to spread NS over.
      ns_mode: one of :data:`muon_jax.NS_MODES`.
      param_specs: the parameters' ``PartitionSpec`` (or ``NamedSharding``) per leaf, as a pytree
        matching the parameters or a callable returning one from them. Optional: on ``Auto`` meshes
        the layout of a traced array cannot be read, and with it ``"placed"`` moves each piece
        straight to its owner instead of having XLA reshard each leaf first.

    Returns:
      A stateless ``optax.GradientTransformation``.

    Example:
        >>> g = {"w": jax.random.normal(jax.random.key(0), (16, 64))}
        >>> tx = muon_jax.orthogonalize(dtype=jnp.dtype("float32"))
        >>> u, _ = tx.update(g, tx.init(g))
        >>> s = np.linalg.svd(np.asarray(u["w"]), compute_uv=False)
        >>> bool(0.6 < s.min() and s.max() < 1.25)   # Moonlight's quintic leaves singular values near 1
        True
    """
    # Fail at construction on an unknown name (dtype may arrive as an array under inject_hyperparams).
    resolve_coeffs(coeffs, 1)
    resolve_method(method, (1, 1), jnp.float32)
    resolve_restarts(restarts, jnp.float32, 5)
    ns_axes = resolve_ns_axes(mesh, ns_axis, ns_mode)

    def ns(m, normalized=False):
        # The method is bound here, so distributed NS (which batches same-shape matrices) runs it too.
        return newton_schulz_iterate(m, steps=steps, coeffs=coeffs, eps=eps, dtype=dtype, method=method,
                                     restarts=restarts, normalized=normalized)

    def x0(m, norm):
        return ns_input(m, norm, coeffs=coeffs, eps=eps, dtype=dtype)

    def orthogonalize_leaf(x, view):
        return view.from_matrices(ns(view.to_matrices(x)))

    def orthogonalize_all(updates, params):
        # Distributed NS batches matrices across leaves, so it needs every leaf at once: the unmasked leaves
        # in leaf order, and the results put back in the same order.
        leaves, treedef = jax.tree.flatten(updates, is_leaf=is_masked)
        views = matrix_views(updates, matrix_axes)
        mine = [i for i, v in enumerate(views) if v is not None]
        anchors = None if params is None else [jax.tree.leaves(params, is_leaf=is_masked)[i] for i in mine]
        results = orthogonalize_sharded(
            [leaves[i] for i in mine], [views[i] for i in mine], ns, mesh=mesh, ns_axes=ns_axes,
            ns_mode=ns_mode, anchors=anchors, specs=leaf_specs(param_specs, updates, params),
            ns_dtype=static_dtype(dtype), ns_input=x0)
        for i, r in zip(mine, results):
            leaves[i] = r
        return jax.tree.unflatten(treedef, leaves)

    def update_fn(updates, state, params=None):
        if mesh is None:
            return map_matrices(orthogonalize_leaf, updates, matrix_axes), state
        return orthogonalize_all(updates, params), state

    return optax.GradientTransformation(check_views(matrix_axes), update_fn)


def shape_scale(lr_scale: Union[str, Callable[[tuple[int, int]], float]], shape: tuple[int, int]):
    """The per-matrix learning-rate multiplier for a matrix of shape ``(fan_in, fan_out)``."""
    fan_in, fan_out = shape
    if callable(lr_scale):
        return lr_scale(shape)
    if lr_scale == "moonlight":
        return 0.2 * math.sqrt(max(fan_in, fan_out))
    if lr_scale == "spectral":
        return math.sqrt(max(1.0, fan_out / fan_in))
    if lr_scale == "none":
        return 1.0
    raise ValueError(
        f"Unknown lr_scale {lr_scale!r}; choose one of {LR_SCALES} or a callable (fan_in, fan_out) -> float.")


def scale_by_shape(
    lr_scale: Union[str, Callable[[tuple[int, int]], float]] = "moonlight",
    matrix_axes: MatrixAxes = None,
) -> optax.GradientTransformation:
    r"""Multiplies each matrix update by a factor of its shape ``[A, B]`` (fan-in ``A``, fan-out ``B``; with
    multi-axis ``matrix_axes``, ``A`` and ``B`` are the products of the row and the column axes' sizes).

    - ``"moonlight"``: ``0.2·√max(A, B)``. An orthogonalised full-rank matrix has RMS
      ``√(1/max(A, B))`` (Lemma 1 of arXiv 2502.16982), so the update RMS becomes 0.2 for every shape,
      matching AdamW's typical update RMS: AdamW's learning rate and weight decay carry over.
    - ``"spectral"``: ``√max(1, B/A)`` (Keller Jordan's Muon; Bernstein & Newhouse's spectral scaling).
    - ``"none"``: 1.
    - a callable ``(A, B) -> float``.

    Args:
      lr_scale: the rule above.
      matrix_axes: the ``(rows, cols)`` axes of each leaf's matrix; see the module docstring.

    Returns:
      A stateless ``optax.GradientTransformation``.

    Example:
        >>> x = {"w": jnp.ones((16, 64)), "conv": jnp.ones((3, 3, 4, 16))}
        >>> tx = muon_jax.scale_by_shape(matrix_axes={"w": None, "conv": ((0, 1, 2), (3,))})
        >>> u, _ = tx.update(x, tx.init(x))
        >>> round(float(u["w"][0, 0]), 4), round(float(u["conv"][0, 0, 0, 0]), 4)   # 0.2·√64, 0.2·√36
        (1.6, 1.2)
    """
    shape_scale(lr_scale, (1, 1))  # fail at construction on an unknown name

    def scale_leaf(x, view):
        return x * jnp.asarray(shape_scale(lr_scale, view.matrix), x.dtype)

    def update_fn(updates, state, params=None):
        del params
        return map_matrices(scale_leaf, updates, matrix_axes), state

    return optax.GradientTransformation(check_views(matrix_axes), update_fn)
