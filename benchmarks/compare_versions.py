"""Side-by-side timing of two jadeis source trees: ``sample`` and gradients.

    python benchmarks/compare_versions.py --old /work/wt-old/src --new src
    python benchmarks/compare_versions.py --old ... --new ... --rounds 1 --n 8 --reps 2 --small

Each round runs one fresh Python process per tree, alternating (old, new, old, new, ...), so
that machine-load drift and a warm or cold cache hit both trees alike. A process imports
jadeis from its tree only (``PYTHONPATH=<tree>``), builds the problems below (the same
arrays in every process) and times, round-robin within the process:

- ``sample``: the public call ``jadeis.sample(...)`` (as a user calls it; jadeis jits it
  itself) with DDIM and DPM-Solver++(2M): bench_sample.py's problem (the benchmark MLP
  without conditioning, batch 64, dim 128, hidden 512, 64-dim time embedding, float32),
  N steps on the log-SNR grid of VPLinear;
- gradients: ``jax.jit(jax.grad(loss o sample))`` with respect to params, x_T and z
  (loss mean(x_0^2)), DPM-Solver++(2M), with DiscreteAdjoint(), AdjointDEIS(order=2)
  (cached and reconstruct) and Backprop(): bench_gradient.py's "medium" problem (the
  benchmark MLP with an 8-dim conditioning vector, batch 64, dim 32, hidden 256, float32);
- the adaptive controller: ``sample`` and the DiscreteAdjoint gradient with
  ``Adaptive(DPMSolverPP(3))`` and ``Adaptive(SinglestepDPMSolver(3))`` at rtol = atol = TOL
  on the same problems (``ts`` the two end times; the API both trees share).

Per process: after a warm-up call, ``--reps`` batches of calls (each >= ``--min-batch-s``
seconds, synchronised with ``block_until_ready``), the median per call. Compile time is
separate: trace + lower + XLA compile for the gradients; first call minus the median call
for ``sample``. The report gives, per case, the median over rounds of each tree's
per-process medians, their ratio new/old, the median of the per-round paired ratios, and
the compile times; it is written to ``benchmarks/results/compare_versions.md`` (and the
per-process numbers to ``compare_versions.csv``). Target: new/old <= 1.05.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SAMPLE_CASES = (
    "sample DDIM",
    "sample DPM++(2M)",
    "sample adaptive DPM++(3M)",
    "sample adaptive DPM-Solver-23",
)
GRAD_CASES = (
    "grad DiscreteAdjoint",
    "grad AdjointDEIS-2 cached",
    "grad AdjointDEIS-2 reconstruct",
    "grad Backprop",
    "grad adaptive DPM++(3M) DiscreteAdjoint",
    "grad adaptive DPM-Solver-23 DiscreteAdjoint",
)
#: the adaptive cases' tolerance (both trees: ``Adaptive(inner, rtol=TOL, atol=TOL)``, ts the
#: two end times; the same accepted steps in both)
TOL = 1e-3
CASES = SAMPLE_CASES + GRAD_CASES
SIZES = {  # (batch, dim, hidden)
    "sample": (64, 128, 512),
    "grad": (64, 32, 256),
}
SMALL_SIZES = {"sample": (8, 16, 32), "grad": (8, 8, 32)}
SAMPLE_EMB, GRAD_EMB, ZDIM = 64, 16, 8


# ----------------------------------------------------------------------------------------
# Worker: one process, one tree


def worker(args) -> dict:
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    import common as C  # noqa: PLC0415
    import jadeis  # noqa: PLC0415

    src = Path(args.src).resolve()
    got = Path(jadeis.__file__).resolve()
    if src not in got.parents:
        raise SystemExit(f"jadeis imported from {got}, not from {src}")
    sizes = SMALL_SIZES if args.small else SIZES
    sch = jadeis.VPLinear()
    ts = jadeis.time_grid(sch, args.n, dtype=jnp.float32)

    # sample: bench_sample.py's problem (no conditioning)
    b, d, h = sizes["sample"]
    key = jax.random.key(0)
    scale = jax.random.uniform(jax.random.fold_in(key, 99), ())
    sp = C.init_mlp(
        key,
        [d + SAMPLE_EMB, h, h, d],
        jnp.float32,
        freqs=C.time_embedding_freqs(SAMPLE_EMB, 6.0, scale=scale),
    )
    sx = jax.random.normal(jax.random.key(1), (b, d), jnp.float32)

    def sample_fn(solver):
        def run(params, x_T, ts):
            return jadeis.sample(C.mlp_eps, params, x_T, None, schedule=sch, ts=ts, solver=solver)

        return run

    # gradients: bench_gradient.py's problem (conditioning vector z)
    b, d, h = sizes["grad"]
    gp = C.init_mlp(
        jax.random.key(0),
        [d + GRAD_EMB + ZDIM, h, h, d],
        jnp.float32,
        freqs=C.time_embedding_freqs(GRAD_EMB, 4.0),
    )
    gx = jax.random.normal(jax.random.key(1), (b, d), jnp.float32)
    gz = jax.random.normal(jax.random.key(2), (ZDIM,), jnp.float32)
    solver2 = jadeis.DPMSolverPP(order=2)

    def grad_fn(adjoint, solver=solver2, grid=ts):
        def loss(params, x_T, z):
            x0 = jadeis.sample(
                C.mlp_eps, params, x_T, z, schedule=sch, ts=grid, solver=solver, adjoint=adjoint
            )
            return jnp.mean(x0**2)

        return jax.grad(loss, argnums=(0, 1, 2))

    ends = jnp.asarray([sch.t_max, sch.t_min], jnp.float32)
    ad3 = jadeis.Adaptive(jadeis.DPMSolverPP(order=3), rtol=TOL, atol=TOL, max_steps=1024)
    ad23 = jadeis.Adaptive(
        jadeis.SinglestepDPMSolver(order=3), rtol=TOL, atol=TOL, max_steps=1024
    )

    fns, fargs, compile_s = {}, {}, {}
    for name, solver, grid in zip(
        SAMPLE_CASES, (jadeis.DDIM(), solver2, ad3, ad23), (ts, ts, ends, ends)
    ):
        fn = sample_fn(solver)
        wall, _ = C.timed_call(fn, sp, sx, grid)  # first call: trace + compile + run
        fns[name], fargs[name], compile_s[name] = fn, (sp, sx, grid), wall
    grads = (
        grad_fn(jadeis.DiscreteAdjoint()),
        grad_fn(jadeis.AdjointDEIS(order=2)),
        grad_fn(jadeis.AdjointDEIS(order=2, trajectory="reconstruct")),
        grad_fn(jadeis.Backprop()),
        grad_fn(jadeis.DiscreteAdjoint(), ad3, ends),
        grad_fn(jadeis.DiscreteAdjoint(), ad23, ends),
    )
    for name, fn in zip(GRAD_CASES, grads):
        compiled, seconds, _ = C.compile_timed(fn, (gp, gx, gz))
        fns[name], fargs[name], compile_s[name] = compiled, (gp, gx, gz), seconds

    calls = {n: C.calls_per_batch(fns[n], fargs[n], args.min_batch_s) for n in CASES}
    samples = {n: [] for n in CASES}
    for _ in range(args.reps):
        for n in CASES:  # round-robin: load drift within the process hits all cases alike
            samples[n].append(C.timed_batch(fns[n], fargs[n], calls[n]))
    out = {}
    for n in CASES:
        med = statistics.median(samples[n])
        value = fns[n](*fargs[n])
        leaves = [np.asarray(v, np.float64).ravel() for v in jax.tree.leaves(value)]
        out[n] = {
            "median_s": med,
            "min_s": min(samples[n]),
            "compile_s": compile_s[n] - (med if n in SAMPLE_CASES else 0.0),
            "calls_per_batch": calls[n],
            # a fingerprint of the result: both trees should compute the same numbers
            "checksum": [float(np.linalg.norm(v)) for v in leaves],
        }
    return {
        "src": str(src),
        "jadeis": jadeis.__version__,
        "commit": _commit(src),
        "peak_rss_mb": C.peak_rss_mb(),
        "cases": out,
    }


def _commit(src: Path) -> str:
    """The checkout's commit, with "+dirty" when files under ``src`` differ from it."""
    try:
        git = ["git", "-C", str(src)]
        run = lambda *a: subprocess.run(  # noqa: E731
            [*git, *a], capture_output=True, text=True, check=True
        ).stdout.strip()
        return run("rev-parse", "--short", "HEAD") + (
            "+dirty" if run("status", "--porcelain", ".") else ""
        )
    except Exception:  # noqa: BLE001 - not a git checkout
        return "?"


# ----------------------------------------------------------------------------------------
# Parent: alternate processes, aggregate, report


def run_worker(src: str, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--src",
        src,
        "--n",
        str(args.n),
        "--reps",
        str(args.reps),
        "--min-batch-s",
        str(args.min_batch_s),
        "--json-out",
        path,
    ] + (["--small"] if args.small else [])
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(src).resolve())  # this tree's jadeis, nothing else
    env.pop("JAX_ENABLE_X64", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker for {src} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    try:
        return json.loads(Path(path).read_text())
    finally:
        os.unlink(path)


def rel_diff(a, b) -> float:
    return max((abs(x - y) / max(abs(y), 1e-30) for x, y in zip(a, b)), default=0.0)


def report(args, results, info, t_total) -> tuple[str, list[dict]]:
    import common as C  # noqa: PLC0415

    old, new = results["old"], results["new"]
    csv_rows = []
    for tree in ("old", "new"):
        for i, r in enumerate(results[tree]):
            for case, v in r["cases"].items():
                csv_rows.append(
                    {
                        "tree": tree,
                        "round": i,
                        "src": r["src"],
                        "commit": r["commit"],
                        "case": case,
                        "N": args.n,
                        "median_ms": 1e3 * v["median_s"],
                        "min_ms": 1e3 * v["min_s"],
                        "compile_s": v["compile_s"],
                    }
                )
    rows, verdicts = [], []
    for case in CASES:
        o = [r["cases"][case]["median_s"] for r in old]
        n = [r["cases"][case]["median_s"] for r in new]
        mo, mn = statistics.median(o), statistics.median(n)
        paired = statistics.median(b / a for a, b in zip(o, n))
        co = statistics.median(r["cases"][case]["compile_s"] for r in old)
        cn = statistics.median(r["cases"][case]["compile_s"] for r in new)
        diff = rel_diff(new[0]["cases"][case]["checksum"], old[0]["cases"][case]["checksum"])
        ratio = mn / mo
        ok = ratio <= 1.05
        verdicts.append(ok)
        rows.append(
            (
                case,
                f"{1e3 * mo:.3f}",
                f"{1e3 * mn:.3f}",
                f"**{ratio:.3f}**",
                f"{paired:.3f}",
                f"{1e3 * min(o):.3f} / {1e3 * min(n):.3f}",
                f"{co:.2f} / {cn:.2f}",
                f"{diff:.1e}",
                "yes" if ok else "NO",
            )
        )
    sizes = SMALL_SIZES if args.small else SIZES
    lines = [
        "# `sample` and gradient timings: new tree versus old tree",
        "",
        f"Generated by `benchmarks/compare_versions.py` ({' '.join(sys.argv[1:])}); "
        f"{args.rounds} round(s) of one process per tree, alternating old, new; "
        f"{t_total:.0f} s in all.",
        "",
        f"- old: `{old[0]['src']}` (commit {old[0]['commit']}, jadeis {old[0]['jadeis']})",
        f"- new: `{new[0]['src']}` (commit {new[0]['commit']}, jadeis {new[0]['jadeis']})",
        f"- N = {args.n} steps (log-SNR grid, VPLinear), float32; `sample`: the benchmark MLP "
        f"(batch, dim, hidden) = {sizes['sample']}, {SAMPLE_EMB}-dim time embedding, no "
        f"conditioning (bench_sample.py); gradients: DPM-Solver++(2M), loss mean(x_0^2), "
        f"w.r.t. params, x_T, z, MLP {sizes['grad']} with an {ZDIM}-dim z "
        "(bench_gradient.py).",
        f"- per process: {args.reps} timed batches (>= {args.min_batch_s} s each) after a "
        "warm-up, cases round-robin; `sample` is the public call, gradients "
        "`jax.jit(jax.grad(...))` compiled ahead.",
        "",
        "Times per call in ms: median over rounds of each process's median. `paired` = "
        "median over rounds of new/old within the round. Compile (s) = trace + lower + "
        "XLA compile (gradients), first call minus median call (`sample`). `result diff` = "
        "largest relative difference of the outputs' norms between the trees (the same "
        "computation should give ~1e-7 in float32).",
        "",
    ]
    lines += C.md_table(
        (
            "case",
            "old (ms)",
            "new (ms)",
            "new / old",
            "paired",
            "fastest old / new (ms)",
            "compile old / new (s)",
            "result diff",
            "<= 1.05",
        ),
        rows,
    )
    lines += [
        "",
        f"Within 5% in every case: **{'yes' if all(verdicts) else 'NO'}**.",
        "",
        "## Machine",
        "",
        C.machine_md(info),
        "",
    ]
    return "\n".join(lines), csv_rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--old", help="old source tree (the folder holding jadeis/)")
    ap.add_argument("--new", help="new source tree (the folder holding jadeis/)")
    ap.add_argument("--rounds", type=int, default=5, help="processes per tree (default 5)")
    ap.add_argument("--n", type=int, default=64, help="sampling steps N (default 64)")
    ap.add_argument("--reps", type=int, default=15, help="timed batches per process")
    ap.add_argument("--min-batch-s", type=float, default=0.1, help="seconds per timed batch")
    ap.add_argument("--small", action="store_true", help="tiny models (smoke test only)")
    ap.add_argument(
        "--out",
        default=str(HERE / "results" / "compare_versions.md"),
        help="Markdown report (a .csv of every process's numbers goes beside it)",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--json-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        res = worker(args)
        Path(args.json_out).write_text(json.dumps(res))
        return
    if not (args.old and args.new):
        ap.error("--old and --new are required")
    for src in (args.old, args.new):
        if not (Path(src) / "jadeis" / "__init__.py").is_file():
            ap.error(f"{src} has no jadeis/__init__.py")
    import common as C  # noqa: PLC0415

    t0 = time.time()
    info = C.machine_info(t0)  # this (parent) process: versions of jax etc.
    for k in ("jadeis", "jadeis_path"):
        info.pop(k, None)
    results = {"old": [], "new": []}
    for i in range(args.rounds):
        for tree in ("old", "new"):
            r = run_worker(getattr(args, tree), args)
            results[tree].append(r)
            summary = ", ".join(
                f"{c.split(' ', 1)[1]} {1e3 * v['median_s']:.2f}" for c, v in r["cases"].items()
            )
            C.log(f"round {i + 1}/{args.rounds} {tree}: {summary} (ms)")
    info["load_average_at_end"] = C.load_average()
    md, csv_rows = report(args, results, info, time.time() - t0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    C.write_csv(out.with_suffix(".csv"), csv_rows, float_format=".6g")
    print(md)
    C.log(f"wrote {out} and {out.with_suffix('.csv')}")


if __name__ == "__main__":
    main()
