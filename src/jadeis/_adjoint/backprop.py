from __future__ import annotations

from .._core import Args, Problem
from .base import AbstractAdjoint, plain_forward


class Backprop(AbstractAdjoint):
    """Plain reverse-mode autodiff through the ``lax.scan`` of the sampler.

    Exact for the discretisation, with respect to every input including ``ts`` and the
    schedule's parameters, but stores every intermediate activation of the model at every
    step: memory grows like N x (activations). The reference the other strategies are
    tested against.

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
        return plain_forward(problem, args)

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
