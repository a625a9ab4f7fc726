"""The solver interface: a solver owns its step, and declares what else it can do.

A solver is a small immutable object, and nothing else in jadeis knows how it steps:

- ``inputs(schedule, ts, dtype, ...)``: every per-step quantity that depends only on the
  schedule and the time grid (times, coefficients), as a pytree of arrays with a leading
  axis of N (one row per step), computed once before the loop. It is differentiable, so
  gradients reach ``ts`` and the schedule's parameters through it. ``step_inputs`` is the
  row of one step of an adaptive grid, from the same formulas.
- ``init(x_T)``: the solver state (a pytree: the sample plus any history) at ``ts[0]``.
- ``step(model, inp, state, xi) -> (state, error)``: one step from ``ts[i]`` to
  ``ts[i+1]``. ``model(x, t)`` is the noise prediction (conditioning and parameters bound);
  ``inp`` is row i of ``inputs``; ``xi`` the step's standard Gaussian noise (``None`` for
  ODE solvers). ``error`` is the step's local error estimate where the solver has one
  (:class:`AbstractAdaptiveSolver`, with rows built for an adaptive grid), else ``None``.
- ``output(state)``: the sample held by a state.

Capabilities are declared by base classes, never probed:

- :class:`AbstractAdaptiveSolver`: the step can return an embedded error estimate (adaptive
  step-size controllers need one); ``error_order`` says its order, or ``None`` for a
  configuration without one.
- :class:`AbstractReversibleSolver`: ``inverse_step`` undoes ``step`` algebraically (exact
  encoding, :class:`jadeis.ReversibleAdjoint`).
- :class:`AbstractLinearMultistepSolver`: x' = a x + sum_j b_j m_{i-j} + c xi, with the
  coefficients public (the fast discrete adjoint, Cycle-SDE encoding).

The sampling loop, encoding, every gradient strategy and every step-size controller call
only these methods (docs/math/samplers.md).
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from .._ei import (
    GridValues,
    add_warmup_correction,
    alpha_of,
    cast,
    grid_values,
    model_time_dtype,
    multistep_weights,
    resolve_warmup,
    shifted,
    step_orders,
)
from .._schedule import AbstractSchedule
from .._threshold import AbstractThreshold


def as_int(value):
    """A converter for integer fields: NumPy and 0-d JAX integers become Python ints (so
    they behave as static numbers everywhere); anything else is left for the check."""
    if isinstance(value, bool):
        return value
    if isinstance(value, np.integer):
        return int(value)
    if getattr(value, "shape", None) == () and np.issubdtype(
        getattr(value, "dtype", float), np.integer
    ):
        try:
            return int(value)
        except (TypeError, jax.errors.ConcretizationTypeError):
            return value
    return value


def check_int(owner: str, name: str, value, lo: int, hi: int | None = None) -> int:
    """``value`` as a Python int in [lo, hi]; numpy/JAX integers accepted, bools refused."""
    value = as_int(value)
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok:
        ok = value >= lo and (hi is None or value <= hi)
    if not ok:
        if hi is not None and hi - lo <= 3:
            rng = " or ".join(str(v) for v in range(lo, hi + 1))
        else:
            rng = f"an int from {lo} to {hi}" if hi is not None else f"an int >= {lo}"
        raise ValueError(f"{owner}: {name} must be {rng}, got {name}={value!r}.")
    return value


def check_choice(owner: str, name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        opts = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{owner}: {name} must be one of {opts}, got {name}={value!r}.")


def check_bool(owner: str, name: str, value) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{owner}: {name} must be True or False, got {name}={value!r}.")


def row(rows, i):
    """Row ``i`` of a pytree of per-step arrays."""
    return jax.tree.map(lambda v: v[i], rows)


class AbstractSolver(eqx.Module):
    """Base class of the samplers (see the module documentation).

    ``order`` is the solver's order; ``stochastic`` whether it samples the diffusion SDE
    (and so needs a key or noise). A new solver is one file with one subclass; declaring
    :class:`AbstractAdaptiveSolver` or :class:`AbstractReversibleSolver` as a base gives it
    adaptive step sizes or exact inversion everywhere.
    """

    order: eqx.AbstractVar[int]
    #: a map applied to the data prediction x_0 wherever the step forms it
    #: (:class:`jadeis.ClipX0`, :class:`jadeis.DynamicThreshold`); data-prediction solvers only
    threshold: AbstractThreshold | None = eqx.field(default=None, kw_only=True)
    stochastic: ClassVar[bool]
    max_order: ClassVar[int] = 3
    #: the step's first model evaluation is at the state's own sample and the step's start
    #: time (``model(output(state), inp.t)``): an adaptive loop reuses it after a rejection
    first_evaluation_at_state: ClassVar[bool] = False
    #: a step may end at t = 0 (sigma = 0, ``time_grid(..., final="zero")``), taken in its
    #: first-order limit x_0 = D(x, s); solvers that cannot say why in ``zero_end_reason``
    steps_to_zero: ClassVar[bool] = True
    zero_end_reason: ClassVar[str] = ""

    def __check_init__(self):
        name = type(self).__name__
        check_int(name, "order", self.order, 1, self.max_order)
        if self.threshold is not None:
            if not isinstance(self.threshold, AbstractThreshold):
                raise ValueError(
                    f"{name}: threshold must be jadeis.ClipX0(lo, hi) or "
                    f"jadeis.DynamicThreshold(ratio, max_value) (or None), got "
                    f"{self.threshold!r:.80}."
                )
            if not self.forms_data_prediction:
                raise ValueError(
                    f"{name}: threshold= clips the data prediction x_0, and {name} steps "
                    f"with the noise prediction (it never forms x_0, and the noise a clipped "
                    f"x_0 implies is a different model). Use {self._data_form()}."
                )

    @property
    def forms_data_prediction(self) -> bool:
        """Whether the step forms the data prediction x_0 from the model's noise prediction
        (so that ``threshold`` applies to it)."""
        return False

    def _data_form(self) -> str:
        """The data-prediction solver to use instead (for the error of a threshold)."""
        return (
            "a data-prediction solver: DPMSolverPP, SDEDPMSolverPP, UniPC, "
            "SinglestepDPMSolver(prediction='data') or Rex(prediction='data')"
        )

    def data_prediction(self, x, eps, alpha, sigma):
        r"""$\hat x_0 = (x - \sigma \hat\epsilon) / \alpha$, thresholded (``threshold``)."""
        x0 = jax.tree.map(lambda x, e: (x - sigma * e) / alpha, x, eps)
        return x0 if self.threshold is None else self.threshold(x0)

    def effective_noise(self, x, eps, alpha, sigma):
        """The noise prediction the step effectively uses: ``eps`` itself, or, with a
        ``threshold``, the noise that the thresholded data prediction implies,
        ``(x - alpha x0) / sigma`` (the model of the ODE the solver discretises; what a
        continuous adjoint differentiates)."""
        if self.threshold is None:
            return eps
        x0 = self.data_prediction(x, eps, alpha, sigma)
        return jax.tree.map(lambda x, d: (x - alpha * d) / sigma, x, x0)

    @abc.abstractmethod
    def inputs(
        self,
        schedule: AbstractSchedule,
        ts: Array,
        dtype,
        *,
        first_index=0,
        to_end: bool = True,
        with_error: bool = False,
    ) -> Any:
        """Per-step inputs (leading axis N) on the descending grid ``ts`` (N + 1 times),
        cast to the state's ``dtype``.

        ``first_index`` is the index of the grid's first step among the steps of the whole
        sampling run (an int, or a traced int for a step of an adaptive grid): multistep
        methods warm up by it. ``to_end``: the grid ends where sampling ends (methods that
        lower their order on the final steps do so only then). ``with_error``: the rows
        also carry what the step needs for its error estimate.
        """

    @abc.abstractmethod
    def init(self, x_T) -> Any:
        """The solver state at ``ts[0]``."""

    @abc.abstractmethod
    def step(self, model, inp, state, xi) -> tuple[Any, Any]:
        """One step: ``(state at ts[i+1], error estimate or None)``."""

    def output(self, state):
        """The sample held by ``state``."""
        return state[0]

    def noise_shape(self, shape: tuple) -> tuple:
        """Shape of the standard Gaussian noise ``xi`` of one step for a sample of ``shape``
        (SDE solvers that need more than one draw per step, such as ShARK, override it)."""
        return tuple(shape)

    @property
    def num_history(self) -> int:
        """How many grid points before the current one a step's inputs depend on."""
        return 0

    @property
    def evals_per_step(self) -> int:
        """Model evaluations per step."""
        return 1

    def step_inputs(self, schedule: AbstractSchedule, times: Array, index, dtype):
        """The inputs of one step of an adaptive grid: ``times`` holds the ``num_history``
        previous accepted times (the first time repeated where there are fewer), the current
        time and the next one; ``index`` is the step's index (traced). The same formulas as
        :meth:`inputs` (no lower order at the end: the end of an adaptive grid is not known
        in advance), with what the error estimate needs."""
        rows = self.inputs(
            schedule,
            times,
            dtype,
            first_index=index - self.num_history,
            to_end=False,
            with_error=True,
        )
        return row(rows, -1)


class AbstractAdaptiveSolver(AbstractSolver):
    """A solver whose step returns an embedded error estimate (with inputs built
    ``with_error``), so that an adaptive step-size controller can choose its steps.

    ``error_order``: the order of the estimate's leading term (the controller's exponent),
    or ``None`` where this configuration has no estimate (e.g. order 1).
    ``unestimated_steps``: how many first steps carry no estimate (a multistep method's
    first step has no history to compare with): they are accepted with the step size
    unchanged.
    """

    unestimated_steps: ClassVar[int] = 0
    #: whether the estimate extrapolates from the model outputs at previous steps (a
    #: multistep method) rather than evaluating the model inside the step: then it cannot
    #: see a change of the model output that starts after the last step
    extrapolated_error: ClassVar[bool] = False

    @property
    @abc.abstractmethod
    def error_order(self) -> int | None:
        """The order of the local error estimate, or ``None`` if there is none."""

    def check_adaptive(self, where: str) -> None:
        """Raise ``ValueError`` for a configuration that has an error estimate but cannot
        take adaptive steps to its tolerance (with the reason)."""


class AbstractReversibleSolver(AbstractSolver):
    """A solver with an algebraic inverse: ``inverse_step`` maps the state after a step back
    to the state before it (exact up to rounding), so sampling can be inverted exactly
    (:func:`jadeis.encode_ode`) and :class:`jadeis.ReversibleAdjoint` rebuilds the states in
    the backward pass instead of storing them."""

    @abc.abstractmethod
    def inverse_step(self, model, inp, state_next, xi):
        """The state at ``ts[i]`` from the state at ``ts[i+1]``."""

    @abc.abstractmethod
    def latent(self, state, num_steps: int, grid: str | None = None) -> Any:
        """The object that stands for ``state`` at ``ts[0]`` as an ``x_T`` (exact encoding);
        ``grid``: a fingerprint of the grid it was encoded on (or ``None``)."""

    @abc.abstractmethod
    def inverse_log_amplification(self, inp) -> Array:
        """Per step (row ``inp``): the log of the worst-case factor by which
        ``inverse_step`` amplifies an error in ``state_next``, relative to the state it
        returns. :class:`jadeis.ReversibleAdjoint` keeps an exact state wherever the
        amplification accumulated since the last one would exceed its budget."""

    def log_amplification_bound(self, schedule, ts, num_steps: int) -> float | None:
        """An upper bound of the summed :meth:`inverse_log_amplification` of a run of at most
        ``num_steps`` steps on ``ts`` (``None``: unknown, e.g. under ``jit``)."""
        return None

    def check_inversion(self, num_steps: int, dtype, where: str) -> None:
        """Raise ``ValueError`` where exact inversion over ``num_steps`` steps in ``dtype``
        is too ill-conditioned to return the stated accuracy."""


class StepCoefficients(NamedTuple):
    """Per-step coefficients of a linear multistep sampler on a grid of N steps."""

    a: Array  # (N,) coefficient of x_i
    b: Array  # (N, order) coefficients of m_i, m_{i-1}, ...
    c: Array  # (N,) coefficient of the Gaussian noise xi_i (zero for ODE samplers)


class LinearStepInputs(NamedTuple):
    """Row i: the model's time, the step coefficients, alpha and sigma at ``ts[i]``, and
    (rows built ``with_error``) the weights of the error estimate."""

    t: Array
    a: Array
    b: Array  # (order,): the coefficients of m_i, ..., m_{i-order+1}
    c: Array
    alpha: Array
    sigma: Array
    e: Array | None = None  # (order,): order-k minus order-(k-1) weights


class AbstractLinearMultistepSolver(AbstractAdaptiveSolver):
    """Linear multistep exponential integrators: x' = a x + sum_j b_j m_{i-j} + c xi.

    Subclasses give ``prediction`` (``"eps"`` or ``"data"``: what ``m`` is) and
    ``coefficients``. The state is ``(x, (m_{i-1}, ..., m_{i-k+1}))``. The error estimate
    (ODE, order >= 2) is the difference of the order-k and order-(k-1) weights applied to
    the same model outputs: no extra model evaluation.
    """

    prediction: ClassVar[str]
    unestimated_steps: ClassVar[int] = 1
    extrapolated_error: ClassVar[bool] = True
    first_evaluation_at_state: ClassVar[bool] = True

    @abc.abstractmethod
    def coefficients(
        self, schedule: AbstractSchedule, ts: Array, *, first_index=0, to_end: bool = True
    ) -> StepCoefficients:
        """Per-step coefficients on the descending grid ``ts`` (length N + 1)."""

    @property
    def num_history(self) -> int:
        return self.order - 1

    @property
    def error_order(self) -> int | None:
        if self.stochastic or self.order < 2:
            return None
        return self.order  # order-k minus order-(k-1) weights: O(h^k)

    def _rows(self, schedule, values: GridValues, first_index, to_end, with_error):
        """``(coefficients, error weights or None)`` from the schedule on the grid."""
        co = self.coefficients(schedule, values.t, first_index=first_index, to_end=to_end)
        return co, None

    def inputs(self, schedule, ts, dtype, *, first_index=0, to_end=True, with_error=False):
        values = grid_values(schedule, ts)
        co, err = self._rows(schedule, values, first_index, to_end, with_error)
        alpha = alpha_of(schedule, values)[:-1]
        sigma = schedule.sigma(ts[:-1])
        return LinearStepInputs(
            t=cast(ts[:-1], model_time_dtype(dtype)),
            a=cast(co.a, dtype),
            # only the columns of the order used (b[:, q] weighs m_{i-q})
            b=cast(co.b[:, : self.order], dtype),
            c=cast(co.c, dtype),
            alpha=cast(alpha, dtype),
            sigma=cast(sigma, dtype),
            e=None if err is None else cast(err[:, : self.order], dtype),
        )

    def init(self, x_T):
        zeros = lambda: jax.tree.map(jnp.zeros_like, x_T)  # noqa: E731
        return (x_T, tuple(zeros() for _ in range(self.order - 1)))

    @property
    def forms_data_prediction(self) -> bool:
        return self.prediction == "data"

    def convert(self, eps, x, alpha, sigma):
        """The model output in this solver's parameterisation (the data prediction
        thresholded by ``threshold``, if any)."""
        if self.prediction == "data":
            return self.data_prediction(x, eps, alpha, sigma)
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

    def error(self, inp: LinearStepInputs, m, hist):
        """The error estimate: the error weights applied to the model outputs."""
        err = jax.tree.map(lambda m: inp.e[0] * m, m)
        for j, h in enumerate(hist):
            err = jax.tree.map(lambda v, h, j=j: v + inp.e[j + 1] * h, err, h)
        return err

    def step(self, model, inp, state, xi):
        x, hist = state
        m = self.model_output(model, inp, x)
        x_next = self.combine(inp, x, m, hist, xi if self.stochastic else None)
        err = None if inp.e is None else self.error(inp, m, hist)
        return (x_next, ((m,) + hist)[: self.order - 1]), err

    def noise_of_step(self, model, inp, state, x_next):
        """The noise ``xi`` with which ``step`` maps ``state`` to ``x_next`` (SDE solvers),
        and the state after that step."""
        x, hist = state
        m = self.model_output(model, inp, x)
        xi = jax.tree.map(
            lambda xn, v: (xn - v) / inp.c, x_next, self.combine(inp, x, m, hist, None)
        )
        return xi, (x_next, ((m,) + hist)[: self.order - 1])


class AbstractExponentialSolver(AbstractLinearMultistepSolver):
    """Shared implementation: a linear part exp(-(lambda_t - lambda_s) * damping) times
    the schedule ratio, plus ``scale * int exp(kappa (l - lambda_t)) m(l) dl``."""

    lower_order_final: eqx.AbstractVar[bool]
    kappa: ClassVar[float]
    drift_factor: ClassVar[float] = 1.0

    def __check_init__(self):
        check_bool(type(self).__name__, "lower_order_final", self.lower_order_final)

    def _midpoint(self) -> bool:
        return False

    def _corrected_warmup(self) -> bool:
        """Whether the second step corrects the first-order first step (see
        :func:`jadeis._ei.resolve_warmup`); solvers with a ``warmup`` option override this."""
        return False

    def coefficients(self, schedule, ts, *, first_index=0, to_end=True):
        co, _ = self._weights(grid_values(schedule, ts), first_index, to_end, False)
        return co

    def _rows(self, schedule, values, first_index, to_end, with_error):
        return self._weights(values, first_index, to_end, with_error)

    def _weights(self, values: GridValues, first_index, to_end, with_error):
        n = values.t.shape[0] - 1
        if isinstance(first_index, int):
            index = first_index + np.arange(n)
        else:
            index = first_index + jnp.arange(n, dtype=jnp.asarray(first_index).dtype)
        # (a window that ends where sampling ends has first_index + n steps before its end)
        total = first_index + n if (to_end and isinstance(first_index, int)) else None
        orders = step_orders(self.order, index, total, self.lower_order_final)
        # within the grid given, a row has only the points before it as history: rows whose
        # history would reach before the grid's start (a window of a longer grid: they are
        # not used) drop to the order they can have, so no weight divides by zero (not even
        # in the gradient of an unused row)
        if isinstance(orders, np.ndarray):
            orders = np.minimum(orders, np.arange(1, n + 1))
        else:
            orders = jnp.minimum(orders, jnp.arange(1, n + 1, dtype=orders.dtype))
        lam = values.lam
        lam_s, lam_t = lam[:-1], lam[1:]
        lam_1, lam_2 = shifted(lam_s, 1), shifted(lam_s, 2)

        def weights(interp_orders):
            w = multistep_weights(
                lam_t, lam_s, lam_1, lam_2, self.kappa, interp_orders, midpoint=self._midpoint()
            )
            if self._corrected_warmup():
                # the correction of the first step belongs to step 1 whatever order is
                # interpolated (so it cancels in the error estimate's difference)
                w = add_warmup_correction(w, index, orders, lam_t, lam_s, lam_1, self.kappa)
            return w

        w = weights(orders)
        h = lam_t - lam_s
        la, ls = values.log_alpha, values.log_sigma
        a, scale, c = self._step_scalars(h, la[:-1], la[1:], ls[:-1], ls[1:])
        b = scale[:, None] * w
        if self.prediction == "eps":
            # a step to sigma_t = 0 (h = inf, time_grid(..., final="zero")): the first-order
            # limits sigma_t expm1(h) -> alpha_t sigma_s / alpha_s (and sigma_t sqrt(expm1(2h)))
            inf_h = jnp.isposinf(h)
            lim = jnp.exp(la[1:] - la[:-1] + ls[:-1])
            b0 = jnp.stack([-self.drift_factor * lim, 0.0 * lim, 0.0 * lim], axis=-1)
            b = jnp.where(inf_h[:, None], b0, b)
            if self.stochastic:
                c = jnp.where(inf_h, lim, c)
        err = None
        if with_error and self.error_order is not None:
            # the order-(k-1) weights on the same points
            if isinstance(orders, np.ndarray):
                low = weights(np.maximum(orders - 1, 1))
            else:
                low = weights(jnp.maximum(orders - 1, 1))
            err = scale[:, None] * (w - low)
            # the first step has no lower-order solution (it is first order): no estimate
            err = jnp.where((jnp.asarray(orders) >= 2)[:, None], err, 0.0 * err)
        return StepCoefficients(a=a, b=b, c=c), err

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


__all__ = [
    "AbstractAdaptiveSolver",
    "AbstractDataSolver",
    "AbstractExponentialSolver",
    "AbstractLinearMultistepSolver",
    "AbstractNoiseSolver",
    "AbstractReversibleSolver",
    "AbstractSolver",
    "LinearStepInputs",
    "StepCoefficients",
    "check_bool",
    "check_choice",
    "check_int",
    "resolve_warmup",
    "row",
]
