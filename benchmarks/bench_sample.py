"""Overhead of ``jadeis.sample`` (DDIM) over a hand-written ``lax.scan`` DDIM loop.

Both run the same small MLP noise model (sinusoidal time embedding, 3 dense layers) on the
same batch, the same N-step log-SNR grid and the same schedule. The hand-written loop is
the minimum a user would write: per-step coefficients a = alpha_t/alpha_s and
b = -sigma_t expm1(h) computed in the jitted function, then one ``lax.scan`` of
``x <- a x + b eps(x, t)``. Timing: median (and quartiles) of wall time over repeats, each
call synchronised with ``block_until_ready``, after a warm-up; the two implementations are
timed alternately so that machine-load drift affects both alike. Compile time (trace + XLA
compile, first call minus a steady-state call) is reported separately.

    .venv/bin/python benchmarks/bench_sample.py            # writes benchmarks/results/
    .venv/bin/python benchmarks/bench_sample.py --quick    # a smoke run, prints only

Target: overhead <= 5% of the hand-written loop's median wall time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

import common as C  # noqa: E402
import jadeis  # noqa: E402

RESULTS = C.RESULTS


# the benchmark MLP (common.py) without conditioning:
# [x, sin/cos(t * freqs)] -> dense -> silu -> dense -> silu -> dense
mlp_eps = C.mlp_eps


def init_mlp(key, dim, hidden, emb, dtype):
    scale = jax.random.uniform(jax.random.fold_in(key, 99), ())
    freqs = C.time_embedding_freqs(emb, 6.0, scale=scale, dtype=dtype)
    return C.init_mlp(key, [dim + emb, hidden, hidden, dim], dtype, freqs=freqs)


def make_sample(schedule):
    def run(params, x_T, ts):
        return jadeis.sample(
            mlp_eps, params, x_T, None, schedule=schedule, ts=ts, solver=jadeis.DDIM()
        )

    return run  # jadeis.sample is itself eqx.filter_jit-ed


def make_scan(schedule):
    @jax.jit
    def run(params, x_T, ts):
        log_alpha = schedule.log_alpha(ts)
        lam = schedule.log_snr(ts)
        sigma = schedule.sigma(ts)
        h = lam[1:] - lam[:-1]
        a = jnp.exp(log_alpha[1:] - log_alpha[:-1]).astype(x_T.dtype)
        b = (-sigma[1:] * jnp.expm1(h)).astype(x_T.dtype)

        def body(x, inp):
            t, a_i, b_i = inp
            return a_i * x + b_i * mlp_eps(params, x, t, None), None

        x_0, _ = lax.scan(body, x_T, (ts[:-1].astype(x_T.dtype), a, b))
        return x_0

    return run


def timed(fn, *args):
    return C.timed_call(fn, *args)[0]


timed_both = C.timed_call  # (wall, process CPU) seconds of one synchronised call


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--emb", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--quick", action="store_true", help="few repeats, print only")
    args = p.parse_args(argv)
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    if args.quick:
        args.repeats = 5
    dtype = jnp.dtype(args.dtype)

    schedule = jadeis.VPLinear()
    ts = jadeis.time_grid(schedule, args.steps, dtype=dtype)
    params = init_mlp(jax.random.key(0), args.dim, args.hidden, args.emb, dtype)
    x_T = jax.random.normal(jax.random.key(1), (args.batch, args.dim), dtype)
    impls = {
        "jadeis.sample (DDIM)": make_sample(schedule),
        "hand-written lax.scan DDIM": make_scan(schedule),
    }

    first = {name: timed(fn, params, x_T, ts) for name, fn in impls.items()}
    outs = {name: fn(params, x_T, ts) for name, fn in impls.items()}
    a, b = outs.values()
    # same computation up to float rounding (relative to the output's scale)
    rel_diff = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
    assert rel_diff <= 1e-5 if args.dtype == "float32" else 1e-12, ("disagree", rel_diff)
    for fn in impls.values():  # warm-up
        for _ in range(3):
            timed(fn, params, x_T, ts)
    wall = {name: [] for name in impls}
    cpu = {name: [] for name in impls}
    for _ in range(args.repeats):
        for name, fn in impls.items():  # alternate, so load drift hits both alike
            w, c = timed_both(fn, params, x_T, ts)
            wall[name].append(w)
            cpu[name].append(c)

    lib, ref = "jadeis.sample (DDIM)", "hand-written lax.scan DDIM"
    rows = []
    for name in impls:
        med = statistics.median(wall[name])
        q = np.percentile(wall[name], [25, 75])
        rows.append(
            {
                "implementation": name,
                "steps": args.steps,
                "batch": args.batch,
                "dim": args.dim,
                "hidden": args.hidden,
                "dtype": args.dtype,
                "repeats": args.repeats,
                "median_ms": round(1e3 * med, 3),
                "p25_ms": round(1e3 * q[0], 3),
                "p75_ms": round(1e3 * q[1], 3),
                "min_ms": round(1e3 * min(wall[name]), 3),
                "cpu_median_ms": round(1e3 * statistics.median(cpu[name]), 3),
                "compile_s": round(first[name] - med, 3),
            }
        )
    med = {name: statistics.median(wall[name]) for name in impls}
    overhead = {
        # ratio of the wall-time medians: the headline number
        "median": 100 * (med[lib] / med[ref] - 1),
        # median of paired per-repeat ratios: robust to slow drift of the machine load
        "paired": 100 * (statistics.median([a / b for a, b in zip(wall[lib], wall[ref])]) - 1),
        # process CPU time: insensitive to time spent descheduled on a shared machine
        "cpu": 100 * (statistics.median(cpu[lib]) / statistics.median(cpu[ref]) - 1),
        # fastest call: the least disturbed by other load
        "min": 100 * (min(wall[lib]) / min(wall[ref]) - 1),
    }
    verdict = "PASS" if overhead["median"] <= 5.0 else "ABOVE TARGET"

    for r in rows:
        print(
            f"{r['implementation']:<28} median {r['median_ms']:9.3f} ms  "
            f"[p25 {r['p25_ms']:.3f}, p75 {r['p75_ms']:.3f}, min {r['min_ms']:.3f}]  "
            f"cpu {r['cpu_median_ms']:.3f} ms  compile {r['compile_s']:.2f} s"
        )
    print(
        "overhead of sample: "
        + ", ".join(f"{k} {v:+.2f}%" for k, v in overhead.items())
        + f"  (outputs agree to {rel_diff:.1e} relative)"
    )
    print(f"target <= 5% (ratio of medians): {verdict}")
    if args.quick:
        return rows, overhead

    info = C.machine_info()
    RESULTS.mkdir(parents=True, exist_ok=True)
    extra = {f"overhead_{k}_pct": round(v, 2) for k, v in overhead.items()}
    C.write_csv(RESULTS / "sample_overhead.csv", [{**r, **extra} for r in rows])
    cmd = " ".join(sys.argv[1:]) or "defaults"
    lines = [
        "# `jadeis.sample` overhead over a hand-written `lax.scan` DDIM loop",
        "",
        f"Generated by `benchmarks/bench_sample.py` ({cmd}).",
        "",
        f"Model: MLP eps(x, t), dim {args.dim} + {args.emb}-dim sinusoidal time embedding, "
        f"hidden {args.hidden}, 3 dense layers (silu); batch {args.batch}; {args.dtype}; "
        f"VPLinear schedule, {args.steps}-step log-SNR grid, DDIM. Wall time of one full "
        f"sampling call (`block_until_ready`), {args.repeats} repeats after warm-up, the two "
        "implementations timed alternately. Compile = first call minus the median call "
        "(trace + lowering + XLA compile).",
        "",
        "| implementation | median (ms) | p25 (ms) | p75 (ms) | min (ms) | CPU median (ms) "
        "| compile (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['implementation']} | {r['median_ms']:.3f} | {r['p25_ms']:.3f} | "
            f"{r['p75_ms']:.3f} | {r['min_ms']:.3f} | {r['cpu_median_ms']:.3f} | "
            f"{r['compile_s']:.2f} |"
        )
    lines += [
        "",
        f"Overhead of `sample` over the hand-written loop: **{overhead['median']:+.2f}%** "
        f"(ratio of wall-time medians; target <= 5%: **{verdict}**). Cross-checks: median of "
        f"paired per-repeat ratios {overhead['paired']:+.2f}%, process CPU time "
        f"{overhead['cpu']:+.2f}%, fastest call {overhead['min']:+.2f}%. Outputs agree to "
        f"{rel_diff:.1e} (max abs difference / max abs value).",
        "",
        "## Machine",
        "",
    ]
    lines.append(C.machine_md(info))
    lines.append("")
    (RESULTS / "sample_overhead.md").write_text("\n".join(lines))
    print(f"wrote {RESULTS / 'sample_overhead.md'} and .csv")
    return rows, overhead


if __name__ == "__main__":
    main()
