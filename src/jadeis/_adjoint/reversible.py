"""Exact gradients of a reversible solver in memory independent of the number of steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .._conditioning import z_at
from .._core import Problem, bind_model, draw_noise, forward, with_final
from . import _tree
from .base import AbstractAdjoint, any_perturbed
from .discrete import _finish, _inputs_and_vjp, step_vjp


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
    Cost: about twice the model evaluations of the forward pass (one inverse, one VJP).

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

    def check(self, problem: Problem, num_steps: int) -> None:
        solver = problem.solver
        if not callable(getattr(solver, "inverse_step", None)):
            raise ValueError(
                f"ReversibleAdjoint needs a reversible solver (one with an algebraic "
                f"inverse_step), such as jadeis.Rex() or jadeis.SDERex(); "
                f"{type(solver).__name__} has none. Use DiscreteAdjoint() for it."
            )

    def fwd(self, problem, args, perturbed):
        grid = any_perturbed((perturbed.schedule, perturbed.ts))
        save = "x" if problem.return_trajectory else None
        x_0, saved, final = forward(problem, args, save=save)
        traj = with_final(saved, x_0) if problem.return_trajectory else None
        return (x_0, traj), (args, final, grid)

    def bwd(self, problem, residuals, x0_bar, traj_bar):
        args, final, grid = residuals
        return _reversible_backward(problem, args, final, x0_bar, traj_bar, grid)


def _reversible_backward(problem: Problem, args, final, x0_bar, traj_bar, grid: bool):
    solver = problem.solver
    params, x_T, z, schedule, ts, noise = args
    dtype = x_T.dtype
    n = ts.shape[0] - 1
    inputs, vjp_inputs = _inputs_and_vjp(problem, args, dtype, grid)
    per_step = problem.per_step_z
    _, out_vjp = jax.vjp(solver.output, final)
    (sbar0,) = out_vjp(x0_bar.astype(dtype) + (0 if traj_bar is None else traj_bar[-1]))

    def body(carry, xs):
        state_next, sbar, pbar, zbar = carry
        i, inp, tb = xs
        model = bind_model(problem, params, z_at(z, i, per_step))
        xi = draw_noise(problem, noise, i, solver.output(state_next))
        state = solver.inverse_step(model, inp, state_next, xi)
        carry, ys = step_vjp(problem, params, z, i, inp, state, xi, (sbar, pbar, zbar), tb, grid)
        return (state,) + carry, ys

    zbar0 = None if per_step else _tree.zeros_like(z)
    tb_in = None if traj_bar is None else traj_bar[:-1]
    (_, sbar, pbar, zbar), (zs, noise_bar, inputs_bar) = lax.scan(
        body,
        (final, sbar0, _tree.zeros_like(params), zbar0),
        (jnp.arange(n), inputs, tb_in),
        reverse=True,
    )
    _, init_vjp = jax.vjp(solver.init, x_T)
    (xT_bar,) = init_vjp(sbar)
    return _finish(problem, args, pbar, xT_bar, zbar, zs, noise_bar, inputs_bar, vjp_inputs)
