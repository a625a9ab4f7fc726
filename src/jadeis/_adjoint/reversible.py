"""Exact gradients of a reversible solver in memory independent of the number of steps."""

from __future__ import annotations

from .._loop import integrate, is_adaptive
from .._solver.base import AbstractReversibleSolver
from ._exact import exact_backward
from .base import AbstractAdjoint, Wanted, adaptive_grid_error, finish


class ReversibleAdjoint(AbstractAdjoint):
    """The exact gradient of a reversible sampler (:class:`jadeis.Rex`, :class:`jadeis.SDERex`)
    in memory independent of N.

    The forward pass keeps only the final state ``(x_0, xh_0)``. The backward pass walks the
    steps in reverse, reconstructing the state at the start of each step with the solver's
    algebraic inverse (``solver.inverse_step``, no fixed-point iteration) and taking the
    vector-Jacobian product of ``solver.step`` there, so the gradient is that of the discrete
    sampler that was run (equal to :class:`jadeis.Backprop` up to the rounding of the
    reconstruction), with respect to ``x_T`` (an array or a :class:`jadeis.RexLatent`),
    ``z``, ``params``, the ``noise`` array, ``ts`` and the schedule's parameters. SDE
    samplers re-draw each step's Brownian increments from the same key (or noise array).
    Under an adaptive controller it walks back over the accepted steps (the recorded times:
    memory ``max_steps`` scalars, independent of the state). Cost: about twice the model
    evaluations of the forward pass (one inverse, one VJP).

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
        res = integrate(problem, args, save="x" if problem.save_trajectory else None)
        return finish(self, problem, res, res.saved), (args, res.final, res.grid, want)

    def bwd(self, problem, residuals, x0_bar, traj_bar):
        args, final, grid, want = residuals
        return exact_backward(problem, args, grid, want, x0_bar, traj_bar, final=final)
