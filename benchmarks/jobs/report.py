"""Job ``report``: the Markdown summary (``summary.md``) and the plots (``pareto_*.png``,
``evals_*.png``, ``memory_vs_steps.png``) from the rows of the other jobs, or, with
``run.py --summarize FOLDER``, from the CSV files of a finished run."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np

import common as C

log = C.log
read_csv = C.read_csv
TARGET_EPS = (1e-2, 1e-3)  # the gradient errors of the headline table


def time_at(rs, eps, tkey="t_grad_s", ekey="err_grad"):
    """Wall time at which one method's error-vs-time front first reaches ``eps``.

    Log-log interpolation between the last front point above ``eps`` and the first at or
    below it (the step counts and tolerances are a factor ~2-10 apart). Returns
    ``(seconds, first row reaching eps)`` or None. ``tkey``/``ekey``: the time and error
    columns (default: the full gradient; ``"t_grad_xT_s"``/``"err_xT"``: dL/dx_T only)."""
    pts = sorted((r for r in rs if _finite(r.get(tkey))), key=lambda r: r[tkey])
    front, best = [], float("inf")
    for r in pts:
        if r[ekey] < best:
            front.append(r)
            best = r[ekey]
    for i, r in enumerate(front):
        if r[ekey] <= eps:
            if i == 0:
                return r[tkey], r
            q = front[i - 1]
            le, l0, l1 = math.log(eps), math.log(q[ekey]), math.log(r[ekey])
            w = (le - l0) / (l1 - l0)
            t = math.exp((1 - w) * math.log(q[tkey]) + w * math.log(r[tkey]))
            return t, r
    return None


def best_time(rows, family, eps, problem, tkey="t_grad_s", ekey="err_grad"):
    """The method of ``family`` with the smallest interpolated time to gradient error ``eps``."""
    best = None
    names = sorted({r["method"] for r in rows if r["family"] == family and r["problem"] == problem})
    for name in names:
        rs = [r for r in rows if r["method"] == name and r["problem"] == problem]
        got = time_at(rs, eps, tkey, ekey)
        if got is not None and (best is None or got[0] < best[0]):
            best = got
    return best


def _ran(rows, family, problem):
    return any(r["family"] == family and r["problem"] == problem for r in rows)


def fmt_cfg(got, ran=True):
    """``time (method; setting; NFE evals+VJPs)`` of the first configuration reaching the
    target (the time is interpolated, the NFE that of that configuration)."""
    if got is None:
        return "not reached" if ran else "not run"
    t, r = got
    s = f"N={r['setting']}" if r["variable"] == "N" else f"tol={r['setting']:g}, {r['steps']} steps"
    nfe = f"NFE {int(r['evals']) + int(r['vjps'])} = {int(r['evals'])}+{int(r['vjps'])}"
    return f"{t * 1e3:.1f} ms ({r['method']}; {s}; {nfe})"


def _finite(v):
    return isinstance(v, (int, float)) and not math.isnan(v)


def forward_evals(r) -> float:
    """Model evaluations of the forward pass of a gradient row: the counted evaluations less
    the backward pass's rematerialised ones (one per VJP; none for Backprop, which keeps the
    activations)."""
    evals, vjps = float(r["evals"]), float(r["vjps"])
    return evals if "Backprop" in str(r["method"]) else evals - vjps


def floors(r) -> tuple[float, float]:
    """``(floor, floor at the measured VJP cost)`` of a gradient row's grad/fwd ratio: a
    gradient that adds only its VJPs to the forward pass, with a VJP costing one model call,
    and costing what one VJP (its forward evaluation included; Backprop: without it, the
    activations are kept) costs on this machine relative to a call (``vjp_over_eval``,
    measured per problem; NaN where not recorded)."""
    fwd, vjps = forward_evals(r), float(r["vjps"])
    c = r.get("vjp_over_eval", float("nan"))
    c = float(c) if _finite(c) else float("nan")
    if "Backprop" in str(r["method"]):
        c = c - 1.0
    return (fwd + vjps) / fwd, (fwd + vjps * c) / fwd


def _grad_over_fwd(r, tkey):
    """A row's gradient / forward time ratio in the metric of ``tkey`` (wall or CPU)."""
    if tkey == "t_grad_s":
        return r.get("grad_over_fwd", float("nan"))
    g, f = r.get("t_grad_cpu_s"), r.get("t_fwd_cpu_s")
    return g / f if (_finite(g) and _finite(f) and f > 0) else float("nan")


def grad_fwd_cell(rows, got, problem, tkey="t_grad_s"):
    """Gradient/forward time ratio (wall, or CPU with ``tkey="t_grad_cpu_s"``) of the
    winning jadeis configuration and its floors (:func:`floors`). Where the forward pass was
    not timed at that setting, the median of the method's ratios over the settings where it
    was (marked "med.")."""
    if got is None:
        return "n/a"
    _, r = got
    floor, measured = floors(r)
    ratio = _grad_over_fwd(r, tkey)
    mark = ""
    if not _finite(ratio):
        rs = [
            _grad_over_fwd(x, tkey)
            for x in rows
            if x["problem"] == problem
            and x["method"] == r["method"]
            and _finite(_grad_over_fwd(x, tkey))
        ]
        ratio = statistics.median(rs) if rs else float("nan")
        mark = " med."
    rtxt = "n/a" if math.isnan(ratio) else f"{ratio:.2f}{mark}"
    mtxt = "" if math.isnan(measured) else f", {measured:.1f} at the measured VJP cost"
    return f"{rtxt} (floor {floor:.1f}{mtxt})"


def headline(rows, problems, tkey="t_grad_s"):
    """The headline table in wall time (``tkey="t_grad_s"``, with a CPU-time ratio column)
    or in process CPU time (``"t_grad_cpu_s"``: every time, winner and ratio by CPU time)."""
    cpu = tkey == "t_grad_cpu_s"
    lines = [
        "| problem | grad. error | jadeis best | its grad/fwd time (floor) | diffrax best "
        "| hand-written scan best | gradsolve best (record + replay) | jadeis / diffrax "
        + ("" if cpu else "| jadeis / diffrax, CPU time ")
        + "| jadeis / gradsolve |",
        "|---|---|---|---|---|---|---|---|---|" + ("" if cpu else "---|"),
    ]
    verdicts = []
    for p in problems:
        for eps in TARGET_EPS:
            j = best_time(rows, "jadeis", eps, p, tkey=tkey)
            d = best_time(rows, "diffrax", eps, p, tkey=tkey)
            s = best_time(rows, "scan", eps, p, tkey=tkey)
            g = best_time(rows, "gradsolve", eps, p, tkey=tkey)
            jc = best_time(rows, "jadeis", eps, p, tkey="t_grad_cpu_s")
            dc = best_time(rows, "diffrax", eps, p, tkey="t_grad_cpu_s")
            ratio = j[0] / d[0] if (j and d) else float("nan")
            ratio_cpu = jc[0] / dc[0] if (jc and dc) else float("nan")
            rtxt = "n/a" if math.isnan(ratio) else f"{ratio:.2f}"
            ctxt = "" if cpu else ("| n/a " if math.isnan(ratio_cpu) else f"| {ratio_cpu:.2f} ")
            gtxt = f"{j[0] / g[0]:.2f}" if (j and g) else "n/a"
            lines.append(
                f"| {p} | {eps:g} | {fmt_cfg(j)} | {grad_fwd_cell(rows, j, p, tkey)} "
                f"| {fmt_cfg(d)} | {fmt_cfg(s)} | {fmt_cfg(g, _ran(rows, 'gradsolve', p))} "
                f"| {rtxt} {ctxt}| {gtxt} |"
            )
            verdicts.append((p, eps, ratio, ratio_cpu))
    return "\n".join(lines), verdicts


def guidance_headline(rows, problems):
    """Time per dL/dx_T-only gradient (the guidance case) at equal error of dL/dx_T, per
    family; empty when no gradsolve rows exist (the table is for comparing with it)."""
    if not any(r["family"] == "gradsolve" for r in rows):
        return ""
    fams = ("jadeis", "diffrax", "scan", "gradsolve")
    lines = [
        "| problem | error of dL/dx_T | " + " | ".join(f"{f} best" for f in fams)
        + " | jadeis / gradsolve |",
        "|---|---|" + "---|" * (len(fams) + 1),
    ]
    for p in problems:
        for eps in TARGET_EPS:
            got = {f: best_time(rows, f, eps, p, "t_grad_xT_s", "err_xT") for f in fams}
            cells = [fmt_cfg(got[f], _ran(rows, f, p)) for f in fams]
            j, g = got["jadeis"], got["gradsolve"]
            ratio = f"{j[0] / g[0]:.2f}" if (j and g) else "n/a"
            lines.append(f"| {p} | {eps:g} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def gradsolve_table(rows, problem):
    """gradsolve's own columns: record, replay, record + replay, the public API."""
    rs = [r for r in rows if r["problem"] == problem and r["family"] == "gradsolve"]
    if not rs:
        return ""
    head = ["tol", "steps S (mean; rejected max)", "err grad", "err dL/dx_T",
            "record (ms)", "replay (ms)", "record+replay (ms)", "x_T only: replay (ms)",
            "x_T only: record+replay (ms)", "x_T only: public API, per iteration (ms)",
            "NFE evals+VJPs"]
    body = []
    for r in rs:
        body.append([
            f"{r['setting']:g}",
            f"{r['steps']} ({float(r['steps_mean']):.1f}; {r['rejected_max']})",
            f"{r['err_grad']:.1e}", f"{r['err_xT']:.1e}",
            f"{1e3 * r['t_record_s']:.1f}", f"{1e3 * r['t_replay_s']:.1f}",
            f"{1e3 * r['t_grad_s']:.1f}", f"{1e3 * r['t_replay_xT_s']:.1f}",
            f"{1e3 * r['t_grad_xT_s']:.1f}", f"{1e3 * r['t_public_xT_s']:.0f}",
            f"{int(r['evals']) + int(r['vjps'])} = {r['evals']}+{r['vjps']}",
        ])
    return "\n".join(C.md_table(head, body))


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


LEARNED = " learned grid"


def learned_table(rows):
    """Gradient error of each "learned grid" method against the same method on the log-SNR
    grid (the method named without " learned grid"), at each N both ran."""
    lines = [
        "| problem | method | N | grad. error, log-SNR grid | grad. error, learned grid "
        "| log-SNR / learned |",
        "|---|---|---|---|---|---|",
    ]
    found = False
    keys = []
    for r in rows:
        if r["method"].endswith(LEARNED) and (r["problem"], r["method"]) not in keys:
            keys.append((r["problem"], r["method"]))
    for problem, name in keys:
        base = name[: -len(LEARNED)]
        errs = {
            r["setting"]: r["err_grad"]
            for r in rows
            if r["problem"] == problem and r["method"] == base
        }
        for r in rows:
            if r["problem"] == problem and r["method"] == name:
                e0 = errs.get(r["setting"])
                e0txt = "not run" if e0 is None else f"{e0:.2e}"
                ratio = "" if e0 is None else f"{e0 / max(r['err_grad'], 1e-300):.2f}"
                lines.append(
                    f"| {problem} | {base} | {r['setting']} | {e0txt} | {r['err_grad']:.2e} "
                    f"| {ratio} |"
                )
                found = True
    return "\n".join(lines) if found else ""


def plots(rows, mem_rows, out: Path, problems):
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    styles = {"jadeis": "-", "diffrax": "--", "scan": ":", "gradsolve": "-."}
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
            maps = {"jadeis": "Blues", "diffrax": "Oranges", "scan": "Greens",
                    "gradsolve": "Purples"}
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
            ax.set_title(f"{p}: solid = jadeis, dashed = diffrax, dotted = hand-written scan, "
                         "dash-dot = gradsolve", fontsize=9)
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


def load_sweep(out: Path) -> list[dict]:
    """The rows of ``sweep.csv`` in ``out`` (N settings as int), or none."""
    rows = read_csv(out / "sweep.csv")
    for r in rows:
        r["setting"] = r["setting"] if r["variable"] == "tol" else int(r["setting"])
    return rows


def load_references(out: Path) -> list[dict]:
    """The rows of ``references.csv`` in ``out`` (older files: missing columns filled)."""
    ref_rows = read_csv(out / "references.csv")
    for c in ref_rows:  # files of older runs lack these columns
        c.setdefault("stiff", c["problem"] != "gaussian")
        c.setdefault("description", c["problem"])
    return ref_rows


def summarize(out: Path):
    """Rebuild plots and summary.md from the CSV files of a finished run."""
    info = json.loads((out / "machine.json").read_text())
    rows = load_sweep(out)
    mem_rows = read_csv(out / "memory.csv")
    e2e_rows = read_csv(out / "e2e.csv")
    ref_rows = load_references(out)
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
        f"optax {info['optax']}; {info.get('dtype', 'float64')}; {info['mode']} run of "
        f"{info['date_utc']} UTC, "
        f"{info['total_seconds']:.0f} s; load average {info['load_average_at_start']} -> "
        f"{info['load_average_at_end']}. Times are medians of {info['repeats']} repeats after "
        f"warm-up (compile time separate).",
        "",
    ]
    if info.get("budget_s"):
        stops = info.get("budget_stops") or []
        stxt = "; ".join(
            f"{p} {m} (after {'no setting' if last in (None, '') else last})"
            for p, m, last in stops
        )
        md += [
            f"Wall-clock budget: {float(info['budget_s']):.0f} s for the whole run (each "
            "problem an equal share of what was left; within it the methods ran one setting "
            "each in turn, so every method got as far as the share allowed). Sweeps it stopped "
            "(problem, method, last setting run): "
            + (stxt if stxt else "none") + ".",
            "",
        ]
    md += [
        "## Headline: wall time per gradient at equal gradient accuracy",
        "",
        head,
        "",
        "Times are interpolated (log-log) between the last setting above the target error and "
        "the first at or below it; the NFE (model evaluations, rematerialised ones included, "
        "+ VJPs) is that of the first setting reaching the target. grad/fwd: wall time of the "
        'gradient over that of `jadeis.sample` with the same sampler and N ("med.": the '
        "method's median over the N where the forward pass was timed); floor: (forward "
        "evaluations + VJPs) / forward evaluations, the ratio of a gradient that adds only "
        "the VJPs to the forward pass, if a VJP cost one evaluation.",
        "",
        "jadeis / diffrax, CPU time: the same ratio from the process CPU time of the same "
        "repeats (each side's best method by CPU time): on a core shared with other jobs the "
        "wall time of each measurement depends on their load at that moment, the CPU time "
        "much less. The floor at the measured VJP cost uses one VJP of the model (with its "
        "forward evaluation) = `vjp_over_eval` model calls, measured per problem.",
        "",
        "Target: jadeis / diffrax <= 0.33 (wall time; CPU time in brackets). "
        + "; ".join(
            f"{p} @ {e:g}: {'met' if r <= 1 / 3 else 'NOT met'} ({r:.2f}"
            + ("" if math.isnan(rc) else f"; CPU {rc:.2f}")
            + ")"
            if not math.isnan(r)
            else f"{p} @ {e:g}: n/a"
            for p, e, r, rc in verdicts
        ),
        "",
    ]
    share = sorted(
        r["t_grad_s"] / r["t_grad_cpu_s"]
        for r in rows
        if _finite(r.get("t_grad_cpu_s")) and r["t_grad_cpu_s"] > 0 and _finite(r["t_grad_s"])
    )
    spread = (
        f" (wall / CPU time of the gradients in this run: {share[0]:.2f} to {share[-1]:.2f}, "
        f"median {statistics.median(share):.2f})"
        if share
        else ""
    )
    md += [
        "## Headline in process CPU time",
        "",
        "The same table with every time the process CPU time of the same repeats (winners, "
        "interpolation and ratios by CPU time; grad/fwd the CPU-time ratio). On a core shared "
        "with other jobs a measurement's wall time is its CPU time times a factor set by their "
        f"load at that moment{spread}, so the wall-time ratio of two methods measured minutes "
        "apart moves with that factor; the CPU-time ratio does not.",
        "",
        headline(rows, stiff, tkey="t_grad_cpu_s")[0],
        "",
    ]
    guide = guidance_headline(rows, stiff)
    if guide:
        md += [
            "## Guidance: wall time per dL/dx_T-only gradient at equal error of dL/dx_T",
            "",
            guide,
            "",
            "gradsolve: record + replay of its Tsit5 mesh, one mesh per trajectory, recorded "
            "again for every gradient (a guidance loop moves x_T every iteration); its "
            "parameters are the samples' z, the model's weights constants. The other methods' "
            "dL/dx_T-only gradient is timed at every setting only with `run.py "
            "--guidance-timing`; otherwise only at N = 64 and tol = 1e-5, so their entries "
            "here are then upper bounds.",
            "",
        ]
    md += [
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
        gs = gradsolve_table(rows, name)
        if gs:
            md += [
                "",
                f"gradsolve on {name} (`benchmarks/peers/gradsolve_peer.py`): record = its "
                "adaptive Tsit5 solve that records the steps (also the forward time above); "
                "replay = the gradient by replaying the recorded steps, compiled once; "
                "record+replay = both, per gradient (the headline's time); public API = "
                "`grad_closure(wrt=\"y0\")` + `jax.jit(jax.grad(...))` of the new closure per "
                "iteration, compilation included (the closure bakes the steps in). The full "
                "gradient replicates the model's parameters per trajectory (gradsolve's "
                "parameters are per-trajectory vectors).",
                "",
                gs,
            ]
    learned = learned_table(rows)
    if learned:
        md += [
            "",
            "## Learned time grids vs the log-SNR grid (gradient error at equal N)",
            "",
            "Grids from `benchmarks/grids/<problem>.json`, fitted by `benchmarks/grids.py` "
            "(`jadeis.learn_time_grid`, x_0 mean squared error against a many-step sample) on "
            "other initial noises than the benchmark's; the errors here are on the benchmark's "
            "own (held-out) inputs. The sweep stops a method once its error is below 2e-4, so "
            "a row missing on one side was not run.",
            "",
            learned,
        ]
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
