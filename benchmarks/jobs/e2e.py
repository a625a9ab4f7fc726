"""Job ``e2e``: guidance end to end, Adam (optax) over x_T to a loss threshold, with each
method tagged "e2e" ("e2e-quick" with --quick) at its cheapest configuration of the sweep
that reaches gradient error 1e-2. Writes ``e2e.csv``."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

import common as C
import jadeis
import methods as M
import problems as P

log = C.log


def e2e(problem, sweep_rows, *, quick, selector=None):
    import optax  # noqa: PLC0415

    # the cheapest configuration of each method reaching a gradient error <= 1e-2
    chosen = {}
    for r in sweep_rows:
        if r["err_grad"] <= 1e-2:
            if r["method"] not in chosen or r["t_grad_s"] < chosen[r["method"]]["t_grad_s"]:
                chosen[r["method"]] = r
    wanted = M.select(M.all_methods(), "e2e-quick" if quick else "e2e")
    if selector is not None:
        wanted = [m for m in wanted if M.matches(m, selector)]
    # a reachable target: the exact x_0 of another x_T
    x_T0 = problem.x_T
    x_T_goal = jax.random.normal(jax.random.key(123), x_T0.shape, x_T0.dtype)
    ref_m = M.jadeis_method("ref", jadeis.DPMSolverPP(order=3), jadeis.DiscreteAdjoint(), None)
    ref_fwd = jax.jit(ref_m.make(problem)[0])
    ts_ref = jadeis.time_grid(problem.schedule, 1000, dtype=jnp.float64)
    target = ref_fwd(x_T_goal, problem.z, problem.params, ts_ref)
    true_loss = lambda xT: float(
        0.5 * jnp.sum((ref_fwd(xT, problem.z, problem.params, ts_ref) - target) ** 2)
    )
    loss0 = true_loss(x_T0)
    threshold = 0.05 * loss0
    max_iters = 100 if quick else 200
    max_seconds = 15.0 if quick else 30.0
    rows = []
    for method in wanted:
        name = method.name
        if name not in chosen:
            log(f"    {name}: no configuration reached gradient error 1e-2; skipped")
            continue
        r = chosen[name]
        p2 = P.Problem(**{**problem.__dict__, "loss_fn": P.guidance_loss(target)})
        _, grad = method.make(p2)
        extra = (
            jadeis.time_grid(problem.schedule, int(r["setting"]), method.spacing, dtype=jnp.float64)
            if method.variable == "N"
            else jnp.asarray(r["setting"], jnp.float64)
        )
        opt = optax.adam(0.05)

        def step(x_T, state, extra=extra, grad=grad, opt=opt):
            x0, gx, _, _, _ = grad(x_T, problem.z, problem.params, extra)
            loss = 0.5 * jnp.sum((x0 - target) ** 2)
            upd, state = opt.update(gx, state, x_T)
            return optax.apply_updates(x_T, upd), state, loss

        t0 = time.perf_counter()
        step_c = jax.jit(step).lower(x_T0, opt.init(x_T0)).compile()
        compile_s = time.perf_counter() - t0
        x_T, state = x_T0, opt.init(x_T0)
        t0 = time.perf_counter()
        reached = None
        iters = 0
        for _ in range(max_iters):
            x_T, state, loss = step_c(x_T, state)
            iters += 1
            if float(loss) <= threshold:
                reached = time.perf_counter() - t0
                break
            if time.perf_counter() - t0 > max_seconds:
                break
        total = time.perf_counter() - t0
        tl = true_loss(x_T)
        rows.append(
            {
                "method": name,
                "setting": r["setting"],
                "variable": method.variable,
                "grad_err_of_config": r["err_grad"],
                "iterations": iters,
                "time_to_threshold_s": reached if reached is not None else float("nan"),
                "total_s": total,
                "compile_s": compile_s,
                "own_final_loss": float(loss),
                "true_final_loss": tl,
                "loss0": loss0,
                "threshold": threshold,
            }
        )
        log(
            f"    {name:42s} {method.variable}={r['setting']:<8g} iters {iters:4d} "
            f"time {'not reached' if reached is None else f'{reached:.2f}s':>12s}  "
            f"true loss {tl:.3g} (start {loss0:.3g}, threshold {threshold:.3g})"
        )
    return rows
