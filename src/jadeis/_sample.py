"""The public entry points: ``sample`` and ``solve_adjoint``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from ._adjoint import (
    AbstractAdjoint,
    AdjointDEIS,
    Backprop,
    DiscreteAdjoint,
    deis_backward,
    discrete_backward,
)
from ._conditioning import ConditioningFn, PerStep
from ._core import Static, forward
from ._schedule import AbstractSchedule
from ._solver import AbstractSolver, DPMSolver, DPMSolverPP


def _check_ts(ts, schedule: AbstractSchedule, where: str):
    ts = jnp.asarray(ts)
    if ts.ndim != 1 or ts.shape[0] < 2:
        raise ValueError(
            f"{where}: ts must be a 1-D array of at least 2 times (N + 1 for N steps), got "
            f"shape {ts.shape}. Build one with jadeis.time_grid(schedule, n)."
        )
    if not jnp.issubdtype(ts.dtype, jnp.floating):
        ts = ts.astype(jnp.result_type(float))
    return ts


def _validate_ts_values(x, ts, schedule, where):
    """Traced checks (equinox.error_if): strictly decreasing and inside the schedule's range."""
    lo = jnp.asarray(schedule.t_min, ts.dtype)
    hi = jnp.asarray(schedule.t_max, ts.dtype)
    x = eqx.error_if(
        x,
        jnp.any(ts[1:] >= ts[:-1]),
        f"{where}: ts must be strictly decreasing (sampling runs from t_max down to t_min); "
        f"use jadeis.time_grid(schedule, n).",
    )
    x = eqx.error_if(
        x,
        jnp.any((ts < lo) | (ts > hi)),
        f"{where}: ts has times outside the schedule's range [t_min, t_max] = "
        f"[{schedule.t_min}, {schedule.t_max}]; clip ts or build the schedule with a wider range.",
    )
    return x


def _check_model(eps_fn, params, x, t, z, where):
    try:
        out = jax.eval_shape(eps_fn, params, x, t, z)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise ValueError(
            f"{where}: calling eps_fn(params, x, t, z) failed for x of shape {x.shape} and "
            f"dtype {x.dtype}: {type(e).__name__}: {e}"
        ) from e
    if not hasattr(out, "shape") or out.shape != x.shape or out.dtype != x.dtype:
        got = f"shape {getattr(out, 'shape', None)}, dtype {getattr(out, 'dtype', type(out))}"
        raise ValueError(
            f"{where}: eps_fn must return an array of the shape and dtype of x "
            f"({x.shape}, {x.dtype}); it returned {got}. Cast or reshape the model output."
        )


def _prepare_z(z, ts, where):
    """Normalise z: a ConditioningFn becomes a PerStep; check PerStep lengths."""
    n = ts.shape[0] - 1
    if isinstance(z, ConditioningFn):
        z = z.per_step(ts)
    if isinstance(z, PerStep):
        leaves = jax.tree.leaves(z.values)
        bad = [jnp.shape(v) for v in leaves if jnp.ndim(v) == 0 or jnp.shape(v)[0] != n]
        if not leaves or bad:
            raise ValueError(
                f"{where}: z is a PerStep conditioning, which needs a leading axis of length "
                f"N = {n} (one entry per step of ts) on every leaf; got leaf shapes "
                f"{[jnp.shape(v) for v in leaves]}."
            )
        return z, True
    return z, False


def _check_solver(solver, where):
    if not isinstance(solver, AbstractSolver):
        raise ValueError(
            f"{where}: solver must be a jadeis sampler such as jadeis.DPMSolverPP(order=2), "
            f"got {solver!r}."
        )


@eqx.filter_jit
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
    ``z`` (any pytrees), with the gradient strategy ``adjoint``. Jit-compiled; works under
    ``vmap`` and with ``x_T`` sharded over devices.

    **Arguments:**

    - `eps_fn`: the noise-prediction model ``eps_fn(params, x, t, z) -> eps`` with the
      shape and dtype of ``x`` (use :func:`jadeis.as_eps_fn` for x0/v/flow models).
    - `params`: the model parameters (any pytree).
    - `x_T`: initial noise, any shape (typically a leading batch axis).
    - `z`: conditioning (any pytree, or ``None``); a :class:`jadeis.PerStep` or
      :class:`jadeis.ConditioningFn` for conditioning that varies over the steps.
    - `schedule`: the noise schedule.
    - `ts`: the N + 1 strictly decreasing times, e.g. ``jadeis.time_grid(schedule, N)``.
    - `solver`: the sampler (default ``DPMSolverPP(order=2)``).
    - `adjoint`: the gradient strategy: ``DiscreteAdjoint()`` (default: exact gradient of
      this sampler, memory N x |x|), ``AdjointDEIS(order, steps, trajectory)`` (continuous
      adjoint; ``trajectory="reconstruct"`` for memory independent of N) or ``Backprop()``.
    - `key`: PRNG key for SDE samplers (step i uses ``fold_in(key, i)``).
    - `noise`: alternatively, the Gaussian noise of every step, shape ``(N,) + x_T.shape``
      (then gradients with respect to it are available too).
    - `return_trajectory`: also return the N + 1 states at every time of ``ts``.
    - `check_finite`: raise if ``x_T`` or the result is not finite.

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
    where = "sample"
    _check_solver(solver, where)
    if not isinstance(adjoint, AbstractAdjoint):
        raise ValueError(
            f"{where}: adjoint must be jadeis.DiscreteAdjoint(), jadeis.AdjointDEIS(...) or "
            f"jadeis.Backprop(), got {adjoint!r}."
        )
    x_T = jnp.asarray(x_T)
    if not jnp.issubdtype(x_T.dtype, jnp.floating):
        raise ValueError(f"{where}: x_T must be a floating-point array, got dtype {x_T.dtype}.")
    ts = _check_ts(ts, schedule, where)
    n = ts.shape[0] - 1
    z, per_step = _prepare_z(z, ts, where)
    z0 = jax.tree.map(lambda v: v[0], z.values) if per_step else z
    _check_model(eps_fn, params, x_T, ts[0].astype(x_T.dtype), z0, where)
    adjoint.check(solver, n, return_trajectory)

    noise_mode = "none"
    noise_arg = None
    if solver.stochastic:
        if key is None and noise is None:
            raise ValueError(
                f"{where}: the SDE sampler {type(solver).__name__} needs randomness: pass "
                f"key=jax.random.key(seed), or noise= an array of shape (N,) + x_T.shape = "
                f"{(n,) + x_T.shape}."
            )
        if key is not None and noise is not None:
            raise ValueError(f"{where}: pass either key or noise, not both.")
        if noise is not None:
            noise_arg = jnp.asarray(noise)
            if noise_arg.shape != (n,) + x_T.shape:
                raise ValueError(
                    f"{where}: noise must have shape (N,) + x_T.shape = {(n,) + x_T.shape}, "
                    f"got {noise_arg.shape}."
                )
            noise_mode = "array"
        else:
            key = jnp.asarray(key)
            if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
                key = jax.random.key_data(key)
            noise_arg = key
            noise_mode = "key"

    x_T = _validate_ts_values(x_T, ts, schedule, where)
    if check_finite:
        x_T = eqx.error_if(
            x_T, ~jnp.all(jnp.isfinite(x_T)), f"{where}: x_T has non-finite values (NaN or inf)."
        )
    static = Static(eps_fn, solver, adjoint, per_step, noise_mode, return_trajectory)
    x_0, states = adjoint.run(static, params, x_T, z, schedule, ts, noise_arg)
    if check_finite:
        x_0 = eqx.error_if(
            x_0,
            ~jnp.all(jnp.isfinite(x_0)),
            f"{where}: sampling produced non-finite values; check eps_fn and the time grid "
            f"(t near a schedule end point where alpha or sigma vanish).",
        )
    if return_trajectory:
        return x_0, states
    return x_0


class AdjointResult(NamedTuple):
    """Gradients returned by :func:`solve_adjoint`: dL/dx_T, dL/dz and dL/dparams."""

    x_T: Any
    z: Any
    params: Any


@eqx.filter_jit
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
    adjoint: AbstractAdjoint = AdjointDEIS(order=2),
    sde: bool = False,
    solver: AbstractSolver | None = None,
) -> AdjointResult:
    r"""Backpropagate ``grad_x0 = dL/dx_0`` through sampling, for a forward pass run elsewhere.

    **Arguments:**

    - `eps_fn`, `params`, `z`, `schedule`, `ts`: as in :func:`sample`.
    - `grad_x0`: dL/dx_0, shape of x_0.
    - `trajectory`: the N + 1 states at every time of ``ts`` (as
      ``sample(..., return_trajectory=True)`` returns them); or
    - `x_0`: only the final sample: the states are reconstructed by solving the
      probability-flow ODE backwards (AdjointDEIS only, ODE only). Give exactly one.
    - `adjoint`: ``AdjointDEIS(...)`` (default order 2) or ``DiscreteAdjoint()`` (needs
      ``trajectory`` and the ``solver`` that produced it).
    - `sde`: the trajectory was sampled with an SDE sampler: solve the SDE adjoint along it.
    - `solver`: the sampler of the forward pass (``DiscreteAdjoint``; also used to re-solve
      the states when ``AdjointDEIS(steps=M)`` differs from the grid, default the
      multistep ``DPMSolver`` of the adjoint's order).

    **Returns:** an :class:`AdjointResult` with fields ``x_T``, ``z``, ``params``.

    **Example:**

    ```python
    >>> import jax, jax.numpy as jnp
    >>> import jadeis
    >>> sch = jadeis.VPLinear()
    >>> ts = jadeis.time_grid(sch, 20)
    >>> eps_fn = lambda params, x, t, z: params * x + z
    >>> x_T = jnp.ones((2, 3))
    >>> x_0, traj = jadeis.sample(eps_fn, 0.5, x_T, 0.1, schedule=sch, ts=ts,
    ...                           return_trajectory=True)
    >>> g = jadeis.solve_adjoint(eps_fn, 0.5, 0.1, 2 * x_0, schedule=sch, ts=ts,
    ...                          trajectory=traj)
    >>> g.x_T.shape
    (2, 3)

    ```
    """
    where = "solve_adjoint"
    ts = _check_ts(ts, schedule, where)
    n = ts.shape[0] - 1
    if (trajectory is None) == (x_0 is None):
        raise ValueError(
            f"{where}: give exactly one of trajectory= (the N + 1 states at ts, for the cached "
            f"adjoint) or x_0= (reconstruct the states); got "
            f"{'both' if trajectory is not None else 'neither'}."
        )
    grad_x0 = jnp.asarray(grad_x0)
    if trajectory is not None:
        trajectory = jnp.asarray(trajectory)
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
    else:
        x_0 = jnp.asarray(x_0)
        if x_0.shape != grad_x0.shape:
            raise ValueError(
                f"{where}: grad_x0 must have the shape of x_0 {x_0.shape}, got {grad_x0.shape}."
            )
    ref = trajectory[-1] if trajectory is not None else x_0
    if grad_x0.dtype != ref.dtype:
        grad_x0 = grad_x0.astype(ref.dtype)
    z_in = z
    z, per_step = _prepare_z(z, ts, where)
    z0 = jax.tree.map(lambda v: v[0], z.values) if per_step else z
    _check_model(eps_fn, params, ref, ts[0].astype(ref.dtype), z0, where)
    grad_x0 = _validate_ts_values(grad_x0, ts, schedule, where)

    if isinstance(adjoint, Backprop):
        raise ValueError(
            f"{where}: Backprop differentiates the forward pass itself; use "
            f"jax.grad through jadeis.sample(..., adjoint=jadeis.Backprop()), or pass "
            f"adjoint=AdjointDEIS(...) or DiscreteAdjoint() here."
        )
    if isinstance(adjoint, DiscreteAdjoint):
        if trajectory is None or solver is None:
            raise ValueError(
                f"{where}: DiscreteAdjoint needs trajectory= and solver= (the sampler that "
                f"produced the trajectory)."
            )
        _check_solver(solver, where)
        if solver.stochastic != sde:
            raise ValueError(
                f"{where}: sde={sde} disagrees with the solver {type(solver).__name__}."
            )
        static = Static(eps_fn, solver, adjoint, per_step, "none", False)
        pbar, xT_bar, zbar, _ = discrete_backward(
            static, params, z, schedule, ts, trajectory, grad_x0, None
        )
    elif isinstance(adjoint, AdjointDEIS):
        if x_0 is not None and sde:
            raise ValueError(
                f"{where}: the SDE adjoint runs along the sampled path: pass trajectory=, "
                f"not x_0= (the path cannot be reconstructed)."
            )
        if sde and adjoint.num_steps(n) != n:
            raise ValueError(
                f"{where}: with sde=True the adjoint grid must be the sampling grid "
                f"(steps=None or {n})."
            )
        resolver = solver if solver is not None else DPMSolver(order=adjoint.order)
        _check_solver(resolver, where)
        static = Static(eps_fn, resolver, adjoint, per_step, "none", False)

        def resolve(ts_desc):
            return forward(
                static,
                params,
                trajectory[0],
                z,
                schedule,
                ts_desc,
                None,
                save=True,
                append_final=False,
            )

        xT_bar, pbar, zbar, _ = deis_backward(
            eps_fn,
            adjoint,
            sde=sde,
            params=params,
            z=z,
            per_step=per_step,
            schedule=schedule,
            ts=ts,
            states=trajectory,
            x_0=x_0,
            x0_bar=grad_x0,
            traj_bar=None,
            resolve=resolve,
        )
    else:
        raise ValueError(
            f"{where}: adjoint must be jadeis.AdjointDEIS(...) or jadeis.DiscreteAdjoint(), "
            f"got {adjoint!r}."
        )

    if isinstance(z_in, ConditioningFn):
        _, vjp = jax.vjp(lambda p: ConditioningFn(z_in.fn, p).per_step(ts), z_in.params)
        (p_bar,) = vjp(zbar)
        zbar = ConditioningFn(z_in.fn, p_bar)
    return AdjointResult(x_T=xT_bar, z=zbar, params=pbar)
