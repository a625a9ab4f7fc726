"""The exact reverse sweep over a solver's steps, shared by the exact strategies.

One reverse step is the vector-Jacobian product of ``solver.step`` at the state at the start
of the step (the model evaluations rematerialised inside it). The states come from a buffer
(:class:`jadeis.DiscreteAdjoint`) or are rebuilt from the state after the step with the
solver's algebraic inverse (:class:`jadeis.ReversibleAdjoint`). The sweep runs over the
accepted steps of any controller (``jadeis._loop.sweep``); gradients with respect to ``ts``
and the schedule go through the per-step inputs of a fixed grid.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .._conditioning import z_at
from .._core import Args, Problem, bind_model, draw_noise, is_array, state_dtype
from .._loop import Grid, fixed_rows, split_trajectory_bar, sweep
from . import _tree
from .base import Wanted, partial_vjp


def rows_and_vjp(problem: Problem, args: Args, grid: Grid, want: Wanted, dtype):
    """The per-step inputs of the grid and, when the grid is differentiated, their VJP with
    respect to ``(schedule, ts)``."""
    if want.grid:
        rows, vjp = jax.vjp(
            lambda sch, ts: fixed_rows(problem, sch, ts, dtype), args.schedule, args.ts
        )
        return rows, vjp
    return grid.rows, None


def final_bar(x0_bar, extra, dtype):
    """The cotangent of x_0: ``x0_bar`` plus the trajectory's part on x_0 (``extra``)."""
    if is_array(x0_bar):
        return x0_bar.astype(dtype) + (0 if extra is None else extra)
    if extra is None:
        return jax.tree.map(lambda v: v.astype(dtype), x0_bar)
    return jax.tree.map(lambda v, e: v.astype(dtype) + e, x0_bar, extra)


def cotangents(
    problem: Problem,
    args: Args,
    want: Wanted,
    pbar,
    xT_bar,
    zbar,
    zs,
    noise_bar,
    inputs_bar,
    vjp_rows,
) -> Args:
    """The cotangents of ``args`` from the sweep's accumulators (``None`` where not wanted)."""
    if problem.per_step_z and want.z:
        zbar = type(args.z)(pad_steps(zs, problem.first_step))
    sch_bar = ts_bar = None
    if vjp_rows is not None:
        sch_bar, ts_bar = vjp_rows(inputs_bar)
    if not (problem.noise_mode == "array" and want.noise):
        noise_bar = None
    elif noise_bar is not None:
        noise_bar = jax.tree.map(
            lambda g, v: g.astype(np.dtype(v.dtype)),
            pad_steps(noise_bar, problem.first_step),
            args.noise,
        )
    return Args(
        pbar if want.params else None,
        xT_bar if want.x_T else None,
        zbar if want.z else None,
        sch_bar,
        ts_bar,
        noise_bar,
    )


def pad_steps(per_step, first: int):
    """Per-step cotangents of the steps from ``first`` on, with zeros for the steps before
    (a run that starts part-way: their cotangents are not part of its gradient)."""
    if first == 0 or per_step is None:
        return per_step
    return jax.tree.map(
        lambda v: jnp.concatenate([jnp.zeros((first,) + v.shape[1:], v.dtype), v]), per_step
    )


def _select(pred, a, b):
    return jax.tree.map(lambda u, v: jnp.where(pred, u, v), a, b)


def step_vjp(problem: Problem, params, z, i, inp, state, xi, sbar, want: Wanted):
    """The VJP of step ``i`` at ``state``: ``(state, params, z_i, inputs, noise)``
    cotangents, ``None`` for those not wanted."""
    solver = problem.solver

    def f(st, p, zz, ip, nz):
        return solver.step(bind_model(problem, p, zz), ip, st, nz)[0]

    z_i = z_at(z, i, problem.per_step_z)
    wanted = (
        True,
        want.params,
        want.z,
        want.grid,
        xi is not None and want.noise and problem.noise_mode == "array",
    )
    _, vjp = partial_vjp(f, (state, params, z_i, inp, xi), wanted)
    return vjp(sbar)


def exact_backward(
    problem: Problem,
    args: Args,
    grid: Grid,
    want: Wanted,
    x0_bar,
    traj_bar,
    *,
    states=None,
    final=None,
    checkpoints=None,
):
    """The exact discrete adjoint: the reverse sweep of step VJPs over the accepted steps.

    ``states``: the solver states at the start of every step (a buffer); or ``final``: the
    final state, from which the solver's ``inverse_step`` rebuilds each state, except at the
    run's first step (its start, ``init(x_T)``) and at the steps kept in ``checkpoints``
    (a :class:`jadeis._loop.Checkpointed`), whose exact states replace the rebuilt ones."""
    solver = problem.solver
    params, x_T, z, schedule, ts, noise = args
    dtype = state_dtype(x_T)
    rows, vjp_rows = rows_and_vjp(problem, args, grid, want, dtype)
    per_step = problem.per_step_z
    on_x0, tb = split_trajectory_bar(traj_bar, grid)
    # the cotangent of the final state: x0_bar on its sample (``output`` is a selection,
    # so any state of the right structure serves as its primal)
    like = final if states is None else jax.tree.map(lambda s: s[0], states)
    _, out_vjp = jax.vjp(solver.output, like)
    (sbar0,) = out_vjp(final_bar(x0_bar, on_x0, dtype))

    start = problem.init(x_T) if states is None else None

    def body(carry, i, inp, xs_i):
        rebuilt, sbar, pbar, zbar = carry
        state_i, tb_i = xs_i
        if states is None:
            state_next, j = rebuilt
            model = bind_model(problem, params, z_at(z, i, per_step))
            xi = draw_noise(problem, noise, i, solver.output(state_next))
            state_i = solver.inverse_step(model, inp, state_next, xi)
            if checkpoints is not None:
                k = jnp.maximum(j, 0)
                hit = (j >= 0) & (checkpoints.index[k] == jnp.asarray(i).astype(jnp.int32))
                kept = jax.tree.map(lambda b: b[k], checkpoints.states)
                state_i = _select(hit, kept, state_i)
                j = j - hit.astype(j.dtype)
            state_i = _select(i == problem.first_step, start, state_i)
        else:
            xi = draw_noise(problem, noise, i, solver.output(state_i))
        st_bar, gp, gz, ip_bar, xi_bar = step_vjp(
            problem, params, z, i, inp, state_i, xi, sbar, want
        )
        if tb_i is not None:
            _, ovjp = jax.vjp(solver.output, state_i)
            st_bar = _tree.add(st_bar, ovjp(tb_i)[0])
        if want.params:
            pbar = _tree.add(pbar, gp)
        ys_z = None
        if want.z:
            if per_step:
                ys_z = gz
            else:
                zbar = _tree.add(zbar, gz)
        nxt = (state_i, j) if states is None else None
        return (nxt, st_bar, pbar, zbar), (ys_z, xi_bar, ip_bar)

    zbar0 = _tree.zeros_like(z) if (want.z and not per_step) else None
    pbar0 = _tree.zeros_like(params) if want.params else None
    j0 = None
    if states is None:
        j0 = jnp.asarray(-1, jnp.int32) if checkpoints is None else checkpoints.count - 1
    carry0 = ((final, j0) if states is None else None, sbar0, pbar0, zbar0)
    (_, sbar, pbar, zbar), ys = sweep(
        problem, schedule, grid, body, carry0, (states, tb), dtype=dtype, rows=rows
    )
    zs, noise_bar, inputs_bar = ys if ys is not None else (None, None, None)
    xT_bar = None
    if want.x_T:
        # the initial state is solver.init(x_T) (x_T itself when resuming)
        _, init_vjp = jax.vjp(problem.init, x_T)
        (xT_bar,) = init_vjp(sbar)
    return cotangents(problem, args, want, pbar, xT_bar, zbar, zs, noise_bar, inputs_bar, vjp_rows)


__all__ = ["cotangents", "exact_backward", "final_bar", "rows_and_vjp", "step_vjp"]
