"""Truncated gradients: differentiate through the last K steps only."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from .._core import Args, Problem
from .._loop import fixed_rows, integrate, is_adaptive, trajectory
from .._solver.base import as_int, check_int, row
from .base import AbstractAdjoint, Out, any_perturbed
from .discrete import DiscreteAdjoint


class Truncated(AbstractAdjoint):
    """The gradient through the last ``k`` sampling steps only (DRaFT-K style).

    The first N - k steps run without a tape (their inputs under ``stop_gradient``); the
    state they reach (the whole solver state, with a multistep method's history) is a
    constant input to the last ``k`` steps, which are differentiated by ``adjoint`` (any
    strategy: ``DiscreteAdjoint()`` by default, ``Backprop()``, ``ReversibleAdjoint()`` for Rex,
    ``AdjointDEIS(...)``). So the gradient with respect to ``z``, ``params``, the noise of the
    last ``k`` steps, and (with an exact ``adjoint``) ``ts`` and the schedule, is that of the
    last ``k`` steps with the state before them held fixed; the earlier steps' contributions
    are left out by definition. ``k >= N`` is ``adjoint`` itself (the exact gradient);
    ``k = 1`` is the one-step gradient.

    The truncated gradient with respect to ``x_T`` is not defined (``x_T`` only reaches the
    untaped steps): by default (``x_T_gradient="refuse"``) asking for it is a ``ValueError``,
    never a zero. ``x_T_gradient="linear"`` defines it explicitly: the Jacobian of the untaped
    steps, ``d x_s / d x_T`` (``x_s`` the sample where the tape starts, at time ``t_s``), is
    taken as the schedule's linear part ``alpha(t_s) / alpha(t_0)``, the flow of the
    probability-flow ODE's linear drift (DDIM's map with the noise prediction held fixed), so
    ``dL/dx_T = alpha(t_s) / alpha(t_0) dL/dx_s``: a scalar multiple of the gradient with
    respect to the state the tape starts from (the history of a multistep solver held
    fixed). Under Adam, which is invariant to that scale, ``x_T`` then moves along
    ``dL/dx_s``. Memory and time of the backward pass are those of ``adjoint`` over ``k``
    steps (docs/math/adjoint.md#the-gradient-dial). Fixed grids only: the last ``k`` steps of
    an adaptive run are known only when it ends.

    **Arguments:**

    - `k`: the number of final steps differentiated (an int >= 1).
    - `adjoint`: the strategy for those steps.
    - `x_T_gradient`: ``"refuse"`` (default) or ``"linear"``, see above.

    **Example:**

    ```python
    >>> import jax, jax.numpy as jnp
    >>> import jadeis
    >>> sch = jadeis.VPLinear()
    >>> eps_fn = lambda p, x, t, z: p * x + z
    >>> loss = lambda z: jadeis.sample(eps_fn, 0.5, jnp.ones((1, 2)), z, schedule=sch,
    ...     ts=jadeis.time_grid(sch, 10), adjoint=jadeis.Truncated(2)).sum()
    >>> jax.grad(loss)(0.1).shape
    ()
    >>> lin = jadeis.Truncated(2, x_T_gradient="linear")
    >>> g = jax.grad(lambda x: jadeis.sample(eps_fn, 0.5, x, 0.1, schedule=sch,
    ...     ts=jadeis.time_grid(sch, 10), adjoint=lin).sum())(jnp.ones((1, 2)))
    >>> g.shape
    (1, 2)

    ```
    """

    k: int
    adjoint: AbstractAdjoint
    x_T_gradient: str

    def __init__(
        self, k: int, adjoint: AbstractAdjoint = DiscreteAdjoint(), x_T_gradient: str = "refuse"
    ):
        self.k = as_int(k)
        self.adjoint = adjoint
        self.x_T_gradient = x_T_gradient

    def __check_init__(self):
        check_int("Truncated", "k", self.k, 1)
        if self.x_T_gradient not in _X_T_GRADIENTS:
            raise ValueError(
                f"Truncated: x_T_gradient must be 'refuse' (no gradient with respect to x_T, "
                f"the default) or 'linear' (the untaped steps' Jacobian taken as "
                f"alpha(t_s)/alpha(t_0)), got x_T_gradient={self.x_T_gradient!r}."
            )
        if not isinstance(self.adjoint, AbstractAdjoint) or isinstance(self.adjoint, Truncated):
            raise ValueError(
                f"Truncated: adjoint must be a gradient strategy for the last k steps such as "
                f"jadeis.DiscreteAdjoint() (not another Truncated), got {self.adjoint!r}."
            )

    def check(self, problem: Problem, num_steps: int) -> None:
        if is_adaptive(problem):
            raise ValueError(
                "Truncated differentiates the last k steps of a fixed grid; with an adaptive "
                "controller they are known only when the run ends. Use a fixed grid (ts of "
                "N + 1 times), or an exact strategy."
            )
        self.adjoint.check(problem, num_steps)

    def bind(self, problem: Problem, args: Args):
        return Truncated(self.k, self.adjoint.bind(problem, args), self.x_T_gradient)

    def cost(self, problem, stats):
        k = jnp.minimum(self.k, stats.num_steps)
        return self.adjoint.cost(problem, stats._replace(num_steps=k, num_attempts=k))

    def run(self, problem: Problem, args: Args) -> Out:
        n = problem.controller.grid(args.schedule, args.ts).shape[0] - 1
        if self.k >= n:
            return self.adjoint.run(problem, args)
        start = n - self.k
        linear = self.x_T_gradient == "linear"
        x_T = args.x_T if linear else _no_gradient(args.x_T)
        # the first steps, without a tape
        frozen = lax.stop_gradient(args._replace(x_T=x_T))
        head = problem._replace(save_trajectory=False)
        from .._core import state_dtype

        rows = fixed_rows(head, frozen.schedule, frozen.ts, state_dtype(frozen.x_T))
        res = integrate(
            head,
            frozen,
            rows=row(rows, slice(0, start)),
            save="x" if problem.save_trajectory else None,
        )
        # the last k steps, from the state reached, with the inner strategy
        tail = problem._replace(first_step=start, resume=True)
        resumed = lax.stop_gradient(res.final)
        if linear:
            resumed = _linear_link(problem, args, resumed, start)
        out = self.adjoint.run(tail, args._replace(x_T=resumed))
        traj = None
        if problem.save_trajectory:
            head_traj = trajectory(res.saved, res.x_0, res.grid)
            traj = jax.tree.map(
                lambda a, b: jnp.concatenate([a[:-1], b]), head_traj, out.trajectory
            )
        s_a, s_b = res.stats, out.stats
        stats = s_b._replace(
            num_steps=s_a.num_steps + s_b.num_steps,
            num_attempts=s_a.num_attempts + s_b.num_attempts,
            model_evals=s_a.model_evals + s_b.model_evals,
        )
        return Out(out.x_0, traj, args.ts, stats)

    def fwd(self, problem, args, perturbed):  # pragma: no cover - run() composes strategies
        raise NotImplementedError

    def bwd(self, problem, residuals, x0_bar, traj_bar):  # pragma: no cover
        raise NotImplementedError


_X_T_GRADIENTS = ("refuse", "linear")


def _linear_link(problem: Problem, args: Args, resumed, start: int):
    """``resumed`` (the state where the tape starts), with ``x_T`` linked to its sample by
    the constant Jacobian ``alpha(t_s) / alpha(t_0)``: the value is unchanged (``resumed``
    plus a zero), the gradient of its sample reaches ``x_T`` times that ratio."""
    grid = lax.stop_gradient(problem.controller.grid(args.schedule, args.ts))
    sch = lax.stop_gradient(args.schedule)
    ratio = sch.alpha(grid[start]) / sch.alpha(grid[0])
    solver = problem.solver
    x_T = solver.output(problem.init(args.x_T))
    delta = jax.tree.map(lambda v: ratio.astype(v.dtype) * (v - lax.stop_gradient(v)), x_T)
    # the sample's place in the solver state (output is a projection: its transpose)
    (delta,) = jax.linear_transpose(solver.output, resumed)(delta)
    return jax.tree.map(lambda r, d: r + d, resumed, delta)


@functools.partial(jax.custom_vjp)
def _no_gradient(x_T):
    """The identity; asking for its gradient is a ``ValueError`` (truncation defines none)."""
    return x_T


def _no_gradient_fwd(x_T):
    values = jax.tree.map(lambda p: p.value, x_T, is_leaf=_is_primal)
    if any_perturbed(jax.tree.map(lambda p: p.perturbed, x_T, is_leaf=_is_primal)):
        raise ValueError(
            "Truncated(k) defines no gradient with respect to x_T: x_T only reaches the first "
            "N - k steps, which are not differentiated. Differentiate with respect to z or the "
            "parameters, use k >= N (the exact gradient), an exact strategy such as "
            "jadeis.DiscreteAdjoint(), or define it explicitly with "
            "Truncated(k, x_T_gradient='linear')."
        )
    return values, None


def _no_gradient_bwd(_, ct):
    return (None,)


def _is_primal(v):
    return isinstance(v, jax.custom_derivatives.CustomVJPPrimal)


_no_gradient.defvjp(_no_gradient_fwd, _no_gradient_bwd, symbolic_zeros=True)
