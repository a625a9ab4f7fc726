"""Adaptive step sizes: a solver with an embedded error estimate under a PID controller."""

from __future__ import annotations

from typing import ClassVar

from .base import AbstractSolver, check_int


def _check_number(name, value, lo, hi=None, *, open_lo=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        v = float(value)
        ok = (v > lo if open_lo else v >= lo) and (hi is None or v <= hi)
    if not ok:
        rng = f"> {lo}" if open_lo else f">= {lo}"
        if hi is not None:
            rng += f" and <= {hi}"
        raise ValueError(f"Adaptive: {name} must be a number {rng}, got {name}={value!r}.")


class Adaptive(AbstractSolver):
    r"""Adaptive step sizes in log-SNR for a solver with an embedded error estimate.

    Wraps a solver with an error estimate: :class:`jadeis.DPMSolverPP` or
    :class:`jadeis.DPMSolver` of order 2 or 3 (the order-k and order-(k-1) multistep weights
    on the same model outputs; one model evaluation per accepted step and none per rejected
    one), :class:`jadeis.SinglestepDPMSolver` (order 2 or 3: the DPM-Solver-12/23 pairs of
    Lu et al. 2022) or :class:`jadeis.Rex` (``scheme="midpoint"``, ``"rk3"`` or ``"rk4"``), and
    chooses the steps with a PID controller (the formula and defaults of
    ``diffrax.PIDController``; docs/math/adaptive.md): a step of size ``h`` in
    ``lambda = log(alpha/sigma)`` is accepted when the RMS over the whole state of
    ``error / (atol + rtol * max(|x_s|, |x_t|))`` is below 1, and the next step is
    ``h * clip(safety * E_n^{-b1} E_{n-1}^{-b2} E_{n-2}^{-b3})`` with
    ``b1 = (pcoeff + icoeff + dcoeff) / k``, ``b2 = -(pcoeff + 2 dcoeff) / k``,
    ``b3 = dcoeff / k`` (``k`` the estimate's order). One grid serves the whole batch.

    Pass it as ``solver=`` to :func:`jadeis.sample` with ``ts`` holding the two end times
    ``[t_T, t_0]``. The loop is a ``lax.while_loop`` of at most ``max_steps`` attempts
    (accepted or rejected; reaching the bound without reaching ``t_0`` raises at run time).
    Gradients: :class:`jadeis.DiscreteAdjoint` (default) is the exact discrete adjoint of the
    accepted steps (it keeps the state at the start of every accepted step: memory
    ``max_steps * |x|``); with a Rex solver :class:`jadeis.ReversibleAdjoint` reconstructs the
    states instead (memory independent of the number of steps). The step sizes themselves are
    not differentiated (as in diffrax, the controller is outside the gradient), so gradients
    with respect to ``ts`` and the schedule's parameters are refused.

    **Arguments:**

    - `solver`: the stepper (``DPMSolverPP(order=3)``, ``SinglestepDPMSolver(order=2 or 3)``
      or a Rex).
    - `rtol`, `atol`: relative and absolute tolerances on the state.
    - `pcoeff`, `icoeff`, `dcoeff`: PID coefficients (default: an I-controller; ``0.4, 0.3,
      0`` is a common PI choice).
    - `safety`, `factormin`, `factormax`: as in diffrax.
    - `dlambda0`: the first step in log-SNR (default: 1/16 of the span; 1/64 for multistep
      solvers, whose first step has no estimate).
    - `max_steps`: the bound on attempts; also the size of the gradient's buffers.

    **Example:**

    ```python
    >>> import jax.numpy as jnp
    >>> import jadeis
    >>> sch = jadeis.VPLinear()
    >>> solver = jadeis.Adaptive(jadeis.DPMSolverPP(order=3), rtol=1e-4, atol=1e-4)
    >>> x0 = jadeis.sample(lambda p, x, t, z: p * x, 0.5, jnp.ones((2, 3)), schedule=sch,
    ...                    ts=jnp.array([1.0, 1e-3]), solver=solver)
    >>> x0.shape
    (2, 3)

    ```
    """

    solver: AbstractSolver
    rtol: float
    atol: float
    pcoeff: float
    icoeff: float
    dcoeff: float
    safety: float
    factormin: float
    factormax: float
    dlambda0: float | None
    max_steps: int
    order: int
    stochastic: ClassVar[bool] = False
    max_order: ClassVar[int] = 4

    def __init__(
        self,
        solver: AbstractSolver,
        rtol: float = 1e-3,
        atol: float = 1e-3,
        pcoeff: float = 0.0,
        icoeff: float = 1.0,
        dcoeff: float = 0.0,
        safety: float = 0.9,
        factormin: float = 0.2,
        factormax: float = 10.0,
        dlambda0: float | None = None,
        max_steps: int = 256,
    ):
        self.solver = solver
        self.rtol, self.atol = rtol, atol
        self.pcoeff, self.icoeff, self.dcoeff = pcoeff, icoeff, dcoeff
        self.safety, self.factormin, self.factormax = safety, factormin, factormax
        self.dlambda0 = dlambda0
        self.max_steps = max_steps
        self.order = getattr(solver, "order", 1)

    def __check_init__(self):
        if not isinstance(self.solver, AbstractSolver) or isinstance(self.solver, Adaptive):
            raise ValueError(
                f"Adaptive: solver must be a jadeis solver with an embedded error estimate, "
                f"such as jadeis.SinglestepDPMSolver(order=3) or jadeis.Rex(), got {self.solver!r}."
            )
        from .base import AbstractExponentialSolver

        multistep = isinstance(self.solver, AbstractExponentialSolver)
        if multistep and (self.solver.stochastic or self.solver.order < 2):
            raise ValueError(
                f"Adaptive: a multistep solver needs order 2 or 3 and the ODE (its order-k and "
                f"order-(k-1) weights give the error estimate), got {self.solver!r}."
            )
        if not multistep and (
            not callable(getattr(self.solver, "step_with_error", None)) or self.solver.stochastic
        ):
            raise ValueError(
                f"Adaptive: {type(self.solver).__name__} has no embedded error estimate; use "
                f"jadeis.DPMSolverPP(order=2 or 3), jadeis.SinglestepDPMSolver(order=2 or 3) or "
                f"jadeis.Rex(scheme='midpoint', 'rk3' or 'rk4')."
            )
        k = self.error_order  # raises for solvers of order 1 (no estimate)
        if k < 2:
            raise ValueError(
                f"Adaptive: {self.solver!r} has no embedded lower-order solution (order 1); "
                f"use order 2 or 3."
            )
        _check_number("rtol", self.rtol, 0.0)
        _check_number("atol", self.atol, 0.0)
        if float(self.rtol) == 0.0 and float(self.atol) == 0.0:
            raise ValueError("Adaptive: rtol and atol cannot both be 0.")
        for name in ("pcoeff", "icoeff", "dcoeff"):
            _check_number(name, getattr(self, name), 0.0)
        _check_number("safety", self.safety, 0.0, 1.0, open_lo=True)
        _check_number("factormin", self.factormin, 0.0, 1.0, open_lo=True)
        _check_number("factormax", self.factormax, 1.0)
        if self.dlambda0 is not None:
            _check_number("dlambda0", self.dlambda0, 0.0, open_lo=True)
        check_int("Adaptive", "max_steps", self.max_steps, 1)

    @property
    def error_order(self) -> int:
        from .base import AbstractExponentialSolver

        if isinstance(self.solver, AbstractExponentialSolver):
            return self.solver.order  # order-k minus order-(k-1) weights: O(h^k)
        return self.solver.error_order

    def inputs(self, schedule, ts, dtype):
        return self.solver.inputs(schedule, ts, dtype)

    def init(self, x_T):
        return self.solver.init(x_T)

    def step(self, model, inp, state, xi):
        return self.solver.step(model, inp, state, xi)

    def output(self, state):
        return self.solver.output(state)
