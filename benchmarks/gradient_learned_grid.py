"""Report of the gradient-learned time grids (``learn_time_grid(target="gradient")``) on the
mixture: ``benchmarks/results/gradient_learned_grid.md`` (+ ``.png`` and the sweep's rows,
``.csv``) from a sweep run into a scratch folder, e.g.::

    python benchmarks/grids.py --target gradient          # the grids (~10 min, 2 cores)
    python benchmarks/run.py --problems mixture --jobs sweep --reps 5 --out /tmp/gg \\
        --methods "learned,discrete+dpmpp3+fixed,discrete+unipc3,backprop+dpmpp3,\\
adaptive+jadeis+!redundant,adjointdeis+dpm3+cached,diffrax+tsit5+t"
    python benchmarks/gradient_learned_grid.py /tmp/gg --command "..."

Compares, in that one run (same process, medians of the repeats), each method's time to
the headline gradient errors 1e-2 and 1e-3 (interpolated as in ``summary.md``) with
diffrax's best, and the gradient-learned grids with the best other jadeis method.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from jobs import report as R  # noqa: E402

RESULTS = HERE / "results"
TAG = "grad-learned grid"
EPS = (1e-2, 1e-3)
PROBLEM = "mixture"


def best(rows, pred, eps, tkey):
    """(seconds, row) of the fastest method among rows with ``pred(name)`` to ``eps``."""
    out = None
    for name in sorted({r["method"] for r in rows if pred(r)}):
        got = R.time_at([r for r in rows if r["method"] == name], eps, tkey)
        if got is not None and (out is None or got[0] < out[0]):
            out = got
    return out


def fmt(got):
    if got is None:
        return "not reached"
    t, r = got
    s = f"N={r['setting']}" if r["variable"] == "N" else f"tol={r['setting']:g}"
    return f"{t * 1e3:.2f} ms ({r['method']}; {s})"


def ratio(a, b):
    return "n/a" if a is None or b is None else f"{a[0] / b[0]:.2f}"


def headline_rows(rows, out, is_new, is_old, is_diffrax):
    """The headline table's rows (one per target error) of a run; ratios into ``out``."""
    lines = []
    for eps in EPS:
        new, old, dfx = (best(rows, p, eps, "t_grad_s") for p in (is_new, is_old, is_diffrax))
        newc, oldc, dfxc = (
            best(rows, p, eps, "t_grad_cpu_s") for p in (is_new, is_old, is_diffrax)
        )
        out[eps] = {
            "new": ratio(new, dfx),
            "old": ratio(old, dfx),
            "new_cpu": ratio(newc, dfxc),
            "old_cpu": ratio(oldc, dfxc),
        }
        lines.append(
            f"| {eps:g} | {fmt(new)} | {fmt(old)} | {fmt(dfx)} | {ratio(new, dfx)} | "
            f"{ratio(old, dfx)} | {ratio(newc, dfxc)} | {ratio(oldc, dfxc)} |"
        )
    return lines


def result_text(rows, is_new, is_old):
    """The run's verdict in words: the gradient-learned grids against the best other jadeis
    method and against the same sampler on the log-SNR and the x_0-learned grid."""
    parts = []
    for eps in EPS:
        new = best(rows, is_new, eps, "t_grad_s")
        old = best(rows, is_old, eps, "t_grad_s")
        if new is None or old is None:
            parts.append(f"at {eps:g}: {'not reached' if new is None else 'no other jadeis'}")
            continue
        name = new[1]["method"]
        base = name.replace(" " + TAG, "")
        same = {
            "log-SNR": R.time_at([r for r in rows if r["method"] == base], eps),
            "x_0-learned": R.time_at(
                [r for r in rows if r["method"] == base + " learned grid"], eps
            ),
        }
        vs = ", ".join(
            f"{k} grid {'not reached' if v is None else f'{v[0] * 1e3:.2f} ms'}"
            for k, v in same.items()
        )
        verdict = "faster" if new[0] < old[0] else "slower"
        parts.append(
            f"at {eps:g}: {name} {new[0] * 1e3:.2f} ms ({vs}), {verdict} than the best other "
            f"jadeis method, {old[1]['method']} {old[0] * 1e3:.2f} ms (ratio "
            f"{new[0] / old[0]:.2f})"
        )
    return "Result of this run: " + "; ".join(parts) + "."


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("folder", help="the sweep's --out folder (sweep.csv, machine.json)")
    ap.add_argument("--command", default="", help="the command that produced the sweep")
    ap.add_argument("--load", default="", help="machine load during the run (free text)")
    ap.add_argument(
        "--repeat",
        action="append",
        default=[],
        help="FOLDER=COMMAND of a repeat sweep (a subset of the methods): its headline too",
    )
    args = ap.parse_args(argv)
    folder = Path(args.folder)
    rows = [r for r in R.load_sweep(folder) if r["problem"] == PROBLEM]
    info = json.loads((folder / "machine.json").read_text())
    grids = json.loads((HERE / "grids" / f"{PROBLEM}.json").read_text())

    def is_diffrax(r):
        return r["family"] == "diffrax"

    def is_new(r):
        return r["family"] == "jadeis" and r["method"].endswith(TAG)

    def is_old(r):
        return r["family"] == "jadeis" and not r["method"].endswith(TAG)

    md = [
        "# Time grids learned against the gradient error (mixture)",
        "",
        '`jadeis.learn_time_grid(..., target="gradient", sample_loss=..., wrt=("x_T", '
        '"z", "params"))` fits the grid so that the N-step gradient of a guidance loss '
        "matches a many-step reference gradient (`benchmarks/grids.py --target gradient`: "
        f"{grids['settings_gradient']['learn']}; training inputs "
        f"{grids['settings_gradient']['train_inputs']}; reference "
        f'{grids["settings_gradient"]["reference"]}). The x_0-learned grids ("learned grid") '
        "are the existing ones (`benchmarks/grids.py`, fitted to x_0).",
        "",
        f"Run: {info['date_utc']} UTC, {info['cpu']}, {info['cpu_count']} cores (shared with "
        f"another engineer's test runs), jax {info['jax']}, diffrax {info['diffrax']}; "
        f"float64; medians of {info['repeats']} repeats after warm-up; load average "
        f"{info['load_average_at_start']} at the start -> {info['load_average_at_end']} at "
        f"the end{'; ' + args.load if args.load else ''}.",
        "",
        f"Command: `{args.command}`" if args.command else "",
        "",
        "## Time to gradient error 1e-2 and 1e-3 (this run)",
        "",
        "| grad. error | gradient-learned best | best other jadeis | diffrax best | "
        "new / diffrax | previous jadeis / diffrax | new / diffrax, CPU | previous / "
        "diffrax, CPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    headline = {}
    md += headline_rows(rows, headline, is_new, is_old, is_diffrax)
    md += ["", result_text(rows, is_new, is_old)]
    md += [
        "",
        "Times are wall-clock medians interpolated log-log between the settings around the "
        "target (as in `summary.md`); the CPU columns use each side's best method by process "
        "CPU time. Target of the issue: jadeis / diffrax <= 0.33.",
    ]
    md += [
        "",
        "### Every method's time to the targets (this run)",
        "",
        "| method | time to 1e-2 (ms) | time to 1e-3 (ms) | / diffrax best at 1e-2 | "
        "/ diffrax best at 1e-3 |",
        "|---|---|---|---|---|",
    ]
    dbest = {eps: best(rows, is_diffrax, eps, "t_grad_s") for eps in EPS}
    per = []
    for name in sorted({r["method"] for r in rows}):
        got = {eps: R.time_at([r for r in rows if r["method"] == name], eps) for eps in EPS}
        per.append((got[EPS[0]][0] if got[EPS[0]] else float("inf"), name, got))
    for _, name, got in sorted(per):
        cells = ["not reached" if got[eps] is None else f"{got[eps][0] * 1e3:.2f}" for eps in EPS]
        rats = [ratio(got[eps], dbest[eps]) for eps in EPS]
        md.append(f"| {name} | {cells[0]} | {cells[1]} | {rats[0]} | {rats[1]} |")
    for spec in args.repeat:
        rfolder, _, rcmd = spec.partition("=")
        rrows = [r for r in R.load_sweep(Path(rfolder)) if r["problem"] == PROBLEM]
        rinfo = json.loads((Path(rfolder) / "machine.json").read_text())
        rnames = sorted({r["method"] for r in rrows})
        md += [
            "",
            f"### Repeat: {rinfo['date_utc']} UTC, load average "
            f"{rinfo['load_average_at_start']} -> {rinfo['load_average_at_end']}",
            "",
            f"Command: `{rcmd}`" if rcmd else "",
            "",
            f"Methods: {', '.join(rnames)}.",
            "",
            "| grad. error | gradient-learned best | best other jadeis | diffrax best | "
            "new / diffrax | previous jadeis / diffrax | new / diffrax, CPU | previous / "
            "diffrax, CPU |",
            "|---|---|---|---|---|---|---|---|",
        ]
        headline[f"repeat {rfolder}"] = {}
        md += headline_rows(rrows, headline[f"repeat {rfolder}"], is_new, is_old, is_diffrax)
    md += [
        "",
        "## Every setting of the DPM++(3M) and UniPC(3) grids",
        "",
        "ratio to diffrax: this setting's wall time over diffrax's best time to the same "
        "gradient error (interpolated; n/a where diffrax did not reach it).",
        "",
        "| method | N | grad. error | x_0 error | time (ms) | CPU time (ms) | ratio to diffrax |",
        "|---|---|---|---|---|---|---|",
    ]
    shown = [
        n
        for n in sorted({r["method"] for r in rows})
        if ("DPM++(3M)" in n or "UniPC(3)" in n) and n.startswith("DiscreteAdjoint")
    ]
    for name in shown:
        for r in sorted((r for r in rows if r["method"] == name), key=lambda r: r["setting"]):
            d = best(rows, is_diffrax, r["err_grad"], "t_grad_s")
            rt = "n/a" if d is None else f"{r['t_grad_s'] / d[0]:.2f}"
            md.append(
                f"| {name} | {r['setting']} | {r['err_grad']:.2e} | {r['err_x0']:.2e} | "
                f"{r['t_grad_s'] * 1e3:.2f} | {r['t_grad_cpu_s'] * 1e3:.2f} | {rt} |"
            )
    md += [
        "",
        "## The other methods of the run",
        "",
        "| method | setting | grad. error | x_0 error | time (ms) | CPU time (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for name in sorted({r["method"] for r in rows} - set(shown)):
        for r in (r for r in rows if r["method"] == name):
            md.append(
                f"| {name} | {r['setting']} | {r['err_grad']:.2e} | {r['err_x0']:.2e} | "
                f"{r['t_grad_s'] * 1e3:.2f} | {r['t_grad_cpu_s'] * 1e3:.2f} |"
            )
    md += [
        "",
        "## Held-out validation of the grids (benchmarks/grids.py)",
        "",
        grids["settings_gradient"]["validation_inputs"] + "; median over the batches.",
        "",
        "| sampler | N | log-SNR grid | x_0-learned grid | gradient-learned grid | "
        "train loss before -> after | seconds to learn |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, entries in sorted(grids["grids"].items()):
        if not key.endswith("-grad"):
            continue
        for n, e in entries.items():
            x0l = e.get("valid_grad_rel_err_x0_learned_median")
            md.append(
                f"| {e['sampler']} | {n} | {e['valid_grad_rel_err_logsnr_median']:.2e} | "
                f"{'n/a' if x0l is None else f'{x0l:.2e}'} | "
                f"{e['valid_grad_rel_err_learned_median']:.2e} | "
                f"{e['train_loss_initial']:.2e} -> {e['train_loss_final']:.2e} | {e['seconds']} |"
            )
    md += ["", "![gradient error vs time](gradient_learned_grid.png)", ""]
    out_md = RESULTS / "gradient_learned_grid.md"
    out_md.write_text("\n".join(md))
    shutil.copyfile(folder / "sweep.csv", RESULTS / "gradient_learned_grid.csv")
    plot(rows, RESULTS / "gradient_learned_grid.png")
    print(json.dumps(headline, indent=1))
    print(f"wrote {out_md}")


def plot(rows, path):
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    import matplotlib.ticker  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(12, 6.2), sharey=True)
    for ax, solver in zip(axes, ("DPM++(3M)", "UniPC(3)"), strict=True):
        lines = [
            (f"DiscreteAdjoint {solver}", "log-SNR grid", "C0", "o"),
            (f"DiscreteAdjoint {solver} learned grid", "x_0-learned grid", "C1", "s"),
            (f"DiscreteAdjoint {solver} {TAG}", "gradient-learned grid", "C2", "D"),
        ]
        if solver == "DPM++(3M)":
            lines.append(("DiscreteAdjoint DPM++(3M) quadratic grid", "quadratic grid", "C4", "v"))
        for name, label, color, marker in lines:
            rs = sorted((r for r in rows if r["method"] == name), key=lambda r: r["setting"])
            if rs:
                ax.loglog(
                    [r["t_grad_s"] * 1e3 for r in rs],
                    [r["err_grad"] for r in rs],
                    marker=marker,
                    color=color,
                    label=label,
                )
                for r in rs:
                    ax.annotate(
                        str(r["setting"]),
                        (r["t_grad_s"] * 1e3, r["err_grad"]),
                        fontsize=7,
                        textcoords="offset points",
                        xytext=(3, 3),
                    )
        for name, color in (
            ("Adaptive DPM-Solver-23 (data)", "C3"),
            ("Adaptive DPM-Solver-23 (data) per-example", "C5"),
        ):
            rs = sorted((r for r in rows if r["method"] == name), key=lambda r: r["t_grad_s"])
            if rs:
                ax.loglog(
                    [r["t_grad_s"] * 1e3 for r in rs],
                    [r["err_grad"] for r in rs],
                    ":",
                    marker="+",
                    color=color,
                    label=f"jadeis {name}",
                )
        for k, name in enumerate(sorted({r["method"] for r in rows if r["family"] == "diffrax"})):
            rs = sorted((r for r in rows if r["method"] == name), key=lambda r: r["t_grad_s"])
            ax.loglog(
                [r["t_grad_s"] * 1e3 for r in rs],
                [r["err_grad"] for r in rs],
                "--",
                marker="x",
                color=("k", "0.5")[k % 2],
                label=name,
            )
        for eps in EPS:
            ax.axhline(eps, color="0.8", lw=0.8, zorder=0)
        ax.set_title(f"mixture: jadeis {solver} (DiscreteAdjoint) vs diffrax")
        ax.set_xlabel("wall time per gradient (ms, median)")
        ax.grid(True, which="both", alpha=0.3)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks([0.3, 0.5, 1, 2, 3, 5, 10])
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    axes[0].set_ylabel("relative gradient error (max of x_T, z, params)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
