"""Exact gradients of a reversible solver in memory independent of the number of steps."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp

from .._core import state_dtype
from .._loop import Checkpoints, integrate, is_adaptive
from .._solver.base import AbstractReversibleSolver, as_int, check_int
from .._solver.rex import amplification_budget
from ._exact import exact_backward
from .base import AbstractAdjoint, Wanted, adaptive_grid_error, finish


class ReversibleAdjoint(AbstractAdjoint):
    """The exact gradient of a reversible sampler (:class:`jadeis.Rex`, :class:`jadeis.SDERex`)
    in memory independent of N.

    The forward pass keeps the final state ``(x_0, xh_0)`` and a few exact states (below).
    The backward pass walks the steps in reverse, reconstructing the state at the start of
    each step with the solver's algebraic inverse (``solver.inverse_step``, no fixed-point
    iteration) and taking the vector-Jacobian product of ``solver.step`` there, so the
    gradient is that of the discrete sampler that was run (equal to :class:`jadeis.Backprop`
    up to the rounding of the reconstruction), with respect to ``x_T`` (an array or a
    :class:`jadeis.RexLatent`), ``z``, ``params``, the ``noise`` array, ``ts`` and the
    schedule's parameters. SDE samplers re-draw each step's Brownian increments from the
    same key (or noise array). Under an adaptive controller it walks back over the accepted
    steps (the recorded times: memory ``max_steps`` scalars). Cost: about twice the model
    evaluations of the forward pass (one inverse, one VJP).

    **Checkpoints.** The inverse amplifies rounding: in the data forms the Lawson state grows
    with the Lawson time tau (gamma, or rho = gamma^2 for SDERex) where the data prediction
    is close to linear in x, and the coupling's parasitic mode grows by 1/zeta per step, so
    a state rebuilt over many steps can be wrong in every digit (SDERex on VPLinear: up to
    (rho_0/rho_T)^2 ~ 5e14; docs/math/reversible.md#conditioning). The forward pass therefore
    keeps the exact state wherever this amplification, accumulated since the last exact
    state, would exceed ``eps^-1/4`` of the state's dtype; the backward pass uses those
    states instead of rebuilt ones. Their number depends on the schedule's log-SNR span, the
    coupling and the dtype, not on N for a coupling near 1 (default ``zeta = 0.999``, VPLinear:
    Rex 2 in float64 and 4 in float32, SDERex 4 and 9). Memory: that many states, plus two.

    **Arguments:**

    - `checkpoints`: the most exact states kept. ``None`` (default): as many as the grid
      needs, computed before compiling from a concrete ``ts`` (under ``jit``, from the
      schedule's range; from N where the schedule is traced too). ``0`` rebuilds every state
      (memory-free, exact only where the amplification stays small: float64 Rex).

    **Example:**

    ```python
    >>> import jax, jax.numpy as jnp
    >>> import jadeis
    >>> sch = jadeis.VPLinear()
    >>> eps_fn = lambda p, x, t, z: p * x
    >>> loss = lambda p: jadeis.sample(eps_fn, p, jnp.ones((1, 2)), None, schedule=sch,
    ...     ts=jadeis.time_grid(sch, 5), solver=jadeis.Rex(),
    ...     adjoint=jadeis.ReversibleAdjoint()).sum()
    >>> jax.grad(loss)(0.5).shape
    ()

    ```
    """

    checkpoints: int | None = eqx.field(default=None, converter=as_int)

    def __check_init__(self):
        if self.checkpoints is not None:
            check_int("ReversibleAdjoint", "checkpoints", self.checkpoints, 0)

    def bind(self, problem, args):
        """This strategy with ``checkpoints`` set for the run (see the class docstring)."""
        if self.checkpoints is not None or not isinstance(
            problem.solver, AbstractReversibleSolver
        ):
            return self
        solver = problem.solver
        if is_adaptive(problem):
            n = problem.controller.max_steps
            ts = args.ts
        else:
            ts = problem.controller.grid(args.schedule, args.ts)
            n = ts.shape[0] - 1
        total = solver.log_amplification_bound(args.schedule, ts, n)
        if total is None:  # a traced grid: the schedule's range bounds it
            ends = jnp.asarray([args.schedule.t_max, args.schedule.t_min])
            total = solver.log_amplification_bound(args.schedule, ends, n)
        dtype = state_dtype(args.x_T)
        k = n if total is None else int(min(n, max(0.0, total) // amplification_budget(dtype)))
        return ReversibleAdjoint(checkpoints=k)

    def check(self, problem, num_steps: int) -> None:
        solver = problem.solver
        if not isinstance(solver, AbstractReversibleSolver):
            raise ValueError(
                f"ReversibleAdjoint needs a reversible solver (one with an algebraic inverse), "
                f"such as jadeis.Rex() or jadeis.SDERex(); {type(solver).__name__} has none. "
                f"Use DiscreteAdjoint() for it."
            )

    def cost(self, problem, stats):
        per = stats.num_steps * problem.solver.evals_per_step
        return per, per

    def fwd(self, problem, args, perturbed):
        want = Wanted.of(perturbed)
        if want.grid and is_adaptive(problem):
            raise adaptive_grid_error(problem)
        size = self.bind(problem, args).checkpoints
        res = integrate(
            problem,
            args,
            save="x" if problem.save_trajectory else None,
            checkpoints=Checkpoints(size, amplification_budget(state_dtype(args.x_T))),
        )
        residuals = (args, res.final, res.grid, want, res.checkpoints)
        return finish(self, problem, res, res.saved), residuals

    def bwd(self, problem, residuals, x0_bar, traj_bar):
        args, final, grid, want, kept = residuals
        return exact_backward(
            problem, args, grid, want, x0_bar, traj_bar, final=final, checkpoints=kept
        )
