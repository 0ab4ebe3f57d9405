"""Newton–Schulz orthogonalisation: the matrix-sign step at the heart of Muon.

For a matrix ``M`` with SVD ``U S Vᵀ``, Muon replaces the update with (approximately) ``U Vᵀ``, the
nearest semi-orthogonal matrix. Computing an SVD every step is too slow on accelerators, so an odd
polynomial ``p(X) = a X + b (X Xᵀ) X + c (X Xᵀ)² X`` is iterated instead; each step maps every
singular value ``σ`` to ``a σ + b σ³ + c σ⁵`` and leaves the singular vectors alone.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

Coeffs = tuple[float, float, float]
CoeffsSpec = Union[str, Coeffs, Sequence[Coeffs]]

# Moonlight / Keller Jordan's quintic: chosen to maximise the slope at zero; singular values end in
# roughly [0.7, 1.2] after 5 steps rather than converging to 1, which does not hurt training.
MOONLIGHT_COEFFS: Coeffs = (3.4445, -4.7750, 2.0315)

# Polar Express (Amsel, Persson, Musco & Gower 2025, arXiv 2505.16932): per-step minimax-optimal
# polynomials, as used in modded-nanogpt's train_gpt.py (record #38), computed there for 5 iterations
# with a 2e-2 safety factor. The safety factor is why the input is normalised by 1.02·‖X‖_F.
POLAR_EXPRESS_COEFFS: tuple[Coeffs, ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

# name -> (per-step coefficients, Frobenius-norm multiplier applied before the iteration)
NS_SCHEDULES: dict[str, tuple[tuple[Coeffs, ...], float]] = {
    "moonlight": ((MOONLIGHT_COEFFS,), 1.0),
    "polar_express": (POLAR_EXPRESS_COEFFS, 1.02),
}

NS_METHODS = ("auto", "standard", "gram")
# "auto" uses Gram NS for a float32 iteration above this aspect ratio max/min, and standard NS in
# half precision, where Gram NS was less accurate than standard NS at any cheaper restart schedule
# (measured: bench/gram_ns.py, docs/benchmarks.md).
GRAM_MIN_ASPECT = 1.5
# Default Gram-NS restart period (a restart every this many iterations) for a float32 iteration, by
# schedule: the longest that kept gram within 1e-4 of standard NS on ill-conditioned and rank-deficient
# matrices (bench/gram_ns.py). Polar Express's large first coefficients need shorter segments; custom
# coefficients get the shorter period. In half precision the period is 1 (see GRAM_MIN_ASPECT).
GRAM_RESTART_EVERY: dict[str, int] = {"moonlight": 3, "polar_express": 2}
GRAM_RESTART_EVERY_CUSTOM = 2


def resolve_coeffs(coeffs: CoeffsSpec, steps: int) -> tuple[tuple[Coeffs, ...], float]:
    """Turns a coefficient spec into ``steps`` triples plus the input-normalisation multiplier.

    A name from ``NS_SCHEDULES``, one ``(a, b, c)`` triple (used at every step), or a sequence of triples
    (one per step). A sequence shorter than ``steps`` repeats its last triple, the converged polynomial
    in the Polar Express construction; a longer one is cut to its first ``steps`` triples. ``steps=0``
    returns the whole table.
    """
    if isinstance(coeffs, str):
        if coeffs not in NS_SCHEDULES:
            raise ValueError(
                f"Unknown ns_coeffs {coeffs!r}; choose one of {sorted(NS_SCHEDULES)}, an (a, b, c) triple "
                "or a sequence of triples (one per step).")
        table, norm_scale = NS_SCHEDULES[coeffs]
    else:
        arr = np.asarray(coeffs, dtype=np.float64)
        if arr.shape == (3,):
            arr = arr[None]
        if arr.ndim != 2 or arr.shape[1] != 3 or arr.shape[0] == 0:
            raise ValueError(
                f"ns_coeffs must be a name, an (a, b, c) triple or a sequence of triples; got shape "
                f"{arr.shape}.")
        table, norm_scale = tuple(tuple(float(v) for v in row) for row in arr), 1.0
    if steps:
        table = table[:steps] + (table[-1],) * max(0, steps - len(table))
    return table, norm_scale



def require_matrix(shape, what: str, fix: str) -> None:
    """Raises a ValueError naming ``what`` and ``fix`` unless ``shape`` has at least two axes."""
    if len(shape) < 2:
        raise ValueError(
            f"{what} has shape {tuple(shape)} (ndim < 2), but Muon orthogonalises "
            f"matrices and needs at least 2 axes. {fix}")


def is_half(dtype) -> bool:
    """Whether ``dtype`` is a 16-bit (or narrower) float."""
    return jnp.dtype(dtype).itemsize < 4


def resolve_method(method: str, shape, dtype) -> str:
    """``"standard"`` or ``"gram"`` for a matrix of ``shape`` iterated in ``dtype`` (``"auto"``: gram
    in float32 when the aspect ratio ``max/min`` exceeds :data:`GRAM_MIN_ASPECT`, else standard)."""
    if method not in NS_METHODS:
        raise ValueError(f"Unknown ns_method {method!r}; choose one of {NS_METHODS}.")
    if method != "auto":
        return method
    short, long = sorted(shape[-2:])
    return "gram" if long > GRAM_MIN_ASPECT * short and not is_half(dtype) else "standard"


def resolve_restarts(restarts, dtype, horizon: int, coeffs: CoeffsSpec = "moonlight") -> tuple[int, ...]:
    """The Gram-NS restart iterations: ``restarts`` itself, or by default every
    ``GRAM_RESTART_EVERY[coeffs]`` iterations below ``horizon`` (every iteration in half precision)."""
    if restarts is None:
        named = GRAM_RESTART_EVERY.get(coeffs) if isinstance(coeffs, str) else None
        every = 1 if is_half(dtype) else named or GRAM_RESTART_EVERY_CUSTOM
        return tuple(range(every, horizon, every))
    if not isinstance(restarts, tuple) or not all(
            isinstance(r, (int, np.integer)) and not isinstance(r, bool) and r > 0 for r in restarts):
        raise ValueError(
            f"ns_restarts must be a tuple of positive iteration indices such as (3,) (hashable: it is "
            f"a static argument), or None for the default; got {restarts!r}.")
    return tuple(sorted(set(int(r) for r in restarts)))


def symmetric_matmul(a: jax.Array, b: jax.Array, precision, out_dtype=None) -> jax.Array:
    """``a @ b`` (in ``out_dtype`` if given) for a product known to be symmetric: a Gram matrix ``X Xᵀ``,
    or the product of two polynomials in one Gram matrix (they commute). Every such product of both NS
    methods goes through here, so a symmetric-GEMM kernel (one triangle computed, then mirrored) can
    replace it.

    Args:
      a, b: ``[..., n, k]`` and ``[..., k, n]`` arrays whose product is symmetric.
      precision: ``jax.lax.Precision`` of the matmul (None: the backend's default).
      out_dtype: the result's dtype (None: that of ``a @ b``).

    Returns:
      ``a @ b``, ``[..., n, n]``.

    Example:
        >>> x = jnp.arange(6.0).reshape(2, 3)
        >>> muon_jax.symmetric_matmul(x, x.T, None)
        Array([[ 5., 14.],
               [14., 50.]], dtype=float32)
    """
    return jnp.matmul(a, b, precision=precision, preferred_element_type=out_dtype)


def gram(x: jax.Array, precision, out_dtype=None) -> jax.Array:
    """``X Xᵀ`` over the last two axes (in ``out_dtype`` if given)."""
    return symmetric_matmul(x, jnp.swapaxes(x, -1, -2), precision, out_dtype)


def _loop(lo, hi, body, carry):
    """``for i in range(lo, hi): carry = body(i, carry)``, unrolled when the bounds are ints, a
    ``fori_loop`` when either is traced (``optax.inject_hyperparams`` makes ``steps`` an array)."""
    if isinstance(lo, int) and isinstance(hi, int):
        for i in range(lo, hi):
            carry = body(i, carry)
        return carry
    return jax.lax.fori_loop(lo, hi, body, carry)


# Standard NS updates a wide iterate in this many column blocks: more shrank the measured working set no
# further (bench/distributed.py) and lengthen the program.
UPDATE_BLOCKS = 4


def column_blocks(short: int, long: int) -> list[tuple[int, int]]:
    """The column ranges in which standard NS updates a ``[short, long]`` iterate, one after the other:
    :data:`UPDATE_BLOCKS` equal blocks if it is at least twice as long as high, else the whole."""
    n = UPDATE_BLOCKS if long >= 2 * short else 1
    cuts = [i * (long // n) for i in range(n)] + [long]
    return list(zip(cuts[:-1], cuts[1:]))


def standard_iterate(X, steps, coeff, precision):
    """``X ← a X + (b A + c A²) X`` with ``A = X Xᵀ``, ``steps`` times (``coeff(i)`` gives (a, b, c)).

    A wide ``X`` (twice as long as high or more) is updated in :func:`column_blocks`: ``A`` formed in
    float32 (then rounded once, as a bf16 matmul does), then each block replaced by
    ``a X_j + (b A + c A²) X_j``, which needs only ``X_j``. Same FLOPs; the working set beyond ``X`` is a
    block instead of whole copies of ``X`` (the product ``B X``, the next iterate, and on CPU float32
    copies of a bf16 ``X``)."""
    blocks = column_blocks(*X.shape[-2:])

    def step(i, X):
        a, b, c = coeff(i)
        if len(blocks) == 1:
            A = gram(X, precision)
            return a * X + jnp.matmul(b * A + c * symmetric_matmul(A, A, precision), X, precision=precision)
        A = gram(X, precision, jnp.float32).astype(X.dtype)
        B = b * A + c * symmetric_matmul(A, A, precision)
        for lo, hi in blocks:
            X = X.at[..., lo:hi].set(a * X[..., lo:hi] + jnp.matmul(B, X[..., lo:hi], precision=precision))
        return X
    return _loop(0, steps, step, X)


def gram_segment(X, lo, hi, coeff, precision):
    """Iterations ``lo..hi-1`` of Gram NS from a fresh ``R = X Xᵀ``; returns ``Q X``.

    With ``h_i = a_i I + Z_i``, ``Z_i = b_i R_i + c_i R_i²``, standard NS is ``X_{i+1} = h_i X_i``, so
    ``X_i = Q_i X`` with ``Q_{i+1} = Q_i h_i`` and ``R_{i+1} = X_{i+1} X_{i+1}ᵀ = h_i R_i h_i``: every
    product is ``n×n`` (``n`` the short side); ``X`` is touched twice per segment. All of ``Q, R, Z`` are
    polynomials in the segment's first ``R``, so they commute and every product is symmetric.
    """
    R = gram(X, precision)
    static = isinstance(lo, int) and isinstance(hi, int)
    # Unrolled, Q starts as h_lo (no product with I) and the last R update is skipped; traced, the
    # loop body must be uniform, so Q starts at I and R is always updated.
    Q = None if static else jnp.broadcast_to(jnp.eye(R.shape[-1], dtype=R.dtype), R.shape)

    def step(i, carry):
        Q, R = carry
        a, b, c = coeff(i)
        Z = b * R + c * symmetric_matmul(R, R, precision)
        if Q is None:
            Q = Z + a * jnp.eye(R.shape[-1], dtype=R.dtype)
        else:
            Q = a * Q + symmetric_matmul(Q, Z, precision)
        if not static or i + 1 < hi:
            RZ = a * R + symmetric_matmul(R, Z, precision)
            R = a * RZ + symmetric_matmul(Z, RZ, precision)
        return Q, R

    Q, _ = _loop(lo, hi, step, (Q, R))
    return X if Q is None else jnp.matmul(Q, X, precision=precision)


def gram_iterate(X, steps, coeff, restarts, precision):
    """Gram NS (Zhang, Amsel, Chen & Dao 2026) on a wide ``X``: segments of :func:`gram_segment`
    split at the ``restarts`` iterations, each re-forming ``X`` and ``R`` from the previous ``Q``."""
    if isinstance(steps, int):
        cuts = [0] + [r for r in restarts if r < steps] + [steps]
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            X = gram_segment(X, lo, hi, coeff, precision)
        return X
    # Traced steps: static segment starts, traced ends; a segment starting past `steps` is skipped
    # (a cond, so that its X Xᵀ and Q X are not computed either).
    starts = (0,) + restarts
    for j, lo in enumerate(starts):
        hi = steps if j + 1 == len(starts) else jnp.minimum(starts[j + 1], steps)
        X = jax.lax.cond(lo < steps, lambda X, lo=lo, hi=hi: gram_segment(X, lo, hi, coeff, precision),
                         lambda X: X, X)
    return X


def ns_input(m, norm, *, coeffs, eps, dtype):
    """The iteration's input ``X_0 = M / (s‖M‖_F + eps)`` in ``dtype``, given ``norm = ‖M‖_F``
    (broadcastable against ``m``): for callers that hold ``M`` in pieces and sum its norm themselves."""
    _, norm_scale = resolve_coeffs(coeffs, 1)
    return (m.astype(jnp.float32) / (norm_scale * norm + eps)).astype(dtype)


def newton_schulz_iterate(x, *, steps, coeffs, eps, dtype, method="auto", restarts=None, normalized=False):
    """Unjitted body of :func:`newton_schulz`, for use inside a caller's trace; ``normalized``: ``x`` is
    already :func:`ns_input`'s ``X_0``.

    ``steps`` may also be a traced integer (``optax.inject_hyperparams`` turns every int argument into
    an array); the loop then runs as a ``fori_loop`` over the coefficient table, with the same maths.
    """
    require_matrix(x.shape, "The newton_schulz input", "Pass an array of matrices ([..., A, B]).")
    method = resolve_method(method, x.shape, dtype)
    static_steps = isinstance(steps, (int, np.integer))
    # For a traced step count take the whole table; steps beyond it repeat the last triple.
    table, _ = resolve_coeffs(coeffs, int(steps) if static_steps else 0)
    steps = int(steps) if static_steps else steps
    # Default restarts for a traced step count: placed as for the table's length (at least 5 steps).
    restarts = resolve_restarts(restarts, dtype, steps if static_steps else max(len(table), 5), coeffs)
    if static_steps:
        coeff = table.__getitem__
    else:
        table_arr = jnp.asarray(table, dtype=dtype)
        coeff = lambda i: table_arr[jnp.minimum(i, len(table) - 1)]  # noqa: E731
    precision = jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None

    wide = x.shape[-2] <= x.shape[-1]
    m = x if wide else jnp.swapaxes(x, -1, -2)
    if normalized:
        X = m.astype(dtype)
    else:
        norm = jnp.sqrt(jnp.sum(jnp.square(m.astype(jnp.float32)), axis=(-2, -1), keepdims=True))
        X = ns_input(m, norm, coeffs=coeffs, eps=eps, dtype=dtype)
    if method == "gram":
        X = gram_iterate(X, steps, coeff, restarts, precision)
    else:
        X = standard_iterate(X, steps, coeff, precision)
    X = X if wide else jnp.swapaxes(X, -1, -2)
    return X.astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("steps", "coeffs", "dtype", "method", "restarts"))
def newton_schulz(
    x: jax.Array,
    *,
    steps: int = 5,
    coeffs: CoeffsSpec = "moonlight",
    eps: float = 1e-7,
    dtype=jnp.bfloat16,
    method: str = "auto",
    restarts: Optional[tuple[int, ...]] = None,
) -> jax.Array:
    r"""Orthogonalises the last two axes of ``x`` (all leading axes are independent matrices).

    .. math::
        X_0 = \frac{M}{s\,\|M\|_F + \epsilon},\qquad
        A_k = X_k X_k^\top,\qquad X_{k+1} = a_k X_k + (b_k A_k + c_k A_k^2) X_k

    with ``s = 1`` for the Moonlight quintic and ``s = 1.02`` for Polar Express. The matrix is
    transposed first when it has more rows than columns so that ``A`` is the smaller Gram matrix
    (``p(Xᵀ) = p(X)ᵀ``, so the result is the same), and a wide one is updated in column blocks (same
    result, a smaller working set: :func:`standard_iterate`). The norm is taken in float32; the
    iteration runs in ``dtype`` (bf16 by default, as in Moonlight; float32 matmuls use full precision
    on every backend).

    ``method="gram"`` computes the same polynomial as Gram Newton–Schulz (Zhang, Amsel, Chen & Dao
    2026): for ``X`` of shape ``[n, m]``, ``n ≤ m``, it iterates on the ``n×n`` matrix ``R = X Xᵀ`` and
    an accumulated ``Q`` (``X_k = Q_k X_0``), touching ``X`` only at the start, at each restart and at
    the end: per step ``8n³`` FLOPs instead of ``4n²m + 2n³``, plus ``4n²m`` per segment.

    Args:
      x: ``[..., A, B]`` array.
      steps: number of iterations.
      coeffs: ``"moonlight"`` (Liu et al. 2025, arXiv 2502.16982), ``"polar_express"`` (Amsel et al.
        2025, arXiv 2505.16932), one ``(a, b, c)`` triple, or a sequence of triples (one per step).
        Must be hashable (a str or tuples) since it is a static argument.
      eps: added to the Frobenius norm, so a zero matrix maps to zero.
      dtype: dtype of the iteration.
      method: ``"standard"``, ``"gram"``, or ``"auto"`` (the default, as in :func:`muon_jax.muon`): gram
        for a float32 iteration where ``max/min``
        of the matrix shape exceeds :data:`GRAM_MIN_ASPECT` (the ratio above which it was faster on
        CPU), standard otherwise (in half precision Gram NS was less accurate at equal cost).
      restarts: Gram NS only: the iterations at which ``X ← Q X`` and ``R ← X Xᵀ`` are re-formed
        (DeepSpeed and Dao-AILab use ``(2,)``). None: in float32 every
        ``GRAM_RESTART_EVERY[coeffs]`` iterations (``(3,)`` for 5 Moonlight steps, ``(2, 4)`` for
        Polar Express), in half precision every iteration; measured in bench/gram_ns.py
        (docs/benchmarks.md).

    Returns:
      An array of ``x``'s shape and dtype whose last two axes have singular values near 1.
    """
    return newton_schulz_iterate(x, steps=steps, coeffs=coeffs, eps=eps, dtype=dtype, method=method,
                                 restarts=restarts)
