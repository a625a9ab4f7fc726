"""The one sampling loop: every controller, every solver, every gradient strategy.

``integrate`` runs a solver's steps under a step-size controller:

- a grid controller (:class:`jadeis.FixedGrid`): one ``lax.scan`` over the per-step inputs,
  computed once for the whole grid (vectorised, differentiable);
- an adaptive controller (:class:`jadeis.PIDController`): a ``lax.while_loop`` of at most
  ``max_steps`` attempts (or, with ``bounded=True``, a ``lax.scan`` of ``max_steps``
  iterations that skip once done, which reverse-mode autodiff can run through). Each
  attempt computes its step's inputs from the recent accepted times, takes the solver's
  step with its error estimate, and lets the controller accept or reject it.

Both record the same :class:`Grid` (the accepted times, their number and, for a fixed grid,
the inputs) and :class:`Stats`. Every gradient strategy wraps ``integrate`` for its forward
pass and walks back over the accepted steps with ``sweep``, so it runs on every controller
with no code of its own for either.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array

from ._conditioning import z_at
from ._controller import AbstractAdaptiveController
from ._core import Args, Problem, bind_model, draw_noise, is_array, state_dtype
from ._solver.base import row


class Grid(NamedTuple):
    """The steps a run took.

    - `ts`: the accepted times, shape ``(K + 1,)``; for an adaptive run ``K = max_steps``
      and the entries after ``count`` repeat the end time.
    - `count`: the number of accepted steps (a Python int for a grid fixed in advance, a
      traced int32 for an adaptive run).
    - `rows`: the solver's inputs of every step: computed before the loop on a fixed grid;
      for an adaptive run that keeps its states (``save``), those its accepted attempts
      used (``max_steps`` rows); otherwise ``None`` (a step's inputs are then recomputed
      from the times, with the same formulas).
    """

    ts: Array
    count: Any
    rows: Any

    @property
    def fixed(self) -> bool:
        return isinstance(self.count, int)


class Stats(NamedTuple):
    """What a run cost (int32 arrays; per example under ``vmap``).

    - `num_steps`: accepted steps; `num_attempts`: steps tried (accepted or rejected);
      `num_rejected`: ``num_attempts - num_steps``.
    - `model_evals`: evaluations of the model in the forward pass.
    - `grad_model_evals`, `grad_vjps`: what a gradient of this run costs with the chosen
      strategy: model evaluations and vector-Jacobian products of the model in its backward
      pass (a VJP counts one; it includes its own forward evaluation).
    """

    num_steps: Array
    num_attempts: Array
    num_rejected: Array
    model_evals: Array
    grad_model_evals: Array
    grad_vjps: Array


class LoopResult(NamedTuple):
    x_0: Any
    final: Any  # the final solver state
    saved: Any  # per accepted step: None, the sample or the solver state at its start
    grid: Grid
    stats: Stats
    checkpoints: Any = None  # Checkpointed: exact states kept for a reversible solver
    failed: Any = None  # adaptive: a bool, the end was not reached (else None)


class Checkpoints(NamedTuple):
    """Where a reversible solver's backward pass keeps exact states (static): at most
    ``size`` of them, each where the inverse's amplification accumulated since the last
    exact state (``solver.inverse_log_amplification`` per step, in nats) would exceed
    ``budget`` (docs/math/reversible.md#conditioning)."""

    size: int
    budget: float


class Checkpointed(NamedTuple):
    """The states kept by a run with :class:`Checkpoints`: ``states[j]`` is the solver state
    at the start of step ``index[j]`` (``count`` of them, in increasing step order)."""

    states: Any
    index: Array
    count: Array


def _checkpoint_init(spec: Checkpoints, state0):
    return {
        "states": _buffer(spec.size, state0),
        "index": jnp.full((spec.size,), -1, jnp.int32),
        "count": jnp.zeros((), jnp.int32),
        "cum": jnp.zeros((), jnp.float32),
        "step": jnp.zeros((), jnp.int32),
    }


def _checkpoint_record(spec: Checkpoints, solver, ck, state, inp, accept, first_step: int):
    """Update the checkpoint carry for an attempted step from ``state`` (kept if
    ``accept``): the state at the start of step ``i`` is kept when the amplification of the
    states rebuilt since the last exact one would exceed the budget with this step's."""
    a = lax.stop_gradient(solver.inverse_log_amplification(inp)).astype(jnp.float32)
    total = ck["cum"] + a
    first = ck["step"] == 0  # the state at the first step is the run's start: exact
    store = accept & ~first & (total > spec.budget) & (ck["count"] < spec.size)
    j = jnp.minimum(ck["count"], spec.size - 1)
    states = jax.tree.map(
        lambda b, v: b.at[j].set(jnp.where(store, lax.stop_gradient(v), b[j])),
        ck["states"],
        state,
    )
    index = ck["index"].at[j].set(jnp.where(store, first_step + ck["step"], ck["index"][j]))
    cum = jnp.where(first | store, jnp.zeros_like(total), total)
    return {
        "states": states,
        "index": index,
        "count": ck["count"] + store.astype(jnp.int32),
        "cum": jnp.where(accept, cum, ck["cum"]),
        "step": ck["step"] + accept.astype(jnp.int32),
    }


def _checkpointed(ck):
    if ck is None:
        return None
    return Checkpointed(ck["states"], ck["index"], ck["count"])


def is_adaptive(problem: Problem) -> bool:
    return isinstance(problem.controller, AbstractAdaptiveController)


def fixed_rows(problem: Problem, schedule, ts, dtype):
    """The per-step inputs of a grid fixed in advance (differentiable in ``schedule``, ``ts``),
    of the steps from ``problem.first_step`` on (the solver sees the grid points before it
    that its history needs, so the rows are those of the whole grid)."""
    solver = problem.solver
    if is_adaptive(problem):
        # the accepted grid of an adaptive run (solve_adjoint): its steps' formulas
        return solver.inputs(schedule, ts, dtype, to_end=False)
    grid = problem.controller.grid(schedule, ts)
    start = problem.first_step
    if start == 0:
        return solver.inputs(schedule, grid, dtype)
    lead = min(solver.num_history, start)
    rows = solver.inputs(schedule, grid[start - lead :], dtype, first_index=start - lead)
    return jax.tree.map(lambda v: v[lead:], rows)


def step_grid(problem: Problem, schedule, ts):
    """The times of the run's steps (from ``problem.first_step`` on) on a fixed grid."""
    return problem.controller.grid(schedule, ts)[problem.first_step :]


def grid_row(problem: Problem, schedule, grid: Grid, i, dtype):
    """The inputs of accepted step ``i`` (recomputed from the times of an adaptive grid,
    exactly as the forward pass computed them)."""
    if grid.rows is not None:
        return row(grid.rows, i)
    solver = problem.solver
    h = solver.num_history
    i = jnp.asarray(i)
    idx = jnp.clip(i + jnp.arange(-h, 2, dtype=i.dtype), 0, None)
    return solver.step_inputs(schedule, grid.ts[idx], i, dtype)


def _select(pred, a, b):
    return jax.tree.map(lambda u, v: jnp.where(pred, u, v), a, b)


def _buffer(n: int, like):
    """A zero buffer of n copies of each leaf, laid out (sharded) like the leaf: under an
    explicit-axis mesh each device then keeps only its own rows of every saved state."""
    return jax.tree.map(lambda v: jnp.broadcast_to(jnp.zeros_like(v)[None], (n,) + v.shape), like)


def _saved_of(save, solver, state):
    if save == "x":
        return solver.output(state)
    if save == "state":
        return state
    return None


def integrate(
    problem: Problem,
    args: Args,
    *,
    save: str | None = None,
    bounded: bool = False,
    rows=None,
    checkpoints: Checkpoints | None = None,
) -> LoopResult:
    """Run the sampler from ``args.x_T`` (a solver state if ``problem.resume``).

    ``save`` selects what is kept per accepted step: ``None``, ``"x"`` (the sample at the
    start of each step) or ``"state"`` (the solver state at the start of each step).
    ``rows``: the per-step inputs of a fixed grid, if already computed. ``bounded``: an
    adaptive loop that reverse-mode autodiff can differentiate (a scan of ``max_steps``
    iterations). ``checkpoints``: also keep a few exact states for a reversible solver's
    backward pass (:class:`Checkpoints`; returned as ``LoopResult.checkpoints``).
    """
    if checkpoints is not None and checkpoints.size == 0:
        checkpoints = None
    if rows is None and is_adaptive(problem):
        return _adaptive(problem, args, save, bounded, checkpoints)
    return _fixed(problem, args, save, rows, checkpoints)


def _uses_step_index(problem: Problem) -> bool:
    """Whether a step reads its index (per-step conditioning or SDE noise)."""
    return problem.per_step_z or problem.solver.stochastic


def _fixed(problem: Problem, args: Args, save, rows, checkpoints=None):
    solver = problem.solver
    params, x_T, z, schedule, ts, noise = args
    state0 = problem.init(x_T)
    dtype = state_dtype(solver.output(state0))
    if rows is None:
        rows = fixed_rows(problem, schedule, ts, dtype)
        ts = step_grid(problem, schedule, ts)
    n = jax.tree.leaves(rows)[0].shape[0]
    yes = jnp.ones((), bool)

    def body(carry, xs):
        state, ck = carry
        i, inp = xs
        model = bind_model(problem, params, z_at(z, i, problem.per_step_z))
        x = solver.output(state)
        x = x.astype(dtype) if is_array(x) else jax.tree.map(lambda v: v.astype(dtype), x)
        xi = draw_noise(problem, noise, i, x)
        new, _ = solver.step(model, inp, state, xi)
        if ck is not None:
            ck = _checkpoint_record(checkpoints, solver, ck, state, inp, yes, problem.first_step)
        return (new, ck), _saved_of(save, solver, state)

    # the step index is scanned over only where a step uses it (per-step z, noise)
    steps = problem.first_step + jnp.arange(n) if _uses_step_index(problem) else None
    ck0 = None if checkpoints is None else _checkpoint_init(checkpoints, state0)
    (final, ck), saved = lax.scan(body, (state0, ck0), (steps, rows))
    count = jnp.asarray(n, jnp.int32)
    evals = count * solver.evals_per_step
    zero = jnp.zeros((), jnp.int32)
    stats = Stats(count, count, zero, evals, zero, zero)
    return LoopResult(
        solver.output(final), final, saved, Grid(ts, n, rows), stats, _checkpointed(ck)
    )


def _adaptive(problem: Problem, args: Args, save, bounded: bool, checkpoints=None):
    solver = problem.solver
    ctrl = problem.controller
    params, x_T, z, schedule, ts, _ = args
    state0 = problem.init(x_T)
    dtype = state_dtype(solver.output(state0))
    M = ctrl.max_steps
    h = solver.num_history
    model = bind_model(problem, params, z)
    cstate0 = lax.stop_gradient(ctrl.init(solver, schedule, ts, dtype))
    t_start = cstate0.t

    reuse = solver.first_evaluation_at_state
    # a gradient strategy's backward pass reads the inputs each accepted step used (a few
    # scalars per step) rather than recomputing them (not kept by the bounded loop that
    # reverse-mode autodiff runs through, which has no such backward pass)
    keep_rows = save is not None and not bounded

    def body(c):
        state, cstate, n = c["state"], c["ctrl"], c["n_acc"]
        t_next, last = ctrl.propose(schedule, cstate)
        times = jnp.concatenate([c["recent"], t_next[None]])
        inp = solver.step_inputs(schedule, times, n, dtype)
        first = []
        if reuse:
            # the step's first evaluation is at the state itself: after a rejection, the
            # retry from the same state reuses it (no model evaluation)

            def step_model(x, t):
                if first:
                    return model(x, t)
                out = lax.cond(c["cached"], lambda x: c["eps0"], lambda x: model(x, t), x)
                first.append(out)
                return out
        else:
            step_model = model
        new_state, err = solver.step(step_model, inp, state, None)
        x, x_new = solver.output(state), solver.output(new_state)
        accept, cstate = ctrl.adapt(solver, cstate, err, x, x_new, n, t_next, last)
        accept = lax.stop_gradient(accept)
        out = {
            "state": _select(accept, new_state, state),
            "ctrl": lax.stop_gradient(cstate),
            "recent": jnp.where(accept, times[1:], c["recent"]),
            "n_acc": n + accept.astype(jnp.int32),
            "n_try": c["n_try"] + 1,
            "done": accept & last,
        }
        if reuse:
            out["eps0"] = first[0]
            out["cached"] = ~accept
            out["reused"] = c["reused"] + c["cached"].astype(jnp.int32)
        if checkpoints is not None:
            out["ck"] = _checkpoint_record(
                checkpoints, solver, c["ck"], state, inp, accept, problem.first_step
            )
        buf = c["ts_buf"]
        out["ts_buf"] = buf.at[n + 1].set(jnp.where(accept, t_next, buf[n + 1]))
        if save is not None:
            # the start of the step and its inputs (unchanged by a rejection, or rewritten by
            # the next attempt at the same index, so writing them on every attempt is
            # harmless): the backward pass reads the inputs the forward pass used instead of
            # recomputing them from the times
            out["saved"] = jax.tree.map(
                lambda b, s: b.at[n].set(s), c["saved"], _saved_of(save, solver, state)
            )
            if keep_rows:
                out["rows"] = jax.tree.map(lambda b, v: b.at[n].set(v), c["rows"], inp)
        return out

    def running(c):
        return ~c["done"] & (c["n_try"] < M) & ~ctrl.stalled(c["ctrl"])

    carry = {
        "state": state0,
        "ctrl": cstate0,
        "recent": jnp.full((h + 1,), t_start, ts.dtype),
        "n_acc": jnp.zeros((), jnp.int32),
        "n_try": jnp.zeros((), jnp.int32),
        "done": jnp.zeros((), bool),
        "ts_buf": jnp.full((M + 1,), ts[-1], ts.dtype).at[0].set(t_start),
    }
    if save is not None:
        carry["saved"] = _buffer(M, _saved_of(save, solver, state0))
    if keep_rows:
        like = jax.eval_shape(
            lambda t: solver.step_inputs(schedule, t, jnp.zeros((), jnp.int32), dtype),
            jax.ShapeDtypeStruct((h + 2,), ts.dtype),
        )
        carry["rows"] = jax.tree.map(lambda v: jnp.zeros((M,) + v.shape, v.dtype), like)
    if checkpoints is not None:
        carry["ck"] = _checkpoint_init(checkpoints, state0)
    if reuse:
        x0 = solver.output(state0)
        carry["eps0"] = jax.tree.map(jnp.zeros_like, x0)
        carry["cached"] = jnp.zeros((), bool)
        carry["reused"] = jnp.zeros((), jnp.int32)
    if bounded:
        c, _ = lax.scan(
            lambda c, _: (lax.cond(running(c), body, lambda c: c, c), None),
            carry,
            None,
            length=M,
        )
    else:
        c = lax.while_loop(running, body, carry)
    x_0 = solver.output(c["state"])
    n_acc, n_try = c["n_acc"], c["n_try"]
    zero = jnp.zeros((), jnp.int32)
    evals = n_try * solver.evals_per_step - (c["reused"] if reuse else 0)
    stats = Stats(n_acc, n_try, n_try - n_acc, evals, zero, zero)
    rows = lax.stop_gradient(c["rows"]) if keep_rows else None
    grid = Grid(lax.stop_gradient(c["ts_buf"]), n_acc, rows)
    return LoopResult(
        x_0, c["state"], c.get("saved"), grid, stats, _checkpointed(c.get("ck")), ~c["done"]
    )


def budget_message(problem: Problem, where: str) -> str:
    """The error of an adaptive run that did not reach its end (``LoopResult.failed``)."""
    m = problem.controller.max_steps
    return (
        f"{where}: the adaptive controller did not reach ts[-1] within max_steps={m} attempts "
        f"(or its step size collapsed); raise max_steps, loosen rtol/atol, or check the model "
        f"for non-finite outputs."
    )


# ---------------------------------------------------------------------------------------
# trajectories


def trajectory(saved_x, x_0, grid: Grid):
    """The states at the accepted times, from the samples saved at the start of each step
    and ``x_0``: ``(N + 1,) + x.shape`` for a fixed grid; ``(max_steps + 1,) + x.shape`` for
    an adaptive run, the entries after ``grid.count`` repeating ``x_0``."""
    if grid.fixed:
        return jax.tree.map(lambda s, x: jnp.concatenate([s, x[None]], axis=0), saved_x, x_0)

    def pad(s, x):
        k = s.shape[0]
        keep = (jnp.arange(k, dtype=jnp.int32) < grid.count).reshape((k,) + (1,) * x.ndim)
        return jnp.concatenate([jnp.where(keep, s, x[None]), x[None]], axis=0)

    return jax.tree.map(pad, saved_x, x_0)


def split_trajectory_bar(traj_bar, grid: Grid):
    """A trajectory cotangent as ``(its part on x_0, its part on the start of each step)``
    (``None``, ``None`` for none): the inverse of :func:`trajectory`."""
    if traj_bar is None:
        return None, None
    if grid.fixed:
        return (jax.tree.map(lambda v: v[-1], traj_bar), jax.tree.map(lambda v: v[:-1], traj_bar))

    def parts(v):
        k = v.shape[0] - 1
        pad = jnp.arange(k + 1, dtype=jnp.int32) >= grid.count
        pad = pad.reshape((k + 1,) + (1,) * (v.ndim - 1))
        on_x0 = jnp.sum(jnp.where(pad, v, jnp.zeros_like(v)), axis=0)
        per_step = jnp.where(pad[:-1], jnp.zeros_like(v[:-1]), v[:-1])
        return on_x0, per_step

    both = jax.tree.map(parts, traj_bar)
    leaves, treedef = jax.tree.flatten(traj_bar)
    pairs = treedef.flatten_up_to(both)
    return (treedef.unflatten([p[0] for p in pairs]), treedef.unflatten([p[1] for p in pairs]))


# ---------------------------------------------------------------------------------------
# walking over the accepted steps


def loop_rows(body, carry, rows, count, *, reverse: bool = False):
    """Run ``body(carry, i, row_i) -> (carry, ys_i)`` for ``i`` in ``range(count)`` (reversed
    with ``reverse``) over precomputed per-step ``rows``: a ``lax.scan`` when ``count`` is a
    Python int (``ys`` stacked), a ``lax.while_loop`` when it is traced (``ys`` must be
    ``None``)."""
    if isinstance(count, int):
        return lax.scan(lambda c, a: body(c, *a), carry, (jnp.arange(count), rows), reverse=reverse)

    def while_body(c):
        i, inner = c
        inner, ys = body(inner, i, row(rows, i))
        _no_outputs(ys)
        return (i - 1 if reverse else i + 1), inner

    i0, cond = _while_range(count, reverse)
    _, carry = lax.while_loop(cond, while_body, (i0, carry))
    return carry, None


def _no_outputs(ys):
    if any(y is not None for y in jax.tree.leaves(ys, is_leaf=lambda v: v is None)):
        raise AssertionError("an adaptive run has no stacked per-step outputs")


def _while_range(count, reverse):
    if reverse:
        return jnp.asarray(count - 1, jnp.int32), lambda c: c[0] >= 0
    return jnp.zeros((), jnp.int32), lambda c: c[0] < count


def sweep(
    problem: Problem,
    schedule,
    grid: Grid,
    body,
    carry,
    xs,
    *,
    dtype,
    rows=None,
    reverse: bool = True,
):
    """Run ``body(carry, i, inp, xs_i) -> (carry, ys_i)`` over the accepted steps (in
    reverse by default). ``xs``: per-step arrays (leading axis the steps). A fixed grid is
    one ``lax.scan`` (``ys`` stacked); an adaptive one a ``lax.while_loop`` over the
    ``grid.count`` accepted steps, with each step's inputs recomputed from the times (``ys``
    must be ``None``: what differs per step of an adaptive run is not stacked)."""
    if grid.fixed:
        rows = grid.rows if rows is None else rows
        n = grid.count

        def scan_body(c, a):
            i, inp, x_i = a
            return body(c, i, inp, x_i)

        steps = problem.first_step + jnp.arange(n)
        return lax.scan(scan_body, carry, (steps, rows, xs), reverse=reverse)

    def while_body(c):
        i, inner = c
        inp = grid_row(problem, schedule, grid, i, dtype)
        x_i = jax.tree.map(lambda v: lax.dynamic_index_in_dim(v, i, keepdims=False), xs)
        inner, ys = body(inner, i, inp, x_i)
        _no_outputs(ys)
        return (i - 1 if reverse else i + 1), inner

    i0, cond = _while_range(grid.count, reverse)
    _, carry = lax.while_loop(cond, while_body, (i0, carry))
    return carry, None
