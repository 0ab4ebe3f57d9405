"""``muon``: Moonlight's Muon for hidden matrices, AdamW for everything else, as one optax transform."""
from __future__ import annotations

import re
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import optax

from muon_jax.distributed import NsAxis
from muon_jax.newton_schulz import CoeffsSpec, require_matrix
from muon_jax.transforms import MatrixAxes, orthogonalize, scale_by_momentum, scale_by_shape

LABELS = ("muon", "adam")
_ADAM_PATH = re.compile(r"embed|lm_head|norm|bias", re.IGNORECASE)


def default_labels(params) -> Any:
    """The default routing: ``"adam"`` for leaves with ndim < 2 (norms, biases, scalars) and for any
    leaf whose path mentions ``embed``, ``lm_head``, ``norm`` or ``bias`` (case-insensitive: the last
    two catch layer-stacked ``[L, d]`` norm scales and biases); ``"muon"`` for every other
    leaf, whose last two axes are the matrix and whose leading axes (stacked layers, experts) index
    independent matrices. (``optax.contrib.muon`` sends 3-D leaves to Adam unless told otherwise.)"""
    def label(path, x):
        adam = jnp.ndim(x) < 2 or _ADAM_PATH.search(jax.tree_util.keystr(path))
        return "adam" if adam else "muon"
    return jax.tree_util.tree_map_with_path(label, params)


def _checked_labels(labels) -> Callable[[Any], Any]:
    """Wraps the user's labels (None, a pytree or a callable) into a validating label function."""
    def label_fn(params):
        tree = default_labels(params) if labels is None else labels(params) if callable(labels) else labels
        def check(path, label, x):
            where = jax.tree_util.keystr(path) or "<root>"
            if label not in LABELS:
                raise ValueError(f"Label {label!r} at {where} is not one of {LABELS}.")
            if label == "muon":
                require_matrix(jnp.shape(x), f"The leaf at {where}, labelled 'muon',", "Label it 'adam'.")
            return label
        return jax.tree_util.tree_map_with_path(check, tree, params)
    return label_fn


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
      labels: ``None`` (:func:`default_labels`), or a pytree / callable(params) giving ``"muon"`` or
        ``"adam"`` per leaf.
      matrix_axes: which two axes of each leaf form the matrix (default: the last two).
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
      An ``optax.GradientTransformation``.
    """
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
    return optax.partition({"muon": muon_tx, "adam": adam_tx}, _checked_labels(labels))
