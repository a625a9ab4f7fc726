from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .._conditioning import z_at
from .._core import Args, Problem, bind_model, draw_noise, state_dtype
from .._loop import Grid, fixed_rows, integrate, is_adaptive, split_trajectory_bar, sweep
from .._solver.base import AbstractLinearMultistepSolver, LinearStepInputs
from . import _tree
from ._exact import cotangents, exact_backward, final_bar, rows_and_vjp
from .base import AbstractAdjoint, Wanted, adaptive_grid_error, finish, partial_vjp


class DiscreteAdjoint(AbstractAdjoint):
    """The exact gradient of the discrete sampler that was run (discretise-then-optimise).

    The backward pass walks the solver's steps in reverse, taking the vector-Jacobian
    product of each step (``solver.step``) with the model evaluation rematerialised
    inside it, so it is exact for any solver, with respect to ``x_T``, ``z``, ``params``,
    the ``noise`` array, the time grid ``ts`` and the schedule's parameters
    (docs/math/adjoint.md). Equal to :class:`Backprop` up to rounding. Under an adaptive
    controller it is the exact gradient of the accepted steps (the grid held fixed; no
    gradient with respect to ``ts`` or the schedule).

    Memory: the solver states at the start of every step (no activations). For the
    linear multistep samplers (DDIM, DPM-Solver, DPM-Solver++, the SDE samplers) a
    hand-derived sweep keeps only the N samples, one |x| per step, and propagates the
    multistep history's cotangents exactly; ``fast=False`` forces the generic sweep
    (tests check that both agree).

    **Example:**

    ```python
    >>> import jax, jax.numpy as jnp
    >>> import jadeis
    >>> sch = jadeis.VPLinear()
    >>> eps_fn = lambda p, x, t, z: p * x
    >>> loss = lambda p: jadeis.sample(eps_fn, p, jnp.ones((1, 2)), None, schedule=sch,
    ...     ts=jadeis.time_grid(sch, 5), adjoint=jadeis.DiscreteAdjoint()).sum()
    >>> jax.grad(loss)(0.5).shape
    ()

    ```
    """

    fast: bool = True

    def _fast(self, problem: Problem) -> bool:
        # (a run resumed from a state has history from before it, which the fast sweep,
        # keeping samples only, does not see)
        return (
            self.fast
            and isinstance(problem.solver, AbstractLinearMultistepSolver)
            and not problem.resume
        )

    def fwd(self, problem, args, perturbed):
        want = Wanted.of(perturbed)
        if want.grid and is_adaptive(problem):
            raise adaptive_grid_error(problem)
        fast = self._fast(problem)
        res = integrate(problem, args, save="x" if fast else "state")
        xs = res.saved if fast else problem.solver.output(res.saved)
        return finish(self, problem, res, xs), (args, res.saved, res.grid, want)

    def check_solve(self, has_trajectory):
        if not has_trajectory:
            self.residuals_from(None, None, None, None)

    def residuals_from(self, problem, args, trajectory, x_0):
        if trajectory is None:
            raise ValueError(
                "solve_adjoint: DiscreteAdjoint needs trajectory= (the N + 1 states that "
                "jadeis.sample_trajectory returns), not x_0= alone."
            )
        dtype = state_dtype(trajectory)
        rows = fixed_rows(problem, args.schedule, args.ts, dtype)
        n = args.ts.shape[0] - 1
        grid = Grid(args.ts, n, rows)
        want = Wanted.everything()
        if self._fast(problem):
            return args, jax.tree.map(lambda v: v[:-1], trajectory), grid, want
        # other solvers carry more than the sample: re-run the forward pass for the states
        args = args._replace(x_T=jax.tree.map(lambda v: v[0], trajectory))
        res = integrate(problem, args, save="state", rows=rows)
        return args, res.saved, grid, want

    def bwd(self, problem, residuals, x0_bar, traj_bar):
        args, saved, grid, want = residuals
        if self._fast(problem):
            return _linear_backward(problem, args, saved, grid, want, x0_bar, traj_bar)
        return exact_backward(problem, args, grid, want, x0_bar, traj_bar, states=saved)


def _linear_backward(problem: Problem, args: Args, xs, grid: Grid, want: Wanted, x0_bar, traj_bar):
    """Hand-derived reverse sweep of x' = a x + sum_j b_j m_{i-j} + c xi keeping only the
    samples ``xs`` (docs/math/adjoint.md, "exact discrete adjoint")."""
    solver = problem.solver
    params, x_T, z, schedule, ts, noise = args
    dtype = state_dtype(xs)
    k = solver.order
    tm = jax.tree.map
    rows, vjp_rows = rows_and_vjp(problem, args, grid, want, dtype)
    per_step = problem.per_step_z
    noise_array = problem.noise_mode == "array" and want.noise
    need_xi = want.grid and solver.stochastic
    on_x0, tb_steps = split_trajectory_bar(traj_bar, grid)

    def body(carry, i, inp, xs_in):
        xbar, pend, xbar_hist, pbar, zbar = carry
        x_i, tb = xs_in
        m_bar = tm(lambda v: inp.b[0] * v, xbar)
        if k > 1:
            m_bar = tm(jnp.add, m_bar, pend[0])
        new_pend = tuple(
            tm(lambda v, j=j: inp.b[j + 1] * v, xbar)
            if j + 1 >= k - 1
            else tm(lambda p, v, j=j: p + inp.b[j + 1] * v, pend[j + 1], xbar)
            for j in range(k - 1)
        )
        z_i = z_at(z, i, per_step)

        def f(p, x, zz, t, alpha, sigma):
            model = bind_model(problem, p, zz)
            return solver.convert(model(x, t), x, alpha, sigma)

        m, vjp = partial_vjp(
            f,
            (params, x_i, z_i, inp.t, inp.alpha, inp.sigma),
            (want.params, True, want.z, want.grid, want.grid, want.grid),
        )
        gp, gx, gz, t_bar, al_bar, si_bar = vjp(m_bar)
        new_xbar = tm(lambda v, g: inp.a * v + g, xbar, gx)
        if tb is not None:
            new_xbar = tm(jnp.add, new_xbar, tb)
        if want.params:
            pbar = _tree.add(pbar, gp)
        ys_z = None
        if want.z:
            if per_step:
                ys_z = gz
            else:
                zbar = _tree.add(zbar, gz)
        ys_noise = tm(lambda v: inp.c * v, xbar) if noise_array else None
        ys_grid = None
        new_hist = xbar_hist
        if want.grid:
            # d[q] = <xbar_{i+1+q}, m_i>: the cotangent of b[i+q, q]
            d = jnp.stack([_tree.vdot(xbar, m)] + [_tree.vdot(h, m) for h in xbar_hist])
            c_bar = jnp.zeros((), dtype)
            if need_xi:
                c_bar = _tree.vdot(xbar, draw_noise(problem, noise, i, x_i))
            ys_grid = (_tree.vdot(xbar, x_i), d, c_bar, t_bar, al_bar, si_bar)
            new_hist = ((xbar,) + xbar_hist)[: k - 1]
        return (new_xbar, new_pend, new_hist, pbar, zbar), (ys_z, ys_noise, ys_grid)

    xbar0 = final_bar(x0_bar, on_x0, dtype)
    zeros = tm(jnp.zeros_like, xbar0)
    pend0 = tuple(zeros for _ in range(k - 1))
    hist0 = tuple(zeros for _ in range(k - 1)) if want.grid else ()
    zbar0 = _tree.zeros_like(z) if (want.z and not per_step) else None
    pbar0 = _tree.zeros_like(params) if want.params else None
    (xT_bar, _, _, pbar, zbar), ys = sweep(
        problem,
        schedule,
        grid,
        body,
        (xbar0, pend0, hist0, pbar0, zbar0),
        (xs, tb_steps),
        dtype=dtype,
        rows=rows,
    )
    zs, noise_bar, ys_grid = ys if ys is not None else (None, None, None)
    inputs_bar = None
    if want.grid:
        n = grid.count
        a_bar, d, c_bar, t_bar, al_bar, si_bar = ys_grid
        cols = []
        for q in range(rows.b.shape[1]):
            if q < min(k, n):  # (a grid of n <= q steps never uses column q)
                cols.append(jnp.concatenate([jnp.zeros((q,), dtype), d[: n - q, q]]))
            else:
                cols.append(jnp.zeros((n,), dtype))
        b_bar = jnp.stack(cols, axis=1)
        inputs_bar = LinearStepInputs(
            t=t_bar.astype(rows.t.dtype),
            a=a_bar,
            b=b_bar,
            c=c_bar,
            alpha=al_bar,
            sigma=si_bar,
            e=None,
        )
    if noise_bar is not None:
        noise_bar = tm(lambda g, v: g.astype(np.dtype(v.dtype)), noise_bar, noise)
    return cotangents(problem, args, want, pbar, xT_bar, zbar, zs, noise_bar, inputs_bar, vjp_rows)
