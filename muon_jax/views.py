r"""Matrix views of parameter leaves, and per-leaf option trees matched to the parameters.

A leaf of shape ``S`` with matrix axes ``(rows, cols)`` (tuples of axis indices) is the batch of matrices

.. math::
    X = \mathrm{reshape}\big(\mathrm{transpose}(W, \text{batch} + \text{rows} + \text{cols}),\;
        [S_{\text{batch}}, \textstyle\prod_{i \in \text{rows}} S_i, \prod_{j \in \text{cols}} S_j]\big)

where ``batch`` are the remaining axes in their order (stacked layers, experts: independent matrices). A
``[3, 3, c_in, c_out]`` conv kernel with ``((0, 1, 2), (3,))`` is one ``[9·c_in, c_out]`` matrix; the default
(``None``) is the last two axes, for which the view is the leaf itself.

Option trees (``labels``, ``matrix_axes``) are matched to the parameters by path, where an ``nnx.Variable``'s
``.value`` step does not count: ``nnx.Optimizer`` gives ``tx.init`` the parameters wrapped in ``nnx.Param`` and
``tx.update`` bare arrays, and one tree must fit both.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import jax
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from muon_jax.newton_schulz import require_matrix

NOT_A_MATRIX_FIX = "Label it 'adam' (muon(labels=...)) or reshape it into a matrix."
AXES_FORMS = ("None (the last two axes), (row_axis, col_axis), ((rows...), (cols...)) such as ((0, 1, 2), (3,)) "
              "for a HWIO conv kernel, or optax.contrib.MuonDimensionNumbers")


def is_masked(x) -> bool:
    return isinstance(x, optax.MaskedNode)


def is_function(x) -> bool:
    """Whether an option is a function of the parameters rather than a pytree (an equinox module holding
    labels is callable too, but it is a pytree node, not a leaf)."""
    leaves = jax.tree.leaves(x)
    return callable(x) and len(leaves) == 1 and leaves[0] is x


def where(path) -> str:
    """A leaf's path as written in messages (``<root>`` for a bare array)."""
    return jax.tree_util.keystr(tuple(path)) or "<root>"


def normalized_path(path) -> str:
    """``path`` without a last ``.value`` step (an ``nnx.Variable``'s value: a leaf cannot also be a node,
    so dropping it never makes two leaves' paths equal)."""
    path = tuple(path)
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    return where(path)


def _wraps_a_value(x) -> bool:
    """Whether ``x`` is a node whose one child is its ``.value`` (an ``nnx.Variable``)."""
    children = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)[0]
    path = children[0][0] if len(children) == 1 else ()
    return len(path) == 1 and isinstance(path[0], jax.tree_util.GetAttrKey) and path[0].name == "value"


def aligned(tree, like, what: str, static_arg: Optional[str] = None) -> list:
    """The entries of ``tree`` (a pytree like ``like``), one per leaf of ``like`` (``MaskedNode`` counting as a
    leaf), in ``like``'s leaf order; a ValueError naming the first path where the two differ otherwise.
    Where ``like`` has a leaf, ``tree``'s subtree there is one entry, whatever it holds (an axes pair is
    itself a tuple pytree), unless it wraps its ``.value``; ``None`` is an entry anywhere. ``static_arg``:
    the argument ``tree`` came from, named in a hint when it is a single entry (a callable run as a
    schedule)."""
    like_paths = [normalized_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(like, is_leaf=is_masked)[0]]
    wanted = set(like_paths)
    entries = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda p, x: x is None or (normalized_path(p) in wanted and not _wraps_a_value(x)),
        is_leaf_takes_path=True)[0]
    paths = [normalized_path(p) for p, _ in entries]
    if paths == like_paths:
        return [x for _, x in entries]
    i = next((k for k, (a, b) in enumerate(zip(paths, like_paths)) if a != b), min(len(paths), len(like_paths)))
    if i < len(like_paths) and like_paths[i] not in set(paths):
        diff = f"it has no entry for the parameter at {like_paths[i]}"
    elif i < len(paths) and paths[i] not in wanted:
        diff = f"it has an entry at {paths[i]}, where the parameters have no leaf"
    else:
        diff = f"its entries repeat or come in another order (first at {(like_paths + paths)[i]})"
    hint = ""
    if static_arg and like_paths != ["<root>"]:
        if _axis_groups(tree) is not None:
            hint = (f" It is one (rows, cols) pair, {tree!r}, for the whole tree: give one per leaf (None for Adam "
                    "leaves), or read them all from the model with muon_jax.infer_routing.")
        elif paths == ["<root>"]:
            hint = (f" It is one entry, {tree!r}, for the whole tree: under optax.inject_hyperparams a "
                    f"callable {static_arg} is called as a schedule; pass static_args=({static_arg!r},).")
    raise ValueError(f"The {what} tree does not match the parameters' tree: {diff}. Build it from the parameters, "
                     f"e.g. with jax.tree.map(..., params).{hint}")


def _axis_group(value) -> Optional[tuple]:
    """``value`` (an int or a sequence of ints) as a tuple of ints; None if it is neither."""
    is_int = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))  # noqa: E731
    if is_int(value):
        return (int(value),)
    if isinstance(value, (tuple, list)) and all(is_int(v) for v in value):
        return tuple(int(v) for v in value)
    return None


def _axis_groups(axes) -> Optional[tuple]:
    """A ``(rows, cols)`` entry (a pair of ints or int sequences) as two tuples of ints; None if it is not one."""
    if not (isinstance(axes, (tuple, list)) and len(axes) == 2):
        return None
    groups = tuple(map(_axis_group, axes))
    return None if None in groups else groups


@dataclasses.dataclass(frozen=True)
class MatrixView:
    """A leaf of ``shape`` seen as ``[*batch, A, B]`` matrices: ``rows`` merged into ``A``, ``cols`` into ``B``
    (non-negative axis indices, in the order given), the other axes a batch in their order."""
    shape: tuple[int, ...]
    rows: tuple[int, ...]
    cols: tuple[int, ...]

    @property
    def batch(self) -> tuple[int, ...]:
        return tuple(i for i in range(len(self.shape)) if i not in self.rows + self.cols)

    @property
    def order(self) -> tuple[int, ...]:
        """The transposition to ``batch + rows + cols``."""
        return self.batch + self.rows + self.cols

    @property
    def matrix(self) -> tuple[int, int]:
        """``(A, B)``: the matrix's fan-in and fan-out."""
        return math.prod(self.shape[i] for i in self.rows), math.prod(self.shape[i] for i in self.cols)

    @property
    def matrices_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[i] for i in self.batch) + self.matrix

    @property
    def is_identity(self) -> bool:
        """Whether the view is the leaf itself (the default: its last two axes)."""
        return self.order == tuple(range(len(self.shape))) and len(self.rows) == len(self.cols) == 1

    def to_matrices(self, x: jax.Array) -> jax.Array:
        """``x`` as ``[*batch, A, B]``."""
        if self.order != tuple(range(x.ndim)):
            x = x.transpose(self.order)
        return x if x.shape == self.matrices_shape else x.reshape(self.matrices_shape)

    def from_matrices(self, y: jax.Array) -> jax.Array:
        """The inverse of :meth:`to_matrices`."""
        permuted = tuple(self.shape[i] for i in self.order)
        y = y if y.shape == permuted else y.reshape(permuted)
        return y if self.order == tuple(range(y.ndim)) else y.transpose(inverse(self.order))

    def spec(self, spec: Optional[P]) -> Optional[P]:
        """The partition spec of :meth:`to_matrices`'s result for a leaf sharded as ``spec``, or None (a
        reshard) when a merged axis group is sharded on any member but its first: row-major merging keeps
        each device's block contiguous only then (the group is then sharded as its first member is)."""
        if spec is None:
            return None
        entries = tuple(spec) + (None,) * (len(self.shape) - len(spec))
        sharded = lambda e: bool(e) and e is not P.UNCONSTRAINED  # noqa: E731
        if any(sharded(entries[i]) for group in (self.rows, self.cols) for i in group[1:]):
            return None
        return P(*[entries[i] for i in self.batch], entries[self.rows[0]], entries[self.cols[0]])


def inverse(order: Sequence[int]) -> tuple[int, ...]:
    out = [0] * len(order)
    for i, j in enumerate(order):
        out[j] = i
    return tuple(out)


def matrix_view(path, shape: tuple[int, ...], axes) -> MatrixView:
    """The view of the leaf at ``path`` given its ``matrix_axes`` entry (any form of :data:`AXES_FORMS`);
    a ValueError naming the leaf and the fix for a bad entry, a leaf below 2-D or a zero-size leaf."""
    at, ndim = where(path), len(shape)
    if axes is None:
        require_matrix(shape, f"The leaf at {at}", NOT_A_MATRIX_FIX)
        rows, cols = (ndim - 2,), (ndim - 1,)
    else:
        if isinstance(axes, optax.contrib.MuonDimensionNumbers):
            axes = (axes.reduction_axis, axes.output_axis)
        groups = _axis_groups(axes)
        if groups is None:
            raise ValueError(f"matrix_axes for the leaf at {at} is {axes!r}; give {AXES_FORMS}.")
        bad = [a for g in groups for a in g if not -ndim <= a < ndim]
        if bad:
            raise ValueError(f"matrix_axes {axes!r} for the leaf at {at} names axis {bad[0]}, but the leaf has shape "
                             f"{tuple(shape)} ({ndim} axes); use axes in [-{ndim}, {ndim}).")
        rows, cols = (tuple(a % ndim for a in g) for g in groups)
        if not rows or not cols:
            raise ValueError(f"matrix_axes {axes!r} for the leaf at {at} leaves the {'rows' if not rows else 'cols'} "
                             f"empty; name at least one axis for each.")
        if len(set(rows + cols)) != len(rows + cols):
            raise ValueError(f"matrix_axes {axes!r} for the leaf at {at} name an axis twice; each axis is a row, a "
                             "column or a batch axis.")
    if 0 in shape:
        raise ValueError(f"The leaf at {at} has zero size (shape {tuple(shape)}): there is no matrix to "
                         "orthogonalise. Label it 'adam'.")
    return MatrixView(tuple(shape), rows, cols)


def matrix_views(tree, matrix_axes) -> list[Optional[MatrixView]]:
    """The view of every leaf of ``tree`` (None for ``MaskedNode`` leaves), in leaf order; ``matrix_axes``:
    None (every leaf's last two axes), a pytree like ``tree`` of entries, or a callable returning one."""
    entries = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_masked)[0]
    spec = matrix_axes(tree) if is_function(matrix_axes) else matrix_axes
    axes = [None] * len(entries) if spec is None else aligned(spec, tree, "matrix_axes", "matrix_axes")
    return [None if is_masked(x) else matrix_view(p, x.shape, a) for (p, x), a in zip(entries, axes)]
