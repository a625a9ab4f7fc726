"""Encoding real data: DDIM inversion (ODE) and Cycle-SDE noise recovery (SDE)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _recompile as R, _validate as V
from ._conditioning import PerStep, z_at
from ._controller import AbstractController
from ._core import bind_model, draw_noise, normal_like, state_dtype
from ._ei import model_time_dtype
from ._loop import budget_message, integrate, is_adaptive, trajectory
from ._sample import prepare, resolve_solver
from ._schedule import AbstractSchedule
from ._solver import DDIM, AbstractSolver, RexLatent, SDEDPMSolver
from ._solver.base import AbstractLinearMultistepSolver, AbstractReversibleSolver
from ._solver.rex import grid_fingerprint


def encode_ode(
    eps_fn: Callable,
    params: Any,
    x_0,
    z: Any = None,
    *,
    schedule: AbstractSchedule,
    ts,
    solver: AbstractSolver = DDIM(),
    controller: AbstractController | None = None,
    return_trajectory: bool = False,
):
    r"""DDIM inversion: the ``x_T`` that sampling on ``ts`` maps (approximately) to ``x_0``.

    Runs the probability-flow ODE forwards in time, from ``x_0`` at ``ts[-1]`` up to
    ``ts[0]``, with the exponential-integrator steps of ``solver`` on the reversed grid
    (with ``DDIM()``: ``x_t = (alpha_t/alpha_s) x_s - sigma_t expm1(lambda_t - lambda_s)
    eps(x_s, s)``). The model is evaluated at the lower-noise end of each step, so
    ``sample(..., x_T, ts=ts, solver=solver)`` reproduces ``x_0`` up to the discretisation
    error, which vanishes as the number of steps grows. Differentiable with ``jax.grad``.

    **Arguments:** as in :func:`jadeis.sample`; ``ts`` is the (descending) sampling grid
    that will decode the result; ``solver`` must be an ODE sampler (default ``DDIM()``).
    With ``return_trajectory=True`` also returns the N + 1 states, ordered like ``ts``
    (first ``x_T``, last ``x_0``).

    With an adaptive ``controller`` (``ts`` the two end times) the ODE is integrated from
    ``ts[-1]`` up to ``ts[0]`` with adaptive steps; the trajectory then has ``max_steps + 1``
    entries, the states at the accepted times (from ``x_T``) followed by ``x_0`` repeated.

    With a reversible solver (``solver=jadeis.Rex(...)``) the inversion is exact: the
    result is a :class:`jadeis.RexLatent` (both coupled states at ``ts[0]``, the grid length
    and the solver) that ``sample(..., x_T=latent, ts=ts, solver=solver)`` maps back to
    ``x_0`` up to rounding (docs/math/reversible.md).

    **Example:**

    ```python
    >>> import jax.numpy as jnp
    >>> import jadeis
    >>> sch = jadeis.VPLinear()
    >>> ts = jadeis.time_grid(sch, 200)
    >>> eps_fn = lambda params, x, t, z: sch.sigma(t) * x / (sch.alpha(t) ** 2 * params
    ...                                                       + sch.sigma(t) ** 2)
    >>> x_0 = jnp.array([[0.3, -0.2]])
    >>> x_T = jadeis.encode_ode(eps_fn, 0.25, x_0, schedule=sch, ts=ts)
    >>> back = jadeis.sample(eps_fn, 0.25, x_T, schedule=sch, ts=ts, solver=jadeis.DDIM())
    >>> bool(jnp.allclose(back, x_0, atol=1e-2))
    True

    ```
    """
    where = "encode_ode"
    solver, controller = resolve_solver(solver, controller, where)
    if solver.stochastic:
        raise ValueError(
            f"{where}: {type(solver).__name__} is an SDE sampler: encode with "
            f"jadeis.encode_sde(..., solver={solver!r}, ...)"
            + (
                ", which returns the latent and the Brownian path's noise."
                if isinstance(solver, AbstractReversibleSolver)
                else "."
            )
        )
    problem, args, _ = prepare(
        where,
        eps_fn,
        params,
        x_0,
        z,
        schedule=schedule,
        ts=ts,
        solver=solver,
        controller=controller,
        adjoint=None,
        save_trajectory=return_trajectory,
    )
    checked = V.checked_eagerly(args.ts, args.schedule)
    if is_adaptive(problem) and problem.solver.extrapolated_error:
        raise ValueError(
            f"{where}: {type(problem.solver).__name__}'s error estimate extrapolates the model "
            f"outputs of the previous steps; integrating up from ts[-1], where the model "
            f"output barely changes, it sees no error and lets the steps grow past where the "
            f"output starts to change (encodings off by O(1) were measured). Encode adaptively "
            f"with jadeis.SinglestepDPMSolver(order=2 or 3), whose estimate evaluates the model "
            f"inside each step, or on a fixed grid."
        )
    if isinstance(problem.solver, AbstractReversibleSolver):
        if is_adaptive(problem):
            raise ValueError(
                f"{where}: exact inversion with {type(problem.solver).__name__} runs the "
                f"algebraic inverse of the steps a decoder will take; an adaptive controller "
                f"would choose the decoder's steps from the latent, so encode on a fixed grid "
                f"(ts of N + 1 times) and decode on the same grid."
            )
        V.check_pytree_solver(args.x_T, problem.solver, "x_0", where)
        return _exact_inversion(problem, args, checked, return_trajectory, where)
    out, failed = _encode_ode(problem, args, checked, _ends_at_zero(args.ts))
    if failed is None:
        return out
    message = {"failed": budget_message(problem, where)}
    if return_trajectory:
        return V.report(out[0], {"failed": failed}, message), out[1]
    return V.report(out, {"failed": failed}, message)


def _exact_inversion(problem, args, checked, return_trajectory, where):
    """Encode with a reversible solver, refusing what its inverse cannot return.

    Two limits (docs/math/reversible.md#conditioning): the coupling's zeta^-N (refused
    before anything runs), and the growth of the Lawson state, whose worst case is far
    from what a trained denoiser reaches: where it could matter (eps e^bound > 1e-3 of the
    state's dtype) the encoding is verified by decoding the latent in the same compiled
    call, and a round trip off by more than sqrt(eps) is refused with the measured error.
    """
    solver = problem.solver
    n = args.ts.shape[0] - 1
    dtype = state_dtype(args.x_T)
    solver.check_inversion(n, dtype, where)
    bound = solver.log_amplification_bound(args.schedule, args.ts, n)
    eps = float(jnp.finfo(dtype).eps)
    verify = bound is None or eps * math.exp(min(bound, 700.0)) > 1e-3
    out, err = _encode_exact(problem, args, checked, verify)
    if err is not None:
        tol = math.sqrt(eps)
        message = (
            f"{where}: the {type(solver).__name__} latent does not decode to x_0 (round trip "
            f"off by more than {tol:.2g}, relative, the bound for {jnp.dtype(dtype).name}): "
            f"exact inversion divides out the growth of the Lawson state over the grid, "
            f"which amplifies rounding by up to {_amplification(bound)} here "
            f"(docs/math/reversible.md#conditioning). Encode in float64, with more steps, or "
            f"with Rex (ODE) instead of SDERex."
        )
        latent = out[0] if return_trajectory else out
        x = V.report(latent.x, {"failed": err > tol}, {"failed": message})
        latent = RexLatent(x, latent.xh, latent.num_steps, latent.solver, latent.grid)
        out = (latent, out[1]) if return_trajectory else latent
    return _with_fingerprint(out, args.ts, return_trajectory)


def _amplification(bound) -> str:
    if bound is None:
        return "an amount unknown under jit"
    return f"e^{bound:.1f} = {math.exp(min(bound, 700.0)):.2g}"


def _with_fingerprint(out, ts, with_trajectory: bool):
    """The latent (of ``out``, or ``out[0]`` with a trajectory) with the fingerprint of a
    concrete grid recorded (outside the compiled function, so that every grid of one
    shape shares its compilation)."""
    latent = out[0] if with_trajectory else out
    latent = RexLatent(latent.x, latent.xh, latent.num_steps, latent.solver,
                       grid_fingerprint(ts))
    return (latent, out[1]) if with_trajectory else latent


@eqx.filter_jit
def _encode_exact(problem, args, ts_checked, verify: bool = False):
    """Exact inversion of a reversible solver: its ``inverse_step`` from ``init(x_0)`` at
    ``ts[-1]`` back to ``ts[0]``; returns its latent (and the N + 1 samples) and, with
    ``verify``, the relative error of decoding it (the largest over the leading axis of a
    batch), else ``None``."""
    R.note_trace("encode_ode", R.problem_parts(problem, args))
    V.check_problem_model(problem, args, "encode_ode", t_index=-1)  # once per compilation
    params, x_0, z, schedule, ts, noise = args
    if not ts_checked:
        ts = V.check_ts_traced(ts, schedule, "encode_ode", problem.solver)
    solver = problem.solver
    n = ts.shape[0] - 1
    inputs = solver.inputs(schedule, ts, state_dtype(x_0))

    def body(state, xs):
        i, inp = xs
        model = bind_model(problem, params, z_at(z, i, problem.per_step_z))
        xi = draw_noise(problem, noise, i, solver.output(state))
        prev = solver.inverse_step(model, inp, state, xi)
        return prev, (solver.output(prev) if problem.save_trajectory else None)

    first, saved = lax.scan(body, solver.init(x_0), (jnp.arange(n), inputs), reverse=True)
    latent = solver.latent(first, n)
    err = None
    if verify:
        def forward(state, xs):
            i, inp = xs
            model = bind_model(problem, params, z_at(z, i, problem.per_step_z))
            xi = draw_noise(problem, noise, i, solver.output(state))
            return solver.step(model, inp, state, xi)[0], None

        last, _ = lax.scan(forward, first, (jnp.arange(n), inputs))
        err = _relative_error(solver.output(last), x_0)
    if problem.save_trajectory:
        saved = jax.tree.map(lambda s, x: jnp.concatenate([s, x[None]]), saved, x_0)
        return (latent, saved), err
    return latent, err


def _relative_error(a, b):
    """|a - b| / |b| per example (over the leading axis of a batch), the largest."""
    if b.ndim < 2:
        a, b = a[None], b[None]
    a = a.reshape(a.shape[0], -1).astype(jnp.float32)
    b = b.reshape(b.shape[0], -1).astype(jnp.float32)
    num = jnp.linalg.norm(a - b, axis=1)
    den = jnp.maximum(jnp.linalg.norm(b, axis=1), float(jnp.finfo(jnp.float32).tiny))
    return jnp.max(jnp.where(jnp.isfinite(num), num / den, jnp.inf))


def _ends_at_zero(ts) -> bool | None:
    """Whether a concrete ``ts`` ends at t = 0 (``None`` for a traced one)."""
    if not V.is_concrete(ts):
        return None
    return float(np.asarray(ts)[-1]) == 0.0


@eqx.filter_jit
def _encode_ode(problem, args, ts_checked, zero_end):
    """The solver's own step on the reversed grid (per-step z reversed with it).

    A grid ending at t = 0 (``zero_end``): the first step, up from the clean data, cannot
    evaluate the model at sigma = 0 (the noise prediction is undefined there); it is taken
    as diffusers' ``DDIMInverseScheduler`` takes it, with the model at the step's upper
    time: ``x_1 = alpha_1 x_0 + sigma_1 eps(x_0, t_1)``. The solver then encodes from
    ``x_1`` on the rest of the grid."""
    R.note_trace("encode_ode", R.problem_parts(problem, args))
    V.check_problem_model(problem, args, "encode_ode", t_index=-1)  # once per compilation
    ts = args.ts
    if not ts_checked:
        ts = V.check_ts_traced(ts, args.schedule, "encode_ode", problem.solver)
    if zero_end is None:  # a traced grid: its end is known only at run time
        ts = V.runtime_check(
            ts,
            [(ts[-1] == 0, "encode_ode: a ts ending at t = 0 (final='zero') is encoded only "
                           "when it is concrete (not traced under jit): pass it as a constant.")],
        )
    z = args.z
    n = ts.shape[0] - 1
    x_first = args.x_T
    if zero_end:
        x_0 = args.x_T
        model = bind_model(problem, args.params, z_at(z, n - 1, problem.per_step_z))
        dtype = state_dtype(x_0)
        t_1 = ts[-2]
        a_1 = args.schedule.alpha(t_1).astype(dtype)
        s_1 = args.schedule.sigma(t_1).astype(dtype)
        eps = model(x_0, t_1.astype(model_time_dtype(dtype)))
        x_first = jax.tree.map(lambda x, e: a_1 * x + s_1 * e, x_0, eps)
        ts = ts[:-1]
        if problem.per_step_z:
            z = PerStep(jax.tree.map(lambda v: v[:-1], z.values))
    if problem.per_step_z:
        z = PerStep(jax.tree.map(lambda v: v[::-1], z.values))
    if ts.shape[0] == 1:  # one step, to t = 0: done
        if not problem.save_trajectory:
            return x_first, None
        return (x_first, jax.tree.map(lambda a, b: jnp.stack([a, b]), x_first, args.x_T)), None
    args = args._replace(x_T=x_first, z=z, ts=ts[::-1])
    res = integrate(
        problem, args, save="x" if problem.save_trajectory else None, bounded=is_adaptive(problem)
    )
    x_T = res.x_0
    if not problem.save_trajectory:
        return x_T, res.failed
    traj = trajectory(res.saved, x_T, res.grid)  # from x_0 (or x_1) up to x_T
    if res.grid.fixed:
        traj = jax.tree.map(lambda v: v[::-1], traj)
        if zero_end:
            traj = jax.tree.map(lambda v, x: jnp.concatenate([v, x[None]]), traj, x_0)
        return (x_T, traj), res.failed
    # the accepted states reversed (x_T first), then x_0 repeated
    k = jax.tree.leaves(traj)[0].shape[0]
    j = jnp.arange(k, dtype=jnp.int32)
    src = jnp.where(j <= res.grid.count, res.grid.count - j, 0)
    return (x_T, jax.tree.map(lambda v: v[src], traj)), res.failed


def encode_sde(
    eps_fn: Callable,
    params: Any,
    x_0,
    z: Any = None,
    *,
    schedule: AbstractSchedule,
    ts,
    solver: AbstractSolver = SDEDPMSolver(),
    key=None,
    path=None,
):
    r"""Cycle-SDE encoding: ``x_T`` and the per-step noises with which the SDE sampler
    reproduces ``x_0`` exactly (up to rounding).

    A path ``x_{t_0}, ..., x_{t_N} = x_0`` is drawn from the forward process conditioned on
    ``x_0`` (``x_{t_0} ~ q(x_{t_0} | x_0)``, then each state from the Gaussian posterior
    ``q(x_{t_{i+1}} | x_{t_i}, x_0)``), or given as ``path``. Along it, with the sampler's
    step ``x_{i+1} = a_i x_i + sum_j b_ij m_{i-j} + c_i xi_i`` (``solver.coefficients``),
    the noise of step i is ``xi_i = (x_{i+1} - a_i x_i - sum_j b_ij m_{i-j}) / c_i``. Then
    ``sample(eps_fn, params, x_T, z, schedule=schedule, ts=ts, solver=solver, noise=noise)``
    returns ``x_0``.

    **Arguments:** as in :func:`jadeis.sample`, with ``solver`` an SDE sampler (default
    ``SDEDPMSolver()``) and ``key`` (PRNG key of the path) or ``path`` (shape
    ``(N + 1,) + x_0.shape``, ``path[-1]`` is replaced by ``x_0``).

    **Returns:** ``(x_T, noise)`` with ``noise`` of shape ``(N,) + x_0.shape``.

    With ``solver=jadeis.SDERex(...)`` (``key`` only): the exact inverse along the Brownian
    path of ``key``; returns ``(latent, noise)``, a :class:`jadeis.RexLatent` and the path's
    standard normals (shape ``(N,) + solver.noise_shape(x_0.shape)``): ``sample`` with
    ``x_T=latent`` and ``key=key`` or ``noise=noise`` reproduces ``x_0``.

    **Example:**

    ```python
    >>> import jax, jax.numpy as jnp
    >>> import jadeis
    >>> sch = jadeis.VPLinear()
    >>> ts = jadeis.time_grid(sch, 10)
    >>> eps_fn = lambda params, x, t, z: params * x
    >>> x_0 = jnp.array([[0.3, -0.2]])
    >>> x_T, noise = jadeis.encode_sde(eps_fn, 0.5, x_0, schedule=sch, ts=ts,
    ...                                key=jax.random.key(0))
    >>> out = jadeis.sample(eps_fn, 0.5, x_T, schedule=sch, ts=ts,
    ...                     solver=jadeis.SDEDPMSolver(), noise=noise)
    >>> bool(jnp.allclose(out, x_0, atol=1e-5))
    True

    ```
    """
    where = "encode_sde"
    solver, _ = resolve_solver(solver, None, where)
    if not solver.stochastic:
        raise ValueError(
            f"{where}: solver must be an SDE sampler such as jadeis.SDEDPMSolver(), got "
            f"{type(solver).__name__}; for ODE samplers use jadeis.encode_ode."
        )
    if isinstance(solver, AbstractReversibleSolver):
        return _encode_sde_exact(eps_fn, params, x_0, z, schedule, ts, solver, key, path, where)
    if (key is None) == (path is None):
        raise ValueError(f"{where}: give exactly one of key= (to draw the path) or path=.")
    if not isinstance(solver, AbstractLinearMultistepSolver):
        raise ValueError(
            f"{where}: Cycle-SDE encoding needs a linear multistep SDE sampler such as "
            f"jadeis.SDEDPMSolver(), got {type(solver).__name__}."
        )
    # the checks of every entry point (the key only stands in for the noise source: the
    # noise is solved for along the path)
    problem, args, _ = prepare(
        where,
        eps_fn,
        params,
        x_0,
        z,
        schedule=schedule,
        ts=ts,
        solver=solver,
        controller=None,
        adjoint=None,
        key=jax.random.key(0) if key is None else key,
    )
    x_0, ts = args.x_T, args.ts
    n = ts.shape[0] - 1
    if path is not None and not isinstance(x_0, jax.Array):
        try:
            path = jax.tree.map(lambda v, p: jnp.asarray(p), x_0, path)
            ok = all(
                p.shape == (n + 1,) + v.shape
                for p, v in zip(jax.tree.leaves(path), jax.tree.leaves(x_0))
            )
        except (ValueError, TypeError):
            ok = False
        if not ok:
            raise ValueError(
                f"{where}: path must be a pytree of x_0's structure with leaves of shape "
                f"(N + 1,) + leaf shape = "
                f"{jax.tree.map(lambda v: (n + 1,) + v.shape, x_0)}."
            )
    elif path is not None:
        path = jnp.asarray(path)
        if path.shape != (n + 1,) + x_0.shape:
            raise ValueError(
                f"{where}: path must have shape (N + 1,) + x_0.shape = {(n + 1,) + x_0.shape}, "
                f"got {path.shape}."
            )
    key = args.noise if path is None else None
    problem = problem._replace(noise_mode="none")
    return _encode_sde(
        problem, args._replace(noise=None), key, path, V.checked_eagerly(ts, schedule)
    )


@eqx.filter_jit
def _encode_sde(problem, args, key, path, ts_checked):
    R.note_trace("encode_sde", R.problem_parts(problem, (args, key, path)))
    V.check_problem_model(problem, args, "encode_sde", t_index=-1)  # once per compilation
    params, x_0, z, schedule, ts, _ = args
    if not ts_checked:
        ts = V.check_ts_traced(ts, schedule, "encode_sde", problem.solver)
    solver = problem.solver
    dtype = state_dtype(x_0)
    if path is None:
        path = _posterior_path(schedule, ts, x_0, jax.random.wrap_key_data(key))
    else:
        path = jax.tree.map(lambda p, x: p.astype(dtype).at[-1].set(x), path, x_0)

    def body(state, inp):
        i, row, x_next = inp
        model = bind_model(problem, params, z_at(z, i, problem.per_step_z))
        xi, state = solver.noise_of_step(model, row, state, x_next)
        return state, xi

    n = ts.shape[0] - 1
    inputs = solver.inputs(schedule, ts, dtype)
    first = jax.tree.map(lambda v: v[0], path)
    rest = jax.tree.map(lambda v: v[1:], path)
    _, noise = lax.scan(body, solver.init(first), (jnp.arange(n), inputs, rest))
    return first, noise


def cast(v, dtype):
    return jnp.asarray(v).astype(dtype)


def _posterior_path(schedule, ts, x_0, key):
    """x_{t_0} ~ q(. | x_0 at t_N); x_{t_{i+1}} ~ q(. | x_{t_i}, x_0); x_{t_N} = x_0.
    For a pytree ``x_0``, leaf ``j`` draws its path with ``fold_in(key, j)``."""
    if not isinstance(x_0, jax.Array):
        leaves, treedef = jax.tree.flatten(x_0)
        return jax.tree.unflatten(
            treedef,
            [
                _posterior_path(schedule, ts, v, jax.random.fold_in(key, j))
                for j, v in enumerate(leaves)
            ],
        )
    dtype = x_0.dtype
    n = ts.shape[0] - 1
    la = schedule.log_alpha(ts)
    var = schedule.sigma(ts) ** 2
    u_la, u_var = la[-1], var[-1]

    def trans_var(la_t, var_t, la_s, var_s):  # sigma_{t|s}^2 for s < t
        return var_t - jnp.exp(2.0 * (la_t - la_s)) * var_s

    k0, key = jax.random.split(key)
    a0 = jnp.exp(la[0] - u_la)
    v0 = trans_var(la[0], var[0], u_la, u_var)
    x_start = cast(a0, dtype) * x_0 + cast(jnp.sqrt(v0), dtype) * normal_like(k0, x_0)

    def body(x_t, inp):
        i, la_t, var_t, la_s, var_s = inp
        v_ts = trans_var(la_t, var_t, la_s, var_s)
        v_tu = trans_var(la_t, var_t, u_la, u_var)
        v_su = trans_var(la_s, var_s, u_la, u_var)
        mean_t = jnp.exp(la_t - la_s) * v_su / v_tu
        mean_u = jnp.exp(la_s - u_la) * v_ts / v_tu
        std = jnp.sqrt(jnp.maximum(v_ts * v_su / v_tu, 0.0))
        xi = normal_like(jax.random.fold_in(key, i), x_0)
        x_s = cast(mean_t, dtype) * x_t + cast(mean_u, dtype) * x_0 + cast(std, dtype) * xi
        return x_s, x_s

    inputs = (jnp.arange(n - 1), la[:-2], var[:-2], la[1:-1], var[1:-1])
    _, mid = lax.scan(body, x_start, inputs)
    return jnp.concatenate([x_start[None], mid, x_0[None]], axis=0)


def _encode_sde_exact(eps_fn, params, x_0, z, schedule, ts, solver, key, path, where):
    """Exact inversion of a reversible SDE solver along the Brownian path of ``key``."""
    if path is not None:
        raise ValueError(
            f"{where}: {type(solver).__name__} is inverted exactly along its Brownian path: "
            f"pass key= (the path), not path=."
        )
    problem, args, _ = prepare(
        where,
        eps_fn,
        params,
        x_0,
        z,
        schedule=schedule,
        ts=ts,
        solver=solver,
        controller=None,
        adjoint=None,
        key=key,
    )
    n = args.ts.shape[0] - 1
    latent = _exact_inversion(problem, args, V.checked_eagerly(args.ts, args.schedule), False,
                              where)
    return latent, _draw_all(problem, args.noise, n, args.x_T)


@eqx.filter_jit
def _draw_all(problem, key, n, x_0):
    return jax.vmap(lambda i: draw_noise(problem, key, i, x_0))(jnp.arange(n))
