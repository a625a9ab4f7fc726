"""Does a trajectory given to :func:`jadeis.solve_adjoint` come from ``solver`` on ``ts``?

A cheap check, run when every input is concrete (not under ``jit``): re-run the solver's
first and last steps from the given states and compare with the next given state.

- ODE solvers: the step from ``trajectory[i]`` must reproduce ``trajectory[i + 1]`` to a
  relative tolerance of ``min(0.05, 10 sqrt(eps))`` of the state's dtype (3e-3 in float32,
  1.5e-7 in float64).
- SDE solvers: the Gaussian noise ``xi`` that maps ``trajectory[i]`` to
  ``trajectory[i + 1]`` is solved for; its mean square must be plausible for standard
  normal noise (a 10-sigma chi-square bound on the number of elements).

For multistep solvers the history of step i is rebuilt from the model outputs at
``trajectory[i - 1]``, ``trajectory[i - 2]`` (exact: that is what the sampler kept), so the
check costs at most ``1 + order`` model evaluations per checked step (two steps). A
reversed trajectory, a trajectory of another grid, an SDE path given with an ODE solver
(a forgotten ``sde=True``) or an ODE path given with an SDE solver are all rejected.
Samplers other than the linear multistep ones are checked on their first step only (ODE),
or not at all (SDE).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._conditioning import z_at
from ._core import Args, Problem, bind_model, state_dtype
from ._loop import fixed_rows
from ._solver.base import AbstractLinearMultistepSolver


def _at(tree, i):
    return jax.tree.map(lambda v: v[i], tree)


def _mean_square(x):
    if isinstance(x, jax.Array):
        return jnp.mean(jnp.square(x.astype(jnp.float32)))
    leaves = jax.tree.leaves(x)
    total = sum(v.size for v in leaves)
    return sum(jnp.sum(jnp.square(v.astype(jnp.float32))) for v in leaves) / total


def _norm(x):
    if isinstance(x, jax.Array):
        return jnp.linalg.norm(x.astype(jnp.float32).ravel())
    return jnp.sqrt(sum(jnp.sum(jnp.square(v.astype(jnp.float32))) for v in jax.tree.leaves(x)))


def _state_at(problem: Problem, args: Args, inputs, trajectory, i: int):
    """The solver state at step i, rebuilt from the trajectory."""
    solver = problem.solver
    x = _at(trajectory, i)
    if not isinstance(solver, AbstractLinearMultistepSolver):
        return solver.init(x)
    hist = []
    for j in range(1, solver.order):
        k = i - j
        if k < 0:
            hist.append(jax.tree.map(jnp.zeros_like, x))
            continue
        inp = jax.tree.map(lambda v, k=k: v[k], inputs)
        model = bind_model(problem, args.params, z_at(args.z, k, problem.per_step_z))
        out = solver.model_output(model, inp, _at(trajectory, k))
        hist.append(jax.tree.map(lambda o, v: o.astype(v.dtype), out, x))
    return (x, tuple(hist))


@eqx.filter_jit
def _measure(problem: Problem, args: Args, trajectory, steps: tuple):
    solver = problem.solver
    dtype = state_dtype(trajectory)
    inputs = fixed_rows(problem, args.schedule, args.ts, dtype)
    out = []
    for i in steps:
        inp = jax.tree.map(lambda v, i=i: v[i], inputs)
        state = _state_at(problem, args, inputs, trajectory, i)
        model = bind_model(problem, args.params, z_at(args.z, i, problem.per_step_z))
        if solver.stochastic:
            xi, _ = solver.noise_of_step(model, inp, state, _at(trajectory, i + 1))
            out.append(_mean_square(xi))
        else:
            nxt = solver.output(solver.step(model, inp, state, None)[0])
            diff = _norm(jax.tree.map(jnp.subtract, nxt, _at(trajectory, i + 1)))
            ref = _norm(_at(trajectory, i + 1))
            out.append(diff / jnp.maximum(ref, jnp.finfo(jnp.float32).tiny))
    return jnp.stack(out)


def check_trajectory(problem: Problem, args: Args, trajectory, where: str) -> None:
    """Raise ``ValueError`` if ``trajectory`` is not a path of ``problem.solver`` on
    ``args.ts`` (see the module docstring). Call only with concrete inputs."""
    solver = problem.solver
    n = jax.tree.leaves(trajectory)[0].shape[0] - 1
    linear = isinstance(solver, AbstractLinearMultistepSolver)
    if solver.stochastic and not linear:
        return
    steps = (0,) if (n == 1 or not linear) else (0, n - 1)
    values = np.asarray(_measure(problem, args, trajectory, steps))
    name = type(solver).__name__
    hint = (
        f"Pass the trajectory that sample_trajectory(...) returns for the same ts (states from "
        f"ts[0] to ts[-1], not reversed) and the solver= that produced it (here {name!r}; the "
        f"default is sample's DPMSolverPP(order=2)); for an SDE path, pass the SDE solver, "
        f"e.g. solver=jadeis.SDEDPMSolverPP(). For a path from another sampler, pass "
        f"check_trajectory=False (AdjointDEIS only: DiscreteAdjoint's gradient is exact for "
        f"the given solver only)."
    )
    if solver.stochastic:
        d = sum(int(np.prod(v.shape[1:])) for v in jax.tree.leaves(trajectory))
        hi = 1.0 + 10.0 * np.sqrt(2.0 / d) + 10.0 / d
        lo = 1.0 - 10.0 * np.sqrt(2.0 / d)
        for i, ms in zip(steps, values):
            if not np.isfinite(ms) or ms > hi or ms < lo:
                raise ValueError(
                    f"{where}: trajectory is not a path of the SDE sampler {name} on ts: the "
                    f"noise that maps trajectory[{i}] to trajectory[{i + 1}] has mean square "
                    f"{float(ms):.3g}, implausible for standard Gaussian noise "
                    f"(expected within [{max(lo, 0.0):.3g}, {hi:.3g}]). {hint}"
                )
        return
    eps = float(jnp.finfo(state_dtype(trajectory)).eps)
    rtol = min(0.05, 10.0 * np.sqrt(eps))
    for i, rel in zip(steps, values):
        if not np.isfinite(rel) or rel > rtol:
            raise ValueError(
                f"{where}: trajectory does not match the sampler {name} on ts: one step from "
                f"trajectory[{i}] differs from trajectory[{i + 1}] by {float(rel):.3g} "
                f"(relative; tolerance {rtol:.2g}). {hint}"
            )
