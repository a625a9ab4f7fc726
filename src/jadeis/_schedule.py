"""Noise schedules: x_t = alpha_t x_0 + sigma_t eps, lambda_t = log(alpha_t / sigma_t)."""

from __future__ import annotations

import abc
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike


class AbstractSchedule(eqx.Module):
    """Base class of every noise schedule.

    A schedule is an immutable pytree. Subclasses give ``log_alpha``, ``sigma``,
    ``log_snr`` and the inverse ``t_from_log_snr``; all are jit-able and elementwise.
    ``t_min`` and ``t_max`` bound the times the schedule is valid (and finite) on;
    ``prior_std`` is the standard deviation of x_T at ``t_max``.
    """

    t_min: eqx.AbstractVar[float]
    t_max: eqx.AbstractVar[float]

    @abc.abstractmethod
    def log_alpha(self, t: ArrayLike) -> Array:
        """log alpha_t."""

    @abc.abstractmethod
    def sigma(self, t: ArrayLike) -> Array:
        """sigma_t."""

    @abc.abstractmethod
    def t_from_log_snr(self, lam: ArrayLike) -> Array:
        """The time t with log_snr(t) == lam (inverse of ``log_snr``)."""

    def alpha(self, t: ArrayLike) -> Array:
        """alpha_t."""
        return jnp.exp(self.log_alpha(_as_time(t)))

    def log_sigma(self, t: ArrayLike) -> Array:
        """log sigma_t."""
        return jnp.log(self.sigma(_as_time(t)))

    def log_snr(self, t: ArrayLike) -> Array:
        """lambda_t = log(alpha_t / sigma_t), the half log signal-to-noise ratio (decreasing)."""
        t = _as_time(t)
        return self.log_alpha(t) - self.log_sigma(t)

    @property
    def prior_std(self) -> float:
        """Standard deviation of the terminal distribution x_T ~ N(0, prior_std^2 I)."""
        return 1.0


def _as_time(t) -> Array:
    """``t`` as an array computed in at least float32: integer times become the default float,
    bfloat16/float16 times float32 (the schedule's arithmetic is not done in low precision)."""
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.floating):
        return t.astype(jnp.result_type(float))
    if jnp.finfo(t.dtype).bits < 32:
        return t.astype(jnp.float32)
    return t


def _vp_log_sigma(log_alpha):
    # sigma = sqrt(1 - alpha^2) without cancellation near alpha = 1
    return 0.5 * jnp.log(-jnp.expm1(2.0 * log_alpha))


def _vp_log_alpha_from_log_snr(lam):
    # alpha^2 = 1 / (1 + exp(-2 lambda))
    return -0.5 * jnp.logaddexp(jnp.zeros_like(lam), -2.0 * lam)


class _AbstractVP(AbstractSchedule):
    def sigma(self, t):
        return jnp.exp(self.log_sigma(t))

    def log_sigma(self, t):
        return _vp_log_sigma(self.log_alpha(_as_time(t)))


class VPLinear(_AbstractVP):
    r"""Variance-preserving SDE with linear beta(t) (score SDE / DDPM in continuous time).

    $\log\alpha_t = -(\beta_1 - \beta_0) t^2/4 - \beta_0 t/2$, $\sigma_t = \sqrt{1-\alpha_t^2}$.

    **Example:**

    ```python
    >>> import jadeis
    >>> s = jadeis.VPLinear()
    >>> round(float(s.t_from_log_snr(s.log_snr(0.5))), 6)
    0.5

    ```
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-3
    t_max: float = 1.0

    def __check_init__(self):
        if not _traced(self.beta_min, self.beta_max):
            _check_finite("VPLinear", beta_min=self.beta_min, beta_max=self.beta_max)
            if not np.all(0 <= _np(self.beta_min)) or not np.all(
                _np(self.beta_min) < _np(self.beta_max)
            ):
                raise ValueError(
                    f"VPLinear: need 0 <= beta_min < beta_max, got beta_min={self.beta_min}, "
                    f"beta_max={self.beta_max}."
                )
        _check_range("VPLinear", self.t_min, self.t_max, lo=0.0)
        if not _traced(self.beta_min, self.beta_max, self.t_max):
            b0, b1, t1 = _np(self.beta_min), _np(self.beta_max), _np(self.t_max)
            log_alpha = -0.25 * t1**2 * (b1 - b0) - 0.5 * t1 * b0
            if np.any(log_alpha < _LOG_ALPHA_MIN):
                a, b = 0.25 * (b1 - b0), 0.5 * b0
                t_ok = 2.0 * -_LOG_ALPHA_MIN / (b + np.sqrt(b * b - 4.0 * a * _LOG_ALPHA_MIN))
                raise ValueError(
                    f"VPLinear: alpha_t underflows at t_max={self.t_max} (log alpha = "
                    f"{np.min(log_alpha):.1f} < {_LOG_ALPHA_MIN:.1f}: alpha^2 is below "
                    f"float32's smallest normal number, and sampling gives NaN). Use t_max <= "
                    f"{np.min(t_ok):.3g} for beta_max={self.beta_max} (the default is 1.0), or a "
                    f"smaller beta_max."
                )

    def log_alpha(self, t):
        t = _as_time(t)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def t_from_log_snr(self, lam):
        # solve a t^2 + b t = L with L = -log alpha, stably
        lam = _as_time(lam)
        big_l = -_vp_log_alpha_from_log_snr(lam)
        a = 0.25 * (self.beta_max - self.beta_min)
        b = 0.5 * self.beta_min
        return 2.0 * big_l / (b + jnp.sqrt(b * b + 4.0 * a * big_l))


class VPCosine(_AbstractVP):
    r"""Variance-preserving cosine schedule (Nichol & Dhariwal 2021).

    $\alpha_t = \cos(\frac{t+s}{1+s}\frac{\pi}{2}) / \cos(\frac{s}{1+s}\frac{\pi}{2})$; alpha
    vanishes at t = 1, so the default ``t_max`` is 0.9946 (as in DPM-Solver).

    **Example:**

    ```python
    >>> import jadeis
    >>> s = jadeis.VPCosine()
    >>> round(float(s.alpha(0.0)), 6)
    1.0

    ```
    """

    s: float = 0.008
    t_min: float = 1e-3
    t_max: float = 0.9946

    def __check_init__(self):
        if not _traced(self.s):
            _check_finite("VPCosine", s=self.s)
            if np.any(_np(self.s) <= 0):
                raise ValueError(f"VPCosine: s must be positive, got s={self.s}.")
        _check_range("VPCosine", self.t_min, self.t_max, lo=0.0, hi=1.0, open_hi=True)
        _check_float32_near_one("VPCosine", self.t_max, "0.9946")

    # jnp, not math, on ``s``: it is a traced leaf under jit/grad/custom_vjp.
    def log_alpha(self, t):
        # log(cos(theta)/cos(theta0)) with theta = theta0 + dtheta, dtheta = t/(1+s) pi/2.
        # Near t = 0 the ratio is 1 + u, u = -2 sin(theta0 + dtheta/2) sin(dtheta/2)/cos(theta0),
        # taken through log1p (no cancellation in float32); near t = 1 log cos(theta) is exact.
        t = _as_time(t)
        s = jnp.asarray(self.s)
        th0 = s / (1.0 + s) * (math.pi / 2.0)
        dth = t / (1.0 + s) * (math.pi / 2.0)
        u = -2.0 * jnp.sin(th0 + 0.5 * dth) * jnp.sin(0.5 * dth) / jnp.cos(th0)
        direct = jnp.log(jnp.cos(th0 + dth)) - jnp.log(jnp.cos(th0))
        return jnp.where(u > -0.5, jnp.log1p(u), direct)

    def t_from_log_snr(self, lam):
        # 1 - cos(theta) = 2 sin^2(theta0/2) - cos(theta0) expm1(log alpha), and
        # theta = 2 arcsin(sqrt((1 - cos theta)/2)): stable where arccos(~1) is not.
        lam = _as_time(lam)
        log_alpha = _vp_log_alpha_from_log_snr(lam)
        s = jnp.asarray(self.s)
        th0 = s / (1.0 + s) * (math.pi / 2.0)
        half = jnp.sin(0.5 * th0) ** 2 - 0.5 * jnp.cos(th0) * jnp.expm1(log_alpha)
        theta = 2.0 * jnp.arcsin(jnp.sqrt(half))
        return (theta - th0) * (2.0 * (1.0 + s) / math.pi)


class DiscreteVP(_AbstractVP):
    r"""Variance-preserving schedule from a discrete beta table (DDPM, Stable Diffusion).

    Step n = 1..N of the table sits at time t_n = n / N, with
    $\log\alpha_{t_n} = \frac12 \sum_{i \le n} \log(1 - \beta_i)$; in between, log alpha is
    piecewise linear in t, and the inverse interpolates t against log alpha so that
    ``t_from_log_snr(log_snr(t)) == t`` exactly up to rounding (as DPM-Solver's
    ``NoiseScheduleVP('discrete')``). Valid on [1/N, 1].

    **Example:**

    ```python
    >>> import jadeis
    >>> s = jadeis.DiscreteVP.ddpm_linear()
    >>> s.log_alpha_table.shape
    (1000,)

    ```
    """

    log_alpha_table: Array
    t_table: Array
    t_min: float
    t_max: float

    def __init__(self, betas: ArrayLike):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size < 2:
            raise ValueError(
                f"DiscreteVP: betas must be a 1-D array of at least 2 entries, got shape "
                f"{betas.shape}."
            )
        if not np.all((betas > 0) & (betas < 1)):
            raise ValueError("DiscreteVP: every beta must lie strictly between 0 and 1.")
        n = betas.size
        self.log_alpha_table = jnp.asarray(0.5 * np.cumsum(np.log1p(-betas)))
        self.t_table = jnp.asarray(np.arange(1, n + 1, dtype=np.float64) / n)
        self.t_min = 1.0 / n
        self.t_max = 1.0

    @classmethod
    def ddpm_linear(cls, n: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        """The DDPM table: betas linear from 1e-4 to 0.02 over 1000 steps."""
        return cls(np.linspace(beta_start, beta_end, n, dtype=np.float64))

    @classmethod
    def scaled_linear(cls, n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
        """Stable Diffusion's "scaled_linear" table: sqrt(beta) linear."""
        return cls(np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2)

    def log_alpha(self, t):
        t = _as_time(t)
        table = self.log_alpha_table.astype(jnp.result_type(t, float))
        return jnp.interp(t, self.t_table.astype(table.dtype), table)

    def t_from_log_snr(self, lam):
        lam = _as_time(lam)
        log_alpha = _vp_log_alpha_from_log_snr(lam)
        table = self.log_alpha_table.astype(log_alpha.dtype)
        # log alpha decreases in t: interpolate on the flipped (increasing) table
        return jnp.interp(log_alpha, table[::-1], self.t_table.astype(table.dtype)[::-1])


class RectifiedFlow(AbstractSchedule):
    r"""Rectified flow / flow matching: alpha_t = 1 - t, sigma_t = t.

    lambda_t = log((1 - t)/t) is finite only inside (0, 1): the default range is
    [1e-3, 1 - 1e-3].

    **Example:**

    ```python
    >>> import jadeis
    >>> s = jadeis.RectifiedFlow()
    >>> float(s.log_snr(0.5))
    0.0

    ```
    """

    t_min: float = 1e-3
    t_max: float = 1.0 - 1e-3

    def __check_init__(self):
        _check_range("RectifiedFlow", self.t_min, self.t_max, lo=0.0, hi=1.0, open_hi=True)
        _check_float32_near_one("RectifiedFlow", self.t_max, "1 - 1e-3")

    def log_alpha(self, t):
        return jnp.log1p(-_as_time(t))

    def sigma(self, t):
        return _as_time(t)

    def log_sigma(self, t):
        return jnp.log(_as_time(t))

    def t_from_log_snr(self, lam):
        lam = _as_time(lam)
        # t = 1 / (1 + exp(lambda))
        return jnp.exp(-jnp.logaddexp(jnp.zeros_like(lam), lam))


class VE(AbstractSchedule):
    r"""Variance exploding / EDM schedule: alpha_t = 1, sigma_t = t, lambda_t = -log t.

    Time is the noise level itself (EDM's sigma), valid on [sigma_min, sigma_max].

    **Example:**

    ```python
    >>> import jadeis
    >>> s = jadeis.VE()
    >>> s.prior_std
    80.0

    ```
    """

    t_min: float = 0.002
    t_max: float = 80.0

    def __check_init__(self):
        _check_range("VE", self.t_min, self.t_max, lo=0.0)

    def log_alpha(self, t):
        return jnp.zeros_like(_as_time(t))

    def sigma(self, t):
        return _as_time(t)

    def log_sigma(self, t):
        return jnp.log(_as_time(t))

    def t_from_log_snr(self, lam):
        return jnp.exp(-_as_time(lam))

    @property
    def prior_std(self) -> float:
        return float(self.t_max)


def _traced(*values):
    """Whether any value is a tracer (a schedule built inside jit/grad/vmap): skip the checks."""
    return any(isinstance(v, jax.core.Tracer) for v in values)


# log alpha_t below this makes alpha^2 smaller than float32's smallest normal number
_LOG_ALPHA_MIN = 0.5 * math.log(float(np.finfo(np.float32).tiny))
_F32_MAX = float(np.finfo(np.float32).max)


def _np(v):
    return np.asarray(v, dtype=np.float64)


def _check_finite(name, **values):
    for arg, v in values.items():
        v64 = _np(v)
        if not np.all(np.isfinite(v64)) or np.any(np.abs(v64) > _F32_MAX):
            raise ValueError(
                f"{name}: {arg} must be a finite number (representable in float32), got {v}."
            )


def _check_range(name, t_min, t_max, *, lo, hi=None, open_hi=False):
    if _traced(t_min, t_max):
        return
    _check_finite(name, t_min=t_min, t_max=t_max)
    t_min = _np(t_min)
    t_max = _np(t_max)
    if not (np.all(t_min > lo) and np.all(t_max > t_min)):
        raise ValueError(f"{name}: need {lo} < t_min < t_max, got t_min={t_min}, t_max={t_max}.")
    if hi is not None and np.any((t_max > hi) | ((t_max >= hi) if open_hi else False)):
        raise ValueError(
            f"{name}: t_max={t_max} is outside the schedule's domain; it must be "
            f"{'<' if open_hi else '<='} {hi} (alpha_t vanishes there)."
        )


def _check_float32_near_one(name, t_max, default):
    """alpha_t ~ (1 - t) near t = 1: reject a ``t_max`` whose float32 rounding changes 1 - t_max
    by more than 1% (float32 and float64 sampling would disagree; at 1 - 1e-8 alpha is 0)."""
    if _traced(t_max):
        return
    t64 = _np(t_max)
    gap = 1.0 - t64
    gap32 = 1.0 - t64.astype(np.float32).astype(np.float64)
    if np.any(np.abs(gap32 - gap) > 0.01 * gap):
        raise ValueError(
            f"{name}: t_max={t_max} is too close to 1 for float32: 1 - t_max = {np.min(gap):.3g} "
            f"rounds to {np.min(gap32):.3g} in float32, so alpha(t_max) is wrong (zero at "
            f"1 - 1e-8, giving NaN) and float32 and float64 samples disagree. Use t_max <= "
            f"1 - 1e-5 (the default is {default})."
        )
