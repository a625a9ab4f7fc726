"""Run the jadeis benchmark suite: ``python benchmarks/run.py`` (full: ~25-35 min on 2 cores,
of which ~10 the unet, whose gradients cost 3-15 s each there),
``python benchmarks/run.py --quick`` (a few minutes; the unet only on a GPU) or
``python benchmarks/run.py --gpu-quick`` (the headline cells, the conv U-Net included, within
a wall-clock budget, default 270 s; results in ``benchmarks/results/gpu-quick-<device>/``;
``--budget-s 30`` tries it on a CPU).

Writes to ``benchmarks/results/`` (``--quick``: ``benchmarks/results/quick/``): CSV files, a
Markdown summary (``summary.md``), PNG plots and ``machine.json`` (machine and versions).
``--dtype float32`` runs the methods in float32 (the references stay float64): sweep and
report only, into ``benchmarks/results/float32/``.

The jobs live in ``benchmarks/jobs/``, one module each; this script builds the problems,
runs the chosen jobs in order and writes their files:

  sweep    jobs/sweep.py          sweep.csv, references.csv
  compile  jobs/compile_times.py  compile.csv  (cold compile times, mlp problem)
  memory   jobs/memory.py         memory.csv   (compiled temp bytes vs N)
  e2e      jobs/e2e.py            e2e.csv      (Adam over x_T; needs the mlp sweep rows,
                                               read from sweep.csv when sweep is not run)
  grid     grid_study.py          grid_study.md (full runs only)

The "learned grid" methods read their grids from ``benchmarks/grids/<problem>.json``
(learned once, on other x_T than the benchmark's, by ``python benchmarks/grids.py``;
``--learn-grids`` relearns those of the chosen problems before the sweep).

Problems: gaussian, mixture, mlp, digits, unet (default: all; ``--quick``: gaussian, mixture,
mlp, and unet when JAX runs on a GPU; the unet's model calls cost ~0.1 s on 2 CPU cores).
  report   jobs/report.py         summary.md, *.png, machine.json

Methods are chosen by tags (``benchmarks/methods.py``): ``--methods discrete+dpmpp3,diffrax``
sweeps the methods tagged both "discrete" and "dpmpp3", and every diffrax method; ``+``
means all of, ``,`` means any of, ``!tag`` excludes. ``--list-methods`` prints every method
with its tags.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

jax.config.update("jax_enable_x64", True)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common as C  # noqa: E402
import methods as M  # noqa: E402
import problems as P  # noqa: E402
from jobs import compile_times, e2e, memory, report, sweep  # noqa: E402

log = C.log
JOBS = ("sweep", "compile", "memory", "e2e", "grid", "report")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few-minute version")
    ap.add_argument(
        "--gpu-quick",
        action="store_true",
        help="the headline cells (mixture, mlp, digits, unet at gradient errors 1e-2 and "
        "1e-3) with the methods tagged 'gpu-quick' (the unet: those tagged 'unet'), sweep "
        "and report only, within --budget-s of wall time; results in "
        "benchmarks/results/gpu-quick-<device kind>/",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="wall-clock budget of the whole run in seconds (--gpu-quick: 270 by default); "
        "each problem gets an equal share of what is left; within it the methods run one "
        "setting each in turn (cheapest first) until the share is spent",
    )
    ap.add_argument(
        "--problems", default=None, help="comma-separated: gaussian,mixture,mlp,digits,unet"
    )
    ap.add_argument(
        "--out", default=None, help="output folder (default benchmarks/results[/quick])"
    )
    ap.add_argument("--reps", type=int, default=None, help="timing repeats (median)")
    ap.add_argument(
        "--dtype",
        choices=("float64", "float32"),
        default="float64",
        help="precision of x_T, z and the parameters, so of every method's sampling and "
        "gradient (the references stay float64); float32: sweep and report only, results in "
        "benchmarks/results/float32/ (gradsolve, float64 only, is skipped)",
    )
    ap.add_argument(
        "--jobs", default=None, help=f"comma-separated, of {','.join(JOBS)} (default: all)"
    )
    ap.add_argument(
        "--methods",
        default=None,
        help="tag selector, e.g. 'discrete+dpmpp3,diffrax' (+: all of, ',': any of, !: not); "
        "the sweep runs exactly these on every problem, the other jobs their own methods "
        "restricted to these",
    )
    ap.add_argument("--list-methods", action="store_true", help="print methods and tags, exit")
    ap.add_argument(
        "--guidance-timing",
        action="store_true",
        help="time the dL/dx_T-only gradient at every setting (the guidance table; "
        "default: only at N=64 and tol=1e-5)",
    )
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--no-cache", action="store_true", help="no persistent compilation cache")
    ap.add_argument("--no-grid-study", action="store_true", help="skip grid_study.py (full)")
    ap.add_argument("--all-methods", action="store_true", help="also those tagged 'redundant'")
    ap.add_argument("--summarize", default=None, help="only rebuild summary/plots from a folder")
    ap.add_argument(
        "--learn-grids",
        action="store_true",
        help="relearn the chosen problems' grids (benchmarks/grids.py) before the sweep",
    )
    return ap.parse_args(argv)


GPU_QUICK_PROBLEMS = "mixture,mlp,digits,unet"
GPU_QUICK_BUDGET_S = 270.0


def device_slug() -> str:
    """The first JAX device's kind as a folder name (``NVIDIA H100 80GB HBM3`` ->
    ``nvidia-h100-80gb-hbm3``; ``cpu`` on a CPU)."""
    kind = getattr(jax.devices()[0], "device_kind", jax.default_backend())
    slug = "".join(c if c.isalnum() else "-" for c in str(kind).lower())
    return "-".join(p for p in slug.split("-") if p) or "unknown"


def default_out(args) -> Path:
    if args.out:
        return Path(args.out)
    if args.gpu_quick:
        return HERE / "results" / f"gpu-quick-{device_slug()}"
    base = HERE / "results" / ("quick" if args.quick else "")
    return base / "float32" if args.dtype == "float32" else base


def chosen_jobs(args):
    if (args.gpu_quick or args.dtype == "float32") and args.jobs is None:
        return {"sweep", "report"}
    jobs = set(JOBS if args.jobs is None else args.jobs.split(","))
    unknown = jobs - set(JOBS)
    if unknown:
        raise SystemExit(f"unknown job(s) {sorted(unknown)}; known: {', '.join(JOBS)}")
    if args.no_memory:
        jobs.discard("memory")
    if args.no_e2e:
        jobs.discard("e2e")
    if args.quick or args.gpu_quick or args.no_grid_study:
        jobs.discard("grid")
    return jobs


def main(argv=None):
    args = parse_args(argv)
    if args.list_methods:
        for m in M.all_methods():
            print(f"{m.name:42s} {','.join(sorted(m.tags))}")
        return None
    if args.summarize:
        return report.summarize(Path(args.summarize))
    t_start = time.time()
    if args.gpu_quick and args.quick:
        raise SystemExit("--gpu-quick and --quick are two different runs; choose one")
    jobs = chosen_jobs(args)
    args.reps = args.reps or (3 if (args.quick or args.gpu_quick) else 5)
    if args.gpu_quick and args.budget_s is None:
        args.budget_s = GPU_QUICK_BUDGET_S
    deadline = None if args.budget_s is None else time.perf_counter() + args.budget_s
    if not args.no_cache:
        # XLA's persistent compilation cache: a second run skips most compilation (the
        # cold compile times are measured separately, with the cache off)
        jax.config.update("jax_compilation_cache_dir", str(HERE / ".cache" / "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    out = default_out(args)
    out.mkdir(parents=True, exist_ok=True)
    if args.gpu_quick:
        default = GPU_QUICK_PROBLEMS
    elif args.quick:
        # the unet only where its model calls are cheap (a GPU): ~0.1 s each on 2 CPU cores
        default = "gaussian,mixture,mlp" + (",unet" if jax.default_backend() != "cpu" else "")
    else:
        default = "gaussian,mixture,mlp,digits,unet"
    names = (args.problems or default).split(",")
    if args.learn_grids:
        import grids  # noqa: PLC0415

        learnable = [n for n in names if n in grids.PLAN]
        log(f"learning time grids of {learnable} (benchmarks/grids.py):")
        grids.main(["--problems", ",".join(learnable)])
    info = C.machine_info(
        t_start,
        mode="gpu-quick" if args.gpu_quick else ("quick" if args.quick else "full"),
        device_kind=str(getattr(jax.devices()[0], "device_kind", "")),
        budget_s=args.budget_s,
        dtype=args.dtype,
        repeats=args.reps,
        jobs=sorted(jobs),
        methods=args.methods,
    )
    log(json.dumps(info, indent=1))

    all_ms = M.all_methods()
    if args.methods is not None:
        M.select(all_ms, args.methods)  # unknown tags: an error before any work
    if not args.all_methods:
        # dominated or redundant variants (kept in methods.py, run with --all-methods)
        all_ms = M.select(all_ms, "!redundant")
    needs_problems = jobs & {"sweep", "compile", "e2e"}
    problems = P.build_problems(names, quick=args.quick, log=log) if needs_problems else []
    if args.dtype != "float64":
        # the references are float64 solves; the methods run in the chosen precision
        problems = [P.cast_inputs(p, jnp.dtype(args.dtype)) for p in problems]

    rows = []
    if "sweep" in jobs:
        for i, p in enumerate(problems):
            ms = sweep.methods_for(
                p.name, all_ms, quick=args.quick, selector=args.methods, gpu_quick=args.gpu_quick
            )
            log(f"sweep {p.name}: {p.description}")
            budget = 10.0 if args.quick else 30.0
            reps = args.reps
            if p.name == "unet":
                # a gradient step costs ~0.4 s on 2 CPU cores (3.3 s per gradient at N = 8):
                # fewer repeats, and a budget that still reaches N = 32 (the 1e-3 cell)
                reps, budget = min(reps, 2), (20.0 if args.quick else 60.0)
            p_deadline = None
            if deadline is not None:
                # an equal share of the wall time left for each problem still to sweep
                left = max(0.0, deadline - time.perf_counter())
                p_deadline = time.perf_counter() + left / (len(problems) - i)
            rows += sweep.sweep_problem(
                p, ms, quick=args.quick, reps=reps, time_budget_s=budget,
                xT_all=args.guidance_timing, deadline=p_deadline, gpu_quick=args.gpu_quick,
            )
            C.write_csv(out / "sweep.csv", rows)
        ref_rows = sweep.reference_rows(problems)
        C.write_csv(out / "references.csv", ref_rows)
    else:
        rows = report.load_sweep(out)
        ref_rows = report.load_references(out)

    compile_rows = C.read_csv(out / "compile.csv")
    cp = next((p for p in problems if p.name == "mlp"), None)
    if "compile" in jobs and cp is not None:
        log("cold compile times (persistent cache off), mlp problem:")
        cms = M.select(all_ms, "compile-quick") if args.quick else all_ms
        if args.methods is not None:
            cms = [m for m in cms if M.matches(m, args.methods)]
        compile_rows = compile_times.compile_table(cp, cms)
        C.write_csv(out / "compile.csv", compile_rows)

    mem_rows = C.read_csv(out / "memory.csv")
    if "memory" in jobs:
        log("memory vs N:")
        mem_rows, _ = memory.memory_sweep(args.quick, selector=args.methods)
        C.write_csv(out / "memory.csv", mem_rows)

    e2e_rows = C.read_csv(out / "e2e.csv")
    e2e_problem = next((p for p in problems if p.name == "mlp"), None)
    if "e2e" in jobs and e2e_problem is not None:
        log("end to end (Adam over x_T on the mlp problem):")
        e2e_rows = e2e.e2e(
            e2e_problem,
            [r for r in rows if r["problem"] == "mlp"],
            quick=args.quick,
            selector=args.methods,
        )
        C.write_csv(out / "e2e.csv", e2e_rows)

    if "grid" in jobs:
        log("grid study (mixture):")
        import grid_study  # noqa: PLC0415

        grid_study.main()

    if "report" in jobs:
        pnames = [c["problem"] for c in ref_rows]
        report.plots(rows, mem_rows, out, pnames)
        info["peak_rss_mb"] = C.peak_rss_mb()
        if deadline is not None:
            info["budget_stops"] = list(sweep.BUDGET_STOPS)
        info["total_seconds"] = time.time() - t_start
        info["load_average_at_end"] = C.load_average()
        (out / "machine.json").write_text(json.dumps(info, indent=1) + "\n")
        report.write_summary(out, info, rows, mem_rows, e2e_rows, ref_rows, compile_rows)
    log(f"done in {time.time() - t_start:.0f}s; results in {out}")
    return None


if __name__ == "__main__":
    main()
