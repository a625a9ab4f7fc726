"""Job ``sweep``: gradient error, wall time, forward time, evaluation/VJP counts and
compiled memory of every selected method over step counts N (fixed grids) or tolerances
(adaptive), on each problem. Writes ``sweep.csv`` and ``references.csv`` (via run.py)."""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp

import common as C
import grids as G
import jadeis
import methods as M
import problems as P

log = C.log

FWD_NS = (64, 256)  # forward sampling is timed at these N (and at every tolerance)
XT_ONLY_AT = (64, 1e-5)  # settings at which the dL/dx_T-only gradient is timed too
STOP_ERR = 2e-4  # a method's sweep stops once its gradient error is below this
# (problem, method, last setting run or None) of every sweep a wall-clock deadline stopped
BUDGET_STOPS: list = []


def methods_for(problem_name, all_ms, *, quick, selector=None, gpu_quick=False):
    """The methods swept on one problem: ``selector`` (tags) if given; else unet: the
    "unet" ones (its model calls cost ~1000x the mixture's); gpu_quick: the "gpu-quick"
    ones; quick: the "quick" ones; digits: "quick" and "grid"; otherwise all. Gaussian:
    only "gaussian" (gpu_quick: "gpu-quick")."""
    if selector is not None:
        ms = M.select(all_ms, selector)
    elif problem_name == "unet":
        ms = M.select(all_ms, "unet")
    elif gpu_quick:
        return M.select(all_ms, "gpu-quick")
    elif quick:
        ms = M.select(all_ms, "quick")
    elif problem_name == "digits":
        ms = M.select(all_ms, "quick,grid")
    else:
        ms = list(all_ms)
    if problem_name == "gaussian" and selector is None:
        # a sanity check of the convergence against the closed form
        ms = M.select(ms, "gaussian") if ms else ms
    return ms


def reference_rows(problems):
    return [
        {
            "problem": p.name,
            "description": p.description,
            "stiff": p.stiff,
            **(p.reference_check or {}),
            **p.info,
        }
        for p in problems
    ]


def settings_for(method, quick: bool, problem_name: str = "", gpu_quick: bool = False):
    if problem_name == "unet" and gpu_quick:
        # on a GPU the unet's steps are cheap: far enough for diffrax Heun to reach 1e-3
        return [1e-3, 1e-4] if method.variable == "tol" else [8, 16, 32, 64, 128]
    if gpu_quick:
        quick = False  # the full settings; the wall-clock deadline bounds the sweep
    if problem_name == "unet":
        # ~0.4 s per step of a gradient on 2 CPU cores, 8x a lone VJP (XLA CPU runs the
        # weight-gradient convolutions of dL/dparams much slower inside the sampler's loop);
        # x_0 errors of UniPC(3): 1.6e-1 (N = 8), 7e-3 (16), 6e-4 (32)
        # (quick: the same N; on 2 CPU cores the 20 s budget stops after N = 16, where
        # gradient errors are 1e-2..5e-2, so the headline cells are reached on a GPU only)
        if method.variable == "tol":
            return [1e-3] if quick else [1e-3, 1e-4]
        return [8, 16, 32]
    if method.variable == "tol":
        return [1e-3, 1e-5] if quick else [1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7]
    if quick:
        return [16, 64, 256]
    return [16, 32, 64, 128, 256, 512]


def learned_settings(method, problem_name: str, settings):
    """The settings of a "learned" method that have a grid in grids/<problem>.json; logs
    what is missing (the sweep never substitutes another grid)."""
    have = G.available(problem_name, method.grid_key)
    if not have:
        log(
            f"    {method.name}: no learned grids for {problem_name!r} ({method.grid_key}) in "
            f"{G.path_for(problem_name)}; skipped (learn them: python benchmarks/grids.py "
            f"--problems {problem_name})"
        )
        return []
    missing = [n for n in settings if n not in have]
    if missing:
        log(f"    {method.name}: no learned grid at N={missing}; those N skipped")
    return [n for n in settings if n in have]


def count_diffrax(problem, method, extra):
    counter = M.Counter()
    _, grad = method.make(problem, M.counting_eps_fn(problem.eps_fn, counter))
    out = jax.jit(grad)(problem.x_T, problem.z, problem.params, extra)
    jax.block_until_ready(out)
    jax.effects_barrier()
    return counter.evals, counter.vjps


def _run(problem, gens, deadline):
    """Rows of the per-method generators ``gens`` (``[(method, generator)]``, each yielding
    one row, or None, per setting). Without a deadline: each method's settings in turn, method
    after method. With one (a ``time.perf_counter()`` value): round robin, one setting of each
    method at a time, so that every method gets as far as the time allows, and at the deadline
    the sweeps left are stopped (logged and recorded in ``BUDGET_STOPS``)."""
    rows = []
    if deadline is None:
        for _, g in gens:
            rows += [r for r in g if r is not None]
        return rows
    live, last = list(gens), {}
    while live:
        for item in list(live):
            method, g = item
            if time.perf_counter() >= deadline:
                for m, _ in live:
                    log(f"    {m.name}: wall-clock budget spent; stopping")
                    BUDGET_STOPS.append((problem.name, m.name, last.get(m.name)))
                return rows
            try:
                r = next(g)
            except StopIteration:
                live.remove(item)
                continue
            if r is not None:
                rows.append(r)
                last[method.name] = r["setting"]
    return rows


def sweep_measured(problem, method, *, quick, reps, time_budget_s, gpu_quick=False):
    """The sweep of a method with its own ``measure`` (gradsolve: a host-side record between
    compiled calls), a generator of one row (None: failed) per setting: the same settings,
    stopping rules and row columns as the others, plus the method's own columns (record /
    replay times, the public API's time)."""
    from peers import gradsolve_peer  # noqa: PLC0415

    if method.family == "gradsolve" and gradsolve_peer.available() is None:
        log(f"    {method.name}: gradsolve is not installed (pip install gradsolve); skipped")
        return
    if method.family == "gradsolve" and P.input_dtype(problem) != jnp.float64:
        log(f"    {method.name}: gradsolve's general path is float64 only; skipped")
        return
    run_time = 0.0
    for setting in settings_for(method, quick, problem.name, gpu_quick):
        try:
            m = method.measure(problem, setting, reps, quick or gpu_quick)
        except Exception as e:  # noqa: BLE001 - e.g. max_steps exhausted while recording
            log(f"    {method.name} {setting}: failed ({type(e).__name__}: {str(e)[:120]})")
            yield None
            continue
        # charged like the other methods: the timed gradient, its x_T-only form and the
        # forward pass over the repeats (not gradsolve's extra record/replay/public timings)
        run_time += (reps + 2) * (m["t_grad_s"] + m["t_grad_xT_s"] + m["t_fwd_s"])
        row = {
            "problem": problem.name,
            "method": method.name,
            "family": method.family,
            "variable": method.variable,
            "setting": setting,
            **m,
            "grad_over_fwd": m["t_grad_s"] / m["t_fwd_s"],
            "grad_xT_over_fwd": m["t_grad_xT_s"] / m["t_fwd_s"],
            "peak_rss_mb": C.peak_rss_mb(),
        }
        log(
            f"    {method.name:42s} {method.variable}={setting:<8g} steps={row['steps']:<6d} "
            f"err x0 {row['err_x0']:.1e} grad {row['err_grad']:.1e}  "
            f"t_grad {row['t_grad_s'] * 1e3:8.2f} ms (replay {row['t_replay_s'] * 1e3:.2f}, "
            f"x_T only {row['t_grad_xT_s'] * 1e3:.2f})  compile {row['compile_grad_s']:5.1f}s  "
            f"evals {row['evals']} vjps {row['vjps']}"
        )
        yield row
        if row["err_grad"] < STOP_ERR:
            break
        if run_time > time_budget_s:
            log(f"    {method.name}: run-time budget of {time_budget_s:.0f}s spent; stopping")
            break


def sweep_problem(problem, ms, *, quick, reps, time_budget_s, xT_all=False, deadline=None,
                  gpu_quick=False):
    """Every method of ``ms`` on ``problem``. ``xT_all``: time the dL/dx_T-only gradient (the
    guidance case) at every setting, not only at ``XT_ONLY_AT``. ``deadline`` (a
    ``time.perf_counter()`` value): the methods take one setting each in turn until it passes
    (see ``_run``)."""
    shared = {"fwd_cache": {}, "per_step_counts": {}}
    gens = []
    for method0 in ms:
        if method0.measure is not None:
            g = sweep_measured(
                problem, method0, quick=quick, reps=reps, time_budget_s=time_budget_s,
                gpu_quick=gpu_quick,
            )
        else:
            g = _sweep_method(problem, method0, shared, quick=quick, reps=reps,
                              time_budget_s=time_budget_s, xT_all=xT_all, gpu_quick=gpu_quick)
        gens.append((method0, g))
    return _run(problem, gens, deadline)


def _sweep_method(problem, method0, shared, *, quick, reps, time_budget_s, xT_all, gpu_quick):
    """One method's sweep over its settings, a generator of one row (None: failed) each."""
    fwd_cache, per_step_counts = shared["fwd_cache"], shared["per_step_counts"]
    ref = problem.reference
    args0 = (problem.x_T, problem.z, problem.params)
    method = method0
    fwd, grad = method.make(problem)
    run_time = 0.0  # seconds spent running (compilation excluded) for the budget
    compiled_grad = None
    compiled_fwd = None
    compiled_gx = None
    settings = settings_for(method, quick, problem.name, gpu_quick)
    dtype = P.input_dtype(problem)  # the grids and tolerances in the inputs' precision
    if method.spacing == "learned":
        settings = learned_settings(method, problem.name, settings)
    for setting in settings:
        if method0.static_setting:
            # the setting is part of the compiled function: bind it, recompile
            make = functools.partial(method0.make, tol=setting)
            method = dataclasses.replace(method0, make=make)
            fwd, grad = method.make(problem)
            compiled_grad = compiled_fwd = compiled_gx = None
        if method.spacing == "learned":
            extra = G.load_grid(problem.name, method.grid_key, setting).astype(dtype)
        elif method.variable == "N":
            extra = jadeis.time_grid(problem.schedule, setting, method.spacing, dtype=dtype)
        else:
            extra = jnp.asarray(setting, dtype)
        args = args0 + (extra,)
        if method.variable == "N" or compiled_grad is None:
            compiled_grad, c_grad, temp = C.compile_timed(grad, args)
        else:
            c_grad = 0.0  # one compilation serves every tolerance
        t_run = time.perf_counter()
        try:
            x0, gx, gz, gp, steps = compiled_grad(*args)
            jax.block_until_ready(x0)
        except Exception as e:  # noqa: BLE001 - e.g. diffrax max_steps reached
            log(f"    {method.name} {setting}: failed ({type(e).__name__}: {str(e)[:80]})")
            yield None
            continue
        errs = {
            "err_x0": P.rel_err(x0, ref["x0"]),
            "err_xT": P.rel_err(gx, ref["x_T"]),
            "err_z": P.rel_err(gz, ref["z"]),
            "err_params": P.rel_err(gp, ref["params"]),
        }
        errs["err_grad"] = max(errs["err_xT"], errs["err_z"], errs["err_params"])
        t_grad, t_grad_min, t_grad_cpu = C.time_call(
            compiled_grad, args, reps, with_min=True, with_cpu=True
        )
        run_time += time.perf_counter() - t_run
        # forward sampling time (shared by methods with the same sampler and setting)
        fkey = (method.forward_key, float(setting))
        # the unet's few N are all timed (its headline cells sit at N = 8..64)
        fwd_ns = settings if problem.name == "unet" else FWD_NS
        if fkey not in fwd_cache and (method.variable == "tol" or setting in fwd_ns):
            if method.variable == "N" or compiled_fwd is None:
                compiled_fwd, _, temp_fwd = C.compile_timed(fwd, args)
            fwd_cache[fkey] = (C.time_call(compiled_fwd, args, reps, with_cpu=True), temp_fwd)
        (t_fwd, t_fwd_cpu), temp_fwd = fwd_cache.get(fkey, ((float("nan"), float("nan")), -1))
        t_grad_xT = float("nan")
        # guidance: only dL/dx_T
        if (setting in XT_ONLY_AT or xT_all) and problem.name != "unet":
            _, grad_x = method.make(problem, xT_only=True)
            if method.variable == "N" or compiled_gx is None:
                compiled_gx = C.compile_timed(grad_x, args)[0]
            t_grad_xT = C.time_call(compiled_gx, args, reps)
        n_steps = int(steps)
        if n_steps < 0 and method.stages:
            # attempted steps (accepted + rejected) from the forward pass's evaluations
            counter = M.Counter()
            f_count, _ = method.make(problem, M.counting_eps_fn(problem.eps_fn, counter))
            jax.block_until_ready(jax.jit(f_count)(*args))
            jax.effects_barrier()
            n_steps = counter.evals // method.stages
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
            "t_grad_cpu_s": t_grad_cpu,
            "t_fwd_s": t_fwd,
            "t_fwd_cpu_s": t_fwd_cpu,
            "grad_over_fwd": t_grad / t_fwd,
            "vjp_over_eval": problem.info.get("vjp_over_eval", float("nan")),
            "t_grad_xT_s": t_grad_xT,
            "grad_xT_over_fwd": t_grad_xT / t_fwd,
            "compile_grad_s": c_grad,
            "evals": evals,
            "vjps": vjps,
            "counted": counted,
            "temp_bytes_grad": temp,
            "temp_bytes_fwd": temp_fwd,
            "peak_rss_mb": C.peak_rss_mb(),
        }
        log(
            f"    {method.name:42s} {method.variable}={setting:<8g} steps={n_steps:<6d} "
            f"err x0 {errs['err_x0']:.1e} grad {errs['err_grad']:.1e}  "
            f"t_grad {t_grad * 1e3:8.2f} ms  fwd {t_fwd * 1e3:7.2f} ms  "
            f"compile {c_grad:5.1f}s  evals {evals} vjps {vjps}"
        )
        yield row
        if errs["err_grad"] < STOP_ERR:
            break  # more accuracy than the targets ask for
        if method.variable == "N" and setting >= 256 and errs["err_grad"] > 3e-2:
            # even third order would not reach 1e-3 at twice the steps
            log(f"    {method.name}: error > 3e-2 at N={setting}; larger N not tried")
            break
        if run_time > time_budget_s:
            log(f"    {method.name}: run-time budget of {time_budget_s:.0f}s spent; stopping")
            break
