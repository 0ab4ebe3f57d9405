"""The three Muon-specific optax transforms: momentum, orthogonalisation, shape scaling.

Each is a small ``optax.GradientTransformation`` usable on its own; :func:`muon_jax.muon` chains them
with ``optax.add_decayed_weights`` and ``optax.scale_by_learning_rate``.

Matrix axes. Every leaf these transforms see is treated as a batch of matrices: by default the last
two axes are the matrix ``[A, B]`` (``A`` = fan-in, ``B`` = fan-out for ``y = x @ W``) and every leading
axis (stacked layers, experts) indexes independent matrices. ``matrix_axes`` overrides this with a
pytree of ``(row_axis, col_axis)`` pairs matching the updates (``None`` entries keep the default), or a
callable that returns such a pytree from the updates it is given. Inside :func:`muon_jax.muon` the
updates are ``optax.partition``-masked, so non-Muon leaves appear as ``optax.MaskedNode``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from muon_jax.distributed import NsAxis, orthogonalize_sharded, resolve_ns_axes
from muon_jax.newton_schulz import (CoeffsSpec, newton_schulz_iterate, ns_input, require_matrix, resolve_coeffs,
                                    resolve_method, resolve_restarts)

MatrixAxes = Union[None, Any, Callable[[Any], Any]]
ParamSpecs = Union[None, Any, Callable[[Any], Any]]
LR_SCALES = ("moonlight", "spectral", "none")
NOT_A_MATRIX_FIX = "Label it 'adam' (muon(labels=...)) or reshape it into a matrix."


def _is_masked(x) -> bool:
    return isinstance(x, optax.MaskedNode)


def matrix_axes_of(path, x, axes) -> tuple[int, int]:
    """The two non-negative matrix axes of leaf ``x`` (``axes`` None means the last two)."""
    where = jax.tree_util.keystr(path) or "<root>"
    require_matrix(x.shape, f"The leaf at {where}", NOT_A_MATRIX_FIX)
    rows, cols = (-2, -1) if axes is None else axes
    rows, cols = rows % x.ndim, cols % x.ndim
    if rows == cols:
        raise ValueError(f"matrix_axes for the leaf at {where} name the same axis twice: {axes}.")
    return rows, cols


def matrix_specs(param_specs: ParamSpecs, updates, params, matrix_axes) -> Optional[list]:
    """The partition spec of every matrix leaf of ``updates`` (masked leaves skipped), its axes
    permuted as the matrices are (matrix axes last); None without ``param_specs``."""
    if param_specs is None:
        return None
    tree = param_specs(params) if callable(param_specs) else param_specs
    is_spec = lambda x: x is None or isinstance(x, (PartitionSpec, NamedSharding))  # noqa: E731
    specs = jax.tree.leaves(tree, is_leaf=is_spec)
    leaves = jax.tree.leaves(updates, is_leaf=_is_masked)
    if len(specs) != len(leaves) or not all(map(is_spec, specs)):
        raise ValueError(f"param_specs must give one PartitionSpec (or NamedSharding, or None) per parameter "
                         f"leaf: got {len(specs)} specs for {len(leaves)} leaves. Pass a pytree shaped like "
                         "the parameters, e.g. jax.tree.map(lambda x: x.sharding.spec, params).")
    it, out = iter(s for s, x in zip(specs, leaves) if not _is_masked(x)), []

    def collect(x, axes):
        spec = next(it)
        spec = spec.spec if isinstance(spec, NamedSharding) else spec
        if spec is not None:
            entries = tuple(spec) + (None,) * (x.ndim - len(spec))
            order = [i for i in range(x.ndim) if i not in axes] + list(axes)  # as jnp.moveaxis(x, axes, (-2, -1))
            spec = PartitionSpec(*(entries[i] for i in order))
        out.append(spec)
        return x

    map_matrices(collect, updates, matrix_axes)
    return out


def static_dtype(dtype) -> Optional[jnp.dtype]:
    """``dtype`` as a numpy dtype, or None when it is not static (an array under ``inject_hyperparams``)."""
    try:
        return None if isinstance(dtype, jax.Array) else jnp.dtype(dtype)
    except TypeError:
        return None


def map_matrices(fn: Callable[[jax.Array, tuple[int, int]], jax.Array], updates, matrix_axes):
    """Applies ``fn(leaf, (row_axis, col_axis))`` to every array leaf; masked leaves pass through."""
    spec = matrix_axes(updates) if callable(matrix_axes) else matrix_axes
    if spec is None:
        return jax.tree_util.tree_map_with_path(
            lambda p, x: fn(x, matrix_axes_of(p, x, None)), updates)
    return jax.tree_util.tree_map_with_path(
        lambda p, x, ax: x if _is_masked(x) else fn(x, matrix_axes_of(p, x, ax)),
        updates, spec, is_leaf=_is_masked)


class ScaleByMomentumState(NamedTuple):
    """The momentum buffer ``M``, one per parameter."""
    mu: optax.Updates


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

    References:
      Liu et al., *Muon is Scalable for LLM Training*, arXiv 2502.16982, Algorithm 1.
    """
    mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

    def zeros_sharded_like(p):
        # p·0 (params are finite), not zeros_like: under jit (jax.jit(tx.init)) a constant has no
        # layout of its own, XLA merges the zeros of same-shape leaves into one array, and the buffers
        # would end up replicated or on one device instead of sharded like their parameters.
        return (p * 0).astype(mu_dtype or p.dtype)

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
    method: str = "standard",
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
        (``method="auto"`` picks per matrix shape).
      matrix_axes: which two axes form the matrix; see the module docstring.
      mesh: the ``jax.sharding.Mesh`` the updates are sharded on; None: single-device semantics.
      ns_axis: a mesh axis name or a tuple of names to spread NS over.
      ns_mode: one of :data:`muon_jax.NS_MODES`.
      param_specs: the parameters' ``PartitionSpec`` (or ``NamedSharding``) per leaf, as a pytree
        matching the parameters or a callable returning one from them. Optional: on ``Auto`` meshes
        the layout of a traced array cannot be read, and with it ``"placed"`` moves each piece
        straight to its owner instead of having XLA reshard each leaf first.
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

    def orthogonalize_leaf(x, axes):
        return jnp.moveaxis(ns(jnp.moveaxis(x, axes, (-2, -1))), (-2, -1), axes)

    def orthogonalize_all(updates, params):
        # Distributed NS batches matrices across leaves, so it needs every leaf at once: collect them
        # (matrix axes last) in map_matrices' order, then put the results back in the same order.
        def matrices(tree):
            mats = []
            map_matrices(lambda x, axes: mats.append(jnp.moveaxis(x, axes, (-2, -1))), tree, matrix_axes)
            return mats

        results = iter(orthogonalize_sharded(
            matrices(updates), ns, mesh=mesh, ns_axes=ns_axes, ns_mode=ns_mode,
            anchors=None if params is None else matrices(params),
            specs=matrix_specs(param_specs, updates, params, matrix_axes), ns_dtype=static_dtype(dtype),
            ns_input=x0))
        return map_matrices(
            lambda x, axes: jnp.moveaxis(next(results), (-2, -1), axes), updates, matrix_axes)

    def update_fn(updates, state, params=None):
        if mesh is None:
            return map_matrices(orthogonalize_leaf, updates, matrix_axes), state
        return orthogonalize_all(updates, params), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


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
    r"""Multiplies each matrix update by a factor of its shape ``[A, B]`` (fan-in ``A``, fan-out ``B``).

    - ``"moonlight"``: ``0.2·√max(A, B)``. An orthogonalised full-rank matrix has RMS
      ``√(1/max(A, B))`` (Lemma 1 of arXiv 2502.16982), so the update RMS becomes 0.2 for every shape,
      matching AdamW's typical update RMS: AdamW's learning rate and weight decay carry over.
    - ``"spectral"``: ``√max(1, B/A)`` (Keller Jordan's Muon; Bernstein & Newhouse's spectral scaling).
    - ``"none"``: 1.
    - a callable ``(A, B) -> float``.

    Args:
      lr_scale: the rule above.
      matrix_axes: which two axes form the matrix; see the module docstring.
    """
    shape_scale(lr_scale, (1, 1))  # fail at construction on an unknown name

    def scale_leaf(x, axes):
        return x * jnp.asarray(shape_scale(lr_scale, (x.shape[axes[0]], x.shape[axes[1]])), x.dtype)

    def update_fn(updates, state, params=None):
        del params
        return map_matrices(scale_leaf, updates, matrix_axes), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)
