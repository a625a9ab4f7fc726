"""Run the jadeis benchmark suite: ``python benchmarks/run.py`` (full, <= ~15 min on 2 cores)
or ``python benchmarks/run.py --quick`` (a few minutes).

Writes to ``benchmarks/results/`` (``--quick``: ``benchmarks/results/quick/``): CSV files, a
Markdown summary (``summary.md``), PNG plots and ``machine.json`` (machine and versions).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import jadeis  # noqa: E402
import methods as M  # noqa: E402
import problems as P  # noqa: E402

TARGET_EPS = (1e-2, 1e-3)
FWD_NS = (64, 256)  # forward sampling is timed at these N (and at every tolerance)
XT_ONLY_AT = (64, 1e-5)  # settings at which the dL/dx_T-only gradient is timed too
STOP_ERR = 2e-4
REDUNDANT = (
    "DiscreteAdjoint DPM++(2M)",
    "Backprop DPM(2M)",
    "diffrax Euler (t)",
)  # a method's sweep stops once its gradient error is below this


def log(*a):
    print(*a, flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------------------
# Timing


def time_call(fn, args, reps: int, min_batch_s: float = 0.08, with_min: bool = False):
    """Median seconds per call, after a warm-up call; fast calls are batched (each repeat
    runs >= ``min_batch_s``). With ``with_min``, also the fastest repeat."""
    out = fn(*args)
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    est = time.perf_counter() - t0
    inner = max(1, min(100, int(min_batch_s / max(est, 1e-6))))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / inner)
    if with_min:
        return statistics.median(samples), min(samples)
    return statistics.median(samples)


def compile_fn(fn, args):
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - t0
    try:
        temp = int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - backend without memory analysis
        temp = -1
    return compiled, seconds, temp


# ----------------------------------------------------------------------------------------
# Sweeps


def settings_for(method, quick: bool):
    if method.variable == "tol":
        return [1e-3, 1e-5] if quick else [1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7]
    if quick:
        return [16, 64, 256]
    return [16, 32, 64, 128, 256, 512]


GAUSSIAN_METHODS = (
    "AdjointDEIS-2 cached",
    "AdjointDEIS-2 reconstruct",
    "DiscreteAdjoint DPM++(3M)",
    "diffrax Tsit5 RecursiveCheckpoint (rho)",
    "scan DPM++(2M) + checkpoint",
)


def quick_methods(ms):
    keep = {
        "AdjointDEIS-2 reconstruct",
        "AdjointDEIS-3 cached",
        "DiscreteAdjoint DPM++(3M)",
        "Backprop DPM++(3M)",
        "diffrax Tsit5 Backsolve (t)",
        "diffrax Tsit5 RecursiveCheckpoint (t)",
        "diffrax Heun (rho)",
        "scan DPM++(2M) + checkpoint",
    }
    return [m for m in ms if m.name in keep]


def count_diffrax(problem, method, extra):
    counter = M.Counter()
    _, grad = method.make(problem, M.counting_eps_fn(problem.eps_fn, counter))
    out = jax.jit(grad)(problem.x_T, problem.z, problem.params, extra)
    jax.block_until_ready(out)
    jax.effects_barrier()
    return counter.evals, counter.vjps


def sweep_problem(problem, ms, *, quick, reps, time_budget_s):
    rows = []
    fwd_cache = {}
    per_step_counts = {}
    ref = problem.reference
    args0 = (problem.x_T, problem.z, problem.params)
    for method in ms:
        fwd, grad = method.make(problem)
        run_time = 0.0  # seconds spent running (compilation excluded) for the budget
        compiled_grad = None
        compiled_fwd = None
        compiled_gx = None
        for setting in settings_for(method, quick):
            if method.variable == "N":
                extra = jadeis.time_grid(
                    problem.schedule, setting, method.spacing, dtype=jnp.float64
                )
            else:
                extra = jnp.asarray(setting, jnp.float64)
            args = args0 + (extra,)
            if method.variable == "N" or compiled_grad is None:
                compiled_grad, c_grad, temp = compile_fn(grad, args)
            else:
                c_grad = 0.0  # one compilation serves every tolerance
            t_run = time.perf_counter()
            try:
                x0, gx, gz, gp, steps = compiled_grad(*args)
                jax.block_until_ready(x0)
            except Exception as e:  # noqa: BLE001 - e.g. diffrax max_steps reached
                log(f"    {method.name} {setting}: failed ({type(e).__name__}: {str(e)[:80]})")
                continue
            errs = {
                "err_x0": P.rel_err(x0, ref["x0"]),
                "err_xT": P.rel_err(gx, ref["x_T"]),
                "err_z": P.rel_err(gz, ref["z"]),
                "err_params": P.rel_err(gp, ref["params"]),
            }
            errs["err_grad"] = max(errs["err_xT"], errs["err_z"], errs["err_params"])
            t_grad, t_grad_min = time_call(compiled_grad, args, reps, with_min=True)
            run_time += time.perf_counter() - t_run
            # forward sampling time (shared by methods with the same sampler and setting)
            fkey = (method.forward_key, float(setting))
            if fkey not in fwd_cache and (method.variable == "tol" or setting in FWD_NS):
                if method.variable == "N" or compiled_fwd is None:
                    compiled_fwd, _, temp_fwd = compile_fn(fwd, args)
                fwd_cache[fkey] = (time_call(compiled_fwd, args, reps), temp_fwd)
            t_fwd, temp_fwd = fwd_cache.get(fkey, (float("nan"), -1))
            t_grad_xT = float("nan")
            if setting in XT_ONLY_AT:  # the guidance case: only dL/dx_T
                _, grad_x = method.make(problem, xT_only=True)
                if method.variable == "N" or compiled_gx is None:
                    compiled_gx = compile_fn(grad_x, args)[0]
                t_grad_xT = time_call(compiled_gx, args, reps)
            n_steps = int(steps)
            if method.counts is not None:
                evals, vjps = method.counts(n_steps)
                counted = "analytic"
            elif method.variable == "N":
                # fixed grid: counts are linear in N; instrument once per method and scale
                if method.name not in per_step_counts:
                    e, v = count_diffrax(problem, method, extra)
                    per_step_counts[method.name] = (e / n_steps, v / n_steps)
                e, v = per_step_counts[method.name]
                evals, vjps = round(e * n_steps), round(v * n_steps)
                counted = "instrumented (per step, scaled)"
            else:
                evals, vjps = count_diffrax(problem, method, extra)
                counted = "instrumented"
            row = {
                "problem": problem.name,
                "method": method.name,
                "family": method.family,
                "variable": method.variable,
                "setting": setting,
                "steps": n_steps,
                **errs,
                "t_grad_s": t_grad,
                "t_grad_min_s": t_grad_min,
                "t_fwd_s": t_fwd,
                "grad_over_fwd": t_grad / t_fwd,
                "t_grad_xT_s": t_grad_xT,
                "grad_xT_over_fwd": t_grad_xT / t_fwd,
                "compile_grad_s": c_grad,
                "evals": evals,
                "vjps": vjps,
                "counted": counted,
                "temp_bytes_grad": temp,
                "temp_bytes_fwd": temp_fwd,
                "peak_rss_mb": peak_rss_mb(),
            }
            rows.append(row)
            log(
                f"    {method.name:42s} {method.variable}={setting:<8g} steps={n_steps:<6d} "
                f"err x0 {errs['err_x0']:.1e} grad {errs['err_grad']:.1e}  "
                f"t_grad {t_grad * 1e3:8.2f} ms  fwd {t_fwd * 1e3:7.2f} ms  "
                f"compile {c_grad:5.1f}s  evals {evals} vjps {vjps}"
            )
            if errs["err_grad"] < STOP_ERR:
                break  # more accuracy than the targets ask for
            if method.variable == "N" and setting >= 256 and errs["err_grad"] > 3e-2:
                # even third order would not reach 1e-3 at twice the steps
                log(f"    {method.name}: error > 3e-2 at N={setting}; larger N not tried")
                break
            if run_time > time_budget_s:
                log(f"    {method.name}: run-time budget of {time_budget_s:.0f}s spent; stopping")
                break
    return rows


def compile_table(problem, ms):
    rows = []
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        for method in ms:
            fwd, grad = method.make(problem)
            if method.variable == "N":
                extra = jadeis.time_grid(problem.schedule, 64, dtype=jnp.float64)
            else:
                extra = jnp.asarray(1e-5, jnp.float64)
            args = (problem.x_T, problem.z, problem.params, extra)
            t0 = time.perf_counter()
            lowered = jax.jit(grad).lower(*args)
            t1 = time.perf_counter()
            lowered.compile()
            t2 = time.perf_counter()
            _, c_fwd, _ = compile_fn(fwd, args)
            setting = "N=64" if method.variable == "N" else "any tol (traced)"
            rows.append(
                {
                    "method": method.name,
                    "setting": setting,
                    "trace_lower_s": t1 - t0,
                    "xla_compile_s": t2 - t1,
                    "grad_total_s": t2 - t0,
                    "fwd_total_s": c_fwd,
                }
            )
            log(
                f"    {method.name:42s} grad {t2 - t0:5.2f}s (trace {t1 - t0:.2f}s)  "
                f"fwd {c_fwd:5.2f}s"
            )
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
    return rows


# ----------------------------------------------------------------------------------------
# Memory versus N


def memory_sweep(quick):
    problem = P.mlp_problem(batch=512, log=log)
    problem.reference = {}
    ns = [10, 100, 1000]
    names = [
        "AdjointDEIS-1 reconstruct",
        "AdjointDEIS-2 reconstruct",
        "AdjointDEIS-3 reconstruct",
        "AdjointDEIS-2 cached",
        "DiscreteAdjoint DPM++(3M)",
        "Backprop DPM++(3M)",
        "scan DPM++(2M)",
        "scan DPM++(2M) + checkpoint",
        "diffrax Heun (rho)",
    ]
    if quick:
        names = [
            "AdjointDEIS-2 reconstruct",
            "DiscreteAdjoint DPM++(3M)",
            "Backprop DPM++(3M)",
            "scan DPM++(2M) + checkpoint",
        ]
    by_name = {m.name: m for m in M.all_methods()}
    x_bytes = int(np.prod(problem.x_T.shape)) * 8
    rows = []
    fwd_temp = {}
    for name in names:
        method = by_name[name]
        fwd, grad = method.make(problem)
        for n in ns:
            ts = jadeis.time_grid(problem.schedule, n, dtype=jnp.float64)
            args = (problem.x_T, problem.z, problem.params, ts)
            _, c, temp = compile_fn(grad, args)
            if n not in fwd_temp:  # forward sampling memory (the same for every jadeis sampler)
                fwd_temp[n] = compile_fn(fwd, args)[2]
            rows.append(
                {
                    "method": name,
                    "N": n,
                    "temp_bytes_grad": temp,
                    "temp_bytes_fwd": fwd_temp[n],
                    "x_bytes": x_bytes,
                    "compile_s": c,
                }
            )
            log(
                f"    {name:36s} N={n:<5d} grad temp {temp / 2**20:9.2f} MiB  "
                f"fwd {fwd_temp[n] / 2**20:7.2f} MiB"
            )
    return rows, problem


# ----------------------------------------------------------------------------------------
# End to end: guidance with optax Adam over x_T


def e2e(problem, sweep_rows, *, quick):
    import optax  # noqa: PLC0415

    by_name = {m.name: m for m in M.all_methods()}
    # the cheapest configuration of each method reaching a gradient error <= 1e-2
    chosen = {}
    for r in sweep_rows:
        if r["err_grad"] <= 1e-2:
            if r["method"] not in chosen or r["t_grad_s"] < chosen[r["method"]]["t_grad_s"]:
                chosen[r["method"]] = r
    wanted = [
        "AdjointDEIS-3 cached",
        "DiscreteAdjoint DPM++(3M)",
        "DiscreteAdjoint DPM++(3M) karras grid",
        "Backprop DPM++(3M)",
        "diffrax Tsit5 Backsolve (t)",
        "diffrax Tsit5 RecursiveCheckpoint (t)",
        "scan DPM++(2M) + checkpoint",
    ]
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
    if quick:
        wanted = [
            "AdjointDEIS-2 reconstruct",
            "DiscreteAdjoint DPM++(3M)",
            "diffrax Tsit5 RecursiveCheckpoint (t)",
        ]
    rows = []
    for name in wanted:
        if name not in chosen:
            log(f"    {name}: no configuration reached gradient error 1e-2; skipped")
            continue
        r = chosen[name]
        method = by_name[name]
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


# ----------------------------------------------------------------------------------------
# Outputs


def write_csv(path, rows):
    if not rows:
        return
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def time_at(rs, eps):
    """Wall time at which one method's error-vs-time front first reaches ``eps``.

    Log-log interpolation between the last front point above ``eps`` and the first at or
    below it (the step counts and tolerances are a factor ~2-10 apart). Returns
    ``(seconds, first row reaching eps)`` or None."""
    pts = sorted(rs, key=lambda r: r["t_grad_s"])
    front, best = [], float("inf")
    for r in pts:
        if r["err_grad"] < best:
            front.append(r)
            best = r["err_grad"]
    for i, r in enumerate(front):
        if r["err_grad"] <= eps:
            if i == 0:
                return r["t_grad_s"], r
            q = front[i - 1]
            le, l0, l1 = math.log(eps), math.log(q["err_grad"]), math.log(r["err_grad"])
            w = (le - l0) / (l1 - l0)
            t = math.exp((1 - w) * math.log(q["t_grad_s"]) + w * math.log(r["t_grad_s"]))
            return t, r
    return None


def best_time(rows, family, eps, problem):
    """The method of ``family`` with the smallest interpolated time to gradient error ``eps``."""
    best = None
    names = sorted({r["method"] for r in rows if r["family"] == family and r["problem"] == problem})
    for name in names:
        rs = [r for r in rows if r["method"] == name and r["problem"] == problem]
        got = time_at(rs, eps)
        if got is not None and (best is None or got[0] < best[0]):
            best = got
    return best


def fmt_cfg(got):
    if got is None:
        return "not reached"
    t, r = got
    s = f"N={r['setting']}" if r["variable"] == "N" else f"tol={r['setting']:g}, {r['steps']} steps"
    return f"{t * 1e3:.1f} ms ({r['method']}; {s})"


def headline(rows, problems):
    lines = [
        "| problem | grad. error | jadeis best | diffrax best | hand-written scan best "
        "| jadeis / diffrax |",
        "|---|---|---|---|---|---|",
    ]
    verdicts = []
    for p in problems:
        for eps in TARGET_EPS:
            j = best_time(rows, "jadeis", eps, p)
            d = best_time(rows, "diffrax", eps, p)
            s = best_time(rows, "scan", eps, p)
            ratio = j[0] / d[0] if (j and d) else float("nan")
            rtxt = "n/a" if math.isnan(ratio) else f"{ratio:.2f}"
            lines.append(f"| {p} | {eps:g} | {fmt_cfg(j)} | {fmt_cfg(d)} | {fmt_cfg(s)} | {rtxt} |")
            verdicts.append((p, eps, ratio))
    return "\n".join(lines), verdicts


def method_table(rows, problem):
    """Per method: the cheapest configuration reaching each target, and the error at fixed cost."""
    lines = [
        "| method | time to grad err 1e-2 | evals / VJPs | time to 1e-3 | evals / VJPs "
        "| grad/fwd time | us per model call | compile (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = []
    for r in rows:
        if r["problem"] == problem and r["method"] not in names:
            names.append(r["method"])
    for name in names:
        rs = [r for r in rows if r["problem"] == problem and r["method"] == name]
        cells = []
        for eps in TARGET_EPS:
            got = time_at(rs, eps)
            if got is not None:
                t, b = got
                sv = f"N={b['setting']}" if b["variable"] == "N" else f"tol={b['setting']:g}"
                cells.append(f"{t * 1e3:.1f} ms (reached at {sv})")
                cells.append(f"{b['evals']} / {b['vjps']}")
            else:
                best = min(rs, key=lambda r: r["err_grad"])
                cells.append(f"not reached (best {best['err_grad']:.1e})")
                cells.append("")
        ratios = [r["grad_over_fwd"] for r in rs if not math.isnan(r["grad_over_fwd"])]
        ratio = statistics.median(ratios) if ratios else float("nan")
        comp = statistics.median(r["compile_grad_s"] for r in rs if r["compile_grad_s"] > 0)
        per_call = statistics.median(r["t_grad_s"] / (r["evals"] + r["vjps"]) * 1e6 for r in rs)
        lines.append(
            f"| {name} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} | {ratio:.2f} "
            f"| {per_call:.0f} | {comp:.1f} |"
        )
    return "\n".join(lines)


def plots(rows, mem_rows, out: Path, problems):
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    styles = {"jadeis": "-", "diffrax": "--", "scan": ":"}
    for p in problems:
        rs = [r for r in rows if r["problem"] == p]
        names = []
        for r in rs:
            if r["method"] not in names:
                names.append(r["method"])
        for xkey, xlabel, fname in (
            ("t_grad_s", "wall time per gradient (s)", f"pareto_{p}.png"),
            ("evals", "model evaluations per gradient (incl. those inside VJPs)", f"evals_{p}.png"),
        ):
            fig, ax = plt.subplots(figsize=(9, 6))
            fam = {n: next(r["family"] for r in rs if r["method"] == n) for n in names}
            maps = {"jadeis": "Blues", "diffrax": "Oranges", "scan": "Greens"}
            colour = {}
            for f, cm in maps.items():
                members = [n for n in names if fam[n] == f]
                for j, n in enumerate(members):
                    colour[n] = plt.get_cmap(cm)(0.45 + 0.55 * j / max(1, len(members) - 1))
            for name in names:
                m = sorted((r for r in rs if r["method"] == name), key=lambda r: r[xkey])
                xs = [r[xkey] for r in m]
                ys = [max(r["err_grad"], 1e-16) for r in m]
                if xkey == "t_grad_s":  # Pareto front: best error reached at each cost
                    front = np.minimum.accumulate(ys)
                    ax.plot(xs, front, styles[fam[name]], color=colour[name], label=name, lw=1.6)
                    ax.plot(xs, ys, ".", color=colour[name], ms=4)
                else:
                    ax.plot(xs, ys, styles[fam[name]], marker=".", color=colour[name], label=name)
            for eps in TARGET_EPS:
                ax.axhline(eps, color="grey", lw=0.6)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_ylim(top=10.0)  # AdjointDEIS at small N reaches 1e6: clip to keep detail
            ax.set_xlabel(xlabel)
            ax.set_ylabel("relative error of the gradient (max over dL/dx_T, dL/dz, dL/dparams)")
            ax.set_title(f"{p}: solid = jadeis, dashed = diffrax, dotted = hand-written scan")
            ax.legend(fontsize=7, ncol=2)
            fig.tight_layout()
            fig.savefig(out / fname, dpi=110)
            plt.close(fig)
    if mem_rows:
        fig, ax = plt.subplots(figsize=(8, 5.5))
        names = []
        for r in mem_rows:
            if r["method"] not in names:
                names.append(r["method"])
        for name in names:
            m = [r for r in mem_rows if r["method"] == name]
            ax.plot(
                [r["N"] for r in m],
                [r["temp_bytes_grad"] / 2**20 for r in m],
                marker="o",
                label=name,
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("steps N")
        ax.set_ylabel("compiled temp memory of one gradient (MiB)")
        ax.set_title("memory vs N (XLA memory_analysis, MLP, batch 512)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "memory_vs_steps.png", dpi=110)
        plt.close(fig)


def machine_info(args, t_start):
    import diffrax  # noqa: PLC0415
    import equinox  # noqa: PLC0415
    import optax  # noqa: PLC0415

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t_start)),
        "mode": "quick" if args.quick else "full",
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "diffrax": diffrax.__version__,
        "equinox": equinox.__version__,
        "optax": optax.__version__,
        "jadeis": jadeis.__version__,
        "numpy": np.__version__,
        "dtype": "float64",
        "repeats": args.reps,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few-minute version")
    ap.add_argument("--problems", default=None, help="comma-separated: gaussian,mixture,mlp,digits")
    ap.add_argument(
        "--out", default=None, help="output folder (default benchmarks/results[/quick])"
    )
    ap.add_argument("--reps", type=int, default=None, help="timing repeats (median)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--no-cache", action="store_true", help="no persistent compilation cache")
    ap.add_argument("--no-grid-study", action="store_true", help="skip grid_study.py (full)")
    ap.add_argument("--all-methods", action="store_true", help="also the redundant variants")
    ap.add_argument("--summarize", default=None, help="only rebuild summary/plots from a folder")
    args = ap.parse_args(argv)
    if args.summarize:
        return summarize(Path(args.summarize))
    t_start = time.time()
    args.reps = args.reps or (3 if args.quick else 5)
    if not args.no_cache:
        # XLA's persistent compilation cache: a second run skips most compilation (the
        # cold compile times are measured separately, with the cache off)
        jax.config.update("jax_compilation_cache_dir", str(HERE / ".cache" / "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    out = Path(args.out) if args.out else HERE / "results" / ("quick" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    default = "gaussian,mixture,mlp" if args.quick else "gaussian,mixture,mlp,digits"
    names = (args.problems or default).split(",")
    info = machine_info(args, t_start)
    log(json.dumps(info, indent=1))

    problems = P.build_problems(names, quick=args.quick, log=log)
    # dominated or redundant variants (kept in methods.py, run with --all-methods):
    # DiscreteAdjoint (2M) and Backprop DPM(2M) (within noise of, or slower than, the (3M)
    # forms in a full run with them), Euler in t (first order: never reaches 1e-2)
    skip = () if args.all_methods else REDUNDANT
    all_ms = [m for m in M.all_methods() if m.name not in skip]
    rows = []
    for p in problems:
        ms = all_ms
        if args.quick or p.name == "digits":
            ms = [m for m in all_ms if m in quick_methods(all_ms) or "grid" in m.name]
        if args.quick:
            ms = quick_methods(all_ms)
        if p.name == "gaussian":  # a sanity check of the convergence against the closed form
            ms = [m for m in ms if m.name in GAUSSIAN_METHODS]
        log(f"sweep {p.name}: {p.description}")
        budget = 10.0 if args.quick else 30.0
        rows += sweep_problem(p, ms, quick=args.quick, reps=args.reps, time_budget_s=budget)
        write_csv(out / "sweep.csv", rows)
    ref_rows = [
        {
            "problem": p.name,
            "description": p.description,
            "stiff": p.stiff,
            **(p.reference_check or {}),
            **p.info,
        }
        for p in problems
    ]
    write_csv(out / "references.csv", ref_rows)

    compile_rows = []
    cp = next((p for p in problems if p.name == "mlp"), None)
    if cp is not None:
        log("cold compile times (persistent cache off), mlp problem:")
        cms = all_ms
        if args.quick:
            keep = ("AdjointDEIS-2 reconstruct", "DiscreteAdjoint DPM++(3M)", "diffrax Heun (rho)")
            cms = [m for m in all_ms if m.name in keep]
        compile_rows = compile_table(cp, cms)
        write_csv(out / "compile.csv", compile_rows)

    mem_rows = []
    if not args.no_memory:
        log("memory vs N:")
        mem_rows, _ = memory_sweep(args.quick)
        write_csv(out / "memory.csv", mem_rows)

    e2e_rows = []
    e2e_problem = next((p for p in problems if p.name == "mlp"), None)
    if not args.no_e2e and e2e_problem is not None:
        log("end to end (Adam over x_T on the mlp problem):")
        e2e_rows = e2e(e2e_problem, [r for r in rows if r["problem"] == "mlp"], quick=args.quick)
        write_csv(out / "e2e.csv", e2e_rows)

    if not args.quick and not args.no_grid_study:
        log("grid study (mixture):")
        import grid_study  # noqa: PLC0415

        grid_study.main()

    pnames = [p.name for p in problems]
    plots(rows, mem_rows, out, pnames)
    info["peak_rss_mb"] = peak_rss_mb()
    info["total_seconds"] = time.time() - t_start
    info["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    (out / "machine.json").write_text(json.dumps(info, indent=1) + "\n")
    write_summary(out, info, rows, mem_rows, e2e_rows, ref_rows, compile_rows)
    log(f"done in {info['total_seconds']:.0f}s; results in {out}")


def read_csv(path):
    if not path.exists():
        return []
    out = []
    with open(path) as f:
        for r in csv.DictReader(f):
            row = {}
            for k, v in r.items():
                try:
                    row[k] = int(v)
                except ValueError:
                    try:
                        row[k] = float(v)
                    except ValueError:
                        row[k] = v
            out.append(row)
    return out


def summarize(out: Path):
    """Rebuild plots and summary.md from the CSV files of a finished run."""
    info = json.loads((out / "machine.json").read_text())
    rows = read_csv(out / "sweep.csv")
    for r in rows:
        r["setting"] = r["setting"] if r["variable"] == "tol" else int(r["setting"])
    mem_rows = read_csv(out / "memory.csv")
    e2e_rows = read_csv(out / "e2e.csv")
    ref_rows = read_csv(out / "references.csv")
    for c in ref_rows:  # files of older runs lack these columns
        c.setdefault("stiff", c["problem"] != "gaussian")
        c.setdefault("description", c["problem"])
    compile_rows = read_csv(out / "compile.csv")
    plots(rows, mem_rows, out, [c["problem"] for c in ref_rows])
    write_summary(out, info, rows, mem_rows, e2e_rows, ref_rows, compile_rows)
    log(f"rebuilt {out / 'summary.md'}")


def write_summary(out, info, rows, mem_rows, e2e_rows, ref_rows, compile_rows=()):
    stiff = [p["problem"] for p in ref_rows if p["stiff"] in (True, "True")]
    head, verdicts = headline(rows, stiff)
    md = [
        "# Benchmark results (generated by benchmarks/run.py)",
        "",
        f"Machine: {info['cpu']}, {info['cpu_count']} cores (shared), {info['jax_backend']}; "
        f"jax {info['jax']}, diffrax {info['diffrax']}, equinox {info['equinox']}, "
        f"optax {info['optax']}; float64; {info['mode']} run of {info['date_utc']} UTC, "
        f"{info['total_seconds']:.0f} s; load average {info['load_average_at_start']} -> "
        f"{info['load_average_at_end']}. Times are medians of {info['repeats']} repeats after "
        f"warm-up (compile time separate).",
        "",
        "## Headline: wall time per gradient at equal gradient accuracy",
        "",
        head,
        "",
        "Target: jadeis / diffrax <= 0.33. "
        + "; ".join(
            f"{p} @ {e:g}: {'met' if r <= 1 / 3 else 'NOT met'} ({r:.2f})"
            if not math.isnan(r)
            else f"{p} @ {e:g}: n/a"
            for p, e, r in verdicts
        ),
        "",
        "## References",
        "",
        "| problem | reference | rel. diff. x0 | rel. diff. grads |",
        "|---|---|---|---|",
    ]
    for c in ref_rows:
        md.append(
            f"| {c['problem']} | {c.get('method', '')} | {float(c.get('x0', 0)):.1e} "
            f"| {float(c.get('grad', 0)):.1e} |"
        )
    for c in ref_rows:
        name = c["problem"]
        md += ["", f"## {name}: {c['description']}", "", method_table(rows, name), ""]
        md.append(f"![pareto](pareto_{name}.png) ![evals](evals_{name}.png)")
    # gradient / forward time ratio of jadeis methods
    md += ["", "## Gradient time / forward time (jadeis, same N)", ""]
    md += [
        "Target <= 3.5. Forward = `jadeis.sample` with the same sampler and N, no gradient; "
        "the gradient is with respect to x_T, z and params together.",
        "",
        "| method | median | max | problems | target <= 3.5 (median) "
        "| dL/dx_T only, N=64: median (max) |",
        "|---|---|---|---|---|---|",
    ]
    jnames = []
    for r in rows:
        if r["family"] == "jadeis" and r["method"] not in jnames:
            jnames.append(r["method"])
    for name in jnames:
        rs = [
            r["grad_over_fwd"]
            for r in rows
            if r["method"] == name
            and r["problem"] != "gaussian"
            and not math.isnan(r["grad_over_fwd"])
        ]
        xs = [
            r.get("grad_xT_over_fwd", float("nan"))
            for r in rows
            if r["method"] == name and r["problem"] != "gaussian"
        ]
        xs = [v for v in xs if isinstance(v, float) and not math.isnan(v)]
        xtxt = f"{statistics.median(xs):.2f} ({max(xs):.2f})" if xs else "n/a"
        if rs:
            med = statistics.median(rs)
            md.append(
                f"| {name} | {med:.2f} | {max(rs):.2f} | all but gaussian "
                f"| {'met' if med <= 3.5 else 'NOT met'} | {xtxt} |"
            )
    if compile_rows:
        md += ["", "## Cold compile times (mlp problem, persistent cache off)", ""]
        md += ["| method | setting | gradient (s) | of which tracing (s) | forward (s) |"]
        md += ["|---|---|---|---|---|"]
        for r in compile_rows:
            md.append(
                f"| {r['method']} | {r['setting']} | {r['grad_total_s']:.2f} | "
                f"{r['trace_lower_s']:.2f} | {r['fwd_total_s']:.2f} |"
            )
    if mem_rows:
        md += ["", "## Memory vs N (compiled temp bytes of one gradient, MLP batch 512)", ""]
        ns = sorted({r["N"] for r in mem_rows})
        md.append("| method | " + " | ".join(f"N={n}" for n in ns) + " | N=max / N=min |")
        md.append("|---|" + "---|" * (len(ns) + 1))
        names = []
        for r in mem_rows:
            if r["method"] not in names:
                names.append(r["method"])
        for name in names:
            m = {r["N"]: r["temp_bytes_grad"] for r in mem_rows if r["method"] == name}
            cells = " | ".join(f"{m[n] / 2**20:.2f} MiB" for n in ns)
            md.append(f"| {name} | {cells} | {m[ns[-1]] / m[ns[0]]:.2f} |")
        xb = mem_rows[0]["x_bytes"]
        md.append("")
        md.append(f"|x| = {xb / 2**20:.3f} MiB. ![memory](memory_vs_steps.png)")
        md.append("")
        for name in names:
            m = {r["N"]: r["temp_bytes_grad"] for r in mem_rows if r["method"] == name}
            slope = (m[ns[-1]] - m[ns[0]]) / ((ns[-1] - ns[0]) * xb)
            line = f"- {name}: growth {slope:.2f} |x| per step"
            if "reconstruct" in name:
                ok = m[ns[-1]] / m[ns[0]] <= 1.2
                line += f"; target flat within 1.2x: {'met' if ok else 'NOT met'}"
            md.append(line)
    if e2e_rows:
        md += ["", "## End to end: Adam over x_T to a guidance loss threshold (mlp)", ""]
        md.append(
            "| method | setting | grad err of config | iterations | time to threshold (s) | "
            "true final loss |"
        )
        md.append("|---|---|---|---|---|---|")
        for r in e2e_rows:
            tt = r["time_to_threshold_s"]
            ttxt = "not reached" if math.isnan(tt) else f"{tt:.2f}"
            md.append(
                f"| {r['method']} | {r['variable']}={r['setting']:g} "
                f"| {r['grad_err_of_config']:.1e} | {r['iterations']} | {ttxt} "
                f"| {r['true_final_loss']:.3g} |"
            )
        md.append(
            f"\nStart loss {e2e_rows[0]['loss0']:.3g}, threshold {e2e_rows[0]['threshold']:.3g} "
            "(each method's own loss); true loss from a DPM-Solver++(3) N=1000 solve."
        )
    (out / "summary.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
