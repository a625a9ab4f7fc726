"""Exponential-integrator maths, written once for every solver and gradient strategy.

Every sampler and every adjoint solver in jadeis integrates an equation of the form

    y(lambda_t) = y(lambda_s) + int_{lambda_s}^{lambda_t} exp(kappa (l - lambda_t)) F(l) dl

exactly in its linear part and with a polynomial interpolant of F (through the current and
previous grid points) in its nonlinear part (docs/math/samplers.md). This module holds:

- the phi-functions with their small-argument series (the one place where the small-h
  cancellations are handled);
- the multistep weights (orders 1-3, the "midpoint" variant), the warm-up orders of a
  multistep method and the corrected warm-up;
- the schedule evaluated on a grid once (:class:`GridValues`) and the history shifts of a
  multistep method;
- the conversions between noise and data predictions, and the model's time dtype.

Step indices may be NumPy arrays (a fixed grid: only the orders used are built, which keeps
the compiled program small) or traced integers (a step of an adaptive grid).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

SERIES_THRESHOLD = 1.0
SERIES_TERMS = 24


# ---------------------------------------------------------------------------------------
# phi-functions


def phi(k: int, z):
    r"""The phi-function $\varphi_k(z) = \sum_{n \ge 0} z^n / (n + k)!$, for k = 1 .. 4
    (docs/math/samplers.md#phi-functions).

    The closed forms (``expm1(z)/z``, ``(expm1(z) - z)/z^2``, ...) cancel catastrophically
    for small ``|z|``; there the Taylor series is summed instead. Safe under ``grad`` (no
    NaN from the unused branch). :func:`phis` gives ``phi_1 .. phi_k`` of one argument at
    the cost of one.

    **Example:**

    ```python
    >>> import jax.numpy as jnp
    >>> from jadeis._ei import phi
    >>> bool(jnp.allclose(phi(1, jnp.asarray(1e-9)), 1.0))
    True

    ```
    """
    return phis(k, z)[k - 1]


def phis(k: int, z) -> tuple:
    r"""``(phi_1(z), ..., phi_k(z))`` for k = 1 .. 4, sharing one series and one ``expm1``.

    For ``|z| < 1`` the Taylor series of $\varphi_k$ is summed and the lower ones follow
    from $\varphi_j(z) = 1/j! + z \varphi_{j+1}(z)$ (no cancellation: $|z \varphi_{j+1}|$
    stays below $1/j!$ there); for ``|z| >= 1``, $\varphi_1 = \mathrm{expm1}(z)/z$ and
    $\varphi_{j+1} = (\varphi_j - 1/j!)/z$, the closed forms of :func:`phi` written as a
    recurrence. One evaluation serves every weight of a step (fewer compiled kernels, and
    less compile time, than ``k`` separate ones).
    """
    if k not in (1, 2, 3, 4):
        raise ValueError(f"phi: k must be 1, 2, 3 or 4, got {k}.")
    z = jnp.asarray(z)
    small = jnp.abs(z) < SERIES_THRESHOLD
    zs = jnp.where(small, z, jnp.zeros_like(z))
    series = jnp.zeros_like(z)
    for n in reversed(range(SERIES_TERMS)):
        series = series * zs + 1.0 / math.factorial(n + k)
    low = [series]  # phi_k, phi_{k-1}, ..., phi_1 for |z| < 1
    for j in range(k - 1, 0, -1):
        low.append(1.0 / math.factorial(j) + zs * low[-1])
    low.reverse()
    zl = jnp.where(small, jnp.ones_like(z), z)
    high = [jnp.expm1(zl) / zl]  # phi_1, ..., phi_k for |z| >= 1
    for j in range(1, k):
        high.append((high[-1] - 1.0 / math.factorial(j)) / zl)
    return tuple(jnp.where(small, a, b) for a, b in zip(low, high))


# ---------------------------------------------------------------------------------------
# multistep weights


def multistep_weights(lam_t, lam_s, lam_1, lam_2, kappa: float, order, midpoint: bool = False):
    r"""Weights ``w`` with ``int exp(kappa (l - lam_t)) F(l) dl ~= w0 F0 + w1 F1 + w2 F2``
    (derivation: docs/math/samplers.md#multistep-weights).

    The integral runs from ``lam_s`` to ``lam_t``; ``F0, F1, F2`` are the values of the
    integrand at ``lam_s`` (current point) and at the two previous grid points ``lam_1``,
    ``lam_2``. ``order`` (1, 2 or 3; an int, a NumPy array, or a traced integer array,
    broadcast against the lambdas) selects the degree of the interpolating polynomial,
    Newton form at ``lam_s`` integrated exactly with phi-functions. Unused weights are
    exactly zero, and a history point that is not used may hold any finite value.

    With ``midpoint=True`` the order-2 rows use the "midpoint" weight of diffusers and
    k-diffusion (``solver_type="midpoint"``): the first divided difference is weighted by
    ``c0 h / 2`` instead of the exact ``c1 = h^2 phi_2(-kappa h)``; the two agree to
    O(h^3) (docs/math/samplers.md).

    Works for any sign of ``h = lam_t - lam_s`` (sampling: h > 0, adjoint: h < 0).
    Returns an array of shape ``broadcast(...) + (3,)``.
    """
    h = lam_t - lam_s
    # the highest order used: with a concrete ``order`` the rows of higher orders are not
    # built at all (they would be selected away), which keeps the compiled program small
    top = max_order(order)
    # a step to sigma = 0 (lam_t = +inf, time_grid(..., final="zero")): first order, in the
    # limit c0 = (1 - e^{-kappa h}) / kappa -> 1 / kappa (kappa > 0; set at the end)
    inf_h = jnp.isposinf(h)
    h = jnp.where(inf_h, jnp.ones_like(h), h)
    zero = jnp.zeros_like(h)
    limit = 1.0 / kappa if kappa > 0 else jnp.inf
    # c_n = int_0^h exp(kappa (u - h)) u^n / n! du = h^(n+1) phi_(n+1)(-kappa h)
    ph = phis(3 if top >= 3 else (2 if (top == 2 and not midpoint) else 1), -kappa * h)
    c0 = h * ph[0]
    if top == 1:
        w0 = jnp.where(inf_h, limit, c0)
        return jnp.stack([w0, zero, zero], axis=-1)
    order = jnp.where(inf_h, 1, order)
    c1 = h**2 * ph[1] if (top >= 3 or not midpoint) else None
    use2 = order >= 2
    one = jnp.ones_like(h)
    h0 = jnp.where(use2, lam_s - lam_1, one)
    # order 2: F' ~= (F0 - F1) / h0
    c1_2 = 0.5 * h * c0 if midpoint else c1
    w2_0 = c0 + c1_2 / h0
    w2_1 = -c1_2 / h0
    if top == 2:
        w0 = jnp.where(use2, w2_0, c0)
        w0 = jnp.where(inf_h, limit, w0)
        w1 = jnp.where(use2, w2_1, zero)
        return jnp.stack([w0, w1, zero], axis=-1)
    c2 = h**3 * ph[2]
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
    w0 = jnp.where(inf_h, limit, w0)
    w1 = jnp.where(use3, w3_1, jnp.where(use2, w2_1, zero))
    w2 = jnp.where(use3, w3_2, zero)
    return jnp.stack([w0, w1, w2], axis=-1)


def is_static(v) -> bool:
    """Whether ``v`` is a Python/NumPy integer or array (known when tracing)."""
    return isinstance(v, (int, np.integer, np.ndarray))


def max_order(order) -> int:
    """The largest entry of a concrete ``order`` (int or numpy array), else 3."""
    if is_static(order):
        return int(np.max(order))
    return 3


def step_orders(order: int, index, num_steps: int | None, lower_order_final: bool):
    """The order used at each step ``index`` of a multistep method of ``order``.

    Warm-up: step i has order ``min(order, i + 1)`` (no history before the first step).
    With ``lower_order_final`` and a known number of steps below 15, the final step is
    first order and the one before it at most second order, as in diffusers' multistep
    schedulers (stability near t = 0). ``index`` is a NumPy array (the steps of a fixed
    grid: the result is NumPy) or a traced integer (a step of an adaptive grid, whose
    number of steps ``num_steps`` is unknown: ``None``).
    """
    if is_static(index):
        index = np.asarray(index)
        orders = np.clip(np.minimum(order, index + 1), 1, None)
        if lower_order_final and num_steps is not None and num_steps < 15:
            orders = np.where(index == num_steps - 1, 1, orders)
            if num_steps >= 2:
                orders = np.where(index == num_steps - 2, np.minimum(orders, 2), orders)
        return orders
    orders = jnp.clip(jnp.minimum(order, index + 1), 1, None)
    if lower_order_final and num_steps is not None and num_steps < 15:
        orders = jnp.where(index == num_steps - 1, 1, orders)
        if num_steps >= 2:
            orders = jnp.where(index == num_steps - 2, jnp.minimum(orders, 2), orders)
    return orders


WARMUPS = ("auto", "corrected", "lower_order")


def resolve_warmup(owner: str, warmup, order: int) -> bool:
    """Whether a multistep method of ``order`` uses the corrected warm-up (docs/math/samplers.md).

    ``"lower_order"``: the first step is first order, the second at most second order
    (DPM-Solver, diffusers). ``"corrected"``: in addition, the second step corrects the
    first with the second model output (:func:`warmup_correction`), so the warm-up's local
    errors are O(h^3) and a third-order method stays third order; no extra model
    evaluation. ``"auto"``: corrected for order 3, lower-order otherwise (order 2 is second
    order either way, and keeps the form diffusers and k-diffusion use).
    """
    if not isinstance(warmup, str) or warmup not in WARMUPS:
        raise ValueError(
            f"{owner}: warmup must be 'auto', 'corrected' or 'lower_order', got warmup={warmup!r}."
        )
    if warmup == "auto":
        return order >= 3
    return warmup == "corrected"


def warmup_correction(lam_t, lam_s, lam_1, kappa: float):
    r"""The weight that turns the first (order-1) step of a multistep method into a
    second-order one, carried by the second step.

    The first step from ``lam_1`` to ``lam_s`` has only ``F1`` (its start value) and is first
    order: local error O(h^2), which alone makes the global error of a third-order method
    O(h^2). Once ``F0`` (at ``lam_s``) is known, the step's integral of the linear
    interpolant through both differs from the one-point rule by ``c1 (F0 - F1) / h0`` with
    ``h0 = lam_s - lam_1`` and ``c1 = h0^2 phi_2(-kappa h0)``. Carried to ``lam_t`` by the
    kernel ``exp(-kappa (lam_t - lam_s))``, the correction is ``corr F0 - corr F1``: added
    to the second step's weights on its current and previous values (a corrector in the
    sense of UniPC, applied once, with no extra model evaluation; docs/math/samplers.md,
    "warm-up"). Returns ``corr`` (elementwise).
    """
    h0 = lam_s - lam_1
    return jnp.exp(-kappa * (lam_t - lam_s)) * h0 * phi(2, -kappa * h0)


def add_warmup_correction(w, index, orders, lam_t, lam_s, lam_1, kappa: float):
    """``w`` (rows of :func:`multistep_weights`) with :func:`warmup_correction` added on the
    step of index 1, where that step has order >= 2 (fixed grids: NumPy ``index``/``orders``,
    only that row is touched; adaptive steps: a traced ``index``)."""
    if is_static(index) and is_static(orders):
        index, orders = np.asarray(index), np.asarray(orders)
        rows = np.flatnonzero((index == 1) & (orders >= 2))
        if rows.size == 0:
            return w
        r = int(rows[0])
        corr = warmup_correction(lam_t[r], lam_s[r], lam_1[r], kappa)
        return w.at[r, 0].add(corr).at[r, 1].add(-corr)
    on = (jnp.asarray(index) == 1) & (jnp.asarray(orders) >= 2)
    corr = warmup_correction(lam_t, lam_s, lam_1, kappa)
    corr = jnp.where(on, corr, jnp.zeros_like(corr))
    return w.at[..., 0].add(corr).at[..., 1].add(-corr)


# ---------------------------------------------------------------------------------------
# the schedule on a grid


class GridValues(NamedTuple):
    """A schedule evaluated once on a grid: times, log alpha, log sigma and log-SNR."""

    t: Array
    log_alpha: Array
    log_sigma: Array
    lam: Array


def grid_values(schedule, ts) -> GridValues:
    """The schedule on ``ts``, each function evaluated once: ``lam`` is ``log_alpha -
    log_sigma`` unless the schedule defines its own ``log_snr`` (then that, which equals
    ``schedule.log_snr(ts)`` exactly)."""
    from ._schedule import AbstractSchedule

    log_alpha = schedule.log_alpha(ts)
    log_sigma = schedule.log_sigma(ts)
    if type(schedule).log_snr is AbstractSchedule.log_snr:
        lam = log_alpha - log_sigma
    else:
        lam = schedule.log_snr(ts)
    return GridValues(ts, log_alpha, log_sigma, lam)


def alpha_of(schedule, values: GridValues):
    """``alpha`` on the grid: from ``log_alpha`` unless the schedule defines its own."""
    from ._schedule import AbstractSchedule

    if type(schedule).alpha is AbstractSchedule.alpha:
        return jnp.exp(values.log_alpha)
    return schedule.alpha(values.t)


def shifted(v, k: int):
    """``v`` shifted right by ``k`` along its first axis, the first entry repeated: the value
    k grid points before each one (the history of a multistep method; at the start, where
    there is no history, the first point stands in and is weighted by zero)."""
    if k == 0:
        return v
    n = v.shape[0]
    return jnp.concatenate([jnp.broadcast_to(v[:1], (min(k, n),) + v.shape[1:]), v[: n - k]])


def lambda_history(lam):
    """Per step of a log-SNR grid ``lam`` (N + 1): current, next, previous, previous-but-one."""
    lam_s = lam[:-1]
    return lam_s, lam[1:], shifted(lam_s, 1), shifted(lam_s, 2)


# ---------------------------------------------------------------------------------------
# parameterisations and dtypes


def data_from_eps(x, eps, alpha, sigma):
    """The data prediction ``(x - sigma eps) / alpha`` (elementwise over a pytree state)."""
    return jax.tree.map(lambda x, e: (x - sigma * e) / alpha, x, eps)


def eps_from_data(x, x0, alpha, sigma):
    """The noise prediction ``(x - alpha x0) / sigma`` (elementwise over a pytree state)."""
    return jax.tree.map(lambda x, d: (x - alpha * d) / sigma, x, x0)


def model_time_dtype(dtype):
    """The dtype of the time handed to the model: the state's, but at least float32."""
    dtype = jnp.dtype(dtype)
    return dtype if dtype.itemsize >= 4 else jnp.dtype(jnp.float32)


def cast(v, dtype) -> Any:
    return jnp.asarray(v).astype(dtype)
