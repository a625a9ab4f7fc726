"""The gradient-strategy interface: a strategy owns its backward pass.

Every strategy but :class:`~jadeis.Backprop` runs the sampler inside one ``jax.custom_vjp``
defined here, and supplies three methods:

- ``fwd(problem, args, perturbed)``: sample and keep what the backward pass needs
  (``perturbed`` says, per argument leaf, whether a gradient is asked for, so gradients
  that nobody asked for are never computed, and a strategy that cannot compute one raises
  instead of returning a zero);
- ``bwd(problem, residuals, x0_bar, traj_bar)``: the cotangents of the arguments (an
  :class:`~jadeis._core.Args`; ``None`` for a zero);
- ``residuals_from(problem, args, trajectory, x_0)``: the same residuals from a forward
  pass run elsewhere, which is all :func:`jadeis.solve_adjoint` needs.

A new strategy is one subclass in one file.
"""

from __future__ import annotations

import abc
import functools

import equinox as eqx
import jax
import jax.numpy as jnp

from .._core import Args, Problem, forward, with_final


class AbstractAdjoint(eqx.Module):
    """Base class of the gradient strategies passed as ``sample(..., adjoint=...)``."""

    def check(self, problem: Problem, num_steps: int) -> None:
        """Static validation against the sampler and grid (raises ``ValueError``)."""

    def run(self, problem: Problem, args: Args):
        """Sample; returns ``(x_0, trajectory or None)`` with this strategy's gradient."""
        return _run(problem, args)

    @abc.abstractmethod
    def fwd(self, problem: Problem, args: Args, perturbed: Args):
        """``((x_0, trajectory or None), residuals)``."""

    @abc.abstractmethod
    def bwd(self, problem: Problem, residuals, x0_bar, traj_bar) -> Args:
        """Cotangents of ``args`` (entries may be ``None`` for zero)."""

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


def plain_forward(problem: Problem, args: Args):
    """``(x_0, trajectory or None)`` without any custom gradient."""
    x_0, saved, _ = forward(problem, args, save="x" if problem.return_trajectory else None)
    return x_0, (with_final(saved, x_0) if problem.return_trajectory else None)


def _is_primal(v):
    return isinstance(v, jax.custom_derivatives.CustomVJPPrimal)


def any_perturbed(tree) -> bool:
    """Whether any leaf of a pytree of ``perturbed`` flags is set."""
    return any(jax.tree.leaves(tree))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _run(problem: Problem, args: Args):
    return plain_forward(problem, args)


def _run_fwd(problem, args):
    values = jax.tree.map(lambda p: p.value, args, is_leaf=_is_primal)
    perturbed = jax.tree.map(lambda p: p.perturbed, args, is_leaf=_is_primal)
    return problem.adjoint.fwd(problem, Args(*values), Args(*perturbed))


def _materialise(ct, like):
    if ct is None or isinstance(ct, jax.custom_derivatives.SymbolicZero):
        return None if like is None else jnp.zeros(like.shape, like.dtype)
    return ct


def _is_zero(v):
    return isinstance(v, jax.custom_derivatives.SymbolicZero)


def _zeros_for(v):
    return jnp.zeros(v.shape, v.dtype) if _is_zero(v) else v


def _run_bwd(problem, res, ct):
    x0_ct, traj_ct = ct
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
    return (problem.adjoint.bwd(problem, res, x0_ct, traj_ct),)


_run.defvjp(_run_fwd, _run_bwd, symbolic_zeros=True)


def grid_error(strategy: str, fix: str) -> ValueError:
    return ValueError(
        f"{strategy} cannot differentiate with respect to ts or the schedule's parameters. "
        f"{fix}"
    )
