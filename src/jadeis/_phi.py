"""Numerically stable phi-functions and exponential-integrator multistep weights.

Every sampler and every adjoint solver in jadeis integrates an equation of the form

    y(lambda_t) = y(lambda_s) + int_{lambda_s}^{lambda_t} exp(kappa (l - lambda_t)) F(l) dl

exactly in its linear part and with a polynomial interpolant of F (through the current
and previous grid points) in its nonlinear part. This module is the one place where the
small-h cancellations of those integrals are handled.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

_SERIES_THRESHOLD = 1.0
_SERIES_TERMS = 24


def phi(k: int, z):
    r"""The phi-function $\varphi_k(z) = \sum_{n \ge 0} z^n / (n + k)!$, for k = 1, 2, 3
    (docs/math/samplers.md#phi-functions).

    Closed forms ``expm1(z)/z``, ``(expm1(z) - z)/z^2`` and
    ``(expm1(z) - z - z^2/2)/z^3`` cancel catastrophically for small ``|z|``; there the
    Taylor series is summed instead. Safe under ``grad`` (no NaN from the unused branch).

    **Example:**

    ```python
    >>> import jax.numpy as jnp
    >>> from jadeis._phi import phi
    >>> bool(jnp.allclose(phi(1, jnp.asarray(1e-9)), 1.0))
    True

    ```
    """
    if k not in (1, 2, 3):
        raise ValueError(f"phi: k must be 1, 2 or 3, got {k}.")
    z = jnp.asarray(z)
    small = jnp.abs(z) < _SERIES_THRESHOLD
    zs = jnp.where(small, z, jnp.zeros_like(z))
    series = jnp.zeros_like(z)
    for n in reversed(range(_SERIES_TERMS)):
        series = series * zs + 1.0 / math.factorial(n + k)
    zl = jnp.where(small, jnp.ones_like(z), z)
    e = jnp.expm1(zl)
    if k == 1:
        closed = e / zl
    elif k == 2:
        closed = (e - zl) / zl**2
    else:
        closed = (e - zl - 0.5 * zl**2) / zl**3
    return jnp.where(small, series, closed)


def multistep_weights(lam_t, lam_s, lam_1, lam_2, kappa: float, order, midpoint: bool = False):
    r"""Weights ``w`` with ``int exp(kappa (l - lam_t)) F(l) dl ~= w0 F0 + w1 F1 + w2 F2``
    (derivation: docs/math/samplers.md#multistep-weights).

    The integral runs from ``lam_s`` to ``lam_t``; ``F0, F1, F2`` are the values of the
    integrand at ``lam_s`` (current point) and at the two previous grid points ``lam_1``,
    ``lam_2``. ``order`` (1, 2 or 3; may be a traced integer array, broadcast against the
    lambdas) selects the degree of the interpolating polynomial, Newton form at ``lam_s``
    integrated exactly with phi-functions. Unused weights are exactly zero, and a history
    point that is not used may hold any finite value.

    With ``midpoint=True`` the order-2 rows use the "midpoint" weight of diffusers and
    k-diffusion (``solver_type="midpoint"``): the first divided difference is weighted by
    ``c0 h / 2`` instead of the exact ``c1 = h^2 phi_2(-kappa h)``; the two agree to
    O(h^3) (docs/math/samplers.md).

    Works for any sign of ``h = lam_t - lam_s`` (sampling: h > 0, adjoint: h < 0).
    Returns an array of shape ``broadcast(...) + (3,)``.
    """
    h = lam_t - lam_s
    # the highest order used: with a concrete ``order`` (a numpy array or int, as the
    # samplers pass it) the rows of higher orders are not built at all (they would be
    # selected away), which keeps the compiled program small
    top = _max_order(order)
    # a step to sigma = 0 (lam_t = +inf, time_grid(..., final="zero")): first order, in the
    # limit c0 = (1 - e^{-kappa h}) / kappa -> 1 / kappa (kappa > 0; set at the end)
    inf_h = jnp.isposinf(h)
    h = jnp.where(inf_h, jnp.ones_like(h), h)
    zero = jnp.zeros_like(h)
    # c_n = int_0^h exp(kappa (u - h)) u^n / n! du = h^(n+1) phi_(n+1)(-kappa h)
    c0 = h * phi(1, -kappa * h)
    if top == 1:
        w0 = jnp.where(inf_h, 1.0 / kappa if kappa > 0 else jnp.inf, c0)
        return jnp.stack([w0, zero, zero], axis=-1)
    order = jnp.where(inf_h, 1, order)
    c1 = h**2 * phi(2, -kappa * h) if (top >= 3 or not midpoint) else None
    use2 = order >= 2
    one = jnp.ones_like(h)
    h0 = jnp.where(use2, lam_s - lam_1, one)
    # order 2: F' ~= (F0 - F1) / h0
    c1_2 = 0.5 * h * c0 if midpoint else c1
    w2_0 = c0 + c1_2 / h0
    w2_1 = -c1_2 / h0
    if top == 2:
        w0 = jnp.where(use2, w2_0, c0)
        w0 = jnp.where(inf_h, 1.0 / kappa if kappa > 0 else jnp.inf, w0)
        w1 = jnp.where(use2, w2_1, zero)
        return jnp.stack([w0, w1, zero], axis=-1)
    c2 = h**3 * phi(3, -kappa * h)
    use3 = order >= 3
    h1 = jnp.where(use3, lam_1 - lam_2, one)
    # order 3: Newton form, F'(lam_s) = d1 + h0 c, F'' = 2c with c the 2nd divided difference
    gamma = c1 * h0 + 2.0 * c2
    hs = h0 + h1
    k1 = c1 + gamma / hs
    w3_0 = c0 + k1 / h0
    w3_1 = -k1 / h0 - gamma / (hs * h1)
    w3_2 = gamma / (hs * h1)
    w0 = jnp.where(use3, w3_0, jnp.where(use2, w2_0, c0))
    w0 = jnp.where(inf_h, 1.0 / kappa if kappa > 0 else jnp.inf, w0)
    w1 = jnp.where(use3, w3_1, jnp.where(use2, w2_1, zero))
    w2 = jnp.where(use3, w3_2, zero)
    return jnp.stack([w0, w1, w2], axis=-1)


def _max_order(order) -> int:
    """The largest entry of a concrete ``order`` (int or numpy array), else 3."""
    if isinstance(order, (int, np.integer, np.ndarray)):
        return int(np.max(order))
    return 3


def warmup_correction(lam, kappa: float):
    r"""Weights that turn the first (order-1) step of a multistep method into a 2nd-order one.

    The first step from ``lam[0]`` to ``lam[1]`` has only ``F0`` and is first order: local
    error O(h^2), which alone makes the global error of a third-order method O(h^2). Once
    ``F1`` (at ``lam[1]``) is known, the step's integral of the linear interpolant through
    ``F0`` and ``F1`` differs from the one-point rule by ``c1 (F1 - F0) / h0`` with
    ``h0 = lam[1] - lam[0]`` and ``c1 = h0^2 phi_2(-kappa h0)``. Carried to ``lam[2]`` by
    the kernel ``exp(kappa (lam[1] - lam[2]))``, this correction is linear in ``F1`` and
    ``F0``, so it is added to the second step's weights on its current and previous values
    (a corrector in the sense of UniPC, applied once, with no extra model evaluation;
    docs/math/samplers.md, "warm-up"). Returns ``(w_current, w_previous)`` for step 1 (to
    be added to row 1 of :func:`multistep_weights`, columns 0 and 1). ``lam`` needs at least
    three grid points.
    """
    h0 = lam[1] - lam[0]
    h1 = lam[2] - lam[1]
    corr = jnp.exp(-kappa * h1) * h0 * phi(2, -kappa * h0)  # exp(.) c1 / h0
    return corr, -corr


def add_warmup_correction(w, lam, kappa: float):
    """``w`` (N, 3) with :func:`warmup_correction` added to row 1 (N >= 2)."""
    corr, _ = warmup_correction(lam, kappa)
    return w.at[1, 0].add(corr).at[1, 1].add(-corr)
