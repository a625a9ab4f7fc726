"""Model evaluations at equal error: jadeis' Adaptive(SinglestepDPMSolver(3)) vs dpm-solver's
own adaptive solver, and a prototype of the fix.

``python benchmarks/peers/embedded_pair.py [--problems mlp,mixture] [--tols 41]`` writes
``benchmarks/results/embedded_pair.csv`` and ``embedded_pair_tables.md`` (~15 minutes on one
core, most of it compiling jadeis' Adaptive once per tolerance).

For each problem (float64; x_T, model and x_0 reference of ``problems.py``) and each form
(``data`` = DPM-Solver++, ``noise`` = DPM-Solver), the forward sample from ``t_max`` to
``t_min`` at ``rtol = atol = tol`` over a sweep of tolerances, by:

- ``reference``: the transcription of ``dpm_solver_adaptive`` (``dpm_solver_adaptive.py``);
- ``jadeis``: ``jadeis.sample(..., solver=jadeis.Adaptive(jadeis.SinglestepDPMSolver(3,
  prediction)))`` as released (evaluations counted by instrumenting the model);
- ``copy[...]``: this file's copy of jadeis' step and adaptive loop (``src/jadeis/_adaptive.py``
  ``_forward``, ``controller``, ``_error_norm``, ``_next_time``; ``src/jadeis/_solver/
  singlestep.py`` ``step_with_error``) with each ingredient switchable between jadeis' choice
  and the reference's. ``copy[jadeis]`` must reproduce ``jadeis`` (checked: the same
  evaluations), ``copy[all reference]`` the reference transcription. The prototype of the fix
  is ``copy[low]``: the reference's lower-order solution in jadeis' step, nothing else changed.

The ingredients (equations in ``benchmarks/results/embedded_pair.md``):

- ``low``: the lower-order solution of the pair. jadeis: the phi_2 ("taylor") DPM-Solver-2
  through stage 1; reference: the phi_1/(2 r1) ("dpm_solver") form.
- ``norm``: jadeis: RMS over the whole batch of ``e / (atol + rtol max(|x_s|, |x_hi|))``;
  reference: max over samples of the per-sample RMS of
  ``e / max(atol, rtol max(|x_lo,prev|, |x_lo|))`` (x_lo,prev: the last accepted lower solution).
- ``ctrl``: jadeis: accept if E < 1, ``h' = h clip(0.9 E^(-1/3), [1, 10])`` after an accepted
  step and ``clip(., [0.2, 0.9])`` after a rejection (factors in float32); reference: accept
  if E <= 1, ``h' = 0.9 h E^(-1/3)`` unclipped.
- ``h0``: the first step in lambda: jadeis 1/16 of the span (~0.6 on VPLinear); reference 0.05.
- ``end``: jadeis stretches a step that would leave less than 1% of itself to end at t_min;
  the reference clamps the step to the remainder.

Model evaluations: 3 per attempted step in every variant (both loops re-evaluate the model at
the start of a rejected step). Errors: relative L2 of x_0 against the problem's reference
(diffrax Tsit5 at 1e-10, ~1e-10 accurate). "NFE at equal error": log-log interpolation of each
method's error-vs-NFE front at fixed errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

R1, R2 = 1.0 / 3.0, 2.0 / 3.0


@dataclasses.dataclass(frozen=True)
class Options:
    """Which ingredient is jadeis' (False) and which the reference's (True)."""

    low: bool = False
    norm: bool = False
    ctrl: bool = False
    h0: bool = False
    end: bool = False

    @property
    def label(self):
        on = [k for k in ("low", "norm", "ctrl", "h0", "end") if getattr(self, k)]
        if not on:
            return "copy[jadeis]"
        if len(on) == 5:
            return "copy[all reference]"
        return "copy[" + "+".join(on) + "]"


def _phi1(z):
    return jnp.expm1(z) / z


def _phi2(z):
    return (jnp.expm1(z) - z) / z**2


def ss3_step(noise_fn, sch, x, t_s, t_t, prediction, ref_low):
    """One SinglestepDPMSolver(3) step as jadeis computes it (``inputs`` + ``_stages`` +
    ``step_with_error``, docs/math/adaptive.md (7.1)): ``(x_hi, x_lo)``; ``ref_low`` swaps
    the lower solution's weight ``P_t h phi_2(sh) / r1`` for the reference's
    ``P_t h phi_1(sh) / (2 r1)``."""
    noise = prediction == "noise"
    sign = 1.0 if noise else -1.0
    lam_s, lam_t = sch.log_snr(t_s), sch.log_snr(t_t)
    la_s, ls_s = sch.log_alpha(t_s), sch.log_sigma(t_s)
    h = lam_t - lam_s

    def at(t_u):
        la_u, ls_u = sch.log_alpha(t_u), sch.log_sigma(t_u)
        ell = jnp.exp(la_u - la_s) if noise else jnp.exp(ls_u - ls_s)
        P = -jnp.exp(ls_u) if noise else jnp.exp(la_u)
        return ell, P, jnp.exp(la_u), jnp.exp(ls_u)

    def m(xx, t, alpha, sigma):
        eps = noise_fn(xx, t)
        return eps if noise else (xx - sigma * eps) / alpha

    _, _, a_s, s_s = at(t_s)
    m0 = m(x, t_s, a_s, s_s)
    H1, H2 = R1 * h, R2 * h
    t1 = sch.t_from_log_snr(lam_s + H1)
    ell1, P1, a1, s1 = at(t1)
    m1 = m(ell1 * x + P1 * H1 * _phi1(sign * H1) * m0, t1, a1, s1)
    t2 = sch.t_from_log_snr(lam_s + H2)
    ell2, P2, a2, s2 = at(t2)
    u2 = (
        ell2 * x
        + P2 * H2 * _phi1(sign * H2) * m0
        + P2 * H2 * _phi2(sign * H2) * (R2 / R1) * (m1 - m0)
    )
    m2 = m(u2, t2, a2, s2)
    ell, P, _, _ = at(t_t)
    base = ell * x + P * h * _phi1(sign * h) * m0
    hi = base + P * h * _phi2(sign * h) / R2 * (m2 - m0)
    if ref_low:
        lo = base + P * h * _phi1(sign * h) / (2 * R1) * (m1 - m0)
    else:
        lo = base + P * h * _phi2(sign * h) / R1 * (m1 - m0)
    return hi, lo


def adaptive_copy(noise_fn, sch, x_T, tol, prediction, opts: Options, max_tries=20_000):
    """jadeis' adaptive loop (``_forward`` with an I-controller, ``Adaptive``'s defaults:
    safety 0.9, factormin 0.2, factormax 10, dlambda0 = span/16) with the switches of
    ``opts``: ``(x_0, nfe, accepted, attempts)``."""
    dt = x_T.dtype
    t_start = jnp.asarray(sch.t_max, dt)
    t_end = jnp.asarray(sch.t_min, dt)
    lam0, lam_end = sch.log_snr(t_start), sch.log_snr(t_end)
    span = lam_end - lam0
    h0 = jnp.asarray(0.05, dt) if opts.h0 else span / 16

    def norm(err, x, hi, lo, x_prev):
        if opts.norm:
            delta = jnp.maximum(tol, tol * jnp.maximum(jnp.abs(x_prev), jnp.abs(lo)))
            v = (err / delta).reshape(err.shape[0], -1)
            return jnp.max(jnp.sqrt(jnp.mean(v**2, axis=-1)))
        scale = tol + tol * jnp.maximum(jnp.abs(x), jnp.abs(hi))
        return jnp.sqrt(jnp.sum(jnp.square(err / scale)).astype(jnp.float32) / err.size)

    def body(c):
        x, t, lam, h, x_prev = c["x"], c["t"], c["lam"], c["h"], c["x_prev"]
        rem = lam_end - lam
        if opts.end:
            last = h >= rem
        else:
            last = h * 1.01 >= rem
        h_eff = jnp.where(last, rem, h)
        t_next = jnp.where(last, t_end, sch.t_from_log_snr(lam + h_eff))
        hi, lo = ss3_step(noise_fn, sch, x, t, t_next, prediction, opts.low)
        E = norm(hi - lo, x, hi, lo, x_prev)
        if opts.ctrl:
            accept = E <= 1.0
            factor = 0.9 * E.astype(dt) ** (-1.0 / 3.0)
        else:
            E = jnp.where(jnp.isnan(E), jnp.inf, E).astype(jnp.float32)
            accept = E < 1.0
            factor = 0.9 * (1.0 / E) ** (1.0 / 3.0)
            factor = jnp.clip(factor, jnp.where(accept, 1.0, 0.2), jnp.where(accept, 10.0, 0.9))
            factor = factor.astype(dt)
        return {
            "x": jnp.where(accept, hi, x),
            "x_prev": jnp.where(accept, lo, x_prev),
            "t": jnp.where(accept, t_next, t),
            "lam": jnp.where(accept, jnp.where(last, lam_end, lam + h_eff), lam),
            "h": h_eff * factor,
            "n_acc": c["n_acc"] + accept.astype(jnp.int32),
            "n_try": c["n_try"] + 1,
            "done": accept & last,
        }

    carry = {
        "x": x_T,
        "x_prev": x_T,
        "t": t_start,
        "lam": lam0,
        "h": h0.astype(dt),
        "n_acc": jnp.zeros((), jnp.int32),
        "n_try": jnp.zeros((), jnp.int32),
        "done": jnp.zeros((), bool),
    }
    c = lax.while_loop(lambda c: ~c["done"] & (c["n_try"] < max_tries), body, carry)
    return c["x"], 3 * c["n_try"], c["n_acc"], c["n_try"]


# ----------------------------------------------------------------------------------------


def jadeis_released(problem, prediction, tol, max_steps=4096):
    """``(x_0, nfe)`` of jadeis' own Adaptive(SinglestepDPMSolver(3)) (one compilation per
    tolerance: the tolerances are part of the solver); NFE by instrumenting the model."""
    import jadeis  # noqa: PLC0415
    import methods as M  # noqa: PLC0415

    sch = problem.schedule
    solver = jadeis.Adaptive(
        jadeis.SinglestepDPMSolver(3, prediction), rtol=tol, atol=tol, max_steps=max_steps
    )
    ends = jnp.asarray([sch.t_max, sch.t_min], jnp.float64)
    counter = M.Counter()
    eps = M.counting_eps_fn(problem.eps_fn, counter)
    f = jax.jit(lambda x, z, p: jadeis.sample(eps, p, x, z, schedule=sch, ts=ends, solver=solver))
    x0 = jax.block_until_ready(f(problem.x_T, problem.z, problem.params))
    jax.effects_barrier()
    return x0, counter.evals


def with_inputs(problem, seed):
    """``problem`` with other inputs of its distribution (``train_inputs(seed)``) and an x_0
    reference for them (DPM-Solver++(3M), N = 4000: agrees with diffrax Tsit5 at 1e-10 to
    ~1e-10 on the benchmark's own inputs); seed 0: the problem itself."""
    if seed == 0:
        return problem
    import jadeis  # noqa: PLC0415

    x_T, z = problem.train_inputs(seed)
    ts = jadeis.time_grid(problem.schedule, 4000, dtype=jnp.float64)
    x0 = jax.jit(
        lambda x, zz: jadeis.sample(
            problem.eps_fn,
            problem.params,
            x,
            zz,
            schedule=problem.schedule,
            ts=ts,
            solver=jadeis.DPMSolverPP(order=3),
        )
    )(x_T, z)
    return dataclasses.replace(
        problem, name=f"{problem.name} (inputs {seed})", x_T=x_T, z=z, reference={"x0": x0}
    )


def sweep(problem, tols, log=print, released=True):
    from dpm_solver_adaptive import reference_adaptive  # noqa: PLC0415

    import problems as P  # noqa: PLC0415

    sch = problem.schedule
    assert float(sch.beta_min) == 0.1 and float(sch.beta_max) == 20.0, "VPLinear defaults"
    params, z = problem.params, problem.z

    def noise_fn(x, t):
        return problem.eps_fn(params, x, t, z)

    x_ref = problem.reference["x0"]
    rows = []
    variants = [
        Options(),
        Options(low=True),
        Options(low=True, norm=True),
        Options(low=True, ctrl=True),
        Options(low=True, h0=True),
        Options(low=True, end=True),
        Options(norm=True),
        Options(ctrl=True),
        Options(low=True, norm=True, ctrl=True, h0=True),
        Options(norm=True, ctrl=True, h0=True, end=True),
        Options(low=True, norm=True, ctrl=True, h0=True, end=True),
    ]
    for prediction in ("data", "noise"):
        ref_fn = jax.jit(
            lambda x, tol, pred=prediction: reference_adaptive(
                noise_fn, x, prediction=pred, tol=tol, t_T=float(sch.t_max), t_0=float(sch.t_min)
            )
        )
        runs = [("reference", ref_fn)]
        for o in variants:
            runs.append(
                (
                    o.label,
                    jax.jit(
                        lambda x, tol, o=o, pred=prediction: adaptive_copy(
                            noise_fn, sch, x, tol, pred, o
                        )
                    ),
                )
            )
        for name, fn in runs:
            t0 = time.perf_counter()
            for tol in tols:
                x0, nfe, n_acc, n_try = jax.block_until_ready(
                    fn(problem.x_T, jnp.asarray(tol, jnp.float64))
                )
                rows.append(
                    {
                        "problem": problem.name,
                        "form": prediction,
                        "method": name,
                        "tol": tol,
                        "nfe": int(nfe),
                        "accepted": int(n_acc),
                        "attempts": int(n_try),
                        "err_x0": P.rel_err(x0, x_ref),
                    }
                )
            log(f"  {problem.name} {prediction:5s} {name:28s} {time.perf_counter() - t0:5.1f}s")
        if not released:
            continue
        t0 = time.perf_counter()
        for tol in tols:
            x0, nfe = jadeis_released(problem, prediction, tol)
            rows.append(
                {
                    "problem": problem.name,
                    "form": prediction,
                    "method": "jadeis",
                    "tol": tol,
                    "nfe": int(nfe),
                    "accepted": -1,
                    "attempts": nfe // 3,
                    "err_x0": P.rel_err(x0, x_ref),
                }
            )
        log(
            f"  {problem.name} {prediction:5s} {'jadeis (released)':28s} "
            f"{time.perf_counter() - t0:5.1f}s"
        )
    return rows


def nfe_at(rows, err):
    """NFE at which the error-vs-NFE front first reaches ``err`` (log-log interpolation), or
    None."""
    pts = sorted(rows, key=lambda r: (r["nfe"], r["err_x0"]))
    front, best = [], math.inf
    for r in pts:
        if r["err_x0"] < best:
            front.append(r)
            best = r["err_x0"]
    for i, r in enumerate(front):
        if r["err_x0"] <= err:
            if i == 0:
                return float(r["nfe"])
            q = front[i - 1]
            w = (math.log(err) - math.log(q["err_x0"])) / (
                math.log(r["err_x0"]) - math.log(q["err_x0"])
            )
            return math.exp((1 - w) * math.log(q["nfe"]) + w * math.log(r["nfe"]))
    return None


TARGETS = (1e-3, 1e-4, 1e-5, 1e-6)
DENSE = tuple(float(v) for v in np.logspace(-3, -6, 13))  # 4 per decade


def checks(rows):
    """The copies against what they copy: per (problem, form), the largest difference in
    evaluations and in x_0 (relative error difference) over the tolerances."""
    lines = [
        "| problem | form | copy | of | max NFE difference | tolerances compared |",
        "|---|---|---|---|---|---|",
    ]
    for problem in dict.fromkeys(r["problem"] for r in rows):
        for form in ("data", "noise"):
            for copy, orig in (("copy[jadeis]", "jadeis"), ("copy[all reference]", "reference")):
                a = {
                    r["tol"]: r
                    for r in rows
                    if (r["problem"], r["form"], r["method"]) == (problem, form, copy)
                }
                b = {
                    r["tol"]: r
                    for r in rows
                    if (r["problem"], r["form"], r["method"]) == (problem, form, orig)
                }
                common = sorted(set(a) & set(b))
                if not common:
                    continue
                d = max(abs(a[t]["nfe"] - b[t]["nfe"]) for t in common)
                lines.append(f"| {problem} | {form} | {copy} | {orig} | {d} | {len(common)} |")
    return "\n".join(lines)


def pooled(rows):
    """Per problem and form, the geometric mean and the maximum, over the input sets and the
    13 errors, of each method's NFE ratio to the reference on the same inputs."""
    lines = [
        "",
        "### Pooled over the input sets",
        "",
        "| problem | form | method | geometric mean / reference | max | at or below "
        "reference (ratio <= 1.005) |",
        "|---|---|---|---|---|---|",
    ]
    fams = dict.fromkeys(r["problem"].split(" (")[0] for r in rows)
    for fam in fams:
        for form in ("data", "noise"):
            rs = [r for r in rows if r["problem"].split(" (")[0] == fam and r["form"] == form]
            sets = dict.fromkeys(r["problem"] for r in rs)
            methods = [m for m in dict.fromkeys(r["method"] for r in rs) if m != "jadeis"]
            for m in methods:
                ratios = []
                for ps in sets:
                    mine = [r for r in rs if r["problem"] == ps and r["method"] == m]
                    ref = [r for r in rs if r["problem"] == ps and r["method"] == "reference"]
                    for e in DENSE:
                        a, b = nfe_at(mine, e), nfe_at(ref, e)
                        if a is not None and b is not None:
                            ratios.append(a / b)
                if ratios:
                    gm = math.exp(np.mean(np.log(ratios)))
                    ok = sum(x <= 1.005 for x in ratios)
                    lines.append(
                        f"| {fam} | {form} | {m} | {gm:.3f} | {max(ratios):.3f} | "
                        f"{ok}/{len(ratios)} |"
                    )
    return "\n".join(lines)


def tables(rows):
    lines = []
    for problem in dict.fromkeys(r["problem"] for r in rows):
        for form in ("data", "noise"):
            rs = [r for r in rows if r["problem"] == problem and r["form"] == form]
            methods = list(dict.fromkeys(r["method"] for r in rs))
            ref = {e: nfe_at([r for r in rs if r["method"] == "reference"], e) for e in TARGETS}
            lines += ["", f"### {problem}, {form} form", ""]
            head = "| method | " + " | ".join(f"NFE at err {e:g} (/ reference)" for e in TARGETS)
            lines += [
                head + " | geometric mean / reference (13 errors 1e-3..1e-6) | max | "
                "at or below reference (ratio <= 1.005) |",
                "|---|" + "---|" * (len(TARGETS) + 3),
            ]
            dref = {e: nfe_at([r for r in rs if r["method"] == "reference"], e) for e in DENSE}
            for m in methods:
                mine = [r for r in rs if r["method"] == m]
                cells = []
                for e in TARGETS:
                    v = nfe_at(mine, e)
                    if v is None or ref[e] is None:
                        cells.append("not reached" if v is None else f"{v:.0f}")
                        continue
                    cells.append(f"{v:.0f} ({v / ref[e]:.3f})")
                ratios = [
                    v / dref[e]
                    for e in DENSE
                    if (v := nfe_at(mine, e)) is not None and dref[e] is not None
                ]
                if ratios:
                    gm = math.exp(np.mean(np.log(ratios)))
                    tail = (
                        f"{gm:.3f} | {max(ratios):.3f} | "
                        f"{sum(x <= 1.005 for x in ratios)}/{len(ratios)}"
                    )
                else:
                    tail = "n/a | n/a | n/a"
                lines.append(f"| {m} | " + " | ".join(cells) + f" | {tail} |")
    return "\n".join(lines)


def main(argv=None):
    jax.config.update("jax_enable_x64", True)
    import common as C  # noqa: PLC0415
    import problems as P  # noqa: PLC0415

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problems", default="mlp,mixture")
    ap.add_argument("--tols", type=int, default=41, help="tolerances 1e-2..1e-7, log-spaced")
    ap.add_argument("--out", default=str(HERE.parent / "results"))
    ap.add_argument(
        "--seeds",
        default="0",
        help="input sets: 0 = the benchmark's x_T and z, k > 0 = problem.train_inputs(k) "
        "(jadeis' released Adaptive runs on set 0 only, where its copy is checked against it)",
    )
    ap.add_argument("--name", default="embedded_pair", help="output file stem")
    args = ap.parse_args(argv)
    tols = [float(v) for v in np.logspace(-2, -7, args.tols)]
    seeds = [int(v) for v in args.seeds.split(",")]
    rows = []
    for p in P.build_problems(args.problems.split(","), quick=False, log=C.log):
        for seed in seeds:
            rows += sweep(with_inputs(p, seed), tols, log=C.log, released=seed == 0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    C.write_csv(out / f"{args.name}.csv", rows, float_format=".6g")
    info = C.machine_info()
    text = checks(rows) + "\n" + tables(rows)
    text += "\n" + pooled(rows)
    (out / f"{args.name}_tables.md").write_text(
        f"<!-- generated by benchmarks/peers/embedded_pair.py on {info['date_utc']} UTC, "
        f"jax {info['jax']}, jadeis {info['jadeis']} -->\n" + text + "\n"
    )
    print(text)
    return rows


if __name__ == "__main__":
    main()
