"""Exponential-integrator samplers as per-step linear combinations.

Every sampler in jadeis takes a step of the form

    x_{i+1} = a_i x_i + b_{i,0} m_i + b_{i,1} m_{i-1} + b_{i,2} m_{i-2} + c_i xi_i

where ``m`` is the model output in the sampler's parameterisation (noise ``eps`` or data
``x0``), the history ``m_{i-1}, m_{i-2}`` lives in the ``lax.scan`` carry, and ``xi_i`` is
standard Gaussian noise (SDE samplers only). The per-step scalars ``a, b, c`` depend only
on the schedule and the time grid, so they are computed once, vectorised, before the scan;
lower-order warm-up steps are simply rows of ``b`` with trailing zeros.
"""

from __future__ import annotations

import abc
from typing import ClassVar, NamedTuple

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from .._phi import multistep_weights
from .._schedule import AbstractSchedule


class StepCoefficients(NamedTuple):
    """Per-step coefficients of a sampler on a grid of N steps."""

    a: Array  # (N,) coefficient of x_i
    b: Array  # (N, 3) coefficients of m_i, m_{i-1}, m_{i-2}
    c: Array  # (N,) coefficient of the Gaussian noise xi_i (zero for ODE samplers)


def effective_orders(order: int, n: int, lower_order_final: bool) -> np.ndarray:
    """Order used at each of ``n`` steps: warm-up from 1, lower order at the end of short grids.

    As in diffusers' multistep schedulers: for grids of fewer than 15 steps, the final step
    is first order and the one before it at most second order (stability near t = 0).
    """
    orders = np.minimum(order, np.arange(1, n + 1))
    if lower_order_final and n < 15:
        orders[-1] = 1
        if n >= 2:
            orders[-2] = min(orders[-2], 2)
    return orders


def lambda_history(lam: Array):
    """Per step of a log-SNR grid ``lam`` (N+1): current, next, previous, previous-but-one."""
    lam_s = lam[:-1]
    lam_t = lam[1:]
    lam_1 = jnp.concatenate([lam[:1], lam[:-2]])
    lam_2 = jnp.concatenate([lam[:1], lam[:1], lam[:-3]])[: lam_s.shape[0]]
    return lam_s, lam_t, lam_1, lam_2


class AbstractSolver(eqx.Module):
    """Base class of the samplers.

    Subclasses fix ``prediction`` (``"eps"`` or ``"data"``: what ``m`` is), ``stochastic``,
    and give ``coefficients``. ``order`` is the multistep order.
    """

    order: eqx.AbstractVar[int]
    prediction: ClassVar[str]
    stochastic: ClassVar[bool]
    max_order: ClassVar[int] = 3

    def __check_init__(self):
        if (
            isinstance(self.order, bool)
            or not isinstance(self.order, int)
            or not 1 <= self.order <= self.max_order
        ):
            allowed = " or ".join(str(k) for k in range(1, self.max_order + 1))
            raise ValueError(
                f"{type(self).__name__}: order must be {allowed}, got order={self.order!r}."
            )

    @abc.abstractmethod
    def coefficients(self, schedule: AbstractSchedule, ts: Array) -> StepCoefficients:
        """Per-step coefficients on the descending grid ``ts`` (length N + 1)."""


class AbstractExponentialSolver(AbstractSolver):
    """Shared implementation: a linear part exp(-(lambda_t - lambda_s) * damping) times
    the schedule ratio, plus ``scale * int exp(kappa (l - lambda_t)) m(l) dl``."""

    lower_order_final: eqx.AbstractVar[bool]
    kappa: ClassVar[float]
    drift_factor: ClassVar[float] = 1.0

    def coefficients(self, schedule, ts):
        n = ts.shape[0] - 1
        orders = jnp.asarray(effective_orders(self.order, n, self.lower_order_final))
        lam = schedule.log_snr(ts)
        lam_s, lam_t, lam_1, lam_2 = lambda_history(lam)
        w = multistep_weights(lam_t, lam_s, lam_1, lam_2, self.kappa, orders)
        h = lam_t - lam_s
        log_alpha = schedule.log_alpha(ts)
        log_sigma = schedule.log_sigma(ts)
        la_s, la_t = log_alpha[:-1], log_alpha[1:]
        ls_s, ls_t = log_sigma[:-1], log_sigma[1:]
        a, scale, c = self._step_scalars(h, la_s, la_t, ls_s, ls_t)
        return StepCoefficients(a=a, b=scale[:, None] * w, c=c)

    @abc.abstractmethod
    def _step_scalars(self, h, la_s, la_t, ls_s, ls_t):
        """(a, scale of the weights, noise coefficient) per step."""


class AbstractNoiseSolver(AbstractExponentialSolver):
    """Noise form: x_t = (alpha_t/alpha_s) x_s - f sigma_t int e^{-(l - lambda_t)} eps dl."""

    prediction: ClassVar[str] = "eps"
    kappa: ClassVar[float] = -1.0

    def _step_scalars(self, h, la_s, la_t, ls_s, ls_t):
        a = jnp.exp(la_t - la_s)
        scale = -self.drift_factor * jnp.exp(ls_t)
        if self.stochastic:
            c = jnp.exp(ls_t) * jnp.sqrt(jnp.expm1(2.0 * h))
        else:
            c = jnp.zeros_like(h)
        return a, scale, c


class AbstractDataSolver(AbstractExponentialSolver):
    """Data-prediction form: x_t = (sigma_t/sigma_s) x_s + alpha_t int e^{(l-lambda_t)} x0 dl
    (ODE), or the SDE form with e^{-h} damping and kernel e^{2(l - lambda_t)}."""

    prediction: ClassVar[str] = "data"

    def _step_scalars(self, h, la_s, la_t, ls_s, ls_t):
        alpha_t = jnp.exp(la_t)
        if self.stochastic:
            a = jnp.exp(ls_t - ls_s - h)
            scale = 2.0 * alpha_t
            c = jnp.exp(ls_t) * jnp.sqrt(-jnp.expm1(-2.0 * h))
        else:
            a = jnp.exp(ls_t - ls_s)
            scale = alpha_t
            c = jnp.zeros_like(h)
        return a, scale, c
