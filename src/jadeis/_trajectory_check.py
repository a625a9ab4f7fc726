"""Does a trajectory given to :func:`jadeis.solve_adjoint` come from ``solver`` on ``ts``?

A check run when every input is concrete (not under ``jit``): re-run the solver's steps
from the given states and compare with the next given state (docs/checks.md).

- Which steps. Linear multistep solvers (DDIM, DPMSolver, DPMSolverPP and their SDE forms)
  and the singlestep solvers, whose state at step i can be rebuilt from the trajectory
  (a multistep history is the model outputs at the previous states, exactly what the
  sampler kept): **every step**, with the model evaluated at the N states in one batched
  call (``jax.lax.map`` in chunks of 8 states: the cost of N model evaluations, or
  ``order`` times that for a singlestep solver). UniPC and Rex keep state that the
  trajectory does not hold (UniPC's corrected previous sample, Rex's second chain): their
  **first step** only.
- ODE solvers: every checked step from ``trajectory[i]`` must reproduce
  ``trajectory[i + 1]`` to a relative tolerance of ``min(0.05, 10 sqrt(eps))`` of the
  state's dtype (3.5e-3 in float32, 1.5e-7 in float64).
- SDE solvers: the Gaussian noise ``xi`` that maps ``trajectory[i]`` to ``trajectory[i + 1]``
  is solved for at every step (N steps of d values) and must look like independent standard
  normal noise: its mean square within the chi-square quantiles of probability 1e-9 on
  each side (``chi2.ppf(1e-9, N d) / (N d)`` .. ``chi2.ppf(1 - 1e-9, N d) / (N d)``), and its
  lag-1 correlation across steps within ``6 / sqrt((N - 1) d)``.

What it sees: a reversed trajectory, one of another grid, one of another sampler whose
steps differ from this one's by more than the tolerance at any step (DDIM's path given
with the default DPMSolverPP(2): the second-order steps differ by 1e-3 to 1e-1), an SDE
path given with an ODE solver, and an ODE path given with an SDE solver: its implied noise
is smooth in the step (lag-1 correlation 0.98-1.00 from N = 20 on), and its mean square
is far from 1 at few steps (120-900 at N = 5 with a second-order or data-form step).

What it cannot see: a path of another sampler whose steps agree with this one's within the
tolerance (first-order steps of different samplers are the same map: DDIM and
DPM-Solver++(1) paths pass for each other; float32's tolerance hides differences below
3.5e-3 per step), an SDE path whose noise is not standard normal but plausible in both
statistics, an ODE path given with an SDE solver when ``(N - 1) d`` is below about 36 (the
correlation bound exceeds 1) and its mean square happens to be plausible (measured:
SDEDPMSolver at N = 5 on a 2-element state, 3.6), UniPC's and Rex's steps after the first,
and anything under ``jit``.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._conditioning import z_at
from ._core import Args, Problem, bind_model, state_dtype
from ._loop import fixed_rows
from ._solver import SinglestepDPMSolver
from ._solver.base import AbstractLinearMultistepSolver

#: states per batched model call
CHUNK = 8


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


def _rows_at(inputs, idx):
    return jax.tree.map(lambda v: v[idx], inputs)


def _every_step_multistep(problem: Problem, args: Args, inputs, trajectory):
    """Per step i of a linear multistep solver: the next state predicted from the given
    ones (without noise), and the noise coefficient ``c_i``."""
    solver = problem.solver
    n = jax.tree.leaves(trajectory)[0].shape[0] - 1
    xs = jax.tree.map(lambda v: v[:-1], trajectory)

    def output_at(i):
        inp = _rows_at(inputs, i)
        model = bind_model(problem, args.params, z_at(args.z, i, problem.per_step_z))
        x = _at(xs, i)
        out = solver.model_output(model, inp, x)
        return jax.tree.map(lambda o, v: o.astype(v.dtype), out, x)

    ms = jax.lax.map(output_at, jnp.arange(n), batch_size=min(n, CHUNK))

    def predict(i):
        inp = _rows_at(inputs, i)
        hist = tuple(
            jax.tree.map(lambda m, j=j: jnp.where(i - j >= 0, m[jnp.maximum(i - j, 0)],
                                                  jnp.zeros_like(m[0])), ms)
            for j in range(1, solver.order)
        )
        return solver.combine(inp, _at(xs, i), _at(ms, i), hist, None), inp.c

    return jax.vmap(predict)(jnp.arange(n))


def _every_step_singlestep(problem: Problem, args: Args, inputs, trajectory):
    solver = problem.solver
    n = jax.tree.leaves(trajectory)[0].shape[0] - 1

    def step(i):
        inp = _rows_at(inputs, i)
        model = bind_model(problem, args.params, z_at(args.z, i, problem.per_step_z))
        return solver.output(solver.step(model, inp, solver.init(_at(trajectory, i)), None)[0])

    return jax.lax.map(step, jnp.arange(n), batch_size=min(n, CHUNK))


def _first_step(problem: Problem, args: Args, inputs, trajectory):
    solver = problem.solver
    inp = _rows_at(inputs, 0)
    model = bind_model(problem, args.params, z_at(args.z, 0, problem.per_step_z))
    out = solver.output(solver.step(model, inp, solver.init(_at(trajectory, 0)), None)[0])
    return jax.tree.map(lambda v: v[None], out)


def _rel_per_step(pred, nxt):
    """|pred_i - next_i| / |next_i| per step (norms over every leaf, in float32 at least)."""
    def sq(tree):
        def one(v):
            v = v.astype(v.dtype if v.dtype.itemsize >= 4 else jnp.float32)
            return jnp.sum(jnp.square(v).reshape(v.shape[0], -1), axis=1)

        return sum(one(v) for v in jax.tree.leaves(tree))

    diff = sq(jax.tree.map(jnp.subtract, pred, nxt))
    ref = sq(nxt)
    return jnp.sqrt(diff) / jnp.maximum(jnp.sqrt(ref), float(jnp.finfo(jnp.float32).tiny))


@eqx.filter_jit
def _measure(problem: Problem, args: Args, trajectory):
    """ODE: the relative residual of every checked step; SDE: the implied noise's sum of
    squares and its number of values."""
    solver = problem.solver
    dtype = state_dtype(trajectory)
    inputs = fixed_rows(problem, args.schedule, args.ts, dtype)
    nxt = jax.tree.map(lambda v: v[1:], trajectory)
    if isinstance(solver, AbstractLinearMultistepSolver):
        pred, c = _every_step_multistep(problem, args, inputs, trajectory)
        if solver.stochastic:
            xi = jax.tree.map(
                lambda a, b: (a - b) / c.reshape(c.shape + (1,) * (a.ndim - 1)), nxt, pred)
            n = c.shape[0]
            flat = jnp.concatenate(
                [v.astype(jnp.float32).reshape(n, -1) for v in jax.tree.leaves(xi)], axis=1)
            # the mean square of the noise, and its lag-1 correlation across steps
            stats = jnp.stack([
                jnp.sum(jnp.square(flat)),
                jnp.sum(flat[:-1] * flat[1:]),
                jnp.sum(jnp.square(flat[:-1])),
                jnp.sum(jnp.square(flat[1:])),
            ])
            return stats, flat.shape
        return _rel_per_step(pred, nxt), None
    if isinstance(solver, SinglestepDPMSolver):
        return _rel_per_step(_every_step_singlestep(problem, args, inputs, trajectory), nxt), None
    pred = _first_step(problem, args, inputs, trajectory)
    return _rel_per_step(pred, jax.tree.map(lambda v: v[:1], nxt)), None


def check_trajectory(problem: Problem, args: Args, trajectory, where: str) -> None:
    """Raise ``ValueError`` if ``trajectory`` is not a path of ``problem.solver`` on
    ``args.ts`` (see the module docstring). Call only with concrete inputs."""
    solver = problem.solver
    linear = isinstance(solver, AbstractLinearMultistepSolver)
    if solver.stochastic and not linear:
        return
    values, count = _measure(problem, args, trajectory)
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
        from scipy.stats import chi2

        total, cross, sa, sb = (float(v) for v in np.asarray(values, np.float64))
        n, d = count
        k = n * d
        ms = total / k
        lo = float(chi2.ppf(1e-9, k)) / k
        hi = float(chi2.ppf(1.0 - 1e-9, k)) / k
        if not np.isfinite(ms) or ms > hi or ms < lo:
            raise ValueError(
                f"{where}: trajectory is not a path of the SDE sampler {name} on ts: the "
                f"noise that maps each state to the next has mean square {ms:.3g} over its "
                f"{k} values, implausible for standard Gaussian noise (expected within "
                f"[{lo:.3g}, {hi:.3g}]). {hint}"
            )
        m = (n - 1) * d
        if m > 0 and sa > 0 and sb > 0:
            r = cross / np.sqrt(sa * sb)
            bound = 6.0 / np.sqrt(m)  # 6 sigma of the correlation of independent noise
            if abs(r) > bound:
                raise ValueError(
                    f"{where}: trajectory is not a path of the SDE sampler {name} on ts: the "
                    f"noise that maps each state to the next is correlated from one step to "
                    f"the next ({r:.3g}; independent Gaussian noise stays within "
                    f"{bound:.3g} here), as the smooth path of an ODE sampler's is. {hint}"
                )
        return
    values = np.asarray(values)
    eps = float(jnp.finfo(state_dtype(trajectory)).eps)
    rtol = min(0.05, 10.0 * np.sqrt(eps))
    bad = np.flatnonzero(~np.isfinite(values) | (values > rtol))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{where}: trajectory does not match the sampler {name} on ts: one step from "
            f"trajectory[{i}] differs from trajectory[{i + 1}] by {float(values[i]):.3g} "
            f"(relative; tolerance {rtol:.2g}; {bad.size} of the {values.size} steps checked "
            f"differ). {hint}"
        )
