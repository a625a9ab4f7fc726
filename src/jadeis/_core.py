"""A sampling problem, as the loop and the gradient strategies see it.

A sampling problem is split, as ``jax.custom_vjp`` wants it, into a hashable static part
(:class:`Problem`: the model function, the solver, the step-size controller and a few
flags) and the differentiable arguments (:class:`Args`: ``params, x_T, z, schedule, ts,
noise``). The loop itself is ``jadeis._loop``; the gradient strategies wrap it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax

from ._controller import AbstractController
from ._solver import AbstractSolver


class StaticPart:
    """The non-array leaves of a pytree (e.g. an Equinox module's activation functions),
    hashable by value where the leaves are (as ``equinox.filter_jit`` hashes them)."""

    def __init__(self, tree):
        self.tree = tree
        leaves, self.treedef = jax.tree.flatten(tree)
        self.leaves = tuple(leaves)

    def __hash__(self):
        return hash((self.treedef, self.leaves))

    def __eq__(self, other):
        return (
            isinstance(other, StaticPart)
            and self.treedef == other.treedef
            and self.leaves == other.leaves
        )


def split_params(params):
    """``(array leaves, StaticPart of the rest)``: the parameters that are differentiated
    and traced, and what is closed over (functions, flags: anything but arrays)."""
    dynamic, static = eqx.partition(params, eqx.is_array)
    return dynamic, StaticPart(static)


class Problem(NamedTuple):
    """Hashable, trace-time configuration of one sampling problem."""

    eps_fn: Callable
    solver: AbstractSolver
    controller: AbstractController
    per_step_z: bool
    noise_mode: str  # "none" | "key" | "array"
    save_trajectory: bool
    static_params: StaticPart | None = None
    #: the index of the run's first step (a run that starts part-way: a truncated gradient)
    first_step: int = 0
    #: ``x_T`` is a whole solver state to resume from (not a sample to initialise one with)
    resume: bool = False

    def init(self, x_T):
        """The solver state at the start of the run."""
        return x_T if self.resume else self.solver.init(x_T)

    def params(self, dynamic):
        """The parameters as the model takes them (array leaves and the static rest)."""
        if self.static_params is None:
            return dynamic
        return eqx.combine(dynamic, self.static_params.tree)


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
    params = problem.params(params)

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
        return jax.tree.unflatten(
            treedef,
            [
                _leaf_noise(problem.solver, jax.random.fold_in(key_i, j), v)
                for j, v in enumerate(leaves)
            ],
        )
    if is_array(noise):
        return noise[i].astype(x.dtype)
    dtype = state_dtype(x)
    return jax.tree.map(lambda v: v[i].astype(dtype), noise)
