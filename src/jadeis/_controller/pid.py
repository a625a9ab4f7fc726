"""Adaptive step sizes in log-SNR with diffrax's PID formula."""

from __future__ import annotations

import math
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from .._solver.base import AbstractAdaptiveSolver, as_int, check_int
from .base import AbstractAdaptiveController


def _check_number(name, value, lo, hi=None, *, open_lo=False):
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )
    if ok:
        v = float(value)
        ok = math.isfinite(v) and (v > lo if open_lo else v >= lo) and (hi is None or v <= hi)
    if not ok:
        rng = f"> {lo}" if open_lo else f">= {lo}"
        if hi is not None:
            rng += f" and <= {hi}"
        raise ValueError(
            f"PIDController: {name} must be a finite number {rng}, got {name}={value!r}."
        )


class PIDState(NamedTuple):
    """The controller's state: the current time and log-SNR, the next step size (its
    magnitude in log-SNR), the inverse scaled errors of the last two accepted steps, and the
    end point (time, log-SNR) with the direction of integration (+1 sampling, -1 encoding),
    and the step size below which the steps have collapsed."""

    t: Array
    lam: Array
    h: Array
    e1: Array
    e2: Array
    t_end: Array
    lam_end: Array
    direction: Array
    h_min: Array


class PIDController(AbstractAdaptiveController):
    r"""Adaptive step sizes in log-SNR for a solver with an embedded error estimate, with the
    PID formula and defaults of ``diffrax.PIDController`` (docs/math/adaptive.md).

    A step of size ``h`` in ``lambda = log(alpha/sigma)`` is accepted when the RMS over the
    whole state of ``error / (atol + rtol * max(|x_s|, |x_t|))`` is below 1 (one grid for
    the whole batch), and the next step is
    ``h * clip(safety * E_n^{-b1} E_{n-1}^{-b2} E_{n-2}^{-b3})`` with
    ``b1 = (pcoeff + icoeff + dcoeff) / k``, ``b2 = -(pcoeff + 2 dcoeff) / k``,
    ``b3 = dcoeff / k`` (``k`` the estimate's order). The controller's decisions are not
    differentiated: every gradient strategy differentiates the accepted steps with the grid
    held fixed (as diffrax does), so gradients with respect to ``ts`` or the schedule's
    parameters are refused.

    Pass it as ``controller=`` with ``ts`` holding the two end times ``[t_T, t_0]``, and a
    solver with an error estimate: :class:`jadeis.DPMSolverPP` or :class:`jadeis.DPMSolver`
    of order 2 or 3 (the order-k and order-(k-1) multistep weights on the same model
    outputs), :class:`jadeis.SinglestepDPMSolver` of order 2 or 3 (the DPM-Solver-12/23
    pairs) or :class:`jadeis.Rex` (``scheme="midpoint"``, ``"rk3"`` or ``"rk4"``). The loop
    makes at most ``max_steps`` attempts (accepted or rejected); not reaching ``ts[-1]``
    raises at run time.

    **Arguments:**

    - `rtol`, `atol`: relative and absolute tolerances on the state.
    - `pcoeff`, `icoeff`, `dcoeff`: PID coefficients (default: an I-controller; ``0.4, 0.3,
      0`` is a common PI choice).
    - `safety`, `factormin`, `factormax`: as in diffrax.
    - `dlambda0`: the first step in log-SNR (default: 1/16 of the span; 1/64 for solvers
      whose first step has no estimate, such as the multistep ones).
    - `max_steps`: the bound on attempts; also the size of the buffers that gradients keep.

    **Example:**

    ```python
    >>> import jax.numpy as jnp
    >>> import jadeis
    >>> sch = jadeis.VPLinear()
    >>> sol = jadeis.solve(lambda p, x, t, z: p * x, 0.5, jnp.ones((2, 3)), schedule=sch,
    ...                    ts=jnp.array([1.0, 1e-3]), solver=jadeis.DPMSolverPP(order=3),
    ...                    controller=jadeis.PIDController(rtol=1e-4, atol=1e-4))
    >>> sol.x_0.shape, int(sol.stats.num_steps) > 1
    ((2, 3), True)

    ```
    """

    rtol: float = 1e-3
    atol: float = 1e-3
    pcoeff: float = 0.0
    icoeff: float = 1.0
    dcoeff: float = 0.0
    safety: float = 0.9
    factormin: float = 0.2
    factormax: float = 10.0
    dlambda0: float | None = None
    max_steps: int = eqx.field(default=256, converter=as_int)

    def __check_init__(self):
        _check_number("rtol", self.rtol, 0.0)
        _check_number("atol", self.atol, 0.0)
        if float(self.rtol) == 0.0 and float(self.atol) == 0.0:
            raise ValueError("PIDController: rtol and atol cannot both be 0.")
        for name in ("pcoeff", "icoeff", "dcoeff"):
            _check_number(name, getattr(self, name), 0.0)
        _check_number("safety", self.safety, 0.0, 1.0, open_lo=True)
        _check_number("factormin", self.factormin, 0.0, 1.0, open_lo=True)
        _check_number("factormax", self.factormax, 1.0)
        if self.dlambda0 is not None:
            _check_number("dlambda0", self.dlambda0, 0.0, open_lo=True)
        check_int("PIDController", "max_steps", self.max_steps, 1)

    def check(self, solver, ts, schedule, where):
        self.check_solver(solver, where)
        if ts.shape[0] != 2:
            raise ValueError(
                f"{where}: with an adaptive controller, ts must hold the two end times "
                f"[t_T, t_0] (the controller chooses the steps in between), got {ts.shape[0]} "
                f"times."
            )
        concrete = not any(isinstance(v, jax.core.Tracer) for v in jax.tree.leaves((ts, schedule)))
        if concrete:
            with jax.ensure_compile_time_eval():
                lam = np.asarray(schedule.log_snr(jnp.asarray(ts)), np.float64)
            if not np.all(np.isfinite(lam)):
                raise ValueError(
                    f"{where}: an adaptive controller steps in log-SNR and needs finite log-SNRs "
                    f"at both end times; ts[-1] with sigma = 0 (time_grid(..., final='zero')) "
                    f"has an infinite one. End at schedule.t_min instead."
                )

    @staticmethod
    def check_solver(solver, where):
        """The solver must have an embedded error estimate (ODE)."""
        name = type(solver).__name__
        if not isinstance(solver, AbstractAdaptiveSolver) or solver.stochastic:
            raise ValueError(
                f"{where}: {name} has no embedded error estimate, so it cannot take adaptive "
                f"steps; use jadeis.DPMSolverPP(order=2 or 3), jadeis.SinglestepDPMSolver(order=2 "
                f"or 3) or jadeis.Rex(scheme='midpoint', 'rk3' or 'rk4')"
                + (
                    " (an SDE step would need a Brownian path that can be queried on any interval)."
                    if solver.stochastic
                    else "."
                )
            )
        if solver.error_order is None:
            raise ValueError(
                f"{where}: {solver!r} has no embedded lower-order solution (order 1 or Euler), "
                f"so it has no error estimate; use order 2 or 3 (Rex: scheme='midpoint', 'rk3' "
                f"or 'rk4')."
            )
        solver.check_adaptive(where)

    # -- the loop's calls -----------------------------------------------------------------

    def init(self, solver, schedule, ts, dtype):
        tdt = ts.dtype
        t_start, t_end = ts[0], ts[-1]
        lam0 = schedule.log_snr(t_start).astype(tdt)
        lam_end = schedule.log_snr(t_end).astype(tdt)
        span = jnp.abs(lam_end - lam0)
        if self.dlambda0 is None:
            fraction = 1 / 64 if solver.unestimated_steps else 1 / 16
            h0 = span * fraction
        else:
            h0 = jnp.minimum(jnp.asarray(self.dlambda0, tdt), span)
        one = jnp.ones((), jnp.float32)
        return PIDState(
            t=t_start,
            lam=lam0,
            h=h0.astype(tdt),
            e1=one,
            e2=one,
            t_end=t_end,
            lam_end=lam_end,
            direction=jnp.sign(lam_end - lam0).astype(tdt),
            # a step size below this has collapsed: the loop stops (then an error)
            h_min=span * 1e-12,
        )

    def propose(self, schedule, state: PIDState):
        # a step that would leave less than 1% of itself before the end is stretched to end
        # exactly at t_end
        rem = jnp.abs(state.lam_end - state.lam)
        last = state.h * 1.01 >= rem
        lam_next = state.lam + state.direction * state.h
        t_next = jnp.where(
            last, state.t_end, schedule.t_from_log_snr(lam_next).astype(state.t_end.dtype)
        )
        return t_next, last

    def error_norm(self, error, x, x_next):
        """RMS over every element of ``error / (atol + rtol * max(|x|, |x_next|))`` (in at
        least float32); NaN counts as infinite (a failed step)."""
        total = None
        count = 0
        for e, a, b in zip(jax.tree.leaves(error), jax.tree.leaves(x), jax.tree.leaves(x_next)):
            dt = e.dtype if jnp.dtype(e.dtype).itemsize >= 4 else jnp.dtype(jnp.float32)
            e, a, b = e.astype(dt), a.astype(dt), b.astype(dt)
            b = jnp.where(jnp.isfinite(b), b, a)
            scale = self.atol + self.rtol * jnp.maximum(jnp.abs(a), jnp.abs(b))
            part = jnp.sum(jnp.square(e / scale)).astype(jnp.float32)
            total = part if total is None else total + part
            count += e.size
        E = jnp.sqrt(total / max(count, 1))
        return jnp.where(jnp.isnan(E), jnp.inf, E).astype(jnp.float32)

    def factor(self, solver, E, e1, e2):
        """One decision of the PID controller (the formula of ``diffrax.PIDController``):
        ``(accept, factor, e1', e2')`` from the scaled error ``E`` of this attempt and the
        inverse scaled errors ``e1``, ``e2`` of the last two accepted steps."""
        k = solver.error_order
        c1 = (self.pcoeff + self.icoeff + self.dcoeff) / k
        c2 = -(self.pcoeff + 2 * self.dcoeff) / k
        c3 = self.dcoeff / k
        accept = E < 1.0
        inv = 1.0 / E
        factor = self.safety * inv**c1
        if c2 != 0:
            factor = factor * e1**c2
        if c3 != 0:
            factor = factor * e2**c3
        factor = jnp.clip(
            factor,
            jnp.where(accept, 1.0, self.factormin),
            jnp.where(accept, self.factormax, self.safety),
        )
        # a failed step (E = inf) or an exact one (E = 0) does not steer the next ones
        inv = jnp.where((inv == 0) | jnp.isinf(inv), jnp.ones_like(inv), inv)
        return accept, factor, jnp.where(accept, inv, e1), jnp.where(accept, e1, e2)

    def adapt(self, solver, state: PIDState, error, x, x_next, index, t_next, last):
        E = self.error_norm(error, x, x_next)
        accept, factor, e1, e2 = self.factor(solver, E, state.e1, state.e2)
        if solver.unestimated_steps:
            # the first steps have no estimate: accepted, the step size kept
            free = index < solver.unestimated_steps
            accept = accept | free
            factor = jnp.where(free, jnp.ones_like(factor), factor)
            e1 = jnp.where(free, state.e1, e1)
            e2 = jnp.where(free, state.e2, e2)
        rem = jnp.abs(state.lam_end - state.lam)
        h_eff = jnp.where(last, rem, state.h)
        lam_next = jnp.where(last, state.lam_end, state.lam + state.direction * h_eff)
        new = PIDState(
            t=jnp.where(accept, t_next, state.t),
            lam=jnp.where(accept, lam_next, state.lam),
            h=(h_eff * factor.astype(h_eff.dtype)).astype(state.h.dtype),
            e1=e1,
            e2=e2,
            t_end=state.t_end,
            lam_end=state.lam_end,
            direction=state.direction,
            h_min=state.h_min,
        )
        return accept, new

    def stalled(self, state: PIDState):
        return state.h <= state.h_min
