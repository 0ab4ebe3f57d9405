r"""``infer_routing``: which leaves Muon orthogonalises, and as which matrices, read from the computation.

Muon (Jordan et al. 2024; Liu et al. 2025, arXiv 2502.16982) is meant for the hidden matrices of a network:
weights that multiply activations. Names do not say which leaves those are (``w``, ``kernel``, ``c_attn``,
``wte`` ...), and shapes do not say which axes of a ``[L, E, d, f]`` or ``[3, 3, c_in, c_out]`` leaf form the
matrix. The computation does. :func:`infer_routing` traces ``fn(params, *args)`` abstractly with
``jax.make_jaxpr`` (no FLOPs, no parameter memory; arrays may be ``jax.ShapeDtypeStruct``) and runs two forward
dataflow analyses over the jaxpr.

**Where each leaf goes (structural provenance).** Every value that is a pure re-layout of one or more leaves
(transpose, reshape, dtype cast, broadcast, slice, concatenate, squeeze, scan slicing, and data-independent
element-wise maps such as ``w * 0.5``) carries, per leaf, the set of leaf axes behind each of its axes. Sub-jaxprs
(``jit``, ``custom_jvp_call``, ``custom_vjp_call``, ``checkpoint``/remat, ``shard_map``, ``cond``, ``while``,
``scan``) are followed with their operands mapped; a scanned operand loses its leading axis, which so becomes
an axis of independent matrices (stacked layers). When such a value meets

* ``dot_general`` (or ``ragged_dot_general``): the leaf axes behind the operand's contracting dimensions are the
  matrix rows (fan-in, contracted with the layer's input), those behind its free dimensions the columns
  (fan-out), those behind its batch (and ragged group) dimensions, and the leaf axes sliced away before, index
  independent matrices. An expert stack ``[E, d, f]`` multiplied per expert (``'ecd,edf->ecf'``) is so ``E``
  matrices ``[d, f]``; one whose ``E`` is a free output dimension (``'cd,edf->cef'``) is one matrix
  ``[d, E·f]``.
* ``conv_general_dilated`` (as the kernel): input-feature and spatial dimensions are rows, the output-feature
  dimension the columns (an HWIO kernel gives ``((0, 1, 2), (3,))``). Feature- or batch-grouped convolutions
  (depthwise included) go to AdamW: their kernel is a block-diagonal matrix, not one dense matrix.
* ``gather`` (or ``dynamic_slice`` at data-dependent offsets): an embedding table, AdamW.
* any other operation together with a data-dependent value: an element-wise use (norm scales, biases, gains,
  additive tables, masks of activations), AdamW when it is the only kind of use.

**Which matmuls are the output layer (producers).** Every data-dependent float value carries the set of leaves
whose matmul or convolution produced it without passing through another parameter's matmul or convolution: a
weight-operand matmul replaces the set by its weight's leaves, every other operation takes the union of its
operands' sets; integer and boolean values (``top_k`` indices, counts) and ``stop_gradient`` carry none, since
no gradient flows through them. A leaf in the sets of ``fn``'s outputs whose results never enter another
parameter's matmul is the output layer (LM, classifier or regression head, or a tied embedding): AdamW, as
Moonlight does. (The second condition keeps hidden layers whose results also reach the output by a side path,
such as a router in an auxiliary balancing loss or a conv in batch statistics, off the list.)

Rules, in order: non-array, integer, boolean and below-2-D leaves, unused leaves, gathered leaves, leaves used in
ways that disagree (contracted on different axes in two matmuls, or both in a matmul and element-wise), output
layers and element-wise-only leaves go to AdamW; a leaf whose every use is a matmul with one and the same view
goes to Muon with that view. Pass ``fn`` returning what is trained on (the loss, or the logits): every float
output counts as output.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

MUON, ADAM = "muon", "adam"

# one value of the jaxpr: per leaf, the leaf axes behind each of its axes (a pure re-layout of that leaf)
AxisMap = tuple[frozenset, ...]

# operations that are the identity on their operands' layout (operand i -> output i)
_IDENTITY = frozenset({
    "copy", "copy_p", "reduce_precision", "sharding_constraint", "mesh_cast", "reshard",
    "optimization_barrier", "device_put", "pvary", "pbroadcast", "rev", "real", "imag", "name", "tie_in",
})
# the primitives with a rule of their own (method `_<name>` of `_Analysis`)
_RULES = frozenset({
    "convert_element_type", "transpose", "reshape", "squeeze", "expand_dims", "broadcast_in_dim", "slice", "split",
    "pad", "dynamic_slice", "concatenate", "gather", "dot_general", "ragged_dot_general", "conv_general_dilated",
    "scan", "while", "cond",
})
# the primitives whose results carry no gradient (for the output-layer analysis)
_NO_GRADIENT = frozenset({"stop_gradient", "argmax", "argmin", "iota", "random_bits", "random_seed", "random_wrap",
                          "random_unwrap", "threefry2x32", "sign", "floor", "ceil", "round", "is_finite"})


@dataclasses.dataclass(frozen=True)
class _Val:
    """What the analysis knows of one jaxpr value."""
    prov: tuple = ()                 # ((leaf, AxisMap), ...) sorted by leaf: pure re-layouts of these leaves
    data: bool = False               # depends on something other than params and literals (inputs, constants)
    deps: frozenset = frozenset()    # the leaves a data-independent value depends on
    prod: frozenset = frozenset()    # leaves whose matmul produced this value with no parameter matmul after it
    onehot: bool = False             # a re-layout of booleans of the data cast to float (jax.nn.one_hot)


_NULL = _Val()


def _val(prov: dict, data: bool, deps, prod, onehot: bool = False) -> _Val:
    return _Val(tuple(sorted(prov.items())) if not data else (), data, frozenset() if data else frozenset(deps),
                frozenset(prod), onehot)


def _join(a: _Val, b: _Val) -> _Val:
    """The value of a loop carry / cond output that may be either `a` or `b`."""
    pa, pb = dict(a.prov), dict(b.prov)
    prov = {leaf: m for leaf, m in pa.items() if pb.get(leaf) == m}
    return _val(prov, a.data or b.data, a.deps | b.deps, a.prod | b.prod, a.onehot and b.onehot)


def _reshape_map(in_shape, out_shape) -> list[list[int]]:
    """For each output axis of a row-major reshape, the input axes it shares elements' strides with.

    Axis k of a shape spans the strides [s_k, s_k·n_k) with s_k = prod(shape[k+1:]); an output axis maps to the
    input axes (of size > 1) whose spans overlap its own. Merges and splits map exactly."""
    def spans(shape):
        out, stride = [], 1
        for n in reversed(shape):
            out.append((stride, stride * n))
            stride *= n
        return out[::-1]
    ins = spans(in_shape)
    return [[i for i, (lo, hi) in enumerate(ins) if hi - lo > 0 and max(lo, a) < min(hi, b)]
            for (a, b) in spans(out_shape)]


def _shape(v) -> tuple:
    return tuple(v.aval.shape) if hasattr(v.aval, "shape") else ()


def _is_float(v) -> bool:
    dtype = getattr(v.aval, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def _sub_jaxprs(params) -> list:
    """The jaxprs among an equation's params (a ClosedJaxpr's consts are read as data by `run`)."""
    found = []
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jcore.ClosedJaxpr):
                found.append(item.jaxpr)
            elif isinstance(item, jcore.Jaxpr):
                found.append(item)
    return found


class _Analysis:
    """The two forward analyses over one traced jaxpr; `uses[leaf]` collects how each leaf is used."""

    def __init__(self, num_leaves: int):
        self.uses: list[set] = [set() for _ in range(num_leaves)]
        self.feeds: set = set()   # leaves whose matmul results reach another parameter's matmul
        self.ops: list[set] = [set() for _ in range(num_leaves)]  # which matmul primitives each leaf weighs

    # -- uses --------------------------------------------------------------------------------------------------
    def record_matmul(self, val: _Val, contract, batch, free, what: str):
        """`val` is a matmul operand: its dims `contract`, `batch`, `free` give each leaf's view."""
        for leaf, axis_map in val.prov:
            rows = frozenset().union(*(axis_map[d] for d in contract))
            cols = frozenset().union(*(axis_map[d] for d in free))
            bat = frozenset().union(*(axis_map[d] for d in batch))
            if rows & cols or rows & bat or cols & bat:
                both = sorted((rows & cols) | (rows & bat) | (cols & bat))
                self.uses[leaf].add(("conflict", f"axes {both} play two roles in one {what}"))
            elif not rows or not cols:
                self.uses[leaf].add(("elementwise", f"broadcast into a {what} operand"))
            else:
                self.uses[leaf].add(("matmul", (tuple(sorted(rows)), tuple(sorted(cols)))))
                self.ops[leaf].add(what)

    def record(self, val: _Val, kind: str, detail: str):
        for leaf, _ in val.prov:
            self.uses[leaf].add((kind, detail))

    # -- jaxprs ------------------------------------------------------------------------------------------------
    def run(self, jaxpr: jcore.Jaxpr, in_vals: list) -> list:
        env: dict = {}
        for v in jaxpr.constvars:
            env[v] = _Val(data=True)
        for v, val in zip(jaxpr.invars, in_vals):
            env[v] = val
        read = lambda v: env.get(v, _NULL) if isinstance(v, jcore.Var) else _NULL
        for eqn in jaxpr.eqns:
            outs = self.equation(eqn, [read(v) for v in eqn.invars])
            for v, val in zip(eqn.outvars, outs):
                if not _is_float(v):
                    val = dataclasses.replace(val, prod=frozenset(), prov=())
                env[v] = val
        return [read(v) for v in jaxpr.outvars]

    def loop(self, body: jcore.Jaxpr, consts: list, carry: list, xs: list, out_of_body) -> list:
        """Run a loop body to a fixed point of its carry (sets only grow, so this ends in a few passes)."""
        for _ in range(8):
            outs = self.run(body, consts + carry + xs)
            new = [_join(c, o) for c, o in zip(carry, out_of_body(outs))]
            if new == carry:
                return outs
            carry = new
        return outs

    def equation(self, eqn, ins: list) -> list:
        name, p = eqn.primitive.name, eqn.params
        if name in _RULES:
            return getattr(self, "_" + name)(eqn, ins)
        if name in _IDENTITY and len(eqn.invars) == len(eqn.outvars):
            return list(ins)
        subs = _sub_jaxprs(p)
        if len(subs) == 1 and len(subs[0].invars) == len(ins) and len(subs[0].outvars) == len(eqn.outvars):
            return self.run(subs[0], ins)  # jit, custom_jvp/vjp, checkpoint, shard_map, closed_call ...
        return self.generic(eqn, ins)

    def generic(self, eqn, ins: list) -> list:
        """Any other operation: element-wise (same shapes) maps of params stay re-layouts of them; meeting data
        is an element-wise (or other) use."""
        data = any(v.data for v in ins)
        deps = frozenset().union(*(v.deps for v in ins))
        prod = frozenset() if eqn.primitive.name in _NO_GRADIENT else frozenset().union(*(v.prod for v in ins))
        out_shapes = {_shape(v) for v in eqn.outvars}
        out = next(iter(out_shapes)) if len(out_shapes) == 1 else None
        # element-wise: every operand a scalar or of the output's rank, each axis the output's or 1 (broadcast)
        fits = lambda shape: out is not None and len(shape) == len(out) and all(n in (1, m) for n, m in zip(shape, out))
        aligned = all(_shape(v) == () or fits(_shape(v)) for v in eqn.invars)
        prov: dict = {}
        for v, val in zip(eqn.invars, ins):
            if not val.prov:
                continue
            if data:
                self.record(val, "elementwise" if aligned else "other",
                            f"{eqn.primitive.name} with activations")
            elif aligned and _shape(v) != ():
                for leaf, axis_map in val.prov:  # an axis broadcast from size 1 is no longer the leaf's
                    axis_map = tuple(a if n == m else frozenset() for a, n, m in zip(axis_map, _shape(v), out))
                    prov[leaf] = axis_map if prov.get(leaf, axis_map) == axis_map else None
        prov = {leaf: m for leaf, m in prov.items() if m is not None}
        return [_val(prov, data, deps, prod) for _ in eqn.outvars]

    @staticmethod
    def _mapped(val: _Val, fn) -> dict:
        return {leaf: tuple(fn(axis_map)) for leaf, axis_map in val.prov}

    # -- re-layouts --------------------------------------------------------------------------------------------
    def _relayout(self, val: _Val, fn) -> _Val:
        return _val(self._mapped(val, fn), val.data, val.deps, val.prod, val.onehot)

    def _convert_element_type(self, eqn, ins):
        was_bool = getattr(eqn.invars[0].aval, "dtype", None) == jnp.dtype(bool)
        return [dataclasses.replace(ins[0], onehot=ins[0].onehot or (was_bool and ins[0].data))]

    def _transpose(self, eqn, ins):
        perm = eqn.params["permutation"]
        return [self._relayout(ins[0], lambda m: [m[i] for i in perm])]

    def _reshape(self, eqn, ins):
        groups = _reshape_map(_shape(eqn.invars[0]), _shape(eqn.outvars[0]))
        return [self._relayout(ins[0], lambda m: [frozenset().union(*(m[i] for i in g)) for g in groups])]

    def _squeeze(self, eqn, ins):
        drop = {d % len(_shape(eqn.invars[0])) for d in eqn.params["dimensions"]}
        return [self._relayout(ins[0], lambda m: [a for i, a in enumerate(m) if i not in drop])]

    def _expand_dims(self, eqn, ins):
        return self._reshape(eqn, ins)

    def _broadcast_in_dim(self, eqn, ins):
        out_rank, dims = len(eqn.params["shape"]), eqn.params["broadcast_dimensions"]
        in_shape = _shape(eqn.invars[0])
        def fn(m):
            out = [frozenset()] * out_rank
            for i, d in enumerate(dims):
                out[d] = m[i] if in_shape[i] == eqn.params["shape"][d] else frozenset()
            return out
        return [self._relayout(ins[0], fn)] + [_NULL] * (len(eqn.outvars) - 1)

    def _sliced(self, in_shape, out_shape):
        """Slicing keeps each axis, except one cut to a single element, which selects (a batch axis)."""
        return lambda m: [a if out_shape[i] > 1 or in_shape[i] == 1 else frozenset() for i, a in enumerate(m)]

    def _slice(self, eqn, ins):
        return [self._relayout(ins[0], self._sliced(_shape(eqn.invars[0]), _shape(eqn.outvars[0])))]

    def _split(self, eqn, ins):
        return [self._relayout(ins[0], self._sliced(_shape(eqn.invars[0]), _shape(v))) for v in eqn.outvars]

    def _pad(self, eqn, ins):
        return self.generic(eqn, ins) if ins[1].data else [self._relayout(ins[0], list)]

    def _dynamic_slice(self, eqn, ins):
        if any(v.data for v in ins[1:]):
            self.record(ins[0], "gather", "read at data-dependent offsets (dynamic_slice)")
            return self.generic(eqn, [dataclasses.replace(v, prov=()) for v in ins])
        out = self._relayout(ins[0], self._sliced(_shape(eqn.invars[0]), _shape(eqn.outvars[0])))
        return [dataclasses.replace(out, deps=out.deps.union(*(v.deps for v in ins[1:])))]

    def _concatenate(self, eqn, ins):
        if any(v.data for v in ins) and any(v.prov for v in ins):
            return self.generic(eqn, ins)
        prov: dict = {}
        for val in ins:
            for leaf, axis_map in val.prov:
                old = prov.get(leaf)
                prov[leaf] = axis_map if old is None else tuple(a | b for a, b in zip(old, axis_map))
        return [_val(prov, any(v.data for v in ins), frozenset().union(*(v.deps for v in ins)),
                     frozenset().union(*(v.prod for v in ins)))]

    def _gather(self, eqn, ins):
        self.record(ins[0], "gather", "read by a gather (an embedding)")
        return self.generic(eqn, [dataclasses.replace(v, prov=()) for v in ins])

    # -- matmuls -----------------------------------------------------------------------------------------------
    def _product(self, eqn, ins) -> list:
        """A matmul's result: weight operands (data-independent, depending on params) become its producers."""
        weights = [v for v in ins if not v.data and v.deps]
        data = any(v.data for v in ins)
        if weights:
            self.feeds.update(*(v.prod for v in ins if v.data))
        prod = (frozenset().union(*(v.deps for v in weights)) if weights
                else frozenset().union(*(v.prod for v in ins)))
        return [_val({}, data, frozenset().union(*(v.deps for v in ins)), prod)]

    def _dot_general(self, eqn, ins):
        (contract, batch) = eqn.params["dimension_numbers"]
        for side in (0, 1):
            if ins[1 - side].onehot:  # one_hot(tokens) @ table is an embedding lookup written as a matmul
                self.record(ins[side], "gather", "multiplied by a one-hot of the data (an embedding)")
                continue
            rank = len(_shape(eqn.invars[side]))
            c, b = contract[side], batch[side]
            self.record_matmul(ins[side], c, b, [d for d in range(rank) if d not in c and d not in b], "dot_general")
        return self._product(eqn, ins)

    def _ragged_dot_general(self, eqn, ins):
        dims = eqn.params["ragged_dot_dimension_numbers"]
        (contract, batch) = dims.dot_dimension_numbers
        rank = len(_shape(eqn.invars[1]))
        c, b = contract[1], tuple(batch[1]) + tuple(dims.rhs_group_dimensions)
        self.record_matmul(ins[1], c, b, [d for d in range(rank) if d not in c and d not in b], "ragged_dot")
        self.record(ins[0], "other", "the ragged operand of a ragged_dot")
        return self._product(eqn, ins[:2]) + [_NULL] * (len(eqn.outvars) - 1)

    def _conv_general_dilated(self, eqn, ins):
        out_dim, in_dim, *spatial = eqn.params["dimension_numbers"].rhs_spec
        groups = eqn.params["feature_group_count"] * eqn.params["batch_group_count"]
        if groups > 1:
            self.record(ins[1], "other", f"the kernel of a grouped convolution ({groups} groups)")
        else:
            self.record_matmul(ins[1], [in_dim, *spatial], [], [out_dim], "convolution")
        self.record(ins[0], "other", "the input of a convolution")
        return self._product(eqn, ins)

    # -- control flow ------------------------------------------------------------------------------------------
    def _scan(self, eqn, ins):
        p = eqn.params
        nc, nk = p["num_consts"], p["num_carry"]
        consts, carry, xs = ins[:nc], ins[nc:nc + nk], ins[nc + nk:]
        sliced = [self._relayout(v, lambda m: m[1:]) for v in xs]  # the scanned axis indexes the slices
        outs = self.loop(p["jaxpr"].jaxpr, consts, carry, sliced, lambda o: o[:nk])
        ys = [self._relayout(v, lambda m: (frozenset(),) + tuple(m)) for v in outs[nk:]]
        return [_join(c, o) for c, o in zip(carry, outs[:nk])] + ys

    def _while(self, eqn, ins):
        p = eqn.params
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        cond_consts, body_consts, carry = ins[:cn], ins[cn:cn + bn], ins[cn + bn:]
        outs = self.loop(p["body_jaxpr"].jaxpr, body_consts, carry, [], lambda o: o)
        final = [_join(c, o) for c, o in zip(carry, outs)]
        self.run(p["cond_jaxpr"].jaxpr, cond_consts + final)
        return final

    def _cond(self, eqn, ins):
        results = [self.run(branch.jaxpr, ins[1:]) for branch in eqn.params["branches"]]
        out = results[0]
        for other in results[1:]:
            out = [_join(a, b) for a, b in zip(out, other)]
        return out


def _is_array(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _label(shape, dtype, uses: set, head: bool, ops: set) -> tuple[str, Optional[tuple], str]:
    """(label, matrix axes, reason) of one leaf from its uses."""
    if dtype is None:
        return ADAM, None, "not an array"
    if not jnp.issubdtype(dtype, jnp.floating):
        return ADAM, None, f"{dtype} leaf (not floating point)"
    if len(shape) < 2:
        return ADAM, None, f"{len(shape)}-D (below 2-D)"
    if not uses:
        return ADAM, None, "unused by fn"
    kinds = {kind for kind, _ in uses}
    details = lambda kind: "; ".join(sorted(str(d) for k, d in uses if k == kind))
    if "gather" in kinds:
        return ADAM, None, details("gather") + (" and the output layer" if head else "")
    if "conflict" in kinds:
        return ADAM, None, "disagreeing uses: " + details("conflict")
    views = {d for k, d in uses if k == "matmul"}
    non_matmul = "; ".join(sorted(str(d) for k, d in uses if k != "matmul"))
    if views and non_matmul:
        return ADAM, None, f"disagreeing uses: a matmul and {non_matmul}"
    if len(views) > 1:
        described = " vs ".join(f"rows {r} cols {c}" for r, c in sorted(views))
        return ADAM, None, f"disagreeing uses: matmuls view it differently ({described})"
    if head:
        return ADAM, None, "output layer (head): its matmul reaches the output"
    if not views and kinds == {"elementwise"}:
        return ADAM, None, f"used only elementwise ({details('elementwise')})"
    if not views:
        return ADAM, None, f"not a matmul weight ({non_matmul})"
    (rows, cols), = views
    return MUON, (rows, cols), f"weight of {' and '.join(sorted(ops))}"


class Routing:
    """Where each leaf of a params tree goes, as :func:`infer_routing` read it from the computation.

    Attributes:
      labels: a pytree like the params (same treedef: dicts, lists, ``nnx.State`` ...), each leaf ``"muon"`` or
        ``"adam"``; give it to ``muon_jax.muon(labels=...)`` (or ``optax.partition``).
      matrix_axes: a pytree like the params; a ``"muon"`` leaf holds a pair ``(rows, cols)`` of sorted tuples of
        axis indices (the matrix is the leaf transposed to ``batch + rows + cols`` and reshaped to
        ``[..., prod(rows), prod(cols)]``; every other axis indexes independent matrices), an ``"adam"`` leaf
        ``None``. A pair is itself a tuple pytree: consumers flatten with ``is_leaf`` (see :func:`is_axes_pair`).
      reasons: a pytree like the params of short strings saying why.
      table: one row per leaf: (path, shape (None for a non-array leaf), label, matrix view "batch x rows x
        cols" or "", reason). ``str(routing)`` prints them aligned, under a header.

    Example:
        >>> params = {"w": jnp.zeros((4, 8)), "out": jnp.zeros((8, 1))}
        >>> routing = muon_jax.infer_routing(lambda p, x: jnp.tanh(x @ p["w"]) @ p["out"], params, jnp.zeros((2, 4)))
        >>> print(routing)
        path     shape   label  matrix (batch x rows x cols)  reason
        ['out']  (8, 1)  adam                                 output layer (head): its matmul reaches the output
        ['w']    (4, 8)  muon   1 x 4 x 8                     weight of dot_general
        >>> routing.summary()
        'routing: 1 muon (32 params), 1 adam (8 params)'
    """
    def __init__(self, labels: Any, matrix_axes: Any, reasons: Any, table: tuple):
        for name, value in (("labels", labels), ("matrix_axes", matrix_axes), ("reasons", reasons),
                            ("table", table)):
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError(f"Routing is read-only; infer_routing builds a new one (tried to set {name!r}).")

    def __repr__(self) -> str:
        return f"<Routing {self.summary()}>"

    def __str__(self) -> str:
        header = ("path", "shape", "label", "matrix (batch x rows x cols)", "reason")
        rows = [header] + [tuple("-" if c is None else str(c) for c in row) for row in self.table]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return "\n".join("  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in rows)

    def summary(self) -> str:
        """One line: how many leaves (and parameters) each branch gets."""
        counts = {MUON: [0, 0], ADAM: [0, 0]}
        for _, shape, label, _, _ in self.table:
            counts[label][0] += 1
            counts[label][1] += 0 if shape is None else math.prod(shape)
        part = lambda k: f"{counts[k][0]} {k} ({_human(counts[k][1])} params)"
        return f"routing: {part(MUON)}, {part(ADAM)}"


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def is_axes_pair(x) -> bool:
    """Whether ``x`` is one ``(rows, cols)`` entry of :attr:`Routing.matrix_axes`, for ``is_leaf=``: the pairs are
    tuples, which pytree functions would otherwise walk into.

    Args:
      x: any pytree node or leaf.

    Returns:
      True for a pair of tuples of ints, such as ``((0, 1, 2), (3,))``.

    Example:
        >>> axes = {"conv": ((0, 1, 2), (3,)), "bias": None}
        >>> jax.tree.leaves(axes, is_leaf=muon_jax.is_axes_pair)
        [((0, 1, 2), (3,))]
        >>> muon_jax.is_axes_pair((0, 1))
        False
    """
    return (isinstance(x, tuple) and len(x) == 2
            and all(isinstance(t, tuple) and all(isinstance(i, int) for i in t) for t in x))


def infer_routing(fn: Callable, params, *args, **kwargs) -> Routing:
    r"""Reads which leaves of ``params`` are hidden matrices, and their matrix axes, from ``fn``'s computation.

    Traces ``fn(params, *args, **kwargs)`` with ``jax.make_jaxpr`` (nothing runs, nothing is allocated; array
    leaves of ``params``, ``args`` and ``kwargs`` may be ``jax.ShapeDtypeStruct``; other leaves, such as flags,
    are passed as they are) and applies the rules of the module docstring: a leaf multiplied as a weight
    (``dot_general``, ``ragged_dot``, ``conv``), with one view in every use and not the output layer, goes to
    ``"muon"`` with matrix axes ``(rows, cols)`` (rows: axes contracted with the layer's input, cols: output
    features); embeddings, the output layer, norms, biases, gains, below-2-D, integer, unused and
    inconsistently used leaves go to ``"adam"``.

    Args:
      fn: ``fn(params, *args, **kwargs)``, returning the loss or the model output (every float output counts).
      params: the pytree trained (plain dicts and lists, flax linen variables, ``nnx.State``, equinox arrays).
      \*args, \*\*kwargs: the rest of ``fn``'s inputs (a batch, possibly as ``ShapeDtypeStruct``).

    Returns:
      A :class:`Routing`: ``labels``, ``matrix_axes``, ``reasons`` (pytrees like ``params``), printable as a
      table, with a one-line ``summary()``.

    Raises:
      TypeError: ``fn`` is not callable (errors of ``fn`` itself while tracing propagate unchanged).

    Example:
        >>> params = {"embed": jnp.zeros((100, 16)), "w": jnp.zeros((16, 64)), "head": jnp.zeros((64, 100))}
        >>> def logits(p, tokens):
        ...     return jax.nn.relu(p["embed"][tokens] @ p["w"]) @ p["head"]
        >>> routing = muon_jax.infer_routing(logits, params, jax.ShapeDtypeStruct((8, 32), jnp.int32))
        >>> routing.labels
        {'embed': 'adam', 'head': 'adam', 'w': 'muon'}
        >>> routing.matrix_axes["w"], routing.reasons["embed"]
        (((0,), (1,)), 'read by a gather (an embedding)')
        >>> tx = muon_jax.muon(1e-3, labels=routing.labels, matrix_axes=routing.matrix_axes)
    """
    if not callable(fn):
        raise TypeError(f"infer_routing(fn, params, *args): fn must be a function of the params (and args), got "
                        f"{type(fn).__name__}; pass e.g. lambda params, batch: loss(model, params, batch).")
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = [leaf for _, leaf in path_leaves]
    traced = [i for i, leaf in enumerate(leaves) if _is_array(leaf)]
    arg_leaves, arg_def = jax.tree_util.tree_flatten((args, kwargs))
    arg_traced = [i for i, leaf in enumerate(arg_leaves) if _is_array(leaf)]

    def call(param_arrays, arg_arrays):
        full = list(leaves)
        for i, x in zip(traced, param_arrays):
            full[i] = x
        full_args = list(arg_leaves)
        for i, x in zip(arg_traced, arg_arrays):
            full_args[i] = x
        a, k = jax.tree_util.tree_unflatten(arg_def, full_args)
        return fn(jax.tree_util.tree_unflatten(treedef, full), *a, **k)

    as_spec = lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype)
    closed = jax.make_jaxpr(call)([as_spec(leaves[i]) for i in traced],
                                  [as_spec(arg_leaves[i]) for i in arg_traced])
    jaxpr = closed.jaxpr
    analysis = _Analysis(len(traced))
    in_vals = []
    for k, v in enumerate(jaxpr.invars[:len(traced)]):
        rank = len(_shape(v))
        prov = {k: tuple(frozenset({a}) for a in range(rank))} if _is_float(v) else {}
        in_vals.append(_val(prov, False, {k}, ()))
    in_vals += [_Val(data=True)] * (len(jaxpr.invars) - len(traced))
    outs = analysis.run(jaxpr, in_vals)
    heads = frozenset().union(*(o.prod for o, v in zip(outs, jaxpr.outvars)
                                if not isinstance(v, jcore.Var) or _is_float(v))) - analysis.feeds

    labels, axes, reasons, table = [], [], [], []
    slot = {i: k for k, i in enumerate(traced)}
    for i, (path, leaf) in enumerate(path_leaves):
        shape = tuple(np.shape(leaf)) if i in slot else None  # None: not an array
        dtype = leaf.dtype if i in slot else None
        uses = analysis.uses[slot[i]] if i in slot else set()
        label, pair, reason = _label(shape, dtype, uses, i in slot and slot[i] in heads,
                                     analysis.ops[slot[i]] if i in slot else set())
        labels.append(label)
        axes.append(pair)
        reasons.append(reason)
        view = ""
        if pair is not None:
            rows, cols = pair
            batch = [a for a in range(len(shape)) if a not in rows and a not in cols]
            size = lambda ax: math.prod(shape[a] for a in ax)
            view = f"{size(batch)} x {size(rows)} x {size(cols)}"
        table.append((jax.tree_util.keystr(path) or "<root>", shape, label, view, reason))
    return Routing(jax.tree_util.tree_unflatten(treedef, labels), jax.tree_util.tree_unflatten(treedef, axes),
                   jax.tree_util.tree_unflatten(treedef, reasons), tuple(table))
