"""The gradient-strategy interface: a strategy owns its backward pass, and wraps the loop.

Every strategy but :class:`~jadeis.Backprop` runs the sampling loop (``jadeis._loop``)
inside one ``jax.custom_vjp`` defined here, and supplies:

- ``fwd(problem, args, perturbed)``: sample (``integrate``) and keep what the backward pass
  needs. ``perturbed`` says, per argument leaf, whether a gradient is asked for, so
  gradients that nobody asked for are never computed (the model's VJP closes over what is
  not perturbed), and a strategy that cannot compute one raises instead of returning a zero;
- ``bwd(problem, residuals, x0_bar, traj_bar)``: the cotangents of the arguments (an
  :class:`~jadeis._core.Args`; ``None`` for a zero), walking back over the accepted steps
  (``sweep``), whatever the step-size controller;
- ``residuals_from(problem, args, trajectory, x_0)``: the same residuals from a forward
  pass run elsewhere, which is all :func:`jadeis.solve_adjoint` needs;
- ``cost(problem, num_steps)``: the model evaluations and VJPs of its backward pass.

A new strategy is one subclass in one file.
"""

from __future__ import annotations

import abc
import functools
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from .._core import Args, Problem
from .._loop import Grid, LoopResult, Stats, integrate, trajectory


class Out(NamedTuple):
    """What a run returns: ``x_0``, the trajectory (or None), the accepted times, stats, and
    whether an adaptive run failed to reach its end (a bool; ``None`` on a fixed grid)."""

    x_0: Any
    trajectory: Any
    ts: Any
    stats: Stats
    failed: Any = None


class AbstractAdjoint(eqx.Module):
    """Base class of the gradient strategies passed as ``sample(..., adjoint=...)``."""

    def check(self, problem: Problem, num_steps: int) -> None:
        """Static validation against the sampler, controller and grid (``ValueError``)."""

    def bind(self, problem: Problem, args: Args) -> AbstractAdjoint:
        """This strategy with whatever it fixes from the run's arguments before compiling
        (e.g. :class:`jadeis.ReversibleAdjoint`'s number of exact states, from a concrete
        ``ts``); called once by every entry point. Default: itself."""
        return self

    def run(self, problem: Problem, args: Args) -> Out:
        """Sample with this strategy's gradient."""
        return _run(self, problem, args)

    @abc.abstractmethod
    def fwd(self, problem: Problem, args: Args, perturbed: Args):
        """``(Out, residuals)``."""

    @abc.abstractmethod
    def bwd(self, problem: Problem, residuals, x0_bar, traj_bar) -> Args:
        """Cotangents of ``args`` (entries may be ``None`` for zero)."""

    def cost(self, problem: Problem, stats: Stats) -> tuple[Any, Any]:
        """``(model evaluations, VJPs)`` of the backward pass of a run with these stats."""
        return 0 * stats.num_steps, stats.num_steps * problem.solver.evals_per_step

    def check_solve(self, has_trajectory: bool) -> None:
        """Eager checks of :func:`jadeis.solve_adjoint`'s inputs for this strategy."""

    def residuals_from(self, problem: Problem, args: Args, trajectory, x_0):
        """Residuals of :meth:`fwd` from a given trajectory (or only ``x_0``)."""
        raise ValueError(
            f"solve_adjoint: {type(self).__name__} cannot run on a forward pass made "
            f"elsewhere; use jax.grad through jadeis.sample(..., adjoint={type(self).__name__}())."
        )

    def solve(self, problem: Problem, args: Args, trajectory, x_0, grad_x0) -> Args:
        """The cotangents of ``args`` for ``dL/dx_0 = grad_x0`` (used by solve_adjoint)."""
        res = self.residuals_from(problem, args, trajectory, x_0)
        return self.bwd(problem, res, grad_x0, None)


def finish(adjoint: AbstractAdjoint, problem: Problem, res: LoopResult, xs=None) -> Out:
    """The run's :class:`Out` from the loop's result; ``xs``: the samples at the start of
    every step, if saved (for the trajectory)."""
    traj = trajectory(xs, res.x_0, res.grid) if problem.save_trajectory else None
    evals, vjps = adjoint.cost(problem, res.stats)
    stats = res.stats._replace(
        grad_model_evals=jnp.asarray(evals, jnp.int32), grad_vjps=jnp.asarray(vjps, jnp.int32)
    )
    return Out(res.x_0, traj, res.grid.ts, stats, res.failed)


def plain_forward(
    adjoint: AbstractAdjoint, problem: Problem, args: Args, *, bounded: bool = False
) -> Out:
    """The run without any custom gradient."""
    res = integrate(problem, args, save="x" if problem.save_trajectory else None, bounded=bounded)
    return finish(adjoint, problem, res, res.saved)


def _is_primal(v):
    return isinstance(v, jax.custom_derivatives.CustomVJPPrimal)


def any_perturbed(tree) -> bool:
    """Whether any leaf of a pytree of ``perturbed`` flags is set."""
    return any(jax.tree.leaves(tree))


class Wanted(NamedTuple):
    """Which cotangents a backward pass must compute."""

    params: bool
    z: bool
    x_T: bool
    noise: bool
    grid: bool

    @classmethod
    def of(cls, perturbed: Args) -> Wanted:
        return cls(
            params=any_perturbed(perturbed.params),
            z=any_perturbed(perturbed.z),
            x_T=any_perturbed(perturbed.x_T),
            noise=any_perturbed(perturbed.noise),
            grid=any_perturbed((perturbed.schedule, perturbed.ts)),
        )

    @classmethod
    def everything(cls) -> Wanted:
        return cls(True, True, True, True, False)


def partial_vjp(fn, primals: tuple, wanted: tuple):
    """``(output, vjp)`` of ``fn(*primals)`` with respect to the primals whose ``wanted``
    flag is set only; the others are closed over (no VJP is built for them, e.g. for the
    parameters when only ``x_T`` is differentiated). ``vjp(ct)`` returns a tuple with
    ``None`` in the places not wanted."""
    idx = [i for i, w in enumerate(wanted) if w]

    def f(*diff):
        full = list(primals)
        for i, d in zip(idx, diff):
            full[i] = d
        return fn(*full)

    out, vjp = jax.vjp(f, *[primals[i] for i in idx])

    def back(ct):
        bars = vjp(ct)
        full = [None] * len(primals)
        for i, b in zip(idx, bars):
            full[i] = b
        return tuple(full)

    return out, back


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _run(adjoint: AbstractAdjoint, problem: Problem, args: Args):
    return plain_forward(adjoint, problem, args)


def _run_fwd(adjoint, problem, args):
    values = jax.tree.map(lambda p: p.value, args, is_leaf=_is_primal)
    perturbed = jax.tree.map(lambda p: p.perturbed, args, is_leaf=_is_primal)
    return adjoint.fwd(problem, Args(*values), Args(*perturbed))


def _is_zero(v):
    return isinstance(v, jax.custom_derivatives.SymbolicZero)


def _zeros_for(v):
    return jnp.zeros(v.shape, v.dtype) if _is_zero(v) else v


def _run_bwd(adjoint, problem, res, ct):
    x0_ct, traj_ct, ts_ct = ct[:3]
    if not all(_is_zero(v) for v in jax.tree.leaves(ts_ct, is_leaf=_is_zero)):
        raise ValueError(
            "The accepted times of a run (Solution.ts) are chosen by the step-size controller "
            "and are not differentiable; stop their gradient with jax.lax.stop_gradient."
        )
    if _is_zero(x0_ct):
        x0_ct = jnp.zeros(x0_ct.shape, x0_ct.dtype)
    elif not isinstance(x0_ct, jax.Array):  # a pytree state: per-leaf symbolic zeros
        x0_ct = jax.tree.map(_zeros_for, x0_ct, is_leaf=_is_zero)
    if _is_zero(traj_ct):
        traj_ct = None
    elif traj_ct is not None and not isinstance(traj_ct, jax.Array):
        leaves = jax.tree.leaves(traj_ct, is_leaf=_is_zero)
        if all(_is_zero(v) for v in leaves):
            traj_ct = None
        else:
            traj_ct = jax.tree.map(_zeros_for, traj_ct, is_leaf=_is_zero)
    return (adjoint.bwd(problem, res, x0_ct, traj_ct),)


_run.defvjp(_run_fwd, _run_bwd, symbolic_zeros=True)


def grid_error(strategy: str, fix: str) -> ValueError:
    return ValueError(
        f"{strategy} cannot differentiate with respect to ts or the schedule's parameters. {fix}"
    )


def adaptive_grid_error(problem: Problem) -> ValueError:
    return ValueError(
        f"With the adaptive controller {type(problem.controller).__name__}, the time grid is "
        f"chosen by the controller and is not differentiated, so gradients with respect to ts "
        f"or the schedule's parameters are not available; differentiate with a fixed grid "
        f"(ts of N + 1 times, controller=jadeis.FixedGrid()) instead, or stop the gradient "
        f"with jax.lax.stop_gradient(ts)."
    )


__all__ = ["AbstractAdjoint", "Grid", "Out", "Wanted", "partial_vjp"]
