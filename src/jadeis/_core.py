"""The sampling loop shared by every entry point and gradient strategy.

A sampling problem is split, as ``jax.custom_vjp`` wants it, into a hashable static part
(:class:`Problem`: the model function, the solver, the strategy and a few flags) and the
differentiable arguments (:class:`Args`: ``params, x_T, z, schedule, ts, noise``). The loop
is one ``lax.scan`` over ``solver.step``; it knows nothing about any particular solver.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
from jax import lax

from ._conditioning import z_at
from ._solver import AbstractSolver


class Problem(NamedTuple):
    """Hashable, trace-time configuration of one sampling problem."""

    eps_fn: Callable
    solver: AbstractSolver
    adjoint: Any
    per_step_z: bool
    noise_mode: str  # "none" | "key" | "array"
    return_trajectory: bool


class Args(NamedTuple):
    """The differentiable arguments of one sampling problem."""

    params: Any
    x_T: Any
    z: Any
    schedule: Any
    ts: Any
    noise: Any  # None, raw key data, or an (N,) + x_T.shape array (a pytree like x_T)


def bind_model(problem: Problem, params, z_i) -> Callable:
    """``model(x, t)``: the noise prediction with parameters and conditioning bound.

    Mixed precision: the prediction is cast to the dtype of ``x`` (the solver's state), so a
    model that runs in bfloat16/float16 drives a float32 state and all solver arithmetic stays
    in the state's dtype; under differentiation the cast sends the cotangent back in the
    model's dtype, so the model's VJP runs in its own precision (docs/precision.md).
    """
    eps_fn = problem.eps_fn

    def model(x, t):
        eps = eps_fn(params, x, t, z_i)
        return jax.tree.map(lambda e, v: jax.numpy.asarray(e).astype(v.dtype), eps, x)

    return model


def normal_like(key, x):
    """Standard normal noise of the shape and dtype of ``x``. Under an explicit-axis mesh
    it is drawn with ``x``'s sharding, so each device draws only its own rows (JAX would
    otherwise type it as replicated and draw the whole batch on every device)."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    axis_types = getattr(getattr(sharding, "mesh", None), "axis_types", ())
    if any(t == jax.sharding.AxisType.Explicit for t in axis_types):
        return jax.random.normal(key, x.shape, x.dtype, out_sharding=sharding)
    return jax.random.normal(key, x.shape, x.dtype)


def is_array(x) -> bool:
    """Whether a state is a single array (else a pytree of arrays)."""
    return isinstance(x, jax.Array)


def state_dtype(x):
    """The dtype of a state: of the array, or of the (common) dtype of a pytree's leaves."""
    if hasattr(x, "dtype"):
        return x.dtype
    return jax.tree.leaves(x)[0].dtype


def _leaf_noise(solver, key, x):
    shape = solver.noise_shape(x.shape)
    if shape == x.shape:
        return normal_like(key, x)
    return jax.random.normal(key, shape, x.dtype)


def draw_noise(problem: Problem, noise, i, x):
    """Gaussian noise of step ``i`` (None for ODE solvers): from the key folded with ``i``
    (for a pytree state, leaf ``j`` of step ``i`` uses ``fold_in(fold_in(key, i), j)``), or
    row ``i`` of the supplied array (of each leaf of the supplied pytree)."""
    if not problem.solver.stochastic:
        return None
    if problem.noise_mode == "key":
        key = jax.random.wrap_key_data(noise)
        if is_array(x):
            return _leaf_noise(problem.solver, jax.random.fold_in(key, i), x)
        leaves, treedef = jax.tree.flatten(x)
        key_i = jax.random.fold_in(key, i)
        return jax.tree.unflatten(treedef, [
            _leaf_noise(problem.solver, jax.random.fold_in(key_i, j), v)
            for j, v in enumerate(leaves)
        ])
    if is_array(noise):
        return noise[i].astype(x.dtype)
    dtype = state_dtype(x)
    return jax.tree.map(lambda v: v[i].astype(dtype), noise)


def solver_inputs(problem: Problem, schedule, ts, dtype):
    """The solver's per-step inputs, with the step index prepended."""
    return problem.solver.inputs(schedule, ts, dtype)


def step_fn(problem: Problem, params, z, i, inp, state, noise, x_dtype):
    """Step ``i`` of the solver with the model, conditioning and noise of that step."""
    solver = problem.solver
    model = bind_model(problem, params, z_at(z, i, problem.per_step_z))
    x = solver.output(state)
    x = x.astype(x_dtype) if is_array(x) else jax.tree.map(lambda v: v.astype(x_dtype), x)
    xi = draw_noise(problem, noise, i, x)
    return solver.step(model, inp, state, xi)


def uses_step_index(problem: Problem) -> bool:
    """Whether ``step_fn`` reads the step index (per-step conditioning or SDE noise)."""
    return problem.per_step_z or problem.solver.stochastic


def num_steps(ts) -> int:
    return ts.shape[0] - 1


def forward(problem: Problem, args: Args, *, save: str | None = None):
    """Run the sampler from ``args.x_T`` over ``args.ts``.

    ``save`` selects what the scan also returns, per step: ``None`` (nothing), ``"x"`` (the
    N samples x_T, ..., x_{N-1} at the start of each step, the scan's own buffer) or
    ``"state"`` (the N solver states at the start of each step). Returns
    ``(x_0, saved, final_state)``.
    """
    solver = problem.solver
    params, x_T, z, schedule, ts, noise = args
    dtype = state_dtype(x_T)
    inputs = solver_inputs(problem, schedule, ts, dtype)
    n = num_steps(ts)

    def body(state, xs):
        i, inp = xs
        new = step_fn(problem, params, z, i, inp, state, noise, dtype)
        if save == "x":
            out = solver.output(state)
        elif save == "state":
            out = state
        else:
            out = None
        return new, out

    # the step index is scanned over only where a step uses it (per-step z, noise)
    steps = jax.numpy.arange(n) if uses_step_index(problem) else None
    final, saved = lax.scan(body, solver.init(x_T), (steps, inputs))
    return solver.output(final), saved, final


def with_final(saved_x, x_0):
    """The (N + 1)-state trajectory from the N saved starting states and x_0."""
    return jax.tree.map(
        lambda s, x: jax.numpy.concatenate([s, x[None]], axis=0), saved_x, x_0
    )
