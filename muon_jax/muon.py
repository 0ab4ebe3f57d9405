"""``muon``: Moonlight's Muon for hidden matrices, AdamW for everything else, as one optax transform."""
from __future__ import annotations

import re
import warnings
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from muon_jax.distributed import NsAxis
from muon_jax.newton_schulz import CoeffsSpec
from muon_jax.transforms import MatrixAxes, orthogonalize, scale_by_momentum, scale_by_shape
from muon_jax.views import aligned, is_function, is_masked, where

LABELS = ("muon", "adam")
_ADAM_PATH = re.compile(r"embed|lm_head|norm|bias", re.IGNORECASE)
# Names of embeddings and output heads that _ADAM_PATH misses (GPT-2, Llama, classifiers): default_labels
# sends them to Muon, and warns.
_HEAD_NAMES = frozenset({"wte", "wpe", "tok_embeddings", "output", "head", "classifier"})
_warned: set = set()


def _looks_like_head(path) -> bool:
    return any(t.lower() in _HEAD_NAMES for t in re.split(r"[^A-Za-z0-9_]+", jax.tree_util.keystr(path)))


def _looks_like_conv(shape) -> bool:
    """A 4-D leaf whose first two axes are an odd k × k window (k ≤ 7): a conv kernel in HWIO layout."""
    return len(shape) == 4 and shape[0] == shape[1] and shape[0] % 2 == 1 and shape[0] <= 7


def default_labels(params) -> Any:
    """The default routing, by name and shape alone: a leaf goes to ``"adam"`` if it has fewer than 2 axes
    (norms, biases, scalars) or its path mentions ``embed``, ``lm_head``, ``norm`` or ``bias``
    (case-insensitive: the last two catch layer-stacked ``[L, d]`` norm scales and biases), and to
    ``"muon"`` otherwise, its last two axes the matrix and its leading axes (stacked layers, experts)
    independent matrices. (``optax.contrib.muon`` sends 3-D leaves to Adam unless told otherwise.)

    It warns once (``warnings.warn``) when it sends to Muon a leaf whose path names ``wte``, ``wpe``,
    ``tok_embeddings``, ``output``, ``head`` or ``classifier`` (an embedding or output head under another
    name), or a 4-D leaf shaped like a ``k × k`` conv kernel, whose matrix is not its last two axes. For
    those, pass ``labels`` and ``matrix_axes`` (:func:`muon_jax.infer_routing` reads both from the model).

    Args:
      params: the pytree trained (dicts, lists, ``nnx.State`` with its ``nnx.Param`` wrappers, ...).

    Returns:
      A pytree like ``params`` holding ``"muon"`` or ``"adam"`` per leaf.

    Example:
        >>> params = {"embed": jnp.zeros((100, 16)), "wq": jnp.zeros((4, 16, 16)), "norm": jnp.ones((4, 16))}
        >>> muon_jax.default_labels(params)
        {'embed': 'adam', 'norm': 'adam', 'wq': 'muon'}
    """
    doubtful = []

    def label(path, x):
        shape = jnp.shape(x)
        if len(shape) < 2 or _ADAM_PATH.search(jax.tree_util.keystr(path)):
            return "adam"
        if _looks_like_head(path) or _looks_like_conv(shape):
            doubtful.append(f"{where(path)} {tuple(shape)}")
        return "muon"

    labels = jax.tree_util.tree_map_with_path(label, params)
    key = tuple(doubtful)
    if doubtful and key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"muon_jax.default_labels sends to Muon {len(doubtful)} leaves named or shaped like an embedding, an "
            f"output head or a conv kernel: {', '.join(doubtful)}. If they are, pass labels= and matrix_axes= "
            "(muon_jax.infer_routing(loss_fn, params, batch) reads both from the model).", stacklevel=2)
    return labels


def _label_list(labels, params) -> list:
    """The user's labels (None, a pytree or a callable) as one valid label per leaf of ``params``."""
    tree = default_labels(params) if labels is None else labels(params) if is_function(labels) else labels
    out = aligned(tree, params, "labels", static_arg="labels")
    for (path, x), label in zip(jax.tree_util.tree_flatten_with_path(params, is_leaf=is_masked)[0], out):
        if not is_masked(x) and not (isinstance(label, str) and label in LABELS):
            hint = "" if isinstance(label, str) else (
                " (Under optax.inject_hyperparams a callable labels is called as a schedule: pass "
                "static_args=('labels',).)")
            raise ValueError(f"Label {label!r} at {where(path)} is not one of {LABELS}.{hint}")
    return out


def _dtype(x):
    return x.dtype if hasattr(x, "dtype") else jnp.result_type(x)


def _is_integer(x) -> bool:
    """Integer and boolean leaves (step counters, masks, RNG key data) are never updated."""
    if is_masked(x):  # masked out by an outer optax.masked / optax.partition
        return False
    dtype = _dtype(x)
    return jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_)


def _check_gradients(updates, params) -> None:
    """One line naming the leaf for gradients that do not fit the parameters or are float0."""
    entries = jax.tree_util.tree_flatten_with_path(updates, is_leaf=is_masked)[0]
    for path, g in entries:
        if not is_masked(g) and _dtype(g) == jax.dtypes.float0:
            raise ValueError(
                f"The gradient at {where(path)} is float0 (jax.grad(..., allow_int=True) of an integer leaf). "
                "Pass zeros of the parameter's dtype there, e.g. jax.tree.map(lambda g, p: jnp.zeros_like(p) if "
                "g.dtype == jax.dtypes.float0 else g, grads, params).")
    if params is None:
        return
    grads = aligned(updates, params, "gradients")
    for (path, p), g in zip(jax.tree_util.tree_flatten_with_path(params, is_leaf=is_masked)[0], grads):
        if not (is_masked(p) or is_masked(g)) and jnp.shape(g) != jnp.shape(p):
            raise ValueError(f"The gradient at {where(path)} has shape {tuple(jnp.shape(g))} but its parameter has "
                             f"shape {tuple(jnp.shape(p))}: pass gradients shaped like the parameters.")


def _concrete(value) -> Optional[np.ndarray]:
    """``value`` as a numpy array, or None when it is traced (a hyperparameter of optax.inject_hyperparams
    inside jit: it was checked where it was concrete)."""
    try:
        return np.asarray(value)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_learning_rate(name: str, lr) -> None:
    if callable(lr):
        return
    value = None if lr is None or isinstance(lr, (str, bytes, bool)) else _concrete(lr)
    if lr is None or isinstance(lr, (str, bytes, bool)) or (
            value is not None and (value.ndim or not np.issubdtype(value.dtype, np.number))):
        raise ValueError(f"{name}={lr!r} is not a learning rate: pass a float such as 2e-2 or an optax schedule "
                         "(a callable step -> rate).")
    if value is not None and value < 0:
        raise ValueError(f"{name}={lr!r} is negative, so the step would ascend the loss: pass a positive float or "
                         "an optax schedule.")


def _check_hyperparams(learning_rate, adam_learning_rate, momentum, ns_steps) -> None:
    """Bad hyperparameters fail at construction with one line; traced ones (inject_hyperparams under jit) are
    checked where they are concrete (init)."""
    _check_learning_rate("learning_rate", learning_rate)
    if adam_learning_rate is not None:
        _check_learning_rate("adam_learning_rate", adam_learning_rate)
    mu = _concrete(momentum)
    if mu is not None and not (mu.ndim == 0 and np.issubdtype(mu.dtype, np.number) and 0 <= mu < 1):
        raise ValueError(f"momentum={momentum!r} is outside [0, 1): the buffer would not decay. Use e.g. 0.95.")
    steps = _concrete(ns_steps)
    if steps is not None and not (steps.ndim == 0 and np.issubdtype(steps.dtype, np.integer) and steps >= 1):
        raise ValueError(f"ns_steps={ns_steps!r} must be an integer of at least 1 (Newton–Schulz iterations; "
                         "Moonlight uses 5).")


def muon(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_coeffs: CoeffsSpec = "moonlight",
    ns_steps: int = 5,
    ns_eps: float = 1e-7,
    ns_dtype: Any = jnp.dtype(jnp.bfloat16),
    lr_scale: Union[str, Callable[[tuple[int, int]], float]] = "moonlight",
    weight_decay: float = 0.1,
    adam_learning_rate: Optional[optax.ScalarOrSchedule] = None,
    adam_b1: float = 0.9,
    adam_b2: float = 0.95,
    adam_eps: float = 1e-8,
    adam_weight_decay: Optional[float] = None,
    labels: Any = None,
    matrix_axes: MatrixAxes = None,
    mu_dtype: Optional[Any] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
    ns_axis: NsAxis = None,
    ns_mode: str = "placed",
    ns_method: str = "auto",
    ns_restarts: Optional[tuple[int, ...]] = None,
    param_specs: Any = None,
) -> optax.GradientTransformation:
    r"""Muon as in Moonlight (Liu et al. 2025, *Muon is Scalable for LLM Training*, arXiv 2502.16982).

    For every matrix ``W`` of shape ``[A, B]`` labelled ``"muon"``:

    .. math::
        M_t &= \mu M_{t-1} + G_t \\
        O_t &= \mathrm{NS}(G_t + \mu M_t) \quad (\text{or } \mathrm{NS}(M_t) \text{ without Nesterov}) \\
        W_t &= W_{t-1} - \eta_t \left(0.2\sqrt{\max(A, B)}\; O_t + \lambda W_{t-1}\right)

    and AdamW (``β = (0.9, 0.95)``, decoupled weight decay) for every leaf labelled ``"adam"``. Built as
    ``optax.partition({"muon": chain(scale_by_momentum, orthogonalize, scale_by_shape,
    add_decayed_weights, scale_by_learning_rate), "adam": adamw}, labels)``.

    Differences from ``optax.contrib.muon``: momentum is Moonlight's heavy-ball buffer (no EMA, no bias
    correction), 3-D/4-D leaves are batches of matrices by default (not sent to Adam), the Adam branch
    is plain AdamW with Moonlight's betas (not NAdam), and weight decay is on by default.

    Args:
      learning_rate: ``η``, a float or an optax schedule, shared by both branches unless
        ``adam_learning_rate`` is given (the 0.2-RMS scaling is what makes sharing it work).
      momentum, nesterov: see :func:`muon_jax.scale_by_momentum`.
      ns_coeffs, ns_steps, ns_eps, ns_dtype: see :func:`muon_jax.newton_schulz`. Under
        ``optax.inject_hyperparams`` pass dtypes as ``jnp.dtype(...)`` instances (scalar types such as
        ``jnp.float32`` are callable and would be taken for schedules) or list them in ``static_args``.
      ns_method: ``"auto"`` (Gram Newton–Schulz in float32 for matrices whose aspect ratio exceeds
        :data:`muon_jax.GRAM_MIN_ASPECT`: same result, fewer FLOPs; standard NS for the rest and in
        bf16/f16, where Gram NS measured less accurate), ``"standard"`` or ``"gram"``; see
        :func:`muon_jax.newton_schulz`.
      ns_restarts: Gram NS restart iterations (a tuple), None for the measured default.
      lr_scale: ``"moonlight"`` | ``"spectral"`` | ``"none"`` | callable, see :func:`muon_jax.scale_by_shape`.
      weight_decay: ``λ`` for Muon leaves (multiplied by the learning rate).
      adam_learning_rate: defaults to ``learning_rate``.
      adam_b1, adam_b2, adam_eps: AdamW's parameters.
      adam_weight_decay: defaults to ``weight_decay``.
      labels: ``None`` (:func:`default_labels`), or a pytree like the params / a function of the params
        giving ``"muon"`` or ``"adam"`` per leaf (:func:`muon_jax.infer_routing` returns one). Trees are
        matched to the params by path (an ``nnx.Variable``'s ``.value`` step aside, so one tree fits
        ``nnx.Optimizer``'s wrapped ``init`` and bare ``update``); integer and boolean leaves are never
        updated, whatever their label. Under ``optax.inject_hyperparams`` a function needs
        ``static_args=("labels",)``.
      matrix_axes: per leaf ``(rows, cols)``, each an axis or a tuple of axes (the matrix is the leaf
        transposed to ``batch + rows + cols`` and reshaped to ``[..., prod(rows), prod(cols)]``; ``A, B``
        above are those products), ``optax.contrib.MuonDimensionNumbers`` or ``None`` (the last two
        axes); a pytree like the params, or a function of them. See ``muon_jax.views``.
      mu_dtype: dtype of the momentum buffers (both branches).
      mesh: the ``jax.sharding.Mesh`` the parameters are sharded on (``NamedSharding``); None keeps
        single-device semantics. With a mesh, Newton–Schulz is distributed over ``ns_axis``.
      ns_axis: a mesh axis name or tuple of names (typically the data/FSDP axes) across which the NS
        work is spread; default all axes of ``mesh``.
      ns_mode: ``"placed"`` (default: each matrix orthogonalised whole by one device, placed so that
        every device does about the same work; one all-to-all out and one back), ``"balanced"``
        (same-shape batches padded to the device count) or ``"gather"`` (Moonlight's distributed
        Muon: every device orthogonalises all full matrices); see docs/distributed.md.
      param_specs: the parameters' ``PartitionSpec`` per leaf (a pytree like the parameters, or a
        callable returning one from them); lets ``"placed"`` move pieces straight from each leaf's own
        layout (see :func:`muon_jax.orthogonalize`). Optional.

    Returns:
      An ``optax.GradientTransformation`` whose state is ``optax.partition``'s. Bad input (a tree that does
      not match the params, a bad axis, a gradient shaped unlike its parameter or float0, a bad
      hyperparameter) raises a ValueError of one line naming the leaf and the fix before anything runs.

    Example:
        >>> params = {"w": jnp.ones((3, 16, 32)), "conv": jnp.ones((3, 3, 4, 8)), "b": jnp.zeros(32)}
        >>> tx = muon_jax.muon(0.02, labels={"w": "muon", "conv": "muon", "b": "adam"},
        ...                    matrix_axes={"w": None, "conv": ((0, 1, 2), (3,)), "b": None})
        >>> grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(0), p.shape), params)
        >>> updates, state = tx.update(grads, tx.init(params), params)
        >>> jax.tree.map(jnp.shape, updates)   # the conv kernel was one [36, 8] matrix
        {'b': (32,), 'conv': (3, 3, 4, 8), 'w': (3, 16, 32)}
        >>> muon_jax.muon(None)
        Traceback (most recent call last):
        ...
        ValueError: learning_rate=None is not a learning rate: pass a float such as 2e-2 or an optax schedule (a callable step -> rate).
    """
    _check_hyperparams(learning_rate, adam_learning_rate, momentum, ns_steps)
    if ns_dtype is not None and isinstance(ns_dtype, jax.Array):
        raise ValueError(
            "ns_dtype arrived as an array: optax.inject_hyperparams treats callables such as "
            "jnp.float32 as schedules. Pass ns_dtype=jnp.dtype('float32') or static_args=('ns_dtype',).")
    muon_tx = optax.chain(
        scale_by_momentum(momentum, nesterov=nesterov, mu_dtype=mu_dtype),
        orthogonalize(steps=ns_steps, coeffs=ns_coeffs, eps=ns_eps, dtype=ns_dtype,
                      matrix_axes=matrix_axes, mesh=mesh, ns_axis=ns_axis, ns_mode=ns_mode,
                      method=ns_method, restarts=ns_restarts, param_specs=param_specs),
        scale_by_shape(lr_scale, matrix_axes=matrix_axes),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
    adam_tx = optax.adamw(
        learning_rate if adam_learning_rate is None else adam_learning_rate,
        b1=adam_b1, b2=adam_b2, eps=adam_eps,
        weight_decay=weight_decay if adam_weight_decay is None else adam_weight_decay,
        mu_dtype=mu_dtype,
    )
    branches = {"muon": muon_tx, "adam": adam_tx}

    def partitioned(tree, params):
        """The partition for this call (labels from ``params``' leaves, which fit ``tree``'s), with
        integer leaves masked out of both branches; and ``tree`` and ``params`` so masked."""
        leaves, treedef = jax.tree.flatten(tree, is_leaf=is_masked)
        frozen = [_is_integer(p) for p in jax.tree.leaves(params, is_leaf=is_masked)]
        names = ["adam" if f or is_masked(label) else label for f, label in zip(frozen, _label_list(labels, params))]
        mask = lambda t: jax.tree.unflatten(  # noqa: E731
            jax.tree.structure(t, is_leaf=is_masked),
            [optax.MaskedNode() if f else x for f, x in zip(frozen, jax.tree.leaves(t, is_leaf=is_masked))])
        label_tree = jax.tree.unflatten(treedef, names)
        # Given as a function: optax.partition would call a callable tree (an equinox module) on the params.
        return optax.partition(branches, lambda _: label_tree), mask, frozen

    def init_fn(params):
        tx, mask, _ = partitioned(params, params)
        return tx.init(mask(params))

    def update_fn(updates, state, params=None):
        _check_gradients(updates, params)
        tx, mask, frozen = partitioned(updates, updates if params is None else params)
        out, state = tx.update(mask(updates), state, None if params is None else mask(params))
        leaves, treedef = jax.tree.flatten(out, is_leaf=is_masked)
        # Integer leaves get zeros (of the gradient's dtype): no step, no weight decay truncated into them.
        grads = jax.tree.leaves(updates, is_leaf=is_masked)
        return jax.tree.unflatten(treedef, [jnp.zeros_like(g) if f else u
                                            for f, u, g in zip(frozen, leaves, grads)]), state

    return optax.GradientTransformation(init_fn, update_fn)
