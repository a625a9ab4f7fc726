"""``Adaptive(solver, rtol, atol, ...)``: a solver and a PID controller in one argument."""

from __future__ import annotations

import equinox as eqx

from .._solver.base import AbstractSolver
from .pid import PIDController


class Adaptive(eqx.Module):
    """A solver with adaptive step sizes, as one ``solver=`` argument: shorthand for
    ``solver=solver, controller=jadeis.PIDController(rtol, atol, ...)`` (every keyword is
    the controller's; see :class:`jadeis.PIDController`).

    ``sample(..., solver=jadeis.Adaptive(jadeis.DPMSolverPP(order=3), rtol=1e-4))`` is the
    same call as ``sample(..., solver=jadeis.DPMSolverPP(order=3),
    controller=jadeis.PIDController(rtol=1e-4))``; ``ts`` holds the two end times.

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
    controller: PIDController

    def __init__(self, solver: AbstractSolver, **controller_options):
        if not isinstance(solver, AbstractSolver):
            raise ValueError(
                f"Adaptive: solver must be a jadeis solver with an embedded error estimate, "
                f"such as jadeis.SinglestepDPMSolver(order=3) or jadeis.Rex(), got {solver!r}."
            )
        controller = PIDController(**controller_options)
        PIDController.check_solver(solver, "Adaptive")
        self.solver = solver
        self.controller = controller

    @property
    def order(self) -> int:
        return self.solver.order
