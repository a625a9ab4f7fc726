"""Job ``compile``: cold compile times (persistent compilation cache off) of each selected
method's gradient (trace + lower, XLA compile) and forward pass. Writes ``compile.csv``."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

import common as C
import jadeis

log = C.log


def compile_table(problem, ms):
    rows = []
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        for method in ms:
            if method.measure is not None:
                continue  # not one compiled function (gradsolve: its sweep rows time it)
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
            _, c_fwd, _ = C.compile_timed(fwd, args)
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
