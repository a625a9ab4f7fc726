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
    r"""Variance-preserving SDE with linear beta(t) (score SDE / DDPM in continuous time;
    docs/math/schedules.md#vplinear).

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
    r"""Variance-preserving cosine schedule (Nichol & Dhariwal 2021;
    docs/math/schedules.md#vpcosine).

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
    r"""Variance-preserving schedule from a discrete beta table (DDPM, Stable Diffusion;
    docs/math/schedules.md#discretevp).

    Step n = 1..N of the table sits at time t_n = n / N, with
    $\log\alpha_{t_n} = \frac12 \sum_{i \le n} \log(1 - \beta_i)$; in between, log alpha is
    piecewise linear in t, and the inverse interpolates t against log alpha so that
    ``t_from_log_snr(log_snr(t)) == t`` exactly up to rounding (as DPM-Solver's
    ``NoiseScheduleVP('discrete')``). Valid on [1/N, 1]; in addition t = 0 is the clean data
    (alpha = 1, sigma = 0), the end of a grid built with ``time_grid(..., final="zero")``
    (log alpha is linear between t = 0 and t = 1/N).

    diffusers' integer timestep k = 0..N-1 (``alphas_cumprod[k]``) is t = (k + 1) / N:
    :meth:`timestep_to_t` and :meth:`t_to_timestep` map between the two (docs/diffusers.md).

    **Arguments:**

    - `betas`: the table, each in (0, 1).
    - `rescale_betas_zero_snr`: rescale the table to zero terminal SNR first, as diffusers'
      ``rescale_betas_zero_snr=True`` (:func:`jadeis.rescale_betas_zero_snr`). Then
      alphas_cumprod[N-1] = 0, which is floored at ``2**-24`` as diffusers'
      DPM-Solver and Euler schedulers do, so lambda stays finite at t = 1 (an eps-prediction
      cannot give x0 where alpha = 0); use a v-prediction model.
    - `alphas_cumprod`: instead of ``betas``, the cumulative products (see
      :meth:`from_alphas_cumprod`).

    **Example:**

    ```python
    >>> import jadeis
    >>> s = jadeis.DiscreteVP.ddpm_linear()
    >>> s.log_alpha_table.shape
    (1000,)
    >>> float(s.timestep_to_t(999)), float(s.t_to_timestep(0.5))
    (1.0, 499.0)

    ```
    """

    log_alpha_table: Array
    t_table: Array
    t_min: float
    t_max: float

    def __init__(
        self,
        betas: ArrayLike | None = None,
        *,
        rescale_betas_zero_snr: bool = False,
        alphas_cumprod: ArrayLike | None = None,
    ):
        if (betas is None) == (alphas_cumprod is None):
            raise ValueError("DiscreteVP: pass exactly one of betas and alphas_cumprod.")
        if betas is not None:
            betas = np.asarray(betas, dtype=np.float64)
            if betas.ndim != 1 or betas.size < 2:
                raise ValueError(
                    f"DiscreteVP: betas must be a 1-D array of at least 2 entries, got shape "
                    f"{betas.shape}."
                )
            if not np.all((betas > 0) & (betas < 1)):
                raise ValueError("DiscreteVP: every beta must lie strictly between 0 and 1.")
            if rescale_betas_zero_snr:
                betas = _rescale_betas_zero_snr_np(betas)
            with np.errstate(divide="ignore"):
                log_ac = np.cumsum(np.log1p(-betas))
        else:
            ac = np.asarray(alphas_cumprod, dtype=np.float64)
            if ac.ndim != 1 or ac.size < 2:
                raise ValueError(
                    f"DiscreteVP: alphas_cumprod must be a 1-D array of at least 2 entries, "
                    f"got shape {ac.shape}."
                )
            if not (
                np.all(np.isfinite(ac)) and 0 < ac[0] <= 1 and np.all(ac[1:] < ac[:-1])
                and np.all(ac[:-1] > 0) and ac[-1] >= 0
            ):
                raise ValueError(
                    "DiscreteVP: alphas_cumprod must be strictly decreasing in (0, 1] (only the "
                    "last entry may be 0, a zero-terminal-SNR table)."
                )
            if rescale_betas_zero_snr:
                betas = 1.0 - np.concatenate([ac[:1], ac[1:] / ac[:-1]])
                ac = np.cumprod(1.0 - _rescale_betas_zero_snr_np(betas))
            with np.errstate(divide="ignore"):
                log_ac = np.log(ac)
        if not np.isfinite(log_ac[-1]):
            # zero terminal SNR: floored as diffusers' DPMSolverMultistep/Euler schedulers do
            log_ac[-1] = _ZERO_SNR_LOG_FLOOR
        n = log_ac.size
        self.log_alpha_table = jnp.asarray(0.5 * log_ac)
        self.t_table = jnp.asarray(np.arange(1, n + 1, dtype=np.float64) / n)
        self.t_min = 1.0 / n
        self.t_max = 1.0

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: ArrayLike, **kwargs):
        """From diffusers' ``alphas_cumprod`` (alpha^2 at timesteps 0..N-1), e.g.
        ``DiscreteVP.from_alphas_cumprod(pipe.scheduler.alphas_cumprod.numpy())``. A last entry
        of 0 (zero terminal SNR) is floored at ``2**-24`` as in diffusers' DPM-Solver."""
        return cls(alphas_cumprod=alphas_cumprod, **kwargs)

    @classmethod
    def ddpm_linear(
        cls, n: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, **kwargs
    ):
        """The DDPM table: betas linear from 1e-4 to 0.02 over 1000 steps."""
        return cls(np.linspace(beta_start, beta_end, n, dtype=np.float64), **kwargs)

    @classmethod
    def scaled_linear(
        cls, n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012, **kwargs
    ):
        """Stable Diffusion's "scaled_linear" table: sqrt(beta) linear."""
        return cls(np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2, **kwargs)

    @property
    def num_train_timesteps(self) -> int:
        """N, the length of the table (diffusers' ``num_train_timesteps``)."""
        return int(self.log_alpha_table.shape[0])

    @property
    def alphas_cumprod(self) -> Array:
        """diffusers' ``alphas_cumprod``: alpha^2 at timesteps k = 0..N-1."""
        return jnp.exp(2.0 * self.log_alpha_table)

    def timestep_to_t(self, k: ArrayLike) -> Array:
        """The time t = (k + 1) / N of diffusers' timestep k (integer or not)."""
        k = jnp.asarray(k)
        k = k.astype(jnp.result_type(float)) if not jnp.issubdtype(k.dtype, jnp.floating) else k
        return (k + 1.0) / self.num_train_timesteps

    def t_to_timestep(self, t: ArrayLike) -> Array:
        """diffusers' timestep k = N t - 1 of time t, as a float (exact integers on the table's
        nodes up to rounding; round it for a model that embeds integer timesteps)."""
        return _as_time(t) * self.num_train_timesteps - 1.0

    def _nodes(self, dtype):
        # the table's nodes with the clean data prepended: (t = 0, log alpha = 0)
        zero = jnp.zeros((1,), dtype)
        table = jnp.concatenate([zero, self.log_alpha_table.astype(dtype)])
        return jnp.concatenate([zero, self.t_table.astype(dtype)]), table

    def log_alpha(self, t):
        t = _as_time(t)
        ts, table = self._nodes(jnp.result_type(t, float))
        return jnp.interp(t, ts, table)

    def t_from_log_snr(self, lam):
        lam = _as_time(lam)
        log_alpha = _vp_log_alpha_from_log_snr(lam)
        ts, table = self._nodes(log_alpha.dtype)
        # log alpha decreases in t: interpolate on the flipped (increasing) table
        return jnp.interp(log_alpha, table[::-1], ts[::-1])


_ZERO_SNR_LOG_FLOOR = math.log(2.0**-24)


def _rescale_betas_zero_snr_np(betas):
    ac = np.cumprod(1.0 - betas)
    s = np.sqrt(ac)
    s0, s_last = s[0], s[-1]
    s = (s - s_last) * (s0 / (s0 - s_last))
    ac = s**2
    alphas = np.concatenate([ac[:1], ac[1:] / ac[:-1]])
    return 1.0 - alphas


def rescale_betas_zero_snr(betas: ArrayLike) -> np.ndarray:
    """Rescale a beta table to zero terminal SNR, as diffusers' ``rescale_zero_terminal_snr``
    (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1):
    sqrt(alphas_cumprod) is shifted so that its last entry is 0 and scaled so that its first
    is unchanged. The last returned beta is 1 (alphas_cumprod[-1] = 0). In float64.

    **Example:**

    ```python
    >>> import numpy as np, jadeis
    >>> b = jadeis.rescale_betas_zero_snr(np.linspace(1e-4, 0.02, 1000))
    >>> float(b[-1]), float(np.cumprod(1 - b)[-1])
    (1.0, 0.0)

    ```
    """
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size < 2 or not np.all((betas > 0) & (betas < 1)):
        raise ValueError(
            "rescale_betas_zero_snr: betas must be a 1-D array of at least 2 entries in (0, 1)."
        )
    return _rescale_betas_zero_snr_np(betas)


class RectifiedFlow(AbstractSchedule):
    r"""Rectified flow / flow matching: alpha_t = 1 - t, sigma_t = t
    (docs/math/schedules.md#rectifiedflow).

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
    r"""Variance exploding / EDM schedule: alpha_t = 1, sigma_t = t, lambda_t = -log t
    (docs/math/schedules.md#ve).

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
