"""Reversible exponential solvers (Rex): Blasingame & Liu 2025; McCallum & Foster 2024.

An explicit Runge-Kutta scheme (or a stochastic one) applied in the Lawson variables, where the
diffusion ODE/SDE has no linear part, and made algebraically reversible by coupling two
states ``(x, xh)`` (docs/math/reversible.md):

    y_{n+1}  = zeta y_n + (1 - zeta) yh_n + Psi_h(tau_n, yh_n)
    yh_{n+1} = yh_n - Psi_{-h}(tau_{n+1}, y_{n+1})

with ``y = x / L`` (``L`` the Lawson factor) and ``tau`` the Lawson time:

=================  ==================  ================  =========================
form               time tau            factor L          right-hand side
=================  ==================  ================  =========================
ODE, data          gamma = alpha/sigma  sigma            D (data prediction)
ODE, noise         chi = sigma/alpha    alpha            eps (noise prediction)
SDE, data          rho = gamma^2        sigma^2/alpha    D, plus dW_rho
=================  ==================  ================  =========================

``inverse_step`` undoes ``step`` exactly (no fixed point): first ``yh_n``, then ``y_n``.
"""

from __future__ import annotations

import hashlib
import math
from typing import ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from .._ei import grid_values, model_time_dtype
from .base import AbstractAdaptiveSolver, AbstractReversibleSolver, AbstractSolver, check_choice

# Butcher tableaus: (c, A (strictly lower rows), b)
_TABLEAUS = {
    "euler": ((0.0,), (), (1.0,)),
    "midpoint": ((0.0, 0.5), ((0.5,),), (0.0, 1.0)),
    # Kutta's third-order method
    "rk3": ((0.0, 0.5, 1.0), ((0.5,), (-1.0, 2.0)), (1.0 / 6.0, 2.0 / 3.0, 1.0 / 6.0)),
    "rk4": (
        (0.0, 0.5, 0.5, 1.0),
        ((0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
        (1.0 / 6.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 6.0),
    ),
}
_ODE_ORDERS = {"euler": 1, "midpoint": 2, "rk3": 3, "rk4": 4}
# stochastic schemes for additive noise: stage times c; strong orders 0.5 (EM) and 1 (ShARK,
# which is also second order in the deterministic part)
_SDE_STAGES = {"euler": (0.0,), "shark": (0.0, 5.0 / 6.0)}
_SDE_ORDERS = {"euler": 1, "shark": 2}

DEFAULT_COUPLING = 0.999


class RexStages(NamedTuple):
    """Per stage of one application of the base scheme: model time, Lawson factor, alpha, sigma."""

    t: Array
    L: Array
    alpha: Array
    sigma: Array


class RexInputs(NamedTuple):
    """Row n: the Lawson step h = tau_{n+1} - tau_n, the factors L_n, L_{n+1}, the stages
    of the forward increment Psi_h(tau_n, .) and of the backward one Psi_{-h}(tau_{n+1}, .),
    and ``growth = log(tau_{n+1} / tau_n)`` (what conditions the inverse;
    docs/math/reversible.md#conditioning)."""

    h: Array
    L0: Array
    L1: Array
    fwd: RexStages
    bwd: RexStages
    growth: Array | None = None


def grid_fingerprint(ts) -> str | None:
    """A short digest of a concrete grid's times (dtype and values), recorded in a
    :class:`RexLatent` so that decoding it on another grid is an error; ``None`` for a
    traced grid (under ``jit``, where it cannot be read)."""
    if isinstance(ts, jax.core.Tracer):
        return None
    v = np.asarray(ts)
    digest = hashlib.sha256(str(v.dtype).encode() + np.ascontiguousarray(v).tobytes())
    return f"{v.shape[0] - 1} steps, t {float(v[0]):.6g} .. {float(v[-1]):.6g}, " \
        f"sha256 {digest.hexdigest()[:16]}"


class RexLatent(eqx.Module):
    """The exact latent of a Rex solver: both coupled states at ``ts[0]``.

    Returned by :func:`jadeis.encode_ode` (and :func:`jadeis.encode_sde`) with a Rex solver;
    pass it as ``x_T`` to :func:`jadeis.sample` with the same solver on the same grid to get
    ``x_0`` back (up to rounding). A pytree: differentiable, vmappable.

    Recorded (static), so that a mismatch is an error before anything runs: ``num_steps``,
    ``solver`` and ``grid``, a fingerprint of the grid's times (their dtype and values, see
    :func:`grid_fingerprint`). The fingerprint is taken when the encoding grid is concrete
    and compared when the decoding grid is concrete; under ``jit`` (a traced ``ts`` at
    either end) only the number of steps and the solver are checked. A latent built by hand
    (``grid=None``, e.g. an interpolation of two latents) is not compared either.
    """

    x: Array
    xh: Array
    num_steps: int = eqx.field(static=True)
    solver: AbstractSolver = eqx.field(static=True)
    grid: str | None = eqx.field(static=True, default=None)

    @property
    def shape(self):
        return self.x.shape

    @property
    def dtype(self):
        return self.x.dtype

    @property
    def ndim(self):
        return self.x.ndim


def amplification_budget(dtype) -> float:
    """The amplification of rounding (in nats) that exact inversion and the states rebuilt
    by :class:`jadeis.ReversibleAdjoint` may accumulate: a quarter of the dtype's digits,
    ``log(eps^-1/4)`` (``eps^-1/4`` = 8.2e3 in float64, 54 in float32), so that about three
    quarters of them survive."""
    return 0.25 * math.log(1.0 / float(jnp.finfo(dtype).eps))


def log_amplification(growth, coupling):
    """Per step: the log of the worst-case factor by which the inverse step amplifies an
    error in the state it starts from, relative to the state it returns
    (docs/math/reversible.md#conditioning): ``2 max(log(tau_{n+1}/tau_n), 0) + log(1/zeta)``
    (the data forms' Lawson variable grows with tau where the data prediction is close to
    linear in x, and the coupling's parasitic mode grows by 1/zeta)."""
    return 2.0 * jnp.maximum(growth, 0.0) - math.log(coupling)


def _check_coupling(owner, coupling):
    ok = isinstance(coupling, (int, float, np.integer, np.floating)) and not isinstance(
        coupling, (bool, np.bool_)
    )
    if ok:
        ok = 0.0 < float(coupling) <= 1.0
    if not ok:
        raise ValueError(
            f"{owner}: coupling must be a number in (0, 1] (zeta of the reversible coupling; "
            f"the inverse divides by it, so small values amplify rounding), got "
            f"coupling={coupling!r}. The default is {DEFAULT_COUPLING}."
        )


class AbstractRex(AbstractReversibleSolver):
    """Shared machinery of :class:`Rex` and :class:`SDERex`."""

    max_order: ClassVar[int] = 4
    steps_to_zero: ClassVar[bool] = False
    zero_end_reason: ClassVar[str] = (
        "its Lawson time (gamma = alpha / sigma, rho = gamma^2 for SDERex) is infinite at "
        "sigma = 0, and a last step to the clean data, x_0 = D(x, t), has no algebraic "
        "inverse, so the coupled step is not defined there"
    )
    coupling: eqx.AbstractVar[float]

    @property
    def forms_data_prediction(self) -> bool:
        return self.prediction == "data"

    def _data_form(self) -> str:
        return f"{type(self).__name__}(prediction='data') (the default)"

    # --- subclass hooks -------------------------------------------------------------
    def _stage_c(self) -> tuple:
        raise NotImplementedError

    def _time_power(self) -> float:
        """tau = exp(k * lambda): k = 1 (gamma), -1 (chi), 2 (rho)."""
        raise NotImplementedError

    def _lawson(self, log_alpha, log_sigma):
        raise NotImplementedError

    # --- inputs ---------------------------------------------------------------------
    def inputs(self, schedule, ts, dtype, *, first_index=0, to_end=True, with_error=False):
        k = self._time_power()
        values = grid_values(schedule, ts)
        lam, la, ls = values.lam, values.log_alpha, values.log_sigma
        tau = jnp.exp(k * lam)
        tau0, tau1 = tau[:-1], tau[1:]
        h = tau1 - tau0
        L = self._lawson(la, ls)
        a_g, s_g = jnp.exp(la), jnp.exp(ls)
        mdt = model_time_dtype(dtype)

        def stages(direction):
            start, end = (0, 1) if direction > 0 else (1, 0)
            t_s, L_s, a_s, s_s = [], [], [], []
            for c in self._stage_c():
                if c == 0.0 or c == 1.0:
                    j = start if c == 0.0 else end
                    sl = slice(None, -1) if j == 0 else slice(1, None)
                    t_c, L_c, a_c, s_c = ts[sl], L[sl], a_g[sl], s_g[sl]
                else:
                    base = tau0 if direction > 0 else tau1
                    tau_c = base + direction * c * h
                    t_c = schedule.t_from_log_snr(jnp.log(tau_c) / k)
                    la_c = schedule.log_alpha(t_c)
                    ls_c = schedule.log_sigma(t_c)
                    L_c, a_c, s_c = self._lawson(la_c, ls_c), jnp.exp(la_c), jnp.exp(ls_c)
                t_s.append(t_c)
                L_s.append(L_c)
                a_s.append(a_c)
                s_s.append(s_c)

            def st(vs, dt):
                return jnp.stack(vs, axis=1).astype(dt)

            return RexStages(st(t_s, mdt), st(L_s, dtype), st(a_s, dtype), st(s_s, dtype))

        def cast(v):
            return jnp.asarray(v).astype(dtype)

        return RexInputs(
            h=cast(h),
            L0=cast(L[:-1]),
            L1=cast(L[1:]),
            fwd=stages(1),
            bwd=stages(-1),
            growth=cast(k * (lam[1:] - lam[:-1])),
        )

    # --- conditioning of the inverse --------------------------------------------------
    def inverse_log_amplification(self, inp: RexInputs):
        return log_amplification(inp.growth, self.coupling)

    def log_amplification_bound(self, schedule, ts, num_steps: int) -> float | None:
        """An upper bound of the sum of :meth:`inverse_log_amplification` over a run of
        ``num_steps`` steps (at most) from ``ts[0]`` to ``ts[-1]`` (the grid, or the two end
        times of an adaptive run), or ``None`` where ``ts`` or the schedule is traced. On a
        monotone grid the positive parts of ``log(tau_{n+1}/tau_n)`` sum to those of the end
        points, whatever the steps in between."""
        leaves = jax.tree.leaves((schedule, ts))
        if any(isinstance(v, jax.core.Tracer) for v in leaves):
            return None
        with jax.ensure_compile_time_eval():
            ends = jnp.asarray(ts)[jnp.asarray([0, -1])]
            lam = np.asarray(schedule.log_snr(ends), np.float64)
        growth = self._time_power() * (lam[1] - lam[0])
        return float(2.0 * max(growth, 0.0) - num_steps * math.log(self.coupling))

    def check_inversion(self, num_steps: int, dtype, where: str) -> None:
        """Exact inversion (encoding) divides by the coupling at every step: refused where
        ``zeta^-N`` exceeds ``eps^-1/4`` of the state's dtype, the budget of
        :func:`amplification_budget` (docs/math/reversible.md#conditioning: beyond it the
        latent carries a parasitic component of relative size ``eps zeta^-N`` and the round
        trip loses digits; measured there)."""
        growth = -num_steps * math.log(self.coupling)
        limit = amplification_budget(dtype)
        if growth > limit:
            n_max = int(limit / -math.log(self.coupling)) if self.coupling < 1 else num_steps
            z_min = math.exp(-limit / num_steps)
            raise ValueError(
                f"{where}: exact inversion with coupling={self.coupling} over {num_steps} steps "
                f"amplifies rounding by coupling^-N = {math.exp(growth):.3g}, beyond "
                f"{jnp.dtype(dtype).name}'s bound eps^-1/4 = {math.exp(limit):.3g} (the inverse "
                f"divides by the coupling at every step; the round trip would lose digits). "
                f"Use coupling >= {z_min:.4g} for {num_steps} steps, or at most {n_max} steps "
                f"at this coupling (the default coupling {DEFAULT_COUPLING} is within the "
                f"bound up to N = {int(limit / -math.log(DEFAULT_COUPLING))})."
            )


    # --- state ----------------------------------------------------------------------
    def init(self, x_T):
        if isinstance(x_T, RexLatent):
            return (x_T.x, x_T.xh)
        return (x_T, x_T)

    def latent(self, state, num_steps: int, grid: str | None = None) -> RexLatent:
        return RexLatent(state[0], state[1], num_steps, self, grid)

    @property
    def evals_per_step(self) -> int:
        return 2 * len(self._stage_c())

    def output(self, state):
        return state[0]

    def _rhs(self, model, stages: RexStages, i, Y):
        """The right-hand side at stage i: D or eps at x = L Y."""
        x = stages.L[i] * Y
        eps = model(x, stages.t[i])
        if self.prediction == "noise":
            return eps
        return self.data_prediction(x, eps, stages.alpha[i], stages.sigma[i])

    def psi(self, model, stages: RexStages, h, y, xi, sign):
        """The increment of y of one application of the base scheme with step ``h``
        (``sign = -1``: the backward increment on the same Brownian path)."""
        raise NotImplementedError

    def step(self, model, inp: RexInputs, state, xi):
        x, xh = state
        z = self.coupling
        y, yh = x / inp.L0, xh / inp.L0
        inc, err = self._increment(model, inp.fwd, inp.h, yh, xi, 1.0)
        y1 = z * y + (1.0 - z) * yh + inc
        back, err_back = self._increment(model, inp.bwd, -inp.h, y1, xi, -1.0)
        yh1 = yh - back
        if err is not None:
            # both increments of the coupled step carry a local error: the backward one
            # enters yh, and through it the next step's y (docs/math/adaptive.md#embedded-estimates)
            err = inp.L1 * (jnp.abs(err) + jnp.abs(err_back))
        return (inp.L1 * y1, inp.L1 * yh1), err

    def _increment(self, model, stages: RexStages, h, y, xi, sign):
        """The increment ``Psi_h`` of the base scheme at ``y`` and its error estimate (or
        None)."""
        return self.psi(model, stages, h, y, xi, sign), None

    def inverse_step(self, model, inp: RexInputs, state_next, xi):
        """The state at ``ts[i]`` from the state at ``ts[i+1]``: the algebraic inverse of
        :meth:`step` (exact up to rounding; docs/math/reversible.md (5.6))."""
        x1, xh1 = state_next
        z = self.coupling
        y1, yh1 = x1 / inp.L1, xh1 / inp.L1
        yh = yh1 + self.psi(model, inp.bwd, -inp.h, y1, xi, -1.0)
        y = (y1 - (1.0 - z) * yh - self.psi(model, inp.fwd, inp.h, yh, xi, 1.0)) / z
        return (inp.L0 * y, inp.L0 * yh)

    def base_step(self, model, inp: RexInputs, x, xi=None):
        """One uncoupled step of the base scheme in the Lawson variables (for tests: with
        ``scheme="euler"`` this is DDIM)."""
        y = x / inp.L0
        return inp.L1 * (y + self.psi(model, inp.fwd, inp.h, y, xi, 1.0))


class Rex(AbstractRex, AbstractAdaptiveSolver):
    r"""Reversible exponential solver for the probability-flow ODE (Rex, ODE form).

    An explicit Runge-Kutta scheme applied in the Lawson variables (data form: time
    $\gamma = \alpha/\sigma$, state $x/\sigma$; noise form: time $\chi = \sigma/\alpha$,
    state $x/\alpha$), made algebraically reversible with McCallum & Foster's coupling of
    two states ``(x, xh)`` (docs/math/reversible.md). Each step costs two applications of
    the base scheme (2, 4, 6 or 8 model evaluations).

    - exact inversion: :func:`jadeis.encode_ode` with this solver returns a
      :class:`RexLatent` that :func:`jadeis.sample` maps back to ``x_0`` up to rounding;
    - exact gradients in memory independent of N with :class:`jadeis.ReversibleAdjoint`.

    **Arguments:**

    - `scheme`: the base scheme, ``"euler"`` (order 1; it is DDIM), ``"midpoint"`` (2),
      ``"rk3"`` (Kutta, 3) or ``"rk4"`` (classic, 4).
    - `prediction`: ``"data"`` (default) or ``"noise"``: which Lawson variables.
    - `coupling`: zeta in (0, 1]. Default 0.999 (docs/math/reversible.md, "choice of
      coupling": zeta = 1 leaves a parasitic mode undamped; the inverse divides by zeta, so
      small zeta amplifies rounding in inversion and in the reconstructed states).

    **Example:**

    ```python
    >>> import jadeis
    >>> jadeis.Rex().order, jadeis.Rex(scheme="rk4").order
    (2, 4)

    ```
    """

    scheme: str
    prediction: str
    coupling: float
    order: int
    stochastic: ClassVar[bool] = False

    def __init__(self, scheme: str = "midpoint", prediction: str = "data",
                 coupling: float = DEFAULT_COUPLING, *, threshold=None):
        check_choice("Rex", "scheme", scheme, tuple(_TABLEAUS))
        check_choice("Rex", "prediction", prediction, ("data", "noise"))
        _check_coupling("Rex", coupling)
        self.scheme = scheme
        self.prediction = prediction
        self.coupling = float(coupling)
        self.order = _ODE_ORDERS[scheme]
        self.threshold = threshold

    def _stage_c(self):
        return _TABLEAUS[self.scheme][0]

    def _time_power(self):
        return 1.0 if self.prediction == "data" else -1.0

    def _lawson(self, log_alpha, log_sigma):
        return jnp.exp(log_sigma if self.prediction == "data" else log_alpha)

    @property
    def error_order(self) -> int | None:
        """The order of the embedded error estimate's leading term (adaptive steps): midpoint
        is paired with Euler (2), rk3 and rk4 with the midpoint rule through their second
        stage (3). Euler has no embedded estimate (``None``)."""
        if self.scheme == "euler":
            return None
        return 2 if self.scheme == "midpoint" else 3

    def _increment(self, model, stages, h, y, xi, sign):
        """An increment and its error estimate: the base scheme minus its embedded
        lower-order rule (Euler for midpoint, the midpoint rule for rk3/rk4), which share the
        stages."""
        ks = self._stages(model, stages, h, y)
        inc = self._combine(h, ks)
        if self.scheme == "euler":
            return inc, None
        low = h * (ks[0] if self.scheme == "midpoint" else ks[1])
        return inc, inc - low

    def check_adaptive(self, where: str) -> None:
        if self.prediction == "noise":
            raise ValueError(
                f"{where}: Rex(prediction='noise') cannot take adaptive steps: in the noise "
                f"form the solution x / alpha shrinks where the noise is high, and the "
                f"coupling's parasitic mode grows relative to it by zeta (chi_n / chi_(n+1))^2 "
                f"per step, which no local error estimate sees; the large steps an adaptive "
                f"controller takes there let it grow (measured: 21 at rtol=atol=1e-3, 3e-2 at "
                f"1e-5 on the Gaussian oracle). Use prediction='data' (the default), or a "
                f"fixed grid."
            )

    def _stages(self, model, stages, h, y):
        _, A, b = _TABLEAUS[self.scheme]
        ks = []
        for i in range(len(b)):
            Y = y
            if i > 0:
                for j, a_ij in enumerate(A[i - 1]):
                    if a_ij != 0.0:
                        Y = Y + (a_ij * h) * ks[j]
            ks.append(self._rhs(model, stages, i, Y))
        return ks

    def _combine(self, h, ks):
        _, _, b = _TABLEAUS[self.scheme]
        out = None
        for b_i, k in zip(b, ks):
            if b_i != 0.0:
                term = (b_i * h) * k
                out = term if out is None else out + term
        return out

    def psi(self, model, stages, h, y, xi, sign):
        return self._combine(h, self._stages(model, stages, h, y))


class SDERex(AbstractRex):
    r"""Reversible exponential solver for the reverse diffusion SDE (Rex, SDE form).

    In the data-prediction Lawson variables $y = (\alpha/\sigma^2) x$ and time
    $\rho = (\alpha/\sigma)^2$ the reverse SDE is $dy = D\,d\rho + dW_\rho$ for every
    schedule (docs/math/reversible.md (5.10)): unit additive noise. The base scheme is
    Euler-Maruyama (``scheme="euler"``; uncoupled it is SDE-DPM-Solver++(1)) or ShARK
    (``scheme="shark"``, Foster et al.: strong order 1 for additive noise, two model
    evaluations, uses the Brownian increment W and its space-time Levy area H), coupled as
    :class:`Rex`. Step i draws its Brownian increments from ``fold_in(key, i)`` (or row i of
    ``noise``: standard normals of shape ``x.shape`` for Euler-Maruyama, ``(2,) + x.shape``
    for ShARK: W / sqrt(h) and H / sqrt(h / 12)), so the backward pass of
    :class:`jadeis.ReversibleAdjoint` and encoding see exactly the increments of sampling.
    Needs ``key=`` or ``noise=`` in :func:`jadeis.sample`.

    **Arguments:** `scheme` (``"euler"`` or ``"shark"``, default ``"shark"``), `coupling`
    (as :class:`Rex`).

    **Example:**

    ```python
    >>> import jadeis
    >>> jadeis.SDERex().stochastic
    True

    ```
    """

    scheme: str
    coupling: float
    order: int
    stochastic: ClassVar[bool] = True
    prediction: ClassVar[str] = "data"

    def __init__(
        self, scheme: str = "shark", coupling: float = DEFAULT_COUPLING, *, threshold=None
    ):
        check_choice("SDERex", "scheme", scheme, tuple(_SDE_STAGES))
        _check_coupling("SDERex", coupling)
        self.scheme = scheme
        self.coupling = float(coupling)
        self.order = _SDE_ORDERS[scheme]
        self.threshold = threshold

    def noise_shape(self, shape):
        return (2,) + tuple(shape) if self.scheme == "shark" else tuple(shape)

    def _stage_c(self):
        return _SDE_STAGES[self.scheme]

    def _time_power(self):
        return 2.0

    def _lawson(self, log_alpha, log_sigma):
        return jnp.exp(2.0 * log_sigma - log_alpha)

    def psi(self, model, stages, h, y, xi, sign):
        # h > 0 forward; the backward increment (h < 0) runs the same path reversed:
        # W -> -W, while the space-time Levy area H is unchanged (docs/math/reversible.md)
        dt = jnp.abs(h)
        if self.scheme == "euler":
            W = sign * jnp.sqrt(dt) * xi
            return h * self._rhs(model, stages, 0, y) + W
        W = sign * jnp.sqrt(dt) * xi[0]
        H = jnp.sqrt(dt / 12.0) * xi[1]
        f1 = self._rhs(model, stages, 0, y + H)
        Z2 = y + (5.0 / 6.0) * h * f1 + (5.0 / 6.0) * W + H
        f2 = self._rhs(model, stages, 1, Z2)
        return h * (0.4 * f1 + 0.6 * f2) + W
