"""Learned time grids on the bundled digits model.

``python benchmarks/learned_grid.py`` (about 3-4 minutes on 2 shared CPU cores) writes
``results/learned_grid.md`` and ``results/learned_grid.png``.

For each sampler (DDIM, DPM-Solver++(2M), DPM-Solver++(3M)) and N in (5, 8, 10):

- the four spacings of ``jadeis.time_grid`` (logsnr, time, quadratic, karras);
- a grid learned with ``learn_time_grid`` (started from the log-SNR grid, default Adam,
  100 iterations) on a *training* batch of initial noises and conditionings;

all evaluated on a *held-out* batch: error = RMSE of x_0 against a many-step reference
(DPM-Solver++(3M), N = 1000, log-SNR grid, the same end points). The headline
configuration (DPM-Solver++(2M), N = 8) is learned from three independent training batches.
The digits network computes in float32, so everything runs in float32.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common as C  # noqa: E402
import jadeis  # noqa: E402
from jadeis.digits import load_denoiser  # noqa: E402

try:
    learn_time_grid = jadeis.learn_time_grid
except AttributeError:  # before the export lands in jadeis/__init__.py
    from jadeis._learned_grid import learn_time_grid

HERE = Path(__file__).resolve().parent
SPACINGS = ("logsnr", "time", "quadratic", "karras")
SOLVERS = {
    "DDIM": jadeis.DDIM(),
    "DPM-Solver++(2M)": jadeis.DPMSolverPP(order=2),
    "DPM-Solver++(3M)": jadeis.DPMSolverPP(order=3),
}
HEADLINE = ("DPM-Solver++(2M)", 8)
DTYPE = jnp.float32


log = C.log


def machine_info(t_start):
    return C.machine_info(t_start)


def batch(model, seed, size):
    """Initial noises and the conditionings of random digits."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    x_T = jax.random.normal(k1, (size, 8, 8), DTYPE)
    labels = np.asarray(jax.random.randint(k2, (size,), 0, 10))
    return x_T, jnp.asarray(model.z_for(labels), DTYPE)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--iters", type=int, default=100, help="optimiser iterations per grid")
    ap.add_argument("--train", type=int, default=64, help="training batch size")
    ap.add_argument("--test", type=int, default=256, help="held-out batch size")
    ap.add_argument("--ref-steps", type=int, default=1000)
    ap.add_argument("--steps", type=int, nargs="+", default=[5, 8, 10])
    args = ap.parse_args(argv)
    t_start = time.time()
    info = machine_info(t_start)
    log(info)

    model = load_denoiser()
    sch, eps_fn, params = model.schedule, model.eps_fn, model.params
    train_sets = [batch(model, seed, args.train) for seed in (0, 1, 2)]
    x_te, z_te = batch(model, 100, args.test)

    def run(x_T, z, ts, solver):
        return jadeis.sample(eps_fn, params, x_T, z, schedule=sch, ts=ts, solver=solver)

    def reference(x_T, z, steps):
        ts = jadeis.time_grid(sch, steps, dtype=DTYPE)
        return run(x_T, z, ts, jadeis.DPMSolverPP(order=3))

    t0 = time.perf_counter()
    ref_te = reference(x_te, z_te, args.ref_steps)
    ref_tr = [reference(x, z, args.ref_steps) for x, z in train_sets]
    ref_half = reference(x_te, z_te, args.ref_steps // 2)
    ref_err = float(jnp.sqrt(jnp.mean((ref_half - ref_te) ** 2)))
    log(
        f"references: {time.perf_counter() - t0:.1f} s; N={args.ref_steps // 2} vs "
        f"N={args.ref_steps}: RMSE {ref_err:.2e}"
    )

    def rmse(ts, solver, x_T=x_te, z=z_te, ref=ref_te):
        return float(jnp.sqrt(jnp.mean((run(x_T, z, ts, solver) - ref) ** 2)))

    def learn(solver, n, k, init="logsnr"):
        x_T, z = train_sets[k]
        t = time.perf_counter()
        res = learn_time_grid(
            eps_fn,
            params,
            x_T,
            z,
            schedule=sch,
            n=n,
            init=init,
            solver=solver,
            reference=ref_tr[k],
            num_iters=args.iters,
        )
        res.ts.block_until_ready()
        return res, time.perf_counter() - t

    rows, grids, sample_times = [], {}, {}
    for sname, solver in SOLVERS.items():
        for n in args.steps:
            spacing_err = {
                sp: rmse(jadeis.time_grid(sch, n, sp, dtype=DTYPE), solver) for sp in SPACINGS
            }
            best = min(spacing_err, key=spacing_err.get)
            # the spacing a user would start from: the best one on the *training* batch
            train_err = {
                sp: rmse(
                    jadeis.time_grid(sch, n, sp, dtype=DTYPE), solver, *train_sets[0], ref_tr[0]
                )
                for sp in SPACINGS
            }
            init_best = min(train_err, key=train_err.get)
            res_b, secs_b = learn(solver, n, 0, init_best)
            learned_b = rmse(res_b.ts, solver)
            reps = 3 if (sname, n) == HEADLINE else 1
            learned, train_s, train_rmse = [], [], []
            for k in range(reps):
                res, secs = learn(solver, n, k)
                learned.append(rmse(res.ts, solver))
                train_s.append(secs)
                train_rmse.append(float(np.sqrt(res.losses[-1])))
                grids[(sname, n, k)] = np.asarray(res.ts)
            if (sname, n) == HEADLINE:
                # median time of one 8-step sample of the held-out batch, learned vs log-SNR grid
                # one N-step sample of the held-out batch on the learned vs the log-SNR grid:
                # the same compiled function, calls interleaved (the machine is shared)
                f = jax.jit(lambda x, z, ts, solver=solver: run(x, z, ts, solver))
                both = {"learned": res.ts, "logsnr": jadeis.time_grid(sch, n, dtype=DTYPE)}
                jax.block_until_ready(f(x_te, z_te, both["logsnr"]))
                ss = {label: [] for label in both}
                for _ in range(15):
                    for label, ts in both.items():
                        t = time.perf_counter()
                        jax.block_until_ready(f(x_te, z_te, ts))
                        ss[label].append(time.perf_counter() - t)
                sample_times = {label: statistics.median(v) for label, v in ss.items()}
            longer = None
            if statistics.median(learned) >= spacing_err[best]:
                # not better than the best spacing: does a longer optimisation get there?
                x_T, z = train_sets[0]
                res_l = learn_time_grid(
                    eps_fn,
                    params,
                    x_T,
                    z,
                    schedule=sch,
                    n=n,
                    solver=solver,
                    reference=ref_tr[0],
                    num_iters=3 * args.iters,
                )
                longer = (3 * args.iters, rmse(res_l.ts, solver))
            row = dict(
                solver=sname,
                n=n,
                **spacing_err,
                best=best,
                learned=statistics.median(learned),
                learned_all=learned,
                train_rmse=statistics.median(train_rmse),
                ratio=statistics.median(learned) / spacing_err[best],
                train_s=statistics.median(train_s),
                init_best=init_best,
                learned_b=learned_b,
                ratio_b=learned_b / spacing_err[best],
                train_s_b=secs_b,
                longer=longer,
            )
            rows.append(row)
            log(
                f"{sname} N={n}: "
                + ", ".join(f"{k} {v:.4f}" for k, v in spacing_err.items())
                + f" | learned {row['learned']:.4f} (ratio {row['ratio']:.2f}, "
                f"train {row['train_s']:.1f} s) | from {init_best}: {learned_b:.4f} "
                f"(ratio {row['ratio_b']:.2f})"
            )

    total = time.time() - t_start
    info["load_average_at_end"] = C.load_average()
    info["total_seconds"] = round(total, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    write_markdown(args, info, rows, grids, sample_times, ref_err, sch)
    plot(args.out / "learned_grid.png", rows, grids, sch, args.steps)
    log(f"done in {total:.0f} s")


def fmt(v):
    return f"{v:.4f}"


def write_markdown(args, info, rows, grids, sample_times, ref_err, sch):
    head = next(r for r in rows if (r["solver"], r["n"]) == HEADLINE)
    md = [
        "# Learned time grids on the digits model (generated by benchmarks/learned_grid.py)",
        "",
        "`learn_time_grid` fits the N + 1 sampling times of a solver to a "
        "many-step reference. Bundled digits denoiser (`jadeis.digits.load_denoiser()`, "
        "`VPLinear()` schedule, conditioning `z_for(label)` of random digits), float32. "
        f"Grids are learned on a training batch of {args.train} initial noises (default Adam: lr "
        f"0.05 cosine-decayed to 0.005, {args.iters} iterations, started from the log-SNR grid, "
        "gradients by `Backprop()`), and evaluated on a held-out batch of "
        f"{args.test} other noises and digits. Error: RMSE of x_0 (pixels in [-1, 1]) against "
        f"DPM-Solver++(3M) with N = {args.ref_steps} log-SNR steps; the reference's own error "
        f"(N = {args.ref_steps // 2} vs {args.ref_steps}) is {ref_err:.1e}. All grids run from "
        "t = 1 to t = 1e-3.",
        "",
        f"## Headline: {HEADLINE[0]}, N = {HEADLINE[1]}",
        "",
        "| grid | held-out RMSE |",
        "|---|---|",
    ]
    for sp in SPACINGS:
        md.append(f"| `time_grid(..., {sp!r})` | {fmt(head[sp])} |")
    md += [
        f"| learned (median of 3 training batches) | **{fmt(head['learned'])}** |",
        "",
        f"Learned / best spacing ({head['best']}): **{head['ratio']:.2f}**. Each of the three "
        "independent training batches: "
        + ", ".join(fmt(v) for v in head["learned_all"])
        + f". Training RMSE (median) {fmt(head['train_rmse'])}. Median training wall time "
        f"{head['train_s']:.1f} s ({args.iters} iterations, compile included). A learned grid "
        "is only different data for the same compiled sampler: one 8-step sample of the "
        "held-out batch takes "
        f"{1e3 * sample_times['learned']:.1f} ms (learned) vs "
        f"{1e3 * sample_times['logsnr']:.1f} ms (log-SNR grid), medians of 15 interleaved calls.",
        "",
        "Learned grid (times): "
        + ", ".join(f"{t:.4f}" for t in grids[(*HEADLINE, 0)])
        + "; log-SNR grid: "
        + ", ".join(f"{t:.4f}" for t in np.asarray(jadeis.time_grid(sch, HEADLINE[1])))
        + ".",
        "",
        "## All samplers and step counts",
        "",
        "Two learned grids per row: from the log-SNR grid (the default `init`), and from the "
        "spacing with the lowest error on the training batch (`init=` that spacing). "
        '"learned / best" divides by the best spacing\'s held-out error.',
        "",
        "| sampler | N | logsnr | time | quadratic | karras | best spacing | learned (logsnr "
        "init) | learned / best | train RMSE | train time (s) | init: best on train | learned "
        "(that init) | learned / best |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['solver']} | {r['n']} | "
            + " | ".join(fmt(r[sp]) for sp in SPACINGS)
            + f" | {r['best']} | {fmt(r['learned'])} | {r['ratio']:.2f} | "
            f"{fmt(r['train_rmse'])} | {r['train_s']:.1f} | {r['init_best']} | "
            f"{fmt(r['learned_b'])} | {r['ratio_b']:.2f} |"
        )
    md += [
        "",
        *notes(rows, args.iters),
        "Train RMSE: of the logsnr-init grid on its training batch. "
        "Train time: wall time of one `learn_time_grid` call (the reference is given; "
        "compilation included), the median of 3 for the headline row. "
        "Plot: `learned_grid.png` (held-out RMSE against N for each sampler; the N = 8 grids "
        "in log-SNR).",
        "",
        "## Machine",
        "",
    ]
    md += [f"- {k}: {v}" for k, v in info.items()]
    (args.out / "learned_grid.md").write_text("\n".join(md) + "\n")


def notes(rows, iters):
    """Where a learned grid does not beat the best spacing, say so (generated)."""
    out = []
    for r in rows:
        for key, label in (("ratio", "logsnr init"), ("ratio_b", f"{r['init_best']} init")):
            if r[key] >= 1.0:
                out.append(
                    f"- {r['solver']}, N = {r['n']}: the grid learned from the {label} does "
                    f"*not* beat the best spacing ({r['best']}), ratio {r[key]:.2f}: "
                    f"{iters} iterations do not reach a good grid from a start this poor "
                    f"(logsnr {r['logsnr']:.2f} vs {r['best']} {r[r['best']]:.2f})."
                )
                if key == "ratio" and r["longer"] is not None:
                    its, err = r["longer"]
                    out[-1] += (
                        f" With {its} iterations (same init, first training batch) the "
                        f"learned grid reaches {err:.4f}, ratio {err / r[r['best']]:.2f}."
                    )
    if not out:
        out.append("- Every learned grid beats the best spacing on held-out noise.")
    return [*out, ""]


def plot(path, rows, grids, sch, steps):
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, len(SOLVERS) + 1, figsize=(4.2 * (len(SOLVERS) + 1), 3.8))
    for ax, sname in zip(axes, SOLVERS):
        rs = [r for r in rows if r["solver"] == sname]
        ns = [r["n"] for r in rs]
        for sp in SPACINGS:
            ax.plot(ns, [r[sp] for r in rs], "o--", label=sp, alpha=0.8)
        ax.plot(ns, [r["learned"] for r in rs], "k*-", ms=10, label="learned (logsnr init)")
        ax.plot(ns, [r["learned_b"] for r in rs], "r^-", ms=7, label="learned (best init)")
        ax.set_yscale("log")
        ax.set_xticks(ns)
        ax.set_xlabel("steps N")
        ax.set_ylabel("held-out RMSE of x_0")
        ax.set_title(sname)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    ax = axes[-1]
    n = HEADLINE[1]
    lam = lambda ts: np.asarray(sch.log_snr(jnp.asarray(ts)))  # noqa: E731
    series = [(sp, jadeis.time_grid(sch, n, sp)) for sp in SPACINGS]
    series.append(("learned", grids[(*HEADLINE, 0)]))
    for i, (label, ts) in enumerate(series):
        ax.plot(lam(ts), np.full(n + 1, i), "k*" if label == "learned" else "o", ms=7)
    ax.set_yticks(range(len(series)), [s for s, _ in series])
    ax.set_xlabel("log-SNR lambda of the grid points")
    ax.set_title(f"{HEADLINE[0]}, N = {n} grids")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
