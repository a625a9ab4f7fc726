"""Singlestep DPM-Solver (Lu et al. 2022) with an embedded lower-order estimate.

One step from ``s`` to ``t`` (``h = lambda_t - lambda_s``) evaluates the model at ``s`` and at
intermediate log-SNRs ``lambda_s + r_j h`` (``r = (1/2,)`` for order 2, ``(1/3, 2/3)`` for
order 3) and integrates the linear interpolant of the model output exactly
(docs/math/samplers.md#singlestep-dpm-solver). The same evaluations give a solution one order
lower (order 2: DDIM; order 3: the second-order update through the first stage), so every step
also returns an error estimate: the pairs DPM-Solver-12 and DPM-Solver-23 of Lu et al., which
:class:`jadeis.Adaptive` uses to choose the step sizes.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from .._ei import grid_values, model_time_dtype, phis
from .base import AbstractAdaptiveSolver, as_int, check_choice

_NODES = {1: (), 2: (0.5,), 3: (1.0 / 3.0, 2.0 / 3.0)}


class SinglestepInputs(NamedTuple):
    """Row i of a singlestep grid: times and coefficients of the stages and of the update.

    Stage j (``j = 1 .. order - 1``) at model time ``t_stage[j]``:
    ``u_j = lin_stage x + a_stage m_s (+ b_stage (m_1 - m_s) for j = 2)``; the update
    ``x_t = lin x + A m_s + B (m_last - m_s)``, and the embedded lower-order solution uses
    ``B_low (m_1 - m_s)`` (order 3) or nothing (order 2) in place of the last term.
    """

    t: Array
    alpha: Array
    sigma: Array
    t_stage: Array  # (k - 1,)
    alpha_stage: Array
    sigma_stage: Array
    lin_stage: Array
    a_stage: Array
    b_stage: Array  # () slope coefficient of stage 2 (0 for order 2)
    lin: Array
    A: Array
    B: Array
    B_low: Array


def _tm(f, *trees):
    return jax.tree.map(f, *trees)


class SinglestepDPMSolver(AbstractAdaptiveSolver):
    r"""Singlestep DPM-Solver of order 1, 2 or 3 (Lu et al. 2022), noise or data prediction.

    Each step evaluates the model ``order`` times (at ``s`` and at ``lambda_s + r_j h``,
    ``r = 1/2`` or ``1/3, 2/3``) and integrates the linear interpolant of the model output
    exactly (the phi_2 form, ``solver_type="taylor"`` of the reference implementation for
    order 2, its default form for order 3). With ``prediction="data"`` it is DPM-Solver++(2S/3S).
    Its main use is adaptive step sizes: the same evaluations give a solution one order lower,
    and :class:`jadeis.Adaptive` controls the difference (the DPM-Solver-12/23 pairs). On a fixed
    grid it is an ordinary solver (``ts`` of N + 1 times, N * order model evaluations).

    **Arguments:**

    - `order`: 1 (DDIM), 2 or 3.
    - `prediction`: ``"data"`` (default, DPM-Solver++ form) or ``"noise"``.

    **Example:**

    ```python
    >>> import jax.numpy as jnp
    >>> import jadeis
    >>> sch = jadeis.VPLinear()
    >>> x0 = jadeis.sample(lambda p, x, t, z: p * x, 0.5, jnp.ones((2, 3)), schedule=sch,
    ...                    ts=jadeis.time_grid(sch, 8), solver=jadeis.SinglestepDPMSolver(3))
    >>> x0.shape
    (2, 3)

    ```
    """

    order: int = eqx.field(default=3, converter=as_int)
    prediction: str = "data"
    stochastic: ClassVar[bool] = False
    first_evaluation_at_state: ClassVar[bool] = True

    def __check_init__(self):
        check_choice("SinglestepDPMSolver", "prediction", self.prediction, ("data", "noise"))

    @property
    def forms_data_prediction(self) -> bool:
        return self.prediction == "data"

    def _data_form(self) -> str:
        return "SinglestepDPMSolver(prediction='data') (the DPM-Solver++ form, the default)"

    @property
    def error_order(self) -> int | None:
        """The order of the local error estimate's leading term (``order``; the embedded
        solution is one order lower, so the difference is O(h^order)); ``None`` for order 1,
        which has no embedded solution."""
        return self.order if self.order >= 2 else None

    @property
    def evals_per_step(self) -> int:
        return self.order

    def inputs(self, schedule, ts, dtype, *, first_index=0, to_end=True, with_error=False):
        k = self.order
        sign = 1.0 if self.prediction == "noise" else -1.0
        values = grid_values(schedule, ts)
        lam, la, ls = values.lam, values.log_alpha, values.log_sigma
        lam_s, la_s, ls_s = lam[:-1], la[:-1], ls[:-1]
        h = lam[1:] - lam_s
        # a step to sigma_t = 0 (h = inf, time_grid(..., final="zero")) is taken in its
        # first-order limit x_t = alpha_t D(x_s, s) (as the multistep solvers): its stages
        # are evaluated at s and weighted by zero (no model call at t = 0, no inf * 0)
        inf_h = jnp.isposinf(h)
        h = jnp.where(inf_h, jnp.ones_like(h), h)

        def ratio(la_u, ls_u):
            return jnp.exp(la_u - la_s) if sign > 0 else jnp.exp(ls_u - ls_s)

        def prefactor(la_u, ls_u):
            return -jnp.exp(ls_u) if sign > 0 else jnp.exp(la_u)

        nodes = _NODES[k]
        t_st, al_st, si_st, lin_st, a_st = [], [], [], [], []
        b_st = jnp.zeros_like(h)
        for j, r in enumerate(nodes):
            H = r * h
            t_j = jnp.where(inf_h, ts[:-1], schedule.t_from_log_snr(lam_s + H))
            la_j, ls_j = schedule.log_alpha(t_j), schedule.log_sigma(t_j)
            P = prefactor(la_j, ls_j)
            t_st.append(t_j)
            al_st.append(jnp.exp(la_j))
            si_st.append(jnp.exp(ls_j))
            lin_st.append(jnp.where(inf_h, 1.0, ratio(la_j, ls_j)))
            ph = phis(2 if j == 1 else 1, sign * H)
            a_st.append(jnp.where(inf_h, 0.0, P * H * ph[0]))
            if j == 1:
                b_st = jnp.where(inf_h, 0.0, P * H * ph[1] * (r / nodes[0]))
        la_t, ls_t = la[1:], ls[1:]
        P_t = prefactor(la_t, ls_t)
        lin = ratio(la_t, ls_t)
        ph = phis(2, sign * h)
        A = P_t * h * ph[0]
        # the limit of A as h -> inf: alpha_t (data), -alpha_t sigma_s / alpha_s (noise)
        limit = jnp.exp(la_t) if sign < 0 else -jnp.exp(la_t - la_s + ls_s)
        A = jnp.where(inf_h, limit, A)
        phi2 = jnp.where(inf_h, 0.0, P_t * h * ph[1])
        B = phi2 / nodes[-1] if k > 1 else jnp.zeros_like(h)
        # the order-2 comparison solution through the first stage, in the form of Lu et al.'s
        # reference implementation (its DPM-Solver-23 pair): A / (2 r_1) on (m_1 - m_s); its
        # estimate also sees the slope of the model output (docs/math/adaptive.md (7.1b))
        B_low = A / (2.0 * nodes[0]) if k > 2 else jnp.zeros_like(h)

        def cast(v):
            return jnp.asarray(v).astype(dtype)

        def stack(vs, dt):
            if not vs:
                return jnp.zeros(h.shape + (0,), dt)
            return jnp.stack(vs, axis=1).astype(dt)

        mdt = model_time_dtype(dtype)
        return SinglestepInputs(
            t=ts[:-1].astype(mdt),
            alpha=cast(jnp.exp(la_s)),
            sigma=cast(jnp.exp(ls_s)),
            t_stage=stack(t_st, mdt),
            alpha_stage=stack(al_st, dtype),
            sigma_stage=stack(si_st, dtype),
            lin_stage=stack(lin_st, dtype),
            a_stage=stack(a_st, dtype),
            b_stage=cast(b_st),
            lin=cast(lin),
            A=cast(A),
            B=cast(B),
            B_low=cast(B_low),
        )

    def init(self, x_T):
        return x_T

    def output(self, state):
        return state

    def _m(self, model, x, t, alpha, sigma):
        eps = model(x, t)
        if self.prediction == "noise":
            return eps
        return self.data_prediction(x, eps, alpha, sigma)

    def _stages(self, model, inp: SinglestepInputs, x):
        """The model outputs m_s, m_1, ..., m_{k-1}."""
        ms = [self._m(model, x, inp.t, inp.alpha, inp.sigma)]
        for j in range(self.order - 1):
            u = _tm(lambda x, m, j=j: inp.lin_stage[j] * x + inp.a_stage[j] * m, x, ms[0])
            if j == 1:
                u = _tm(lambda u, m1, m0: u + inp.b_stage * (m1 - m0), u, ms[1], ms[0])
            ms.append(
                self._m(model, u, inp.t_stage[j], inp.alpha_stage[j], inp.sigma_stage[j])
            )
        return ms

    def step(self, model, inp: SinglestepInputs, state, xi):
        """``(x_t, error)``: the step and its embedded error estimate (high minus low order;
        ``None`` for order 1)."""
        x = state
        ms = self._stages(model, inp, x)
        m0 = ms[0]
        base = _tm(lambda x, m: inp.lin * x + inp.A * m, x, m0)
        if self.order == 1:
            return base, None
        hi = _tm(lambda ml, m: inp.B * (ml - m), ms[-1], m0)
        if self.order == 2:
            err = hi
        else:
            err = _tm(lambda e, m1, m: e - inp.B_low * (m1 - m), hi, ms[1], m0)
        return _tm(jnp.add, base, hi), err
