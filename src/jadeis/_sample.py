"""The public entry points: ``sample`` and ``solve_adjoint``."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from . import _adaptive, _validate as V
from ._adjoint import AbstractAdjoint, AdjointDEIS, DiscreteAdjoint  # noqa: F401
from ._conditioning import ConditioningFn
from ._core import Args, Problem
from ._schedule import AbstractSchedule
from ._solver import AbstractSolver, Adaptive, DPMSolverPP, RexLatent, SDEDPMSolver
from ._trajectory_check import check_trajectory as check_trajectory_of


def sample(
    eps_fn: Callable,
    params: Any,
    x_T,
    z: Any = None,
    *,
    schedule: AbstractSchedule,
    ts,
    solver: AbstractSolver = DPMSolverPP(order=2),
    adjoint: AbstractAdjoint = DiscreteAdjoint(),
    key=None,
    noise=None,
    return_trajectory: bool = False,
    check_finite: bool = False,
):
    r"""Sample a diffusion model from ``x_T`` at ``ts[0]`` down to ``x_0`` at ``ts[-1]``.

    Differentiable with ``jax.grad``/``jax.vjp`` with respect to ``params``, ``x_T`` and
    ``z`` (any pytrees), ``noise``, and (with ``DiscreteAdjoint``/``Backprop``) the time
    grid ``ts`` and the schedule's parameters, with the gradient strategy ``adjoint``.
    Jit-compiled; works under ``vmap`` and with ``x_T`` sharded over devices.

    **Arguments:**

    - `eps_fn`: the noise-prediction model ``eps_fn(params, x, t, z) -> eps`` with the
      shape and dtype of ``x`` (use :func:`jadeis.as_eps_fn` for x0/v/flow models).
    - `params`: the model parameters (any pytree).
    - `x_T`: initial noise, any shape (typically a leading batch axis); or a pytree of
      arrays sharing one floating dtype (e.g. ``{"image": ..., "audio": ...}`` latents
      sampled together), which ``eps_fn`` then receives and returns.
    - `z`: conditioning (any pytree, or ``None``); a :class:`jadeis.PerStep` or
      :class:`jadeis.ConditioningFn` for conditioning that varies over the steps.
    - `schedule`: the noise schedule.
    - `ts`: the N + 1 strictly decreasing times, e.g. ``jadeis.time_grid(schedule, N)``.
    - `solver`: the sampler (default ``DPMSolverPP(order=2)``).
    - `adjoint`: the gradient strategy: ``DiscreteAdjoint()`` (default: exact gradient of
      this sampler, memory N x |x|), ``AdjointDEIS(order, steps, trajectory)`` (continuous
      adjoint; ``trajectory="reconstruct"`` for memory independent of N) or ``Backprop()``.
    - `key`: PRNG key for SDE samplers (step i uses ``fold_in(key, i)``; for a pytree
      ``x_T``, leaf j of step i uses ``fold_in(fold_in(key, i), j)``, leaves in
      ``jax.tree.leaves`` order).
    - `noise`: alternatively, the Gaussian noise of every step, shape ``(N,) + x_T.shape``
      (a pytree like ``x_T`` with a leading N on each leaf for a pytree state; then
      gradients with respect to it are available too).
    - `return_trajectory`: also return the N + 1 states at every time of ``ts``.
    - `check_finite`: raise if ``x_T`` or the result is not finite (a traced check on the
      state; off by default because it synchronises with the host).

    What is checked: eagerly, before compiling, the types of ``schedule``/``solver``/
    ``adjoint``, shapes and dtypes, the model's output shape and dtype, the noise source,
    and a concrete ``ts`` (finite, strictly decreasing, inside the schedule's range); a
    ``ts`` traced under your own ``jit`` is checked at run time, attached to ``ts`` only.

    **Returns:** ``x_0``, or ``(x_0, trajectory)`` with ``return_trajectory=True``.

    **Example:**

    ```python
    >>> import jax, jax.numpy as jnp
    >>> import jadeis
    >>> sch = jadeis.VPLinear()
    >>> eps_fn = lambda params, x, t, z: params * x   # a stand-in network
    >>> x_T = jax.random.normal(jax.random.key(0), (4, 2))
    >>> x_0 = jadeis.sample(eps_fn, 0.5, x_T, None, schedule=sch, ts=jadeis.time_grid(sch, 10))
    >>> x_0.shape
    (4, 2)

    ```
    """
    if return_trajectory:
        warnings.warn(
            "sample(..., return_trajectory=True) is deprecated: use "
            "jadeis.sample_trajectory(...), which returns the N + 1 states.",
            DeprecationWarning,
            stacklevel=2,
        )
        traj = sample_trajectory(
            eps_fn,
            params,
            x_T,
            z,
            schedule=schedule,
            ts=ts,
            solver=solver,
            adjoint=adjoint,
            key=key,
            noise=noise,
            check_finite=check_finite,
        )
        return traj[-1], traj
    problem, args = _prepare(
        "sample", eps_fn, params, x_T, z, schedule, ts, solver, adjoint, key, noise, False
    )
    return _sample(problem, args, check_finite, V.checked_eagerly(args.ts, args.schedule))[0]


def sample_trajectory(
    eps_fn: Callable,
    params: Any,
    x_T,
    z: Any = None,
    *,
    schedule: AbstractSchedule,
    ts,
    solver: AbstractSolver = DPMSolverPP(order=2),
    adjoint: AbstractAdjoint = DiscreteAdjoint(),
    key=None,
    noise=None,
    check_finite: bool = False,
):
    r"""Like :func:`sample`, but returns the N + 1 states at every time of ``ts``.

    The result has shape ``(N + 1,) + x_T.shape`` (for a pytree ``x_T``, the same pytree
    with a leading N + 1 axis on each leaf); its first entry is ``x_T`` and its last
    ``x_0``. Gradients flow through every state (with every strategy). This is what
    :func:`solve_adjoint` takes as ``trajectory=``.

    **Example:**

    ```python
    >>> import jax.numpy as jnp
    >>> import jadeis
    >>> sch = jadeis.VPLinear()
    >>> traj = jadeis.sample_trajectory(lambda p, x, t, z: p * x, 0.5, jnp.ones((4, 2)),
    ...                                 schedule=sch, ts=jadeis.time_grid(sch, 10))
    >>> traj.shape
    (11, 4, 2)

    ```
    """
    problem, args = _prepare(
        "sample_trajectory", eps_fn, params, x_T, z, schedule, ts, solver, adjoint, key, noise, True
    )
    return _sample(problem, args, check_finite, V.checked_eagerly(args.ts, args.schedule))[1]


def _prepare(where, eps_fn, params, x_T, z, schedule, ts, solver, adjoint, key, noise, traj):
    V.check_solver(solver, where)
    V.check_adjoint(adjoint, where)
    ts = V.check_ts(ts, schedule, where)
    n = ts.shape[0] - 1
    x_T = V.check_x_T(x_T, solver, n, where)
    x_arr = x_T.x if isinstance(x_T, RexLatent) else x_T
    z, per_step, _ = V.prepare_z(z, ts, where)
    noise_mode, noise_arg = V.prepare_noise(solver, key, noise, n, x_arr, where)
    problem = Problem(eps_fn, solver, adjoint, per_step, noise_mode, traj)
    if isinstance(solver, Adaptive):
        V.check_adaptive(problem, ts, x_T, schedule, where)
    else:
        adjoint.check(problem, n)
    return problem, Args(params, x_T, z, schedule, ts, noise_arg)


@eqx.filter_jit
def _sample(problem: Problem, args: Args, check_finite: bool, ts_checked: bool):
    where = "sample"
    V.check_problem_model(problem, args, where)  # at trace time: once per compilation
    if not ts_checked:
        args = args._replace(ts=V.check_ts_traced(args.ts, args.schedule, where))
    if check_finite:
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(args.x_T)]))
        args = args._replace(
            x_T=eqx.error_if(
                args.x_T,
                ~finite,
                f"{where}: x_T has non-finite values (NaN or inf).",
            )
        )
    if isinstance(problem.solver, Adaptive):
        x_0, traj = _adaptive.run(problem, args), None
    else:
        x_0, traj = problem.adjoint.run(problem, args)
    if check_finite:
        x_0 = eqx.error_if(
            x_0,
            ~jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(x_0)])),
            f"{where}: sampling produced non-finite values; check eps_fn and the time grid "
            f"(t near a schedule end point where alpha or sigma vanish).",
        )
    return x_0, traj


class AdjointResult(NamedTuple):
    """Gradients returned by :func:`solve_adjoint`: dL/dx_T, dL/dz and dL/dparams."""

    x_T: Any
    z: Any
    params: Any


def solve_adjoint(
    eps_fn: Callable,
    params: Any,
    z: Any,
    grad_x0,
    *,
    schedule: AbstractSchedule,
    ts,
    trajectory=None,
    x_0=None,
    adjoint: AbstractAdjoint = DiscreteAdjoint(),
    solver: AbstractSolver | None = None,
    sde: bool | None = None,
    check_trajectory: bool = True,
) -> AdjointResult:
    r"""Backpropagate ``grad_x0 = dL/dx_0`` through sampling, for a forward pass run elsewhere.

    **Arguments:**

    - `eps_fn`, `params`, `z`, `schedule`, `ts`: as in :func:`sample`.
    - `grad_x0`: dL/dx_0, shape of x_0 (a pytree like x_0 for a pytree state; then
      ``trajectory`` is that pytree with a leading N + 1 axis on each leaf).
    - `trajectory`: the N + 1 states at every time of ``ts``, from ``ts[0]`` to ``ts[-1]``
      (as :func:`sample_trajectory` returns them); or
    - `x_0`: only the final sample: the states are reconstructed by solving the
      probability-flow ODE backwards (AdjointDEIS only, ODE only). Give exactly one.
    - `adjoint`: the gradient strategy, as in :func:`sample` (default ``DiscreteAdjoint()``,
      exact for ``solver``; needs ``trajectory``), or ``AdjointDEIS(...)`` (the continuous
      adjoint; also from ``x_0`` alone). The strategy does the work (``adjoint.solve``); a
      new strategy needs no change here.
    - `solver`: the sampler of the forward pass, as in :func:`sample` (``None``: sample's
      default ``DPMSolverPP(order=2)``). Whether the path is an SDE path is taken from it
      (``solver.stochastic``): pass e.g. ``SDEDPMSolverPP()`` for a trajectory sampled with
      it. AdjointDEIS also uses it to re-solve the states when ``steps=M`` differs from N.
    - `sde`: deprecated; implied by ``solver``. ``sde=True`` without ``solver`` means
      ``SDEDPMSolver()``; a value that disagrees with ``solver`` is an error.
    - `check_trajectory`: check, when the inputs are concrete (not under ``jit``), that
      ``trajectory`` is a path of ``solver`` on ``ts``: its first and last steps are re-run
      (at most 1 + order model evaluations each) and must reproduce the next state (ODE), or
      imply plausible standard Gaussian noise (SDE). A reversed trajectory, another grid,
      or an SDE path given with an ODE solver are rejected with a ``ValueError``. Turn it
      off for a path from a sampler other than ``solver`` (AdjointDEIS only).

    **Returns:** an :class:`AdjointResult` with fields ``x_T``, ``z``, ``params``.

    **Example:**

    ```python
    >>> import jax, jax.numpy as jnp
    >>> import jadeis
    >>> sch = jadeis.VPLinear()
    >>> ts = jadeis.time_grid(sch, 20)
    >>> eps_fn = lambda params, x, t, z: params * x + z
    >>> x_T = jnp.ones((2, 3))
    >>> traj = jadeis.sample_trajectory(eps_fn, 0.5, x_T, 0.1, schedule=sch, ts=ts)
    >>> g = jadeis.solve_adjoint(eps_fn, 0.5, 0.1, 2 * traj[-1], schedule=sch, ts=ts,
    ...                          trajectory=traj)
    >>> g.x_T.shape
    (2, 3)

    ```
    """
    where = "solve_adjoint"
    V.check_adjoint(adjoint, where)
    ts = V.check_ts(ts, schedule, where)
    n = ts.shape[0] - 1
    if (trajectory is None) == (x_0 is None):
        raise ValueError(
            f"{where}: give exactly one of trajectory= (the N + 1 states at ts, for the cached "
            f"adjoint) or x_0= (reconstruct the states); got "
            f"{'both' if trajectory is not None else 'neither'}."
        )
    adjoint.check_solve(trajectory is not None)
    if sde is not None:
        warnings.warn(
            f"{where}(sde=...) is deprecated: whether the trajectory is an SDE path is taken "
            f"from solver= (e.g. solver=jadeis.SDEDPMSolverPP()).",
            DeprecationWarning,
            stacklevel=2,
        )
    if solver is None:
        solver = SDEDPMSolver() if sde else DPMSolverPP(order=2)
    V.check_solver(solver, where)
    if sde is not None and bool(sde) != solver.stochastic:
        raise ValueError(
            f"{where}: sde={sde} disagrees with the solver {type(solver).__name__}, which is "
            f"an {'SDE' if solver.stochastic else 'ODE'} sampler; drop sde= (it is implied "
            f"by solver=)."
        )
    if x_0 is not None and solver.stochastic:
        raise ValueError(
            f"{where}: the SDE adjoint runs along the sampled path: pass trajectory=, not x_0= "
            f"(the path cannot be reconstructed)."
        )
    if V.is_pytree_state(trajectory if trajectory is not None else x_0):
        trajectory, x_0, grad_x0, ref = _check_tree_inputs(trajectory, x_0, grad_x0, n, where)
    else:
        trajectory, x_0, grad_x0, ref = _check_array_inputs(trajectory, x_0, grad_x0, n, where)
    V.check_pytree_solver(ref, solver, "trajectory" if trajectory is not None else "x_0", where)
    z_in = z
    z, per_step, _ = V.prepare_z(z, ts, where)
    problem = Problem(eps_fn, solver, adjoint, per_step, "none", False)
    adjoint.check(problem, n)
    first = ref if trajectory is None else jax.tree.map(lambda v: v[0], trajectory)
    args = Args(params, first, z, schedule, ts, None)
    if (
        check_trajectory
        and trajectory is not None
        and all(V.is_concrete(v) for v in jax.tree.leaves((args, trajectory)))
    ):
        check_trajectory_of(problem, args, trajectory, where)
    cts = _solve(problem, args, trajectory, x_0, grad_x0, V.checked_eagerly(ts, schedule))
    zbar = cts.z
    if isinstance(z_in, ConditioningFn):
        _, vjp = jax.vjp(lambda p: ConditioningFn(z_in.fn, p).per_step(ts), z_in.params)
        (p_bar,) = vjp(zbar)
        zbar = ConditioningFn(z_in.fn, p_bar)
    return AdjointResult(x_T=cts.x_T, z=zbar, params=cts.params)


def _check_array_inputs(trajectory, x_0, grad_x0, n, where):
    grad_x0 = jnp.asarray(grad_x0)
    if trajectory is not None:
        trajectory = V.check_state(trajectory, "trajectory", where)
        if trajectory.ndim < 1 or trajectory.shape[0] != n + 1:
            raise ValueError(
                f"{where}: trajectory must hold the N + 1 = {n + 1} states at the times of ts "
                f"(shape (N + 1,) + x_0.shape), got shape {trajectory.shape}."
            )
        if trajectory.shape[1:] != grad_x0.shape:
            raise ValueError(
                f"{where}: grad_x0 must have the shape of x_0 = trajectory[-1], "
                f"{trajectory.shape[1:]}, got {grad_x0.shape}."
            )
        ref = trajectory[-1]
    else:
        x_0 = V.check_state(x_0, "x_0", where)
        if x_0.shape != grad_x0.shape:
            raise ValueError(
                f"{where}: grad_x0 must have the shape of x_0 {x_0.shape}, got {grad_x0.shape}."
            )
        ref = x_0
    grad_x0 = grad_x0.astype(ref.dtype)
    return trajectory, x_0, grad_x0, ref


def _check_tree_inputs(trajectory, x_0, grad_x0, n, where):
    """``solve_adjoint``'s inputs for a pytree state: ``trajectory`` (leaves of shape
    ``(N + 1,) + leaf``) or ``x_0``, and ``grad_x0`` of x_0's structure and shapes."""
    if trajectory is not None:
        trajectory = V.check_state(trajectory, "trajectory", where)
        bad = [v.shape for v in jax.tree.leaves(trajectory) if v.ndim < 1 or v.shape[0] != n + 1]
        if bad:
            raise ValueError(
                f"{where}: every leaf of a pytree trajectory must hold the N + 1 = {n + 1} states "
                f"at the times of ts (shape (N + 1,) + leaf shape), got leaf shapes "
                f"{V.shapes_of(trajectory)}."
            )
        ref = jax.tree.map(lambda v: v[-1], trajectory)
        name = "x_0 = trajectory[-1] (per leaf)"
    else:
        x_0 = V.check_state(x_0, "x_0", where)
        ref = x_0
        name = "x_0"
    try:
        grad_x0 = jax.tree.map(lambda r, g: jnp.asarray(g).astype(r.dtype), ref, grad_x0)
        ok = all(g.shape == r.shape for g, r in zip(jax.tree.leaves(grad_x0), jax.tree.leaves(ref)))
    except (ValueError, TypeError):
        ok = False
    if not ok:
        raise ValueError(
            f"{where}: grad_x0 must be a pytree of the structure and leaf shapes of {name}, "
            f"{V.shapes_of(ref)}; got {jax.tree.map(jnp.shape, grad_x0)}."
        )
    return trajectory, x_0, grad_x0, ref


@eqx.filter_jit
def _solve(problem, args, trajectory, x_0, grad_x0, ts_checked):
    ref = jax.tree.map(lambda v: v[-1], trajectory) if trajectory is not None else x_0
    V.check_problem_model(problem, args, "solve_adjoint", x=ref)
    if not ts_checked:
        args = args._replace(ts=V.check_ts_traced(args.ts, args.schedule, "solve_adjoint"))
    return problem.adjoint.solve(problem, args, trajectory, x_0, grad_x0)
