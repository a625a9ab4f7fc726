from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .._conditioning import z_at
from .._core import (
    Args,
    Problem,
    bind_model,
    draw_noise,
    forward,
    is_array,
    state_dtype,
    with_final,
)
from .._solver.base import AbstractLinearMultistepSolver, LinearStepInputs
from . import _tree
from .base import AbstractAdjoint, any_perturbed


class DiscreteAdjoint(AbstractAdjoint):
    """The exact gradient of the discrete sampler that was run (discretise-then-optimise).

    The backward pass walks the solver's steps in reverse, taking the vector-Jacobian
    product of each step (``solver.step``) with the model evaluation rematerialised
    inside it, so it is exact for any solver, with respect to ``x_T``, ``z``, ``params``,
    the ``noise`` array, the time grid ``ts`` and the schedule's parameters
    (docs/math/adjoint.md). Equal to :class:`Backprop` up to rounding.

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
        return self.fast and isinstance(problem.solver, AbstractLinearMultistepSolver)

    def fwd(self, problem, args, perturbed):
        grid = any_perturbed((perturbed.schedule, perturbed.ts))
        if self._fast(problem):
            x_0, saved, _ = forward(problem, args, save="x")
        else:
            x_0, saved, _ = forward(problem, args, save="state")
        traj = None
        if problem.return_trajectory:
            xs = saved if self._fast(problem) else problem.solver.output(saved)
            traj = with_final(xs, x_0)
        return (x_0, traj), (args, saved, grid)

    def check_solve(self, has_trajectory):
        if not has_trajectory:
            self.residuals_from(None, None, None, None)

    def residuals_from(self, problem, args, trajectory, x_0):
        if trajectory is None:
            raise ValueError(
                "solve_adjoint: DiscreteAdjoint needs trajectory= (the N + 1 states that "
                "sample(..., return_trajectory=True) returns), not x_0= alone."
            )
        if self._fast(problem):
            return args, jax.tree.map(lambda v: v[:-1], trajectory), False
        # other solvers carry more than the sample: re-run the forward pass for the states
        args = args._replace(x_T=jax.tree.map(lambda v: v[0], trajectory))
        _, saved, _ = forward(problem, args, save="state")
        return args, saved, False

    def bwd(self, problem, residuals, x0_bar, traj_bar):
        args, saved, grid = residuals
        if self._fast(problem):
            return _linear_backward(problem, args, saved, x0_bar, traj_bar, grid)
        return _generic_backward(problem, args, saved, x0_bar, traj_bar, grid)


def _inputs_and_vjp(problem: Problem, args: Args, dtype, grid: bool):
    fn = lambda sch, ts: problem.solver.inputs(sch, ts, dtype)  # noqa: E731
    if grid:
        inputs, vjp = jax.vjp(fn, args.schedule, args.ts)
        return inputs, vjp
    return fn(args.schedule, args.ts), None


def _finish(problem, args, pbar, xT_bar, zbar, zs, noise_bar, inputs_bar, vjp):
    if problem.per_step_z:
        zbar = type(args.z)(zs)
    sch_bar = ts_bar = None
    if vjp is not None:
        sch_bar, ts_bar = vjp(inputs_bar)
    if problem.noise_mode != "array":
        noise_bar = None
    return Args(pbar, xT_bar, zbar, sch_bar, ts_bar, noise_bar)


def _final_bar(x0_bar, traj_bar, dtype):
    """The cotangent of x_0: ``x0_bar`` plus the trajectory's last entry's."""
    if is_array(x0_bar):
        return x0_bar.astype(dtype) + (0 if traj_bar is None else traj_bar[-1])
    if traj_bar is None:
        return jax.tree.map(lambda v: v.astype(dtype), x0_bar)
    return jax.tree.map(lambda v, tb: v.astype(dtype) + tb[-1], x0_bar, traj_bar)


def step_vjp(problem: Problem, params, z, i, inp, state, xi, carry, tb, grid: bool):
    """One reverse step of the exact discrete adjoint: the VJP of ``solver.step`` at
    ``state`` (the model evaluation rematerialised inside it). ``carry`` is ``(state
    cotangent after the step, params cotangent, z cotangent)``; ``tb`` a trajectory cotangent
    on the state's sample (or None). Returns the new carry and the per-step outputs
    ``(z cotangent if per-step, noise cotangent if a noise array, inputs cotangent if
    grid)``. Shared by :class:`DiscreteAdjoint` and :class:`ReversibleAdjoint`."""
    solver = problem.solver
    sbar, pbar, zbar = carry
    z_i = z_at(z, i, problem.per_step_z)

    def f(st, p, zz, ip, nz):
        return solver.step(bind_model(problem, p, zz), ip, st, nz)

    _, vjp = jax.vjp(f, state, params, z_i, inp, xi)
    st_bar, gp, gz, ip_bar, xi_bar = vjp(sbar)
    if tb is not None:
        _, ovjp = jax.vjp(solver.output, state)
        (extra,) = ovjp(tb)
        st_bar = _tree.add(st_bar, extra)
    pbar = _tree.add(pbar, gp)
    if problem.per_step_z:
        ys_z = gz
    else:
        zbar = _tree.add(zbar, gz)
        ys_z = None
    noise_array = problem.noise_mode == "array"
    return (st_bar, pbar, zbar), (
        ys_z,
        xi_bar if noise_array else None,
        ip_bar if grid else None,
    )


def _generic_backward(problem: Problem, args: Args, states, x0_bar, traj_bar, grid: bool):
    """Reverse scan over the VJP of ``solver.step`` (any solver)."""
    solver = problem.solver
    params, x_T, z, schedule, ts, noise = args
    dtype = state_dtype(x_T)
    n = ts.shape[0] - 1
    inputs, vjp_inputs = _inputs_and_vjp(problem, args, dtype, grid)
    per_step = problem.per_step_z
    # the cotangent of the final state: x0_bar on its sample (``output`` is a selection,
    # so any state of the right structure serves as its primal)
    last = jax.tree.map(lambda s: s[-1], states)
    _, out_vjp = jax.vjp(solver.output, last)
    (sbar0,) = out_vjp(_final_bar(x0_bar, traj_bar, dtype))

    def body(carry, xs):
        sbar, pbar, zbar = carry
        i, inp, state, tb = xs
        xi = draw_noise(problem, noise, i, solver.output(state))
        return step_vjp(problem, params, z, i, inp, state, xi, (sbar, pbar, zbar), tb, grid)

    zbar0 = None if per_step else _tree.zeros_like(z)
    tb_in = None if traj_bar is None else jax.tree.map(lambda v: v[:-1], traj_bar)
    (sbar, pbar, zbar), (zs, noise_bar, inputs_bar) = lax.scan(
        body,
        (sbar0, _tree.zeros_like(params), zbar0),
        (jnp.arange(n), inputs, states, tb_in),
        reverse=True,
    )
    # the initial state is solver.init(x_T)
    _, init_vjp = jax.vjp(solver.init, x_T)
    (xT_bar,) = init_vjp(sbar)
    return _finish(problem, args, pbar, xT_bar, zbar, zs, noise_bar, inputs_bar, vjp_inputs)


def _linear_backward(problem: Problem, args: Args, xs, x0_bar, traj_bar, grid: bool):
    """Hand-derived reverse sweep of x' = a x + sum_j b_j m_{i-j} + c xi keeping only the N
    samples ``xs`` (docs/math/adjoint.md, "exact discrete adjoint")."""
    solver = problem.solver
    params, x_T, z, schedule, ts, noise = args
    dtype = state_dtype(xs)
    n = ts.shape[0] - 1
    k = solver.order
    tm = jax.tree.map
    inputs, vjp_inputs = _inputs_and_vjp(problem, args, dtype, grid)
    per_step = problem.per_step_z
    noise_array = problem.noise_mode == "array"
    need_xi = grid and solver.stochastic

    def body(carry, xs_in):
        xbar, pend, xbar_hist, pbar, zbar = carry
        i, inp, x_i, tb = xs_in
        m_bar = tm(lambda v: inp.b[0] * v, xbar)
        if k > 1:
            m_bar = tm(jnp.add, m_bar, pend[0])
        new_pend = tuple(
            tm(lambda v, j=j: inp.b[j + 1] * v, xbar) if j + 1 >= k - 1
            else tm(lambda p, v, j=j: p + inp.b[j + 1] * v, pend[j + 1], xbar)
            for j in range(k - 1)
        )
        z_i = z_at(z, i, per_step)
        if grid:

            def f(p, x, zz, t, alpha, sigma):
                model = bind_model(problem, p, zz)
                return solver.convert(model(x, t), x, alpha, sigma)

            m, vjp = jax.vjp(f, params, x_i, z_i, inp.t, inp.alpha, inp.sigma)
            gp, gx, gz, t_bar, al_bar, si_bar = vjp(m_bar)
        else:

            def f(p, x, zz):
                return solver.model_output(bind_model(problem, p, zz), inp, x)

            m, vjp = jax.vjp(f, params, x_i, z_i)
            gp, gx, gz = vjp(m_bar)
        new_xbar = tm(lambda v, g: inp.a * v + g, xbar, gx)
        if tb is not None:
            new_xbar = tm(jnp.add, new_xbar, tb)
        pbar = _tree.add(pbar, gp)
        if per_step:
            ys_z = gz
        else:
            zbar = _tree.add(zbar, gz)
            ys_z = None
        ys_noise = tm(lambda v: inp.c * v, xbar) if noise_array else None
        ys_grid = None
        new_hist = xbar_hist
        if grid:
            # d[q] = <xbar_{i+1+q}, m_i>: the cotangent of b[i+q, q]
            d = jnp.stack([_tree.vdot(xbar, m)] + [_tree.vdot(h, m) for h in xbar_hist])
            c_bar = jnp.zeros((), dtype)
            if need_xi:
                c_bar = _tree.vdot(xbar, draw_noise(problem, noise, i, x_i))
            ys_grid = (_tree.vdot(xbar, x_i), d, c_bar, t_bar, al_bar, si_bar)
            new_hist = ((xbar,) + xbar_hist)[: k - 1]
        return (new_xbar, new_pend, new_hist, pbar, zbar), (ys_z, ys_noise, ys_grid)

    xbar0 = _final_bar(x0_bar, traj_bar, dtype)
    zeros = tm(jnp.zeros_like, xbar0)
    pend0 = tuple(zeros for _ in range(k - 1))
    hist0 = tuple(zeros for _ in range(k - 1)) if grid else ()
    zbar0 = None if per_step else _tree.zeros_like(z)
    tb_in = None if traj_bar is None else tm(lambda v: v[:-1], traj_bar)
    (xT_bar, _, _, pbar, zbar), (zs, noise_bar, ys_grid) = lax.scan(
        body,
        (xbar0, pend0, hist0, _tree.zeros_like(params), zbar0),
        (jnp.arange(n), inputs, xs, tb_in),
        reverse=True,
    )
    inputs_bar = None
    if grid:
        a_bar, d, c_bar, t_bar, al_bar, si_bar = ys_grid
        cols = []
        for q in range(inputs.b.shape[1]):
            if q < min(k, n):  # (a grid of n <= q steps never uses column q)
                cols.append(jnp.concatenate([jnp.zeros((q,), dtype), d[: n - q, q]]))
            else:
                cols.append(jnp.zeros((n,), dtype))
        b_bar = jnp.stack(cols, axis=1)
        inputs_bar = LinearStepInputs(
            t=t_bar.astype(inputs.t.dtype),
            a=a_bar,
            b=b_bar,
            c=c_bar,
            alpha=al_bar,
            sigma=si_bar,
        )
    if noise_bar is not None:
        noise_bar = tm(lambda g, v: g.astype(np.dtype(v.dtype)), noise_bar, noise)
    return _finish(problem, args, pbar, xT_bar, zbar, zs, noise_bar, inputs_bar, vjp_inputs)
