"""The step-size controller interface: a controller chooses the steps, a solver takes them.

Two kinds, declared by base class, are run by the one sampling loop (``jadeis._loop``):

- :class:`AbstractGridController`: the steps are known before the loop (a fixed grid, such
  as the ``ts`` users pass). The loop is a ``lax.scan`` over per-step inputs computed once,
  vectorised and differentiable (so gradients reach ``ts`` and the schedule).
- :class:`AbstractAdaptiveController`: each step is proposed from the last one, tried, and
  accepted or rejected from the solver's error estimate. The loop is a ``lax.while_loop``
  of at most ``max_steps`` attempts (a bounded scan where reverse-mode autodiff runs through
  it); the accepted times are recorded so that every gradient strategy can walk back over
  the accepted steps.

A new controller is one file with one subclass.
"""

from __future__ import annotations

import abc
from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array


class AbstractController(eqx.Module):
    """Base class of the step-size controllers passed as ``controller=``."""

    def check(self, solver, ts: Array, schedule, where: str) -> None:
        """Eager validation against the solver and the end points (raises ``ValueError``)."""


class AbstractGridController(AbstractController):
    """A controller whose steps are known before sampling starts."""

    @abc.abstractmethod
    def grid(self, schedule, ts: Array) -> Array:
        """The N + 1 descending times of the steps, from the ``ts`` passed by the user."""


class AbstractAdaptiveController(AbstractController):
    """A controller that proposes each step from the last and accepts or rejects it.

    The loop calls ``init`` once, then per attempt ``propose`` (the next time), the solver's
    step (with its error estimate), and ``adapt`` (accept or reject, and the next proposal).
    Its decisions are not differentiated (the accepted grid is held fixed by every gradient
    strategy, as in diffrax), and gradients with respect to ``ts`` or the schedule's
    parameters are refused.
    """

    max_steps: eqx.AbstractVar[int]

    @abc.abstractmethod
    def init(self, solver, schedule, ts: Array, dtype) -> Any:
        """The controller's state at ``ts[0]`` (a pytree with fields ``t``: the current
        time)."""

    @abc.abstractmethod
    def propose(self, schedule, state) -> tuple[Array, Array]:
        """``(t_next, last)``: the end of the next attempt, and whether it ends sampling."""

    @abc.abstractmethod
    def adapt(self, solver, state, error, x, x_next, index, t_next, last) -> tuple[Array, Any]:
        """``(accept, new state)`` from the attempt's error estimate; ``x``, ``x_next`` are the
        samples before and after the attempt, ``index`` the number of accepted steps so far
        (steps below ``solver.unestimated_steps`` carry no estimate)."""

    def stalled(self, state) -> Array:
        """Whether the controller can no longer make progress (e.g. its step size has
        collapsed): the loop stops, and not reaching the end is an error."""
        return jnp.zeros((), bool)
