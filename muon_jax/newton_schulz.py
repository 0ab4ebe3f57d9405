"""Newton–Schulz orthogonalisation: the matrix-sign step at the heart of Muon.

For a matrix ``M`` with SVD ``U S Vᵀ``, Muon replaces the update with (approximately) ``U Vᵀ``, the
nearest semi-orthogonal matrix. Computing an SVD every step is too slow on accelerators, so an odd
polynomial ``p(X) = a X + b (X Xᵀ) X + c (X Xᵀ)² X`` is iterated instead; each step maps every
singular value ``σ`` to ``a σ + b σ³ + c σ⁵`` and leaves the singular vectors alone.
"""
from __future__ import annotations

import functools
from typing import Sequence, Union

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
NS_COEFFS: dict[str, tuple[tuple[Coeffs, ...], float]] = {
    "moonlight": ((MOONLIGHT_COEFFS,), 1.0),
    "polar_express": (POLAR_EXPRESS_COEFFS, 1.02),
}


def resolve_coeffs(coeffs: CoeffsSpec, steps: int) -> tuple[tuple[Coeffs, ...], float]:
    """Turns a coefficient spec into ``steps`` triples plus the input-normalisation multiplier.

    A name from ``NS_COEFFS``, one ``(a, b, c)`` triple (used at every step), or a sequence of triples
    (one per step). A sequence shorter than ``steps`` repeats its last triple, the converged polynomial
    in the Polar Express construction; a longer one is cut to its first ``steps`` triples. ``steps=0``
    returns the whole table.
    """
    if isinstance(coeffs, str):
        if coeffs not in NS_COEFFS:
            raise ValueError(
                f"Unknown ns_coeffs {coeffs!r}; choose one of {sorted(NS_COEFFS)}, an (a, b, c) triple "
                "or a sequence of triples (one per step).")
        table, norm_scale = NS_COEFFS[coeffs]
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


def newton_schulz_iterate(x, *, steps, coeffs, eps, dtype):
    """Unjitted body of :func:`newton_schulz`, for use inside a caller's trace.

    ``steps`` may also be a traced integer (``optax.inject_hyperparams`` turns every int argument into
    an array); the loop then runs as a ``fori_loop`` over the coefficient table, with the same maths.
    """
    if x.ndim < 2:
        raise ValueError(f"newton_schulz needs an array with at least 2 axes; got shape {x.shape}.")
    static_steps = isinstance(steps, (int, np.integer))
    # For a traced step count take the whole table; steps beyond it repeat the last triple.
    table, norm_scale = resolve_coeffs(coeffs, int(steps) if static_steps else 0)
    precision = jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
    matmul = functools.partial(jnp.matmul, precision=precision)

    wide = x.shape[-2] <= x.shape[-1]
    m = x if wide else jnp.swapaxes(x, -1, -2)
    m32 = m.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(m32), axis=(-2, -1), keepdims=True))
    X = (m32 / (norm_scale * norm + eps)).astype(dtype)

    def step(X, a, b, c):
        A = matmul(X, jnp.swapaxes(X, -1, -2))
        return a * X + matmul(b * A + c * matmul(A, A), X)

    if static_steps:
        for a, b, c in table:
            X = step(X, a, b, c)
    else:
        table_arr = jnp.asarray(table, dtype=dtype)
        X = jax.lax.fori_loop(
            0, steps, lambda i, X: step(X, *table_arr[jnp.minimum(i, len(table) - 1)]), X)
    X = X if wide else jnp.swapaxes(X, -1, -2)
    return X.astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("steps", "coeffs", "dtype"))
def newton_schulz(
    x: jax.Array,
    *,
    steps: int = 5,
    coeffs: CoeffsSpec = "moonlight",
    eps: float = 1e-7,
    dtype=jnp.bfloat16,
) -> jax.Array:
    r"""Orthogonalises the last two axes of ``x`` (all leading axes are independent matrices).

    .. math::
        X_0 = \frac{M}{s\,\|M\|_F + \epsilon},\qquad
        A_k = X_k X_k^\top,\qquad X_{k+1} = a_k X_k + (b_k A_k + c_k A_k^2) X_k

    with ``s = 1`` for the Moonlight quintic and ``s = 1.02`` for Polar Express. The matrix is
    transposed first when it has more rows than columns so that ``A`` is the smaller Gram matrix
    (``p(Xᵀ) = p(X)ᵀ``, so the result is the same). The norm is taken in float32; the iteration runs in
    ``dtype`` (bf16 by default, as in Moonlight; float32 matmuls use full precision on every backend).

    Args:
      x: ``[..., A, B]`` array.
      steps: number of iterations.
      coeffs: ``"moonlight"`` (Liu et al. 2025, arXiv 2502.16982), ``"polar_express"`` (Amsel et al.
        2025, arXiv 2505.16932), one ``(a, b, c)`` triple, or a sequence of triples (one per step).
        Must be hashable (a str or tuples) since it is a static argument.
      eps: added to the Frobenius norm, so a zero matrix maps to zero.
      dtype: dtype of the iteration.

    Returns:
      An array of ``x``'s shape and dtype whose last two axes have singular values near 1.
    """
    return newton_schulz_iterate(x, steps=steps, coeffs=coeffs, eps=eps, dtype=dtype)
