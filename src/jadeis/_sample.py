"""The public entry points: ``sample``, ``sample_trajectory``, ``solve`` and ``solve_adjoint``.

Every entry point (these, ``guide``/``Guidance``, ``encode_ode``/``encode_sde``) builds its
sampling problem with one prologue, :func:`prepare`: the solver and controller, the strategy,
``ts``, ``x_T``, the conditioning, the noise source and the model's parameters are checked
and normalised once, the same way, before anything is compiled.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from . import _recompile as R, _validate as V
from ._adjoint import AbstractAdjoint, DiscreteAdjoint
from ._adjoint.base import Out
from ._conditioning import ConditioningFn
from ._controller import AbstractAdaptiveController, AbstractController, Adaptive, FixedGrid
from ._core import Args, Problem, split_params
from ._loop import Stats, budget_message
from ._schedule import AbstractSchedule
from ._solver import AbstractSolver, DPMSolverPP, RexLatent, SDEDPMSolver
from ._trajectory_check import check_trajectory as check_trajectory_of


def resolve_solver(solver, controller, where: str):
    """``(solver, controller)``: an :class:`jadeis.Adaptive` is unpacked into its solver and
    PID controller; both are type-checked."""
    if isinstance(solver, Adaptive):
        if controller is not None and not isinstance(controller, FixedGrid):
            raise ValueError(
                f"{where}: solver=jadeis.Adaptive(...) already carries its controller; pass "
                f"either solver=Adaptive(inner, ...) or solver=inner, controller=... (got "
                f"controller={controller!r})."
            )
        return solver.solver, solver.controller
    V.check_solver(solver, where)
    if controller is None:
        controller = FixedGrid()
    if not isinstance(controller, AbstractController):
        raise ValueError(
            f"{where}: controller must be a step-size controller such as jadeis.FixedGrid() "
            f"(the steps of ts, the default) or jadeis.PIDController(rtol=..., atol=...), got "
            f"{controller!r}."
        )
    return solver, controller


def prepare(
    where: str,
    eps_fn: Callable,
    params,
    x_T,
    z,
    *,
    schedule,
    ts,
    solver,
    controller,
    adjoint,
    key=None,
    noise=None,
    save_trajectory: bool = False,
):
    """The one prologue of every entry point: ``(problem, args, adjoint)``, validated."""
    solver, controller = resolve_solver(solver, controller, where)
    if adjoint is not None:
        V.check_adjoint(adjoint, where)
    ts = V.check_ts(ts, schedule, where)
    V.check_final_zero(ts, solver, where)
    controller.check(solver, ts, schedule, where)
    adaptive = isinstance(controller, AbstractAdaptiveController)
    n = ts.shape[0] - 1
    x_T = V.check_x_T(x_T, solver, n, where, adaptive=adaptive, ts=ts)
    x_arr = x_T.x if isinstance(x_T, RexLatent) else x_T
    z, per_step, _ = V.prepare_z(z, ts, where, adaptive=adaptive)
    noise_mode, noise_arg = V.prepare_noise(solver, key, noise, n, x_arr, where)
    dynamic, static = split_params(params)
    problem = Problem(eps_fn, solver, controller, per_step, noise_mode, save_trajectory, static)
    args = Args(dynamic, x_T, z, schedule, ts, noise_arg)
    if adjoint is not None:
        adjoint.check(problem, n)
        adjoint = adjoint.bind(problem, args)
    return problem, args, adjoint


class Solution(NamedTuple):
    """What :func:`solve` returns.

    - `x_0`: the sample.
    - `ts`: the accepted times: ``ts`` itself on a fixed grid; for an adaptive controller
      ``max_steps + 1`` times, the first ``stats.num_steps + 1`` accepted and the rest
      repeating the end time (not differentiable).
    - `trajectory`: with ``save_trajectory=True``, the states at those times (padded with
      ``x_0``), else ``None``.
    - `stats`: a :class:`jadeis.Stats`: accepted and rejected steps, model evaluations of
      the run, and the model evaluations and VJPs its gradient costs with the strategy.
    """

    x_0: Any
    ts: Any
    trajectory: Any
    stats: Stats

    @property
    def num_steps(self):
        """The number of accepted steps."""
        return self.stats.num_steps


def sample(
    eps_fn: Callable,
    params: Any,
    x_T,
    z: Any = None,
    *,
    schedule: AbstractSchedule,
    ts,
    solver: AbstractSolver = DPMSolverPP(order=2),
    controller: AbstractController | None = None,
    adjoint: AbstractAdjoint = DiscreteAdjoint(),
    key=None,
    noise=None,
    return_trajectory: bool = False,
    check_finite: bool = False,
):
    r"""Sample a diffusion model from ``x_T`` at ``ts[0]`` down to ``x_0`` at ``ts[-1]``.

    Differentiable with ``jax.grad``/``jax.vjp`` with respect to ``params``, ``x_T`` and
    ``z`` (any pytrees), ``noise``, and (on a fixed grid, with ``DiscreteAdjoint``,
    ``ReversibleAdjoint`` or ``Backprop``) the time grid ``ts`` and the schedule's
    parameters, with the gradient strategy ``adjoint``. Jit-compiled once per configuration
    and shapes; works under ``vmap`` and with ``x_T`` sharded over devices.

    **Arguments:**

    - `eps_fn`: the noise-prediction model ``eps_fn(params, x, t, z) -> eps`` with the
      shape of ``x`` (any floating dtype; use :func:`jadeis.as_eps_fn` for x0/v/flow models).
      A new function object (a new ``lambda`` or closure per call) is a new configuration
      and compiles again (minutes with a U-Net): define ``eps_fn`` once and pass what
      changes (weights, a guidance scale) through ``params`` or ``z``. jadeis warns (a
      ``UserWarning``) when it compiles one configuration a third time for a new function.
    - `params`: the model parameters: any pytree; its array leaves are the parameters
      (traced and differentiated), anything else (an Equinox module's activation functions,
      flags) is closed over, as ``equinox.filter_jit`` does.
    - `x_T`: initial noise, any shape (typically a leading batch axis); or a pytree of
      arrays sharing one floating dtype (e.g. ``{"image": ..., "audio": ...}`` latents
      sampled together), which ``eps_fn`` then receives and returns.
    - `z`: conditioning (any pytree, or ``None``); a :class:`jadeis.PerStep` or
      :class:`jadeis.ConditioningFn` for conditioning that varies over the steps (fixed
      grids only).
    - `schedule`: the noise schedule.
    - `ts`: the N + 1 strictly decreasing times, e.g. ``jadeis.time_grid(schedule, N)``;
      with an adaptive controller, the two end times ``[t_T, t_0]``.
    - `solver`: the sampler (default ``DPMSolverPP(order=2)``); or a
      :class:`jadeis.Adaptive` (a solver and a PID controller in one argument).
    - `controller`: the step-size controller: :class:`jadeis.FixedGrid` (default: the steps
      of ``ts``) or :class:`jadeis.PIDController` (adaptive steps with error control).
    - `adjoint`: the gradient strategy: ``DiscreteAdjoint()`` (default: exact gradient of
      this sampler, memory N x |x|), ``AdjointDEIS(order, steps, trajectory)`` (continuous
      adjoint; ``trajectory="reconstruct"`` for memory independent of N),
      ``ReversibleAdjoint()`` (Rex: exact, memory independent of N) or ``Backprop()``.
    - `key`: PRNG key for SDE samplers (step i uses ``fold_in(key, i)``; for a pytree
      ``x_T``, leaf j of step i uses ``fold_in(fold_in(key, i), j)``, leaves in
      ``jax.tree.leaves`` order).
    - `noise`: alternatively, the Gaussian noise of every step, shape ``(N,) + x_T.shape``
      (a pytree like ``x_T`` with a leading N on each leaf for a pytree state; then
      gradients with respect to it are available too).
    - `check_finite`: raise if ``x_T`` or the result is not finite (a traced check on the
      state; off by default because it synchronises with the host).
    - `return_trajectory`: **deprecated** (a ``DeprecationWarning``; it will be removed):
      use :func:`jadeis.sample_trajectory`, which returns the N + 1 states.

    What is checked: eagerly, before compiling, the types of ``schedule``/``solver``/
    ``controller``/``adjoint``, shapes and dtypes, the model's output shape and dtype, the
    noise source, and a concrete ``ts`` (finite, strictly decreasing, inside the schedule's
    range); a ``ts`` traced under your own ``jit`` is checked at run time, attached to
    ``ts`` only.

    **Returns:** ``x_0`` (use :func:`jadeis.solve` for the accepted grid and the cost).

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
    V.check_adjoint(adjoint, "sample")
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
            controller=controller,
            adjoint=adjoint,
            key=key,
            noise=noise,
            check_finite=check_finite,
        )
        return jax.tree.map(lambda v: v[-1], traj), traj
    problem, args, adjoint = prepare(
        "sample",
        eps_fn,
        params,
        x_T,
        z,
        schedule=schedule,
        ts=ts,
        solver=solver,
        controller=controller,
        adjoint=adjoint,
        key=key,
        noise=noise,
    )
    return run(problem, args, adjoint, check_finite).x_0


def sample_trajectory(
    eps_fn: Callable,
    params: Any,
    x_T,
    z: Any = None,
    *,
    schedule: AbstractSchedule,
    ts,
    solver: AbstractSolver = DPMSolverPP(order=2),
    controller: AbstractController | None = None,
    adjoint: AbstractAdjoint = DiscreteAdjoint(),
    key=None,
    noise=None,
    check_finite: bool = False,
):
    r"""Like :func:`sample`, but returns the states at every time of the grid.

    On a fixed grid the result has shape ``(N + 1,) + x_T.shape`` (for a pytree ``x_T``,
    the same pytree with a leading N + 1 axis on each leaf); its first entry is ``x_T`` and
    its last ``x_0``. With an adaptive controller it has ``max_steps + 1`` entries: the
    states at the accepted times, then ``x_0`` repeated (:func:`jadeis.solve` with
    ``save_trajectory=True`` returns them with the accepted times and their number).
    Gradients flow through every state (with every strategy). This is what
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
    V.check_adjoint(adjoint, "sample_trajectory")
    problem, args, adjoint = prepare(
        "sample_trajectory",
        eps_fn,
        params,
        x_T,
        z,
        schedule=schedule,
        ts=ts,
        solver=solver,
        controller=controller,
        adjoint=adjoint,
        key=key,
        noise=noise,
        save_trajectory=True,
    )
    return run(problem, args, adjoint, check_finite).trajectory


def solve(
    eps_fn: Callable,
    params: Any,
    x_T,
    z: Any = None,
    *,
    schedule: AbstractSchedule,
    ts,
    solver: AbstractSolver = DPMSolverPP(order=2),
    controller: AbstractController | None = None,
    adjoint: AbstractAdjoint = DiscreteAdjoint(),
    key=None,
    noise=None,
    save_trajectory: bool = False,
    check_finite: bool = False,
) -> Solution:
    r"""Sample, and report the steps taken and what they cost: a :class:`jadeis.Solution`.

    The same run as :func:`sample` (differentiable the same way through ``x_0`` and the
    trajectory), returning also the accepted times and :class:`jadeis.Stats`: accepted and
    rejected steps, model evaluations, and the model evaluations and VJPs a gradient of this
    run costs with ``adjoint``. Arguments as in :func:`sample`; ``save_trajectory``: also
    return the states at the accepted times.

    **Example:**

    ```python
    >>> import jax.numpy as jnp
    >>> import jadeis
    >>> sch = jadeis.VPLinear()
    >>> sol = jadeis.solve(lambda p, x, t, z: p * x, 0.5, jnp.ones((2, 3)), schedule=sch,
    ...                    ts=jadeis.time_grid(sch, 10), solver=jadeis.Rex(),
    ...                    adjoint=jadeis.ReversibleAdjoint())
    >>> int(sol.stats.num_steps), int(sol.stats.model_evals), int(sol.stats.grad_vjps)
    (10, 40, 40)

    ```
    """
    V.check_adjoint(adjoint, "solve")
    problem, args, adjoint = prepare(
        "solve",
        eps_fn,
        params,
        x_T,
        z,
        schedule=schedule,
        ts=ts,
        solver=solver,
        controller=controller,
        adjoint=adjoint,
        key=key,
        noise=noise,
        save_trajectory=save_trajectory,
    )
    out = run(problem, args, adjoint, check_finite)
    return Solution(out.x_0, out.ts, out.trajectory, out.stats)


def run(
    problem: Problem,
    args: Args,
    adjoint: AbstractAdjoint,
    check_finite: bool = False,
    where: str = "sample",
) -> Out:
    """Run a prepared problem (compiled once per configuration and shapes).

    What can only fail at run time (an adaptive run that does not reach its end, non-finite
    values with ``check_finite``) comes back as flags with the result, as diffrax's result
    codes: an eager call (also under ``jax.grad``) raises the ``ValueError`` here, in
    Python, with nothing of JAX's around it; under ``jit``/``vmap`` the flags are checked
    in the compiled program (:func:`jadeis._validate.report`)."""
    out, flags = _run(
        problem, args, adjoint, check_finite, V.checked_eagerly(args.ts, args.schedule), where
    )
    messages = {
        "x_T": f"{where}: x_T has non-finite values (NaN or inf).",
        "failed": budget_message(problem, where) if out.failed is not None else "",
        "x_0": f"{where}: sampling produced non-finite values; check eps_fn and the time grid "
        f"(t near a schedule end point where alpha or sigma vanish).",
    }
    flags = {**flags, "failed": out.failed}
    return out._replace(x_0=V.report(out.x_0, flags, messages))


def _all_finite(tree):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(tree)]))


@eqx.filter_jit
def _run(problem: Problem, args: Args, adjoint, check_finite: bool, ts_checked: bool, where):
    # at trace time: once per compilation
    R.note_trace(
        "sample",
        R.problem_parts(problem, args, adjoint, check_finite=check_finite, where=where),
    )
    V.check_problem_model(problem, args, where)
    if not ts_checked:
        args = args._replace(
            ts=V.check_ts_traced(args.ts, args.schedule, where, problem.solver)
        )
    out = adjoint.run(problem, args)
    flags = {}
    if check_finite:
        x_T = args.x_T.x if isinstance(args.x_T, RexLatent) else args.x_T
        flags = {"x_T": ~_all_finite(x_T), "x_0": ~_all_finite(out.x_0)}
    return out, flags


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
    controller: AbstractController | None = None,
    sde: bool | None = None,
    check_trajectory: bool = True,
) -> AdjointResult:
    r"""Backpropagate ``grad_x0 = dL/dx_0`` through sampling, for a forward pass run elsewhere.

    **Arguments:**

    - `eps_fn`, `params`, `z`, `schedule`: as in :func:`sample`.
    - `ts`: the N + 1 times of the forward pass. For a run with an adaptive controller, its
      accepted times (``solution.ts[: solution.num_steps + 1]`` of :func:`jadeis.solve`),
      with ``controller=`` that controller (its steps' formulas differ from a fixed grid's at
      the end of short grids).
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
    - `controller`: the controller of the forward pass (default: a fixed grid).
    - `sde`: deprecated; implied by ``solver``. ``sde=True`` without ``solver`` means
      ``SDEDPMSolver()``; a value that disagrees with ``solver`` is an error.
    - `check_trajectory`: check, when the inputs are concrete (not under ``jit``), that
      ``trajectory`` is a path of ``solver`` on ``ts`` (docs/checks.md says precisely what
      the check can and cannot see). Turn it off for a path from a sampler other than
      ``solver`` (AdjointDEIS only).

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
    solver, controller = resolve_solver(solver, controller, where)
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
    ts = V.check_ts(ts, schedule, where)
    V.check_final_zero(ts, solver, where)
    n = ts.shape[0] - 1
    if V.is_pytree_state(trajectory if trajectory is not None else x_0):
        trajectory, x_0, grad_x0, ref = _check_tree_inputs(trajectory, x_0, grad_x0, n, where)
    else:
        trajectory, x_0, grad_x0, ref = _check_array_inputs(trajectory, x_0, grad_x0, n, where)
    V.check_pytree_solver(ref, solver, "trajectory" if trajectory is not None else "x_0", where)
    z_in = z
    z, per_step, _ = V.prepare_z(z, ts, where)
    dynamic, static = split_params(params)
    problem = Problem(eps_fn, solver, controller, per_step, "none", False, static)
    adjoint.check(problem, n)
    first = ref if trajectory is None else jax.tree.map(lambda v: v[0], trajectory)
    args = Args(dynamic, first, z, schedule, ts, None)
    if (
        check_trajectory
        and trajectory is not None
        and all(V.is_concrete(v) for v in jax.tree.leaves((args, trajectory)))
    ):
        check_trajectory_of(problem, args, trajectory, where)
    cts = _solve(problem, args, adjoint, trajectory, x_0, grad_x0, V.checked_eagerly(ts, schedule))
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
def _solve(problem, args, adjoint, trajectory, x_0, grad_x0, ts_checked):
    R.note_trace("solve_adjoint", R.problem_parts(problem, (args, trajectory, x_0), adjoint))
    ref = jax.tree.map(lambda v: v[-1], trajectory) if trajectory is not None else x_0
    V.check_problem_model(problem, args, "solve_adjoint", x=ref)
    if not ts_checked:
        args = args._replace(
            ts=V.check_ts_traced(args.ts, args.schedule, "solve_adjoint", problem.solver)
        )
    return adjoint.solve(problem, args, trajectory, x_0, grad_x0)
