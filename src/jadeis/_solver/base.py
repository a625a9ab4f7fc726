"""The solver interface: a solver owns its step.

A solver is a small immutable object with four methods, and nothing else in jadeis knows
how it steps:

- ``inputs(schedule, ts)``: every per-step quantity that depends only on the schedule and
  the time grid (times, coefficients), as a pytree of arrays with a leading axis of N,
  computed once before the loop. It is differentiable, so gradients reach ``ts`` and the
  schedule's parameters through it.
- ``init(x_T)``: the solver state (a pytree: the sample plus any history) at ``ts[0]``.
- ``step(model, inp, state, xi)``: one step from ``ts[i]`` to ``ts[i+1]``. ``model(x, t)``
  is the noise prediction (conditioning and parameters already bound); ``inp`` is row i of
  ``inputs``; ``xi`` the step's standard Gaussian noise (``None`` for ODE solvers).
- ``output(state)``: the sample held by a state.

Forward sampling, encoding, every gradient strategy and AdjointDEIS's reconstruction all
call these methods (``docs/math/samplers.md``). Most samplers in jadeis are linear
multistep exponential integrators,

    x_{i+1} = a_i x_i + b_{i,0} m_i + b_{i,1} m_{i-1} + b_{i,2} m_{i-2} + c_i xi_i,

where ``m`` is the model output in the solver's parameterisation (noise or data); they
share :class:`AbstractLinearMultistepSolver`, which also gives the discrete adjoint a fast
path that keeps one state per step.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from .._phi import add_warmup_correction, multistep_weights
from .._schedule import AbstractSchedule


def check_int(owner: str, name: str, value, lo: int, hi: int | None = None) -> int:
    """``value`` as a Python int in [lo, hi]; numpy/JAX integers accepted, bools refused."""
    ok = not isinstance(value, bool) and (
        isinstance(value, (int, np.integer))
        or (
            getattr(value, "shape", None) == ()
            and np.issubdtype(getattr(value, "dtype", float), np.integer)
        )
    )
    if ok:
        value = int(value)
        ok = value >= lo and (hi is None or value <= hi)
    if not ok:
        if hi is not None and hi - lo <= 3:
            rng = " or ".join(str(v) for v in range(lo, hi + 1))
        else:
            rng = f"an int from {lo} to {hi}" if hi is not None else f"an int >= {lo}"
        raise ValueError(f"{owner}: {name} must be {rng}, got {name}={value!r}.")
    return value


class StepCoefficients(NamedTuple):
    """Per-step coefficients of a linear multistep sampler on a grid of N steps."""

    a: Array  # (N,) coefficient of x_i
    b: Array  # (N, 3) coefficients of m_i, m_{i-1}, m_{i-2}
    c: Array  # (N,) coefficient of the Gaussian noise xi_i (zero for ODE samplers)


class LinearStepInputs(NamedTuple):
    """Row i: the model's time, the step coefficients, and alpha, sigma at ``ts[i]``."""

    t: Array
    a: Array
    b: Array  # (order,): the coefficients of m_i, ..., m_{i-order+1}
    c: Array
    alpha: Array
    sigma: Array


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


WARMUPS = ("auto", "corrected", "lower_order")


def resolve_warmup(owner: str, warmup, order: int) -> bool:
    """Whether a multistep method of ``order`` uses the corrected warm-up (docs/math/samplers.md).

    ``"lower_order"``: the first step is first order, the second at most second order
    (DPM-Solver, diffusers). ``"corrected"``: in addition, the second step corrects the
    first with the second model output (:func:`jadeis._phi.warmup_correction`), so the
    warm-up's local errors are O(h^3) and a third-order method stays third order; no extra
    model evaluation. ``"auto"``: corrected for order 3, lower-order otherwise (order 2
    is second order either way, and keeps the form diffusers and k-diffusion use).
    """
    if not isinstance(warmup, str) or warmup not in WARMUPS:
        raise ValueError(
            f"{owner}: warmup must be 'auto', 'corrected' or 'lower_order', got warmup={warmup!r}."
        )
    if warmup == "auto":
        return order >= 3
    return warmup == "corrected"


def corrects_warmup(corrected: bool, orders: np.ndarray) -> bool:
    """Whether the warm-up correction applies on a grid with these per-step ``orders``:
    asked for, and there is a second step of order >= 2 to carry it."""
    return bool(corrected and orders.shape[0] >= 2 and orders[1] >= 2)


def lambda_history(lam: Array):
    """Per step of a log-SNR grid ``lam`` (N+1): current, next, previous, previous-but-one."""
    lam_s = lam[:-1]
    lam_t = lam[1:]
    lam_1 = jnp.concatenate([lam[:1], lam[:-2]])
    lam_2 = jnp.concatenate([lam[:1], lam[:1], lam[:-3]])[: lam_s.shape[0]]
    return lam_s, lam_t, lam_1, lam_2


def log_alpha_sigma_snr(schedule: AbstractSchedule, ts: Array):
    """``(log_alpha, log_sigma, log_snr)`` on the grid ``ts``, each schedule function
    evaluated once: ``log_snr`` is ``log_alpha - log_sigma`` unless the schedule defines
    its own (the same values as ``schedule.log_snr(ts)``)."""
    log_alpha = schedule.log_alpha(ts)
    log_sigma = schedule.log_sigma(ts)
    if type(schedule).log_snr is AbstractSchedule.log_snr:
        lam = log_alpha - log_sigma
    else:
        lam = schedule.log_snr(ts)
    return log_alpha, log_sigma, lam


def alpha_sigma(schedule: AbstractSchedule, ts: Array, log_alpha: Array):
    """``alpha`` and ``sigma`` at ``ts[:-1]`` (the schedule is elementwise), ``alpha`` from
    ``log_alpha`` on the grid unless the schedule defines its own ``alpha``."""
    if type(schedule).alpha is AbstractSchedule.alpha:
        alpha = jnp.exp(log_alpha[:-1])
    else:
        alpha = schedule.alpha(ts[:-1])
    return alpha, schedule.sigma(ts[:-1])


def model_time_dtype(dtype):
    """The dtype of the time handed to the model: the state's, but at least float32."""
    dtype = jnp.dtype(dtype)
    return dtype if dtype.itemsize >= 4 else jnp.dtype(jnp.float32)


class AbstractSolver(eqx.Module):
    """Base class of the samplers: ``inputs``/``init``/``step``/``output`` (see module doc).

    ``order`` is the solver's order; ``stochastic`` whether it samples the diffusion SDE
    (and so needs a key or noise). A new solver is one file with one subclass.
    """

    order: eqx.AbstractVar[int]
    stochastic: ClassVar[bool]
    max_order: ClassVar[int] = 3

    def __check_init__(self):
        check_int(type(self).__name__, "order", self.order, 1, self.max_order)

    @abc.abstractmethod
    def inputs(self, schedule: AbstractSchedule, ts: Array, dtype) -> Any:
        """Per-step inputs (leading axis N) on the descending grid ``ts`` (N + 1 times),
        cast to the state's ``dtype``."""

    @abc.abstractmethod
    def init(self, x_T: Array) -> Any:
        """The solver state at ``ts[0]``."""

    @abc.abstractmethod
    def step(self, model, inp, state, xi):
        """One step: the state at ``ts[i+1]`` from the state at ``ts[i]``."""

    def output(self, state) -> Array:
        """The sample held by ``state``."""
        return state[0]

    def noise_shape(self, shape: tuple) -> tuple:
        """Shape of the standard Gaussian noise ``xi`` of one step for a sample of ``shape``
        (SDE solvers that need more than one draw per step, such as ShARK, override it)."""
        return tuple(shape)


class AbstractLinearMultistepSolver(AbstractSolver):
    """Linear multistep exponential integrators: x' = a x + sum_j b_j m_{i-j} + c xi.

    Subclasses give ``prediction`` (``"eps"`` or ``"data"``: what ``m`` is) and
    ``coefficients``. The state is ``(x, (m_{i-1}, ..., m_{i-k+1}))``.
    """

    prediction: ClassVar[str]

    @abc.abstractmethod
    def coefficients(self, schedule: AbstractSchedule, ts: Array) -> StepCoefficients:
        """Per-step coefficients on the descending grid ``ts`` (length N + 1)."""

    def inputs(self, schedule, ts, dtype):
        if type(self).coefficients is AbstractExponentialSolver.coefficients:
            # one evaluation of the schedule on the grid serves the coefficients and the
            # per-step alpha, sigma (the same values as evaluating each on its own)
            log_alpha, log_sigma, lam = log_alpha_sigma_snr(schedule, ts)
            co = self._coefficients(schedule, ts, log_alpha, log_sigma, lam)
            alpha, sigma = alpha_sigma(schedule, ts, log_alpha)
        else:
            co = self.coefficients(schedule, ts)
            alpha, sigma = schedule.alpha(ts[:-1]), schedule.sigma(ts[:-1])
        t_s = ts[:-1]

        def cast(v):
            return jnp.asarray(v).astype(dtype)

        return LinearStepInputs(
            t=jnp.asarray(t_s).astype(model_time_dtype(dtype)),
            a=cast(co.a),
            # only the columns of the order used (b[:, q] weighs m_{i-q})
            b=cast(co.b[:, : self.order]),
            c=cast(co.c),
            alpha=cast(alpha),
            sigma=cast(sigma),
        )

    def init(self, x_T):
        zeros = lambda: jax.tree.map(jnp.zeros_like, x_T)  # noqa: E731
        return (x_T, tuple(zeros() for _ in range(self.order - 1)))

    def convert(self, eps, x, alpha, sigma):
        """The model output in this solver's parameterisation."""
        if self.prediction == "data":
            return jax.tree.map(lambda x, eps: (x - sigma * eps) / alpha, x, eps)
        return eps

    def model_output(self, model, inp: LinearStepInputs, x):
        return self.convert(model(x, inp.t), x, inp.alpha, inp.sigma)

    def combine(self, inp: LinearStepInputs, x, m, hist, xi):
        """a x + b_0 m + sum_j b_j hist_j (+ c xi): the linear part of the step."""
        x_next = jax.tree.map(lambda x, m: inp.a * x + inp.b[0] * m, x, m)
        for j, h in enumerate(hist):
            x_next = jax.tree.map(lambda v, h, j=j: v + inp.b[j + 1] * h, x_next, h)
        if xi is not None:
            x_next = jax.tree.map(lambda v, xi: v + inp.c * xi, x_next, xi)
        return x_next

    def step(self, model, inp, state, xi):
        x, hist = state
        m = self.model_output(model, inp, x)
        x_next = self.combine(inp, x, m, hist, xi if self.stochastic else None)
        return (x_next, ((m,) + hist)[: self.order - 1])

    def noise_of_step(self, model, inp, state, x_next):
        """The noise ``xi`` with which ``step`` maps ``state`` to ``x_next`` (SDE solvers),
        and the state after that step."""
        x, hist = state
        m = self.model_output(model, inp, x)
        xi = jax.tree.map(lambda xn, v: (xn - v) / inp.c, x_next,
                          self.combine(inp, x, m, hist, None))
        return xi, (x_next, ((m,) + hist)[: self.order - 1])


class AbstractExponentialSolver(AbstractLinearMultistepSolver):
    """Shared implementation: a linear part exp(-(lambda_t - lambda_s) * damping) times
    the schedule ratio, plus ``scale * int exp(kappa (l - lambda_t)) m(l) dl``."""

    lower_order_final: eqx.AbstractVar[bool]
    kappa: ClassVar[float]
    drift_factor: ClassVar[float] = 1.0

    def _midpoint(self) -> bool:
        return False

    def _corrected_warmup(self) -> bool:
        """Whether the second step corrects the first-order first step (see
        :func:`resolve_warmup`); solvers with a ``warmup`` option override this."""
        return False

    def coefficients(self, schedule, ts):
        return self._coefficients(schedule, ts, *log_alpha_sigma_snr(schedule, ts))

    def _coefficients(self, schedule, ts, log_alpha, log_sigma, lam):
        n = ts.shape[0] - 1
        orders_np = effective_orders(self.order, n, self.lower_order_final)
        lam_s, lam_t, lam_1, lam_2 = lambda_history(lam)
        w = multistep_weights(
            lam_t, lam_s, lam_1, lam_2, self.kappa, orders_np, midpoint=self._midpoint()
        )
        if corrects_warmup(self._corrected_warmup(), orders_np):
            w = add_warmup_correction(w, lam, self.kappa)
        h = lam_t - lam_s
        la_s, la_t = log_alpha[:-1], log_alpha[1:]
        ls_s, ls_t = log_sigma[:-1], log_sigma[1:]
        a, scale, c = self._step_scalars(h, la_s, la_t, ls_s, ls_t)
        b = scale[:, None] * w
        if self.prediction == "eps":
            # a step to sigma_t = 0 (h = inf, time_grid(..., final="zero")): the first-order
            # limits sigma_t expm1(h) -> alpha_t sigma_s / alpha_s (and sigma_t sqrt(expm1(2h)))
            inf_h = jnp.isposinf(h)
            lim = jnp.exp(la_t - la_s + ls_s)
            b0 = jnp.stack([-self.drift_factor * lim, 0.0 * lim, 0.0 * lim], axis=-1)
            b = jnp.where(inf_h[:, None], b0, b)
            if self.stochastic:
                c = jnp.where(inf_h, lim, c)
        return StepCoefficients(a=a, b=b, c=c)

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
