"""Cold compile time of ``jadeis.sample`` and of its gradient vs a bare ``lax.scan`` loop.

Each case is ``jax.jit(f).lower(*args)`` (trace + lower) followed by ``.compile()`` (XLA),
timed separately, with the persistent compilation cache off and ``jax.clear_caches()``
before every compile; the batch size differs between the repeats (64, 65, 66, ...), so no
compile reuses another's work. Reported: the median over ``--repeats`` cold compiles of the
wall time and of the process CPU time (less sensitive to a loaded machine), and the ratio
jadeis / bare scan of the CPU time.

The model is the MLP of ``bench_sample.py`` (dim 128, 64-dim time embedding, hidden 512);
VPLinear schedule, 50-step log-SNR grid, float32. Two references, each the minimum a user
would write: DDIM (``x <- a x + b eps(x, t)``) and DPM-Solver++(2M) (the diffusers
"midpoint" form, first step first order). Gradients: ``jax.grad`` of ``sum(x_0^2)`` with
respect to the parameters, through the bare scan (plain reverse mode) and through
``jadeis.sample`` with ``DiscreteAdjoint()`` and ``Backprop()``.

Three ways to call: ``eager`` (``jadeis.sample`` called directly, as in ``bench_sample.py``:
it validates on the host and compiles itself, with the grid an argument of its compiled
function; the bare scan under ``jax.jit`` with the grid an argument; compile = first call
minus second call, forward only), ``concrete`` (the grid is a constant of the jitted
function, as in ``bench_gradient.py``) and ``traced`` (the grid is an argument of the jitted
function: jadeis adds its run-time check of ``ts``).

    .venv/bin/python benchmarks/compile_overhead.py            # writes results/compile_overhead.md
    .venv/bin/python benchmarks/compile_overhead.py --quick    # 1 repeat, prints only
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

import common as C  # noqa: E402
import jadeis  # noqa: E402

jax.config.update("jax_enable_compilation_cache", False)

SCHEDULE = jadeis.VPLinear()
mlp_eps = C.mlp_eps
DIM, EMB, HIDDEN = 128, 64, 512


def init_params():
    freqs = C.time_embedding_freqs(EMB, 6.0)
    return C.init_mlp(jax.random.key(0), [DIM + EMB, HIDDEN, HIDDEN, DIM], freqs=freqs)


def scan_ddim(params, x_T, ts):
    sch = SCHEDULE
    log_alpha, lam, sigma = sch.log_alpha(ts), sch.log_snr(ts), sch.sigma(ts)
    h = lam[1:] - lam[:-1]
    a = jnp.exp(log_alpha[1:] - log_alpha[:-1]).astype(x_T.dtype)
    b = (-sigma[1:] * jnp.expm1(h)).astype(x_T.dtype)

    def body(x, inp):
        t, a_i, b_i = inp
        return a_i * x + b_i * mlp_eps(params, x, t, None), None

    return lax.scan(body, x_T, (ts[:-1].astype(x_T.dtype), a, b))[0]


def scan_dpmpp2m(params, x_T, ts):
    sch = SCHEDULE
    dtype = x_T.dtype
    lam = sch.log_snr(ts)
    alpha, sigma = sch.alpha(ts), sch.sigma(ts)
    h = lam[1:] - lam[:-1]
    r = jnp.concatenate([jnp.ones((1,), dtype), h[:-1] / h[1:]])
    c1 = jnp.concatenate([jnp.zeros((1,), dtype), 0.5 / r[1:]])
    ratio, coef = sigma[1:] / sigma[:-1], -alpha[1:] * jnp.expm1(-h)
    inputs = (ts[:-1], alpha[:-1], sigma[:-1], ratio, coef, c1)

    def body(carry, inp):
        x, d_prev = carry
        t, a_s, s_s, ratio, coef, c = inp
        d = (x - s_s * mlp_eps(params, x, t, None)) / a_s
        return (ratio * x + coef * ((1 + c) * d - c * d_prev), d), None

    return lax.scan(body, (x_T, jnp.zeros_like(x_T)), inputs)[0][0]


def jadeis_sample(solver, adjoint):
    def f(params, x_T, ts):
        return jadeis.sample(
            mlp_eps, params, x_T, None, schedule=SCHEDULE, ts=ts, solver=solver, adjoint=adjoint
        )

    f.is_jadeis = True
    return f


def grad_of(f):
    return jax.grad(lambda p, x, ts: jnp.sum(f(p, x, ts) ** 2))


def cases():
    """(reference name, reference fn, [(name, fn), ...]) per comparison."""
    ddim, pp2 = jadeis.DDIM(), jadeis.DPMSolverPP(order=2)
    disc, bp = jadeis.DiscreteAdjoint(), jadeis.Backprop()
    return [
        ("forward: bare scan DDIM", scan_ddim, [("sample DDIM", jadeis_sample(ddim, disc))]),
        (
            "forward: bare scan DPM++(2M)",
            scan_dpmpp2m,
            [
                ("sample DPMSolverPP(2)", jadeis_sample(pp2, disc)),
                ("sample DPMSolverPP(3)", jadeis_sample(jadeis.DPMSolverPP(order=3), disc)),
            ],
        ),
        (
            "grad: bare scan DDIM + jax.grad",
            grad_of(scan_ddim),
            [
                ("grad DDIM DiscreteAdjoint", grad_of(jadeis_sample(ddim, disc))),
                ("grad DDIM Backprop", grad_of(jadeis_sample(ddim, bp))),
            ],
        ),
        (
            "grad: bare scan DPM++(2M) + jax.grad",
            grad_of(scan_dpmpp2m),
            [
                ("grad DPMSolverPP(2) DiscreteAdjoint", grad_of(jadeis_sample(pp2, disc))),
                ("grad DPMSolverPP(2) Backprop", grad_of(jadeis_sample(pp2, bp))),
            ],
        ),
    ]


def cold_compile(fn, params, batch, steps, grid):
    """(trace + lower s, XLA compile s, CPU s) of one cold compile."""
    x_T = jax.random.normal(jax.random.key(1), (batch, DIM))
    ts = jadeis.time_grid(SCHEDULE, steps)
    jax.clear_caches()
    if grid == "eager":
        return eager_first_call(fn, params, x_T, ts)
    if grid == "concrete":
        jitted, args = jax.jit(lambda p, x: fn(p, x, ts)), (params, x_T)
    else:
        jitted, args = jax.jit(fn), (params, x_T, ts)
    c0, t0 = time.process_time(), time.perf_counter()
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    lowered.compile()
    t2, c2 = time.perf_counter(), time.process_time()
    return t1 - t0, t2 - t1, c2 - c0


def eager_first_call(fn, params, x_T, ts):
    """(first call - second call s, nan, CPU s of the same difference): ``jadeis.sample``
    called as it is (it compiles itself), a bare scan under ``jax.jit``; the compile time
    as ``bench_sample.py`` reports it (it includes ``sample``'s eager validation)."""
    fn = fn if getattr(fn, "is_jadeis", False) else jax.jit(fn)
    times = []
    for _ in range(2):
        c0, t0 = time.process_time(), time.perf_counter()
        jax.block_until_ready(fn(params, x_T, ts))
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    (w1, c1), (w2, c2) = times
    return w1 - w2, float("nan"), c1 - c2


def measure(fn, params, repeats, steps, grid):
    runs = [cold_compile(fn, params, 64 + r, steps, grid) for r in range(repeats)]
    med = lambda i: statistics.median(r[i] for r in runs)  # noqa: E731
    total = med(0) if grid == "eager" else med(0) + med(1)
    return {"trace_lower_s": med(0), "xla_s": med(1), "total_s": total, "cpu_s": med(2)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--grid", choices=["concrete", "traced", "eager", "all"], default="all")
    p.add_argument("--quick", action="store_true", help="1 repeat, print only")
    p.add_argument("--out", default=str(C.RESULTS / "compile_overhead.md"))
    p.add_argument("--note", default="", help="a line added under the title (e.g. the tree)")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = 1
    params = init_params()
    load_start = os.getloadavg()
    grids = ["eager", "concrete", "traced"] if args.grid == "all" else [args.grid]
    rows = []
    for grid in grids:
        for ref_name, ref_fn, impls in cases():
            if grid == "eager" and ref_name.startswith("grad"):
                continue  # the eager mode is the forward call of bench_sample.py
            ref = measure(ref_fn, params, args.repeats, args.steps, grid)
            rows.append({"grid": grid, "name": ref_name, **ref, "ratio": 1.0})
            C.log(f"[{grid}] {ref_name}: {ref['total_s']:.3f} s (cpu {ref['cpu_s']:.3f} s)")
            for name, fn in impls:
                r = measure(fn, params, args.repeats, args.steps, grid)
                r["ratio"] = r["cpu_s"] / ref["cpu_s"]
                rows.append({"grid": grid, "name": "  " + name, **r})
                C.log(
                    f"[{grid}]   {name}: {r['total_s']:.3f} s (cpu {r['cpu_s']:.3f} s), "
                    f"x{r['ratio']:.2f} of the bare scan"
                )
    load_end = os.getloadavg()
    if args.quick:
        return rows
    lines = [
        "# Cold compile time: `jadeis.sample` and its gradient vs a bare `lax.scan`",
        "",
        f"Generated by `benchmarks/compile_overhead.py` (--repeats {args.repeats}, "
        f"--steps {args.steps}).",
        "",
        *([args.note, ""] if args.note else []),
        f"MLP eps(x, t) (dim {DIM}, {EMB}-dim time embedding, hidden {HIDDEN}), batch 64..66 "
        f"(one per repeat, so every compile is cold; `jax.clear_caches()` before each and the "
        f"persistent cache off), VPLinear, {args.steps}-step grid, float32, CPU. Times are "
        f"medians over {args.repeats} cold compiles: trace + lower (`jax.jit(f).lower`), XLA "
        "compile (`.compile()`), their sum (wall), and process CPU time of both; ratio = CPU "
        "time / CPU time of the bare scan above it (the CPU time is less disturbed by other "
        "load on a shared machine than the wall time). Grid `concrete`: a constant of the "
        "jitted function (checked eagerly, as in `bench_gradient.py`); `traced`: an argument "
        "(jadeis adds its run-time check of `ts`); `eager`: `jadeis.sample` called directly, "
        "compile = first call minus second call (no trace/XLA split), as in `bench_sample.py`.",
        "",
        "| grid | function | trace+lower (s) | XLA compile (s) | total (s) | CPU (s) | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = r["name"]
        label = "&nbsp;&nbsp;" + name.strip() if name.startswith(" ") else f"**{name}**"
        lines.append(
            f"| {r['grid']} | {label} | {_s(r['trace_lower_s'], r['grid'])} | "
            f"{_s(r['xla_s'], r['grid'])} | {r['total_s']:.3f} | {r['cpu_s']:.3f} | "
            f"{r['ratio']:.2f} |"
        )
    info = C.machine_info()
    lines += [
        "",
        f"Load average (1, 5, 15 min) at start {tuple(round(v, 2) for v in load_start)}, at "
        f"end {tuple(round(v, 2) for v in load_end)}.",
        "",
        "## Machine",
        "",
        C.machine_md(info),
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    C.log(f"wrote {args.out}")
    return rows


def _s(v, grid):
    return "-" if grid == "eager" else f"{v:.3f}"


if __name__ == "__main__":
    main()
