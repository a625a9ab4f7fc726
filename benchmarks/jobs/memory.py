"""Job ``memory``: compiled scratch memory (XLA ``temp_size_in_bytes``) of one gradient
versus N, for the methods tagged "memory" ("memory-quick" with --quick), on the MLP
problem at batch 512. Writes ``memory.csv``."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import common as C
import jadeis
import methods as M
import problems as P

log = C.log


def memory_sweep(quick, selector=None):
    problem = P.mlp_problem(batch=512, log=log)
    problem.reference = {}
    ns = [10, 100, 1000]
    ms = M.select(M.all_methods(), "memory-quick" if quick else "memory")
    if selector is not None:
        ms = [m for m in ms if M.matches(m, selector)]
    x_bytes = int(np.prod(problem.x_T.shape)) * 8
    rows = []
    fwd_temp = {}
    for method in ms:
        name = method.name
        fwd, grad = method.make(problem)
        for n in ns:
            ts = jadeis.time_grid(problem.schedule, n, dtype=jnp.float64)
            args = (problem.x_T, problem.z, problem.params, ts)
            _, c, temp = C.compile_timed(grad, args)
            if n not in fwd_temp:  # forward sampling memory (the same for every jadeis sampler)
                fwd_temp[n] = C.compile_timed(fwd, args)[2]
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
