from __future__ import annotations

import functools

import jax

from .._core import Args, Problem
from .._loop import is_adaptive
from .base import AbstractAdjoint, adaptive_grid_error, any_perturbed, plain_forward


class Backprop(AbstractAdjoint):
    """Plain reverse-mode autodiff through the loop of the sampler.

    Exact for the discretisation, with respect to every input including ``ts`` and the
    schedule's parameters (on a fixed grid), but stores every intermediate activation of
    the model at every step: memory grows like N x (activations). Under an adaptive
    controller the loop is a bounded scan of ``max_steps`` attempts that autodiff runs
    through (the controller's decisions are not differentiated, so the gradient equals
    :class:`DiscreteAdjoint`'s; memory ``max_steps`` x activations). The reference the other
    strategies are tested against.

    **Example:**

    ```python
    >>> import jax, jax.numpy as jnp
    >>> import jadeis
    >>> sch = jadeis.VPLinear()
    >>> eps_fn = lambda p, x, t, z: p * x
    >>> loss = lambda p: jadeis.sample(eps_fn, p, jnp.ones((1, 2)), None, schedule=sch,
    ...     ts=jadeis.time_grid(sch, 5), adjoint=jadeis.Backprop()).sum()
    >>> jax.grad(loss)(0.5).shape
    ()

    ```
    """

    def run(self, problem: Problem, args: Args):
        if not is_adaptive(problem):
            return plain_forward(self, problem, args)
        schedule, ts = _refuse_gradient(problem, (args.schedule, args.ts))
        return plain_forward(self, problem, args._replace(schedule=schedule, ts=ts), bounded=True)

    def cost(self, problem, stats):
        # autodiff differentiates every attempt, accepted or not
        return 0 * stats.num_steps, stats.num_attempts * problem.solver.evals_per_step

    def fwd(self, problem, args, perturbed):  # pragma: no cover - run() bypasses the VJP
        raise NotImplementedError

    def bwd(self, problem, residuals, x0_bar, traj_bar):  # pragma: no cover
        raise NotImplementedError

    def check_solve(self, has_trajectory):
        self.residuals_from(None, None, None, None)

    def residuals_from(self, problem, args, trajectory, x_0):
        raise ValueError(
            "solve_adjoint: Backprop differentiates the forward pass itself; use jax.grad "
            "through jadeis.sample(..., adjoint=jadeis.Backprop()), or pass "
            "adjoint=DiscreteAdjoint() or AdjointDEIS(...) here."
        )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _refuse_gradient(problem, tree):
    """The identity, whose gradient is refused (a ``ValueError`` when one is asked for): the
    grid of an adaptive run is the controller's."""
    return tree


def _refuse_fwd(problem, tree):
    values = jax.tree.map(lambda p: p.value, tree, is_leaf=_is_primal)
    if any_perturbed(jax.tree.map(lambda p: p.perturbed, tree, is_leaf=_is_primal)):
        raise adaptive_grid_error(problem)
    return values, None


def _refuse_bwd(problem, _, ct):
    return (None,)


def _is_primal(v):
    return isinstance(v, jax.custom_derivatives.CustomVJPPrimal)


_refuse_gradient.defvjp(_refuse_fwd, _refuse_bwd, symbolic_zeros=True)
