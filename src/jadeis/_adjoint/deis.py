"""AdjointDEIS: exponential-integrator solvers of the continuous adjoint equations."""

from __future__ import annotations

from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .._conditioning import z_at
from .._controller import FixedGrid
from .._core import Args, Problem, state_dtype
from .._ei import (
    add_warmup_correction,
    cast,
    lambda_history,
    model_time_dtype,
    multistep_weights,
    resolve_warmup,
    step_orders,
)
from .._grid import time_grid
from .._loop import Grid, integrate, is_adaptive, loop_rows, split_trajectory_bar
from .._solver.base import AbstractLinearMultistepSolver, as_int, check_choice, check_int
from .._solver.dpm_solver import DPMSolver
from . import _tree
from .base import AbstractAdjoint, Wanted, adaptive_grid_error, finish, grid_error

_TRAJECTORY_MODES = ("cached", "reconstruct")


class AdjointDEIS(AbstractAdjoint):
    """AdjointDEIS-k: exponential-integrator solvers of the continuous adjoint equations
    (Blasingame & Liu 2024), one vector-Jacobian product of the noise model per step.

    **Arguments:**

    - `order`: 1, 2 or 3. Order 1 is AdjointDEIS-1; 2 and 3 are the multistep forms
      (2M, 3M) that reuse the previous steps' vector-Jacobian products.
    - `steps`: number M of adjoint steps; ``None`` uses the sampling grid (M = N; under an
      adaptive controller, its accepted grid). Otherwise the adjoint grid is uniform in
      log-SNR between ``ts[-1]`` and ``ts[0]``.
    - `trajectory`: where the states come from. ``"cached"`` keeps the forward states
      (memory N x |x|, no activations; with M != N they are re-solved on the adjoint grid
      with the same sampler in the backward pass). ``"reconstruct"`` re-solves the
      probability-flow ODE backwards from x_0 alongside the adjoint with the multistep
      DPM-Solver of the same order, reusing the same model evaluation: memory independent
      of N; ODE samplers only.
    - `warmup`: ``"auto"`` (default), ``"corrected"`` or ``"lower_order"``: how the first
      adjoint steps from ``t_min`` start the multistep recursion. The first step is first
      order; ``"corrected"`` (the default for order 3) lets the second step correct it with
      the second vector-Jacobian product (no extra model evaluation), so AdjointDEIS-3 is
      third order on non-Gaussian models (docs/math/adjoint.md). The reconstruction solver
      uses the same warm-up.

    With an SDE sampler the adjoint of the diffusion SDE is solved along the sampled path
    (its integral terms are twice those of the probability-flow ODE).

    **Example:**

    ```python
    >>> import jax, jax.numpy as jnp
    >>> import jadeis
    >>> sch = jadeis.VPLinear()
    >>> eps_fn = lambda p, x, t, z: p * x
    >>> loss = lambda p: jadeis.sample(eps_fn, p, jnp.ones((1, 2)), None, schedule=sch,
    ...     ts=jadeis.time_grid(sch, 5), adjoint=jadeis.AdjointDEIS(order=2)).sum()
    >>> jax.grad(loss)(0.5).shape
    ()

    ```
    """

    order: int = eqx.field(default=2, converter=as_int)
    steps: int | None = eqx.field(default=None, converter=as_int)
    trajectory: str = "cached"
    warmup: str = "auto"

    def __check_init__(self):
        check_int("AdjointDEIS", "order", self.order, 1, 3)
        resolve_warmup("AdjointDEIS", self.warmup, self.order)
        if self.steps is not None:
            check_int("AdjointDEIS", "steps", self.steps, 1)
        check_choice("AdjointDEIS", "trajectory", self.trajectory, _TRAJECTORY_MODES)

    def num_steps(self, n: int) -> int:
        return n if self.steps is None else int(self.steps)

    def check(self, problem: Problem, num_steps: int):
        solver = problem.solver
        if solver.stochastic:
            if self.trajectory == "reconstruct":
                raise ValueError(
                    f"AdjointDEIS(trajectory='reconstruct') cannot be used with the SDE sampler "
                    f"{type(solver).__name__}: the sampled path cannot be re-solved backwards. "
                    f"Use trajectory='cached' or DiscreteAdjoint()."
                )
            if self.steps is not None and int(self.steps) != num_steps:
                raise ValueError(
                    f"AdjointDEIS(steps={self.steps}) with the SDE sampler "
                    f"{type(solver).__name__}: the SDE adjoint runs along the sampled path, "
                    f"so steps must be None (or {num_steps}, the sampling grid)."
                )
        if (
            problem.save_trajectory
            and self.steps is not None
            and (is_adaptive(problem) or int(self.steps) != num_steps)
        ):
            raise ValueError(
                f"AdjointDEIS(steps={self.steps}) with a trajectory (sample_trajectory, "
                f"return_trajectory=True or save_trajectory=True): gradients of intermediate "
                f"states need the adjoint on the sampling grid; use steps=None."
            )

    def cost(self, problem, stats):
        m = stats.num_steps if self.steps is None else self.steps
        evals = 0 * stats.num_steps
        if self.trajectory == "cached" and self.steps is not None:
            evals = evals + self.steps * problem.solver.evals_per_step  # the re-solve
        return evals, m + 0 * stats.num_steps

    def fwd(self, problem, args, perturbed):
        want = Wanted.of(perturbed)
        if want.grid:
            if is_adaptive(problem):
                raise adaptive_grid_error(problem)
            raise grid_error(
                "AdjointDEIS",
                "Its closed-form steps solve the continuous adjoint for fixed times. Use "
                "adjoint=jadeis.DiscreteAdjoint() (exact) or jadeis.Backprop(), or stop the "
                "gradient with jax.lax.stop_gradient(ts).",
            )
        if want.noise and problem.noise_mode == "array":
            _check_noise_gradient(problem)
            if problem.first_step:
                raise ValueError(
                    "AdjointDEIS under Truncated gives no gradient with respect to the noise= "
                    "array; use Truncated(k, jadeis.DiscreteAdjoint())."
                )
        cached = self.trajectory == "cached"
        # the residual is the loop's buffer of the states before x_0 (no appended copy)
        save = "x" if (cached or problem.save_trajectory) else None
        res = integrate(problem, args, save=save)
        residuals = (args, res.saved if cached else None, res.x_0, res.grid, want)
        return finish(self, problem, res, res.saved), residuals

    def residuals_from(self, problem, args, trajectory, x_0):
        n = args.ts.shape[0] - 1
        grid = Grid(args.ts, n, None)
        want = Wanted.everything()
        if trajectory is not None:
            args = args._replace(x_T=jax.tree.map(lambda v: v[0], trajectory))
            states = jax.tree.map(lambda v: v[:-1], trajectory)
            return args, states, jax.tree.map(lambda v: v[-1], trajectory), grid, want
        if problem.solver.stochastic:
            raise ValueError(
                "solve_adjoint: the SDE adjoint runs along the sampled path: pass "
                "trajectory=, not x_0= (the path cannot be reconstructed)."
            )
        return args, None, x_0, grid, want

    def bwd(self, problem, residuals, x0_bar, traj_bar):
        args, states, x_0, grid, want = residuals
        need_path = problem.noise_mode == "array" and want.noise
        xT_bar, pbar, zbar, ax_path = deis_backward(
            problem, self, args, grid, states, x_0, x0_bar, traj_bar, want, need_path
        )
        noise_bar = None
        if need_path:
            # xi_i enters x_{i+1} with coefficient c_i: dL/dxi_i = c_i a_x(t_{i+1})
            c = problem.solver.coefficients(args.schedule, args.ts).c.astype(state_dtype(x0_bar))

            def leaf_bar(path, noise):
                bar = (c[:, None] * path[::-1].reshape(c.shape[0], -1)).reshape(noise.shape)
                return bar.astype(noise.dtype)

            noise_bar = jax.tree.map(leaf_bar, ax_path, args.noise)
        return Args(
            pbar if want.params else None,
            xT_bar if want.x_T else None,
            zbar if want.z else None,
            None,
            None,
            noise_bar,
        )


def _check_noise_gradient(problem: Problem):
    if not isinstance(problem.solver, AbstractLinearMultistepSolver):
        raise ValueError(
            f"AdjointDEIS gives gradients with respect to the noise= array for the linear "
            f"multistep SDE samplers only (their step adds c_i xi_i to the sample); "
            f"{type(problem.solver).__name__} draws its noise differently. Use "
            f"adjoint=jadeis.DiscreteAdjoint() (or ReversibleAdjoint() for a reversible "
            f"solver)."
        )


# --------------------------------------------------------------------------------------
# the backward solve


class _Rows(NamedTuple):
    """Per adjoint step j (from the adjoint grid point j to j + 1, ascending in time)."""

    s: Any  # the model's time at point j
    w: Any  # (k,) multistep weights
    decay: Any  # alpha_s / alpha_t: the a_x decay
    cx: Any  # sigma_t / alpha_t^2: scale of the x-integral
    fxs: Any  # kappa alpha_s^2: F_x = kappa alpha_s^2 a^T eps_x
    cj: Any  # (k,) weights of this step's z/params VJP at steps j, j + 1, ...
    cidx: Any  # (k,) ... and the sampling intervals they belong to (per-step z)
    recon: Any  # the reconstruction solver's inputs on the ascending grid
    idx: Any  # the sampling interval holding point j (per-step z)
    alpha: Any  # alpha and sigma at point j (the noise a thresholded x_0 implies)
    sigma: Any


def _adjoint_grid(args: Args, grid: Grid, m: int | None, dtype):
    """The ascending adjoint grid ``u`` (length K + 1) and its number of steps."""
    schedule, ts = args.schedule, args.ts
    if m is None:
        if grid.fixed:
            return grid.ts[::-1], grid.count
        # an adaptive run: its accepted times, reversed; beyond them, zero-length steps
        k = grid.ts.shape[0] - 1
        j = jnp.arange(k + 1, dtype=jnp.int32)
        src = jnp.where(j <= grid.count, grid.count - j, 0)
        return grid.ts[src], grid.count
    u = time_grid(schedule, m, "logsnr", t_start=ts[0], t_end=ts[-1], dtype=ts.dtype)[::-1]
    return u, m


def deis_backward(
    problem: Problem,
    adjoint: AdjointDEIS,
    args: Args,
    grid: Grid,
    states,
    x_0,
    x0_bar,
    traj_bar,
    want: Wanted,
    need_ax_path: bool = False,
):
    """Solve the continuous adjoint equations from ts[-1] back to ts[0].

    ``states`` (the states at the start of every step of the run) for cached mode, or None
    to reconstruct from ``x_0``. In cached mode with M != N the forward states are re-solved
    on the adjoint grid with the problem's solver. In reconstruct mode the states come from
    the multistep DPM-Solver's own step on the ascending adjoint grid, fed with the noise
    prediction of the adjoint's VJP (one model evaluation per step). Returns
    ``(x_T, params, z, a_x at the sampling grid points or None)``.
    """
    eps_fn = problem.eps_fn
    model_params = problem.params
    sde = problem.solver.stochastic
    per_step = problem.per_step_z
    params, x_T, z, schedule, ts, _ = args
    k = adjoint.order
    dtype = state_dtype(x0_bar)
    tm = jax.tree.map
    reconstruct = states is None
    on_x0, tb = split_trajectory_bar(traj_bar, grid)
    u, m = _adjoint_grid(args, grid, adjoint.steps, dtype)
    # The cached states (at the descending times u[::-1]) are read inside the loop by index:
    # a reversed or concatenated copy would hold a second M x |x| buffer.
    cached_x = x_final = None
    if not reconstruct:
        if adjoint.steps is None:
            cached_x, x_final = states, x_0
        else:
            fixed = problem._replace(controller=FixedGrid())
            res = integrate(fixed, args._replace(ts=u[::-1]), save="x")
            cached_x, x_final = res.saved, res.x_0
    n_rows = u.shape[0] - 1
    lam = schedule.log_snr(u)
    lam_s, lam_t, lam_1, lam_2 = lambda_history(lam)
    index = np.arange(n_rows)
    orders = step_orders(k, index, n_rows, lower_order_final=False)
    w = multistep_weights(lam_t, lam_s, lam_1, lam_2, -1.0, orders)
    corrected = resolve_warmup("AdjointDEIS", adjoint.warmup, k)
    if corrected:
        # the second step corrects the first-order first step (docs/math/adjoint.md); the
        # a_x update and the z/params quadratures share these weights
        w = add_warmup_correction(w, index, orders, lam_t, lam_s, lam_1, -1.0)
    alpha = schedule.alpha(u)
    sigma = schedule.sigma(u)
    a_s, a_t, s_t = alpha[:-1], alpha[1:], sigma[1:]
    kappa = 2.0 if sde else 1.0
    # interval of the sampling grid holding each adjoint point (for per-step z)
    n_sample = ts.shape[0] - 1
    idx = jnp.clip(jnp.sum(ts[None, 1:] > u[:-1, None], axis=1), 0, n_sample - 1)
    # The z/params integrals are linear in the per-step VJPs F_j = kappa alpha_j a^T eps_p:
    # step j adds (sigma_t/alpha_t) sum_q w[j, q] F_{j-q}, so F_i enters with the scalar
    # coef[i, q] = kappa alpha_i (sigma_t/alpha_t)_{i+q} w[i+q, q] at step i + q. Applying
    # these scalars as soon as F_i is computed gives the same sums without keeping k - 1
    # params-sized VJPs in the loop carry (memory and work independent of the order).
    cz_all = s_t / a_t
    coef = (
        jnp.stack(
            # (a grid of fewer than k steps: the missing terms are zero; pad to its length)
            [
                jnp.concatenate([cz_all[q:] * w[q:, q], jnp.zeros((min(q, n_rows),), w.dtype)])
                for q in range(k)
            ],
            axis=1,
        )
        * (kappa * a_s)[:, None]
    )
    if not isinstance(m, int):
        # an adaptive run: the rows beyond the accepted steps (zero-length, never run) are
        # not part of any sum
        rows_q = jnp.arange(n_rows, dtype=jnp.int32)[:, None] + jnp.arange(k, dtype=jnp.int32)
        coef = jnp.where(rows_q < m, coef, 0.0 * coef)
    coef_idx = jnp.stack(
        [
            jnp.concatenate([idx[q:], jnp.full((min(q, n_rows),), idx[-1], idx.dtype)])
            for q in range(k)
        ],
        axis=1,
    )
    recon_solver = DPMSolver(
        order=k, lower_order_final=False, warmup="corrected" if corrected else "lower_order"
    )
    recon_rows = recon_solver.inputs(schedule, u, dtype) if reconstruct else None
    rows = _Rows(
        s=cast(u[:-1], model_time_dtype(dtype)),
        w=cast(w[:, :k], dtype),
        decay=cast(a_s / a_t, dtype),
        cx=cast(s_t / a_t**2, dtype),
        fxs=cast(kappa * a_s**2, dtype),
        cj=cast(coef, dtype),
        cidx=coef_idx,
        recon=recon_rows,
        idx=idx,
        alpha=cast(a_s, dtype),
        sigma=cast(sigma[:-1], dtype),
    )

    def body(carry, j, r):
        ax, state, fx_hist, pbar, zbar = carry
        b = m - j  # adjoint step j starts from the state at sampling point m - j
        if reconstruct:
            x_here = state[0]
        else:
            x_here = tm(
                lambda c, f: jnp.where(
                    b == m, f, lax.dynamic_index_in_dim(c, jnp.minimum(b, m - 1), keepdims=False)
                ),
                cached_x,
                x_final,
            )
        if tb is not None:
            ax = tm(
                lambda a, t, e: (
                    a
                    + jnp.where(
                        b == m,
                        e,
                        lax.dynamic_index_in_dim(t, jnp.minimum(b, m - 1), keepdims=False),
                    )
                ),
                ax,
                tb,
                on_x0,
            )
        z_j = z_at(z, r.idx, per_step)
        primals = [x_here] + ([params] if want.params else []) + ([z_j] if want.z else [])

        def eps_of(xx, *diff):
            p = diff[0] if want.params else params
            zz = diff[-1] if want.z else z_j
            out = eps_fn(model_params(p), xx, r.s, zz)
            # the model's output in the state's dtype (mixed precision)
            out = tm(lambda e, v: e.astype(v.dtype), out, xx)
            # with a thresholded data prediction, the noise it implies: the ODE's model
            return problem.solver.effective_noise(xx, out, r.alpha, r.sigma)

        eps, vjp = jax.vjp(eps_of, *primals)
        bars = vjp(ax)
        gx = bars[0]
        gp = bars[1] if want.params else None
        gz = bars[-1] if want.z else None
        fx = tm(lambda g: r.fxs * g, gx)
        ws = [r.w[q] for q in range(k)]
        new_ax = tm(lambda a, c: r.decay * a + r.cx * c, ax, _tree.combine(ws, (fx,) + fx_hist))
        total = jnp.sum(r.cj)
        if want.params:
            pbar = _tree.add(pbar, _tree.scale(total, gp))
        if want.z:
            if per_step:
                for q in range(k):
                    zbar = jax.tree.map(
                        lambda acc, g, q=q: (
                            acc
                            if _tree.is_float0(acc)
                            else acc.at[r.cidx[q]].add(r.cj[q].astype(g.dtype) * g)
                        ),
                        zbar,
                        gz,
                    )
            else:
                zbar = _tree.add(zbar, _tree.scale(total, gz))
        if reconstruct:
            state, _ = recon_solver.step(lambda x, t: eps, r.recon, state, None)
        carry = (new_ax, state, ((fx,) + fx_hist)[: k - 1], pbar, zbar)
        return carry, (ax if need_ax_path else None)

    state0 = recon_solver.init(x_0) if reconstruct else None
    ax0 = x0_bar
    zeros_x = tm(jnp.zeros_like, x0_bar)
    fx_hist0 = tuple(zeros_x for _ in range(k - 1))
    zbar0 = (_tree.zeros_like(z.values if per_step else z)) if want.z else None
    pbar0 = _tree.zeros_like(params) if want.params else None
    carry0 = (ax0, state0, fx_hist0, pbar0, zbar0)
    (ax, _, _, pbar, zbar), ax_path = loop_rows(body, carry0, rows, m)
    if tb is not None:
        ax = tm(lambda a, t: a + t[0], ax, tb)
    if per_step and want.z:
        zbar = type(z)(zbar)
    return ax, pbar, zbar, ax_path
