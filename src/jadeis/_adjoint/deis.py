"""AdjointDEIS: exponential-integrator solvers of the continuous adjoint equations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .._conditioning import z_at
from .._core import Args, Problem, forward, state_dtype, with_final
from .._grid import time_grid
from .._phi import add_warmup_correction, multistep_weights
from .._solver.base import (
    check_int,
    corrects_warmup,
    effective_orders,
    lambda_history,
    model_time_dtype,
    resolve_warmup,
)
from .._solver.dpm_solver import DPMSolver
from . import _tree
from .base import AbstractAdjoint, any_perturbed, grid_error

_TRAJECTORY_MODES = ("cached", "reconstruct")


def _cast(v, dtype):
    return jnp.asarray(v).astype(dtype)


class AdjointDEIS(AbstractAdjoint):
    """AdjointDEIS-k: exponential-integrator solvers of the continuous adjoint equations
    (Blasingame & Liu 2024), one vector-Jacobian product of the noise model per step.

    **Arguments:**

    - `order`: 1, 2 or 3. Order 1 is AdjointDEIS-1; 2 and 3 are the multistep forms
      (2M, 3M) that reuse the previous steps' vector-Jacobian products.
    - `steps`: number M of adjoint steps; ``None`` uses the sampling grid (M = N).
      Otherwise the adjoint grid is uniform in log-SNR between ``ts[-1]`` and ``ts[0]``.
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

    order: int = 2
    steps: int | None = None
    trajectory: str = "cached"
    warmup: str = "auto"

    def __check_init__(self):
        check_int("AdjointDEIS", "order", self.order, 1, 3)
        resolve_warmup("AdjointDEIS", self.warmup, self.order)
        if self.steps is not None:
            check_int("AdjointDEIS", "steps", self.steps, 1)
        if self.trajectory not in _TRAJECTORY_MODES:
            raise ValueError(
                f"AdjointDEIS: trajectory must be 'cached' or 'reconstruct', got "
                f"trajectory={self.trajectory!r}."
            )

    def num_steps(self, n: int) -> int:
        return n if self.steps is None else int(self.steps)

    def check(self, problem: Problem, num_steps: int):
        solver = problem.solver
        return_trajectory = problem.return_trajectory
        if solver.stochastic:
            if self.trajectory == "reconstruct":
                raise ValueError(
                    f"AdjointDEIS(trajectory='reconstruct') cannot be used with the SDE sampler "
                    f"{type(solver).__name__}: the sampled path cannot be re-solved backwards. "
                    f"Use trajectory='cached' or DiscreteAdjoint()."
                )
            if self.num_steps(num_steps) != num_steps:
                raise ValueError(
                    f"AdjointDEIS(steps={self.steps}) with the SDE sampler "
                    f"{type(solver).__name__}: the SDE adjoint runs along the sampled path, "
                    f"so steps must be None (or {num_steps}, the sampling grid)."
                )
        if return_trajectory and self.num_steps(num_steps) != num_steps:
            raise ValueError(
                f"AdjointDEIS(steps={self.steps}) with return_trajectory=True: gradients of "
                f"intermediate states need the adjoint on the sampling grid; use steps=None."
            )

    def fwd(self, problem, args, perturbed):
        if any_perturbed((perturbed.schedule, perturbed.ts)):
            raise grid_error(
                "AdjointDEIS",
                "Its closed-form steps solve the continuous adjoint for fixed times. Use "
                "adjoint=jadeis.DiscreteAdjoint() (exact) or jadeis.Backprop(), or stop the "
                "gradient with jax.lax.stop_gradient(ts).",
            )
        cached = self.trajectory == "cached"
        # the residual is the scan's buffer of the N states before x_0 (no appended copy)
        save = "x" if (cached or problem.return_trajectory) else None
        x_0, head, _ = forward(problem, args, save=save)
        traj = with_final(head, x_0) if problem.return_trajectory else None
        return (x_0, traj), (args, head if cached else None, x_0)

    def residuals_from(self, problem, args, trajectory, x_0):
        if trajectory is not None:
            return args._replace(x_T=jax.tree.map(lambda v: v[0], trajectory)), trajectory, None
        if problem.solver.stochastic:
            raise ValueError(
                "solve_adjoint: the SDE adjoint runs along the sampled path: pass "
                "trajectory=, not x_0= (the path cannot be reconstructed)."
            )
        return args, None, x_0

    def bwd(self, problem, residuals, x0_bar, traj_bar):
        args, states, x_0 = residuals
        need_path = problem.noise_mode == "array"
        xT_bar, pbar, zbar, ax_path = deis_backward(
            problem, self, args, states, x_0, x0_bar, traj_bar, need_ax_path=need_path
        )
        noise_bar = None
        if need_path:
            # xi_i enters x_{i+1} with coefficient c_i: dL/dxi_i = c_i a_x(t_{i+1})
            c = problem.solver.coefficients(args.schedule, args.ts).c.astype(state_dtype(x0_bar))

            def leaf_bar(path, noise):
                bar = (c[:, None] * path[::-1].reshape(c.shape[0], -1)).reshape(noise.shape)
                return bar.astype(noise.dtype)

            noise_bar = jax.tree.map(leaf_bar, ax_path, args.noise)
        return Args(pbar, xT_bar, zbar, None, None, noise_bar)


# --------------------------------------------------------------------------------------
# AdjointDEIS


def deis_backward(
    problem: Problem,
    adjoint: AdjointDEIS,
    args: Args,
    states,
    x_0,
    x0_bar,
    traj_bar,
    need_ax_path: bool = False,
):
    """Solve the continuous adjoint equations from ts[-1] back to ts[0].

    ``states`` (the states at ``ts``: at least the first N; the final one is ``x_0`` when
    given, else ``states[N]``) for cached mode, or None to reconstruct from ``x_0``.
    In cached mode with M != N the forward states are re-solved on the adjoint grid with
    the problem's solver. In reconstruct mode the states come from the multistep
    DPM-Solver's own step on the ascending adjoint grid, fed with the noise prediction
    of the adjoint's VJP (one model evaluation per step). Returns
    ``(x_T, params, z, a_x at the sampling grid points or None)``.
    """
    eps_fn = problem.eps_fn
    sde = problem.solver.stochastic
    per_step = problem.per_step_z
    params, x_T, z, schedule, ts, _ = args
    n = ts.shape[0] - 1
    m = adjoint.num_steps(n)
    k = adjoint.order
    dtype = state_dtype(x0_bar)
    tm = jax.tree.map
    reconstruct = states is None
    if m == n:
        u = ts[::-1]
    else:
        u = time_grid(schedule, m, "logsnr", t_start=ts[0], t_end=ts[-1], dtype=ts.dtype)[::-1]
    # The cached states (at the descending times u[::-1]) are read inside the scan by index:
    # a reversed or concatenated copy would hold a second M x |x| buffer.
    cached_x = x_final = None
    if not reconstruct:
        if m == n:
            cached_x = states
            x_final = x_0 if x_0 is not None else tm(lambda v: v[n], states)
        else:
            x_final, cached_x, _ = forward(problem, args._replace(ts=u[::-1]), save="x")
    back = jnp.arange(m, 0, -1)  # adjoint step j starts from the state/grid point m - j
    lam = schedule.log_snr(u)
    lam_s, lam_t, lam_1, lam_2 = lambda_history(lam)
    orders_np = effective_orders(k, m, lower_order_final=False)
    w = multistep_weights(lam_t, lam_s, lam_1, lam_2, -1.0, orders_np)
    corrected = resolve_warmup("AdjointDEIS", adjoint.warmup, k)
    if corrects_warmup(corrected, orders_np):
        # the second step corrects the first-order first step (docs/math/adjoint.md); the
        # a_x update and the z/params quadratures share these weights
        w = add_warmup_correction(w, lam, -1.0)
    alpha = schedule.alpha(u)
    sigma = schedule.sigma(u)
    a_s, a_t, s_t = alpha[:-1], alpha[1:], sigma[1:]
    kappa = 2.0 if sde else 1.0
    # interval of the sampling grid holding each adjoint point (for per-step z)
    idx = jnp.clip(jnp.sum(ts[None, 1:] > u[:-1, None], axis=1), 0, n - 1)
    # The z/params integrals are linear in the per-step VJPs F_j = kappa alpha_j a^T eps_p:
    # step j adds (sigma_t/alpha_t) sum_q w[j, q] F_{j-q}, so F_i enters with the scalar
    # coef[i, q] = kappa alpha_i (sigma_t/alpha_t)_{i+q} w[i+q, q] at step i + q. Applying
    # these scalars as soon as F_i is computed gives the same sums without keeping k - 1
    # params-sized VJPs in the scan carry (memory and work independent of the order).
    cz_all = s_t / a_t
    coef = (
        jnp.stack(
            # (a grid of m < k steps: the missing terms are zero; pad to length m)
            [
                jnp.concatenate([cz_all[q:] * w[q:, q], jnp.zeros((min(q, m),), w.dtype)])
                for q in range(k)
            ],
            axis=1,
        )
        * (kappa * a_s)[:, None]
    )
    coef_idx = jnp.stack(
        [jnp.concatenate([idx[q:], jnp.full((min(q, m),), idx[-1], idx.dtype)]) for q in range(k)],
        axis=1,
    )
    recon_solver = DPMSolver(
        order=k, lower_order_final=False, warmup="corrected" if corrected else "lower_order"
    )
    recon_inputs = recon_solver.inputs(schedule, u, dtype) if reconstruct else None
    inputs = (
        u[:-1].astype(model_time_dtype(dtype)),
        _cast(w, dtype),
        _cast(a_s / a_t, dtype),  # a_x decay
        _cast(s_t / a_t**2, dtype),  # scale of the x-integral
        _cast(kappa * a_s**2, dtype),  # F_x = kappa alpha_s^2 a^T eps_x
        _cast(coef, dtype),  # weights of this step's z/params VJP at steps j, j+1, ...
        coef_idx,  # ... which belong to these sampling intervals (per-step z)
        recon_inputs,  # reconstruction: the DPM-Solver step on the ascending grid u
        idx,
        back,
    )

    def body(carry, inp):
        ax, state, fx_hist, pbar, zbar = carry
        s, wj, decay, cx, fxs, cj, cidx, rinp, i, b = inp
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
        if traj_bar is not None:
            ax = tm(lambda a, tb: a + lax.dynamic_index_in_dim(tb, b, keepdims=False), ax, traj_bar)
        z_j = z_at(z, i, per_step)
        eps, vjp = jax.vjp(  # the model's output in the state's dtype (mixed precision)
            lambda xx, p, zz: tm(lambda e, v: e.astype(v.dtype), eps_fn(p, xx, s, zz), xx),
            x_here,
            params,
            z_j,
        )
        gx, gp, gz = vjp(ax)
        fx = tm(lambda g: fxs * g, gx)
        ws = [wj[q] for q in range(k)]
        new_ax = tm(lambda a, c: decay * a + cx * c, ax, _tree.combine(ws, (fx,) + fx_hist))
        total = jnp.sum(cj)
        pbar = _tree.add(pbar, _tree.scale(total, gp))
        if per_step:
            for q in range(k):
                zbar = jax.tree.map(
                    lambda acc, g, q=q: acc if _tree.is_float0(acc)
                    else acc.at[cidx[q]].add(cj[q].astype(g.dtype) * g),
                    zbar,
                    gz,
                )
        else:
            zbar = _tree.add(zbar, _tree.scale(total, gz))
        if reconstruct:
            state = recon_solver.step(lambda x, t: eps, rinp, state, None)
        carry = (new_ax, state, ((fx,) + fx_hist)[: k - 1], pbar, zbar)
        return carry, (ax if need_ax_path else None)

    state0 = recon_solver.init(x_0) if reconstruct else None
    zeros_x = tm(jnp.zeros_like, x0_bar)
    fx_hist0 = tuple(zeros_x for _ in range(k - 1))
    zbar0 = _tree.zeros_like(z.values if per_step else z)
    pbar0 = _tree.zeros_like(params)
    carry0 = (x0_bar, state0, fx_hist0, pbar0, zbar0)
    (ax, _, _, pbar, zbar), ax_path = lax.scan(body, carry0, inputs)
    if traj_bar is not None:
        ax = tm(lambda a, tb: a + tb[0], ax, traj_bar)
    if per_step:
        zbar = type(z)(zbar)
    return ax, pbar, zbar, ax_path
