"""Rex (reversible exponential solvers): inversion, reversibility, orders, gradient cost.

Writes ``benchmarks/results/rex.md`` and ``benchmarks/results/rex.png``. About 3-4 minutes on
2 CPU cores: ``python benchmarks/rex.py`` (``--quick`` for a smoke run).

(a) Inversion round trip on the bundled digits model (64 test images, their class
    conditioning): ``encode_ode`` then ``sample`` with the same solver and grid, for Rex
    (data form; midpoint and rk4 base schemes) and DDIM inversion, N = 10, 20, 50; float32
    MSE (the published Stable Diffusion metric) and float64 relative error. The published
    Stable Diffusion numbers are quoted beside them: a different model and data.
(b) Where reversibility breaks down: round-trip relative error of Rex (midpoint) on the
    digits model against the coupling zeta, N and the dtype.
(c) Order of each base scheme (coupled, data form, default coupling) on a small random MLP
    (tests/helpers.py ``RandomMLP``) against a tight diffrax Tsit5 solve; fitted slopes.
(d) Time and compiled scratch memory per gradient (x_T, z, params) on the benchmark MLP
    problem (problems.py ``mlp``) at N = 20, 100, 500: ReversibleAdjoint (Rex midpoint)
    against DiscreteAdjoint (DPM-Solver++(3M)), AdjointDEIS-2 reconstruct (DPM-Solver(2M))
    and diffrax Heun in rho with RecursiveCheckpointAdjoint; the gradient error of each
    against a tight reference (DPM-Solver++(3M), DiscreteAdjoint, N = 2000, float64).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import common as C  # noqa: E402
import jadeis  # noqa: E402
from helpers import RandomMLP, diffrax_reference, fitted_order  # noqa: E402

PUBLISHED = {  # Stable Diffusion, as published by Blasingame & Liu 2025: float32 MSE
    "Rex": {10: 3.8e-9, 20: 2.0e-9, 50: 8.9e-10},
    "EDICT": {10: 1.6e-6},
    "BDIA": {10: 3.3e-7},
    "DDIM inversion": {10: 0.36},
}


def rel(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def tree_rel(a, b) -> float:
    la = np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in jax.tree.leaves(a)])
    lb = np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in jax.tree.leaves(b)])
    return float(np.linalg.norm(la - lb) / max(np.linalg.norm(lb), 1e-300))


# ----------------------------------------------------------------------------------------
# (a), (b): the digits model


def digits_setup(n_images=64):
    from jadeis.digits import load_denoiser, load_split

    model = load_denoiser()
    images, labels = load_split("test")
    x0 = np.asarray(images[:n_images], np.float64)
    z = np.asarray(model.z_for(labels[:n_images]), np.float64)
    return model, x0, z


def round_trip(model, x0, z, solver, n, dtype):
    sch = model.schedule
    ts = jadeis.time_grid(sch, n)
    x0 = jnp.asarray(x0, dtype)
    z = jnp.asarray(z, dtype)
    params = jax.tree.map(lambda v: jnp.asarray(v).astype(dtype)
                          if jnp.issubdtype(jnp.asarray(v).dtype, jnp.floating) else v,
                          model.params)

    @jax.jit
    def f(x0, z, params):
        lat = jadeis.encode_ode(model.eps_fn, params, x0, z, schedule=sch, ts=ts, solver=solver)
        return jadeis.sample(model.eps_fn, params, lat, z, schedule=sch, ts=ts, solver=solver)

    back = np.asarray(f(x0, z, params), np.float64)
    ref = np.asarray(x0, np.float64)
    return float(np.mean((back - ref) ** 2)), rel(back, ref)


def part_a(model, x0, z, ns, log):
    rows = []
    solvers = [
        ("Rex (midpoint)", jadeis.Rex(scheme="midpoint")),
        ("Rex (rk4)", jadeis.Rex(scheme="rk4")),
        ("DDIM inversion", jadeis.DDIM()),
    ]
    for name, solver in solvers:
        for n in ns:
            mse32, rel32 = round_trip(model, x0, z, solver, n, jnp.float32)
            mse64, rel64 = round_trip(model, x0, z, solver, n, jnp.float64)
            rows.append({"method": name, "N": n, "mse32": mse32, "rel32": rel32,
                         "mse64": mse64, "rel64": rel64})
            log(f"  (a) {name:16s} N={n:3d}: f32 MSE {mse32:.2e} rel {rel32:.2e}; "
                f"f64 rel {rel64:.2e}")
    return rows


def part_b(model, x0, z, couplings, ns, log):
    rows = []
    for dtype in (jnp.float32, jnp.float64):
        for zeta in couplings:
            solver = jadeis.Rex(coupling=zeta)
            for n in ns:
                _, r = round_trip(model, x0, z, solver, n, dtype)
                rows.append({"dtype": jnp.dtype(dtype).name, "coupling": zeta, "N": n, "rel": r})
            log(f"  (b) {jnp.dtype(dtype).name} zeta={zeta}: "
                + ", ".join(f"N={r['N']} {r['rel']:.1e}" for r in rows[-len(ns):]))
    return rows


# ----------------------------------------------------------------------------------------
# (c): orders on a random MLP


def part_c(ns, log):
    sch = jadeis.VPLinear()
    mlp = RandomMLP(dim=2, hidden=16, seed=0)
    x_T = jnp.asarray([[0.5, -1.0], [1.3, 0.2]])
    ref = jax.jit(lambda p, x: diffrax_reference(mlp.eps_fn, p, x, None, sch, sch.t_max,
                                                 sch.t_min))(mlp.params, x_T)
    rows = []
    for prediction in ("data", "noise"):
        for scheme in ("euler", "midpoint", "rk3", "rk4"):
            solver = jadeis.Rex(scheme=scheme, prediction=prediction)
            errs = []
            for n in ns:
                ts = jadeis.time_grid(sch, n)
                out = jax.jit(lambda p, x, ts=ts, s=solver: jadeis.sample(
                    mlp.eps_fn, p, x, None, schedule=sch, ts=ts, solver=s))(mlp.params, x_T)
                errs.append(float(jnp.max(jnp.abs(out - ref))))
            slope = fitted_order(ns, errs)
            rows.append({"scheme": scheme, "prediction": prediction, "order": solver.order,
                         "errors": errs, "slope": slope})
            log(f"  (c) {prediction} {scheme:8s}: slope {slope:.2f}  "
                + " ".join(f"{e:.1e}" for e in errs))
    return rows


# ----------------------------------------------------------------------------------------
# (d): gradient cost on the benchmark MLP problem


def part_d(ns, reps, log):
    import diffrax as dfx

    import problems as P
    from methods import diffrax_fixed, jadeis_method, jadeis_reference

    prob = P.mlp_problem(log=log)
    t0 = time.perf_counter()
    ref = jadeis_reference(prob, 2000)
    log(f"  (d) reference (DPM++(3M), DiscreteAdjoint, N=2000): {time.perf_counter() - t0:.1f} s")
    methods = [
        ("ReversibleAdjoint, Rex (midpoint)", jadeis_method(
            "rex", jadeis.Rex(), jadeis.ReversibleAdjoint(), None), (12, "4N fwd + 8N bwd")),
        ("DiscreteAdjoint, DPM++(3M)", jadeis_method(
            "discrete", jadeis.DPMSolverPP(order=3), jadeis.DiscreteAdjoint(), None),
            (3, "N fwd + 2N bwd")),
        ("AdjointDEIS-2 reconstruct, DPM(2M)", jadeis_method(
            "deis", jadeis.DPMSolver(order=2),
            jadeis.AdjointDEIS(order=2, trajectory="reconstruct"), None), (3, "N fwd + 2N bwd")),
        ("diffrax Heun (rho), RecursiveCheckpointAdjoint", diffrax_fixed(
            "heun", "rho", dfx.Heun(), 2), (None, "2N fwd + 2N VJP")),
    ]
    rows = []
    args = (prob.x_T, prob.z, prob.params)
    for label, m, (_, evals) in methods:
        _, grad = m.make(prob)
        for n in ns:
            ts = jadeis.time_grid(prob.schedule, n, dtype=jnp.float64)
            try:
                compiled, csec, mem = C.compile_timed(grad, (*args, ts))
                x0, gx, gz, gp, _ = compiled(*args, ts)
                sec = C.time_call(compiled, (*args, ts), reps=reps, min_batch_s=0.05)
            except Exception as e:  # noqa: BLE001 - report and carry on
                log(f"  (d) {label} N={n}: failed: {type(e).__name__}: {e}")
                continue
            err = {k: tree_rel(v, ref[k]) for k, v in (("x_T", gx), ("z", gz), ("params", gp))}
            rows.append({"method": label, "N": n, "seconds": sec, "compile_s": csec,
                         "temp_mb": mem / 2**20, "err_x_T": err["x_T"], "err_z": err["z"],
                         "err_params": err["params"], "evals": evals})
            log(f"  (d) {label:46s} N={n:4d}: {1e3 * sec:8.1f} ms  temp {mem / 2**20:7.2f} MiB  "
                f"err x_T {err['x_T']:.1e} z {err['z']:.1e} params {err['params']:.1e}")
    return prob, rows


# ----------------------------------------------------------------------------------------
# output


def plot(a_rows, b_rows, c_rows, c_ns, d_rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(18, 4.2))
    for name in dict.fromkeys(r["method"] for r in a_rows):
        rs = [r for r in a_rows if r["method"] == name]
        ax[0].loglog([r["N"] for r in rs], [r["mse32"] for r in rs], "o-", label=f"{name} (f32)")
    ns_pub = sorted(PUBLISHED["Rex"])
    ax[0].loglog(ns_pub, [PUBLISHED["Rex"][n] for n in ns_pub], "k--", label="Rex, SD (published)")
    ax[0].set(title="(a) inversion round trip, digits (f32 MSE)", xlabel="N", ylabel="MSE")
    ax[0].legend(fontsize=7)
    for dt, ls in (("float32", "--"), ("float64", "-")):
        for zeta in dict.fromkeys(r["coupling"] for r in b_rows):
            rs = [r for r in b_rows if r["dtype"] == dt and r["coupling"] == zeta]
            ax[1].loglog([r["N"] for r in rs], [max(r["rel"], 1e-17) for r in rs], ls,
                         marker="o", label=f"{dt} zeta={zeta}")
    ax[1].set(title="(b) round trip vs coupling, N, dtype", xlabel="N", ylabel="relative error")
    ax[1].legend(fontsize=6, ncol=2)
    for r in c_rows:
        ax[2].loglog(c_ns, r["errors"], "o-" if r["prediction"] == "data" else "x:",
                     label=f"{r['prediction']} {r['scheme']} ({r['slope']:.2f})")
    ax[2].set(title="(c) order on a random MLP", xlabel="N", ylabel="max error vs diffrax")
    ax[2].legend(fontsize=6, ncol=2)
    for name in dict.fromkeys(r["method"] for r in d_rows):
        rs = [r for r in d_rows if r["method"] == name]
        ax[3].loglog([r["err_z"] for r in rs], [r["temp_mb"] for r in rs], "o-", label=name)
        for r in rs:
            ax[3].annotate(str(r["N"]), (r["err_z"], r["temp_mb"]), fontsize=6)
    ax[3].set(title="(d) gradient: memory vs dL/dz error (labels: N)",
              xlabel="relative error of dL/dz", ylabel="compiled scratch memory (MiB)")
    ax[3].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fmt(v):
    return f"{v:.1e}"


def write_md(path, info, a_rows, b_rows, c_rows, c_ns, prob, d_rows, seconds):
    L = ["# Rex: exact inversion, reversibility, orders and gradient cost", "",
         f"Written by `benchmarks/rex.py` in {seconds:.0f} s. Plot: `rex.png`.", ""]
    L += ["## (a) Inversion round trip, digits model", "",
          "The bundled digits model (`jadeis.digits`, 8x8 images, VPLinear, class conditioning), "
          "64 test images: `encode_ode` then `sample` with the same solver and grid "
          "(log-SNR grid). float32: the MSE of the round trip (images in [-1, 1]), the metric "
          "of the published table; float64: relative error ||x0' - x0|| / ||x0||. "
          "The float64 column casts the network's parameters to float64.", ""]
    ns = sorted({r["N"] for r in a_rows})
    hdr = ["method"] + [f"f32 MSE N={n}" for n in ns] + [f"f64 rel N={n}" for n in ns]
    body = []
    for name in dict.fromkeys(r["method"] for r in a_rows):
        rs = {r["N"]: r for r in a_rows if r["method"] == name}
        body.append([name] + [fmt(rs[n]["mse32"]) for n in ns] + [fmt(rs[n]["rel64"]) for n in ns])
    L += C.md_table(hdr, body) + [""]
    L += ["Published, **Stable Diffusion (a different model: large latents, a U-Net), "
          "float32 MSE** (Blasingame & Liu 2025); not comparable number for number, only in "
          "kind:", ""]
    L += C.md_table(["method", "N=10", "N=20", "N=50"],
                    [[k] + [fmt(v[n]) if n in v else "-" for n in (10, 20, 50)]
                     for k, v in PUBLISHED.items()]) + [""]
    L += ["## (b) Where reversibility breaks down", "",
          "Round-trip relative error of Rex (midpoint, data form) on the same 64 digits, "
          "against the coupling zeta, N and the dtype. The inverse divides by zeta each step, "
          "so rounding grows like zeta^-N times the Lipschitz factors.", ""]
    bns = sorted({r["N"] for r in b_rows})
    body = []
    for dt in ("float32", "float64"):
        for zeta in dict.fromkeys(r["coupling"] for r in b_rows):
            rs = {r["N"]: r for r in b_rows if r["dtype"] == dt and r["coupling"] == zeta}
            body.append([dt, zeta] + [fmt(rs[n]["rel"]) for n in bns])
    L += C.md_table(["dtype", "zeta"] + [f"N={n}" for n in bns], body) + [""]
    L += ["## (c) Order of each base scheme on a random MLP", "",
          "Coupled Rex (default coupling 0.999), `RandomMLP(dim=2, hidden=16, seed=0)` of "
          "tests/helpers.py, VPLinear, log-SNR grid over [t_max, 1e-3], max error of x_0 "
          "against diffrax Tsit5 at rtol = atol = 1e-10 (float64). Slope fitted over "
          f"N = {', '.join(map(str, c_ns))}.", ""]
    L += C.md_table(["prediction", "scheme", "nominal order", "fitted slope"]
                    + [f"error N={n}" for n in c_ns],
                    [[r["prediction"], r["scheme"], r["order"], f"{r['slope']:.2f}"]
                     + [fmt(e) for e in r["errors"]] for r in c_rows]) + [""]
    L += ["## (d) Time and memory per gradient", "",
          f"Problem: {prob.description} (float64). Gradient of the loss w.r.t. x_T, z and "
          "params in one call; time is the median of repeated calls after compilation; "
          "memory is XLA's compiled scratch memory (`temp_size_in_bytes`). Errors are "
          "relative to a tight reference (DPM-Solver++(3M) + DiscreteAdjoint at N = 2000), "
          "so they mix the discretisation error of the sampler and the error of the gradient "
          "strategy. Model evaluations per gradient in the last column (a VJP counted as one).",
          ""]
    L += C.md_table(["method", "N", "ms / gradient", "scratch MiB", "compile s",
                     "err dL/dx_T", "err dL/dz", "err dL/dparams", "evaluations"],
                    [[r["method"], r["N"], f"{1e3 * r['seconds']:.1f}", f"{r['temp_mb']:.2f}",
                      f"{r['compile_s']:.1f}", fmt(r["err_x_T"]), fmt(r["err_z"]),
                      fmt(r["err_params"]), r["evals"]] for r in d_rows]) + [""]
    L += ["## Machine", "", C.machine_md(info), ""]
    Path(path).write_text("\n".join(L))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run (small sizes)")
    ap.add_argument("--parts", default="abcd", help="which parts to run (default: abcd)")
    ap.add_argument("--out", default=str(C.RESULTS), help="output folder")
    args = ap.parse_args()
    t_start = time.time()
    info = C.machine_info(t_start)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = C.log
    a_ns = (10,) if args.quick else (10, 20, 50)
    b_ns = (10, 50) if args.quick else (10, 50, 200)
    couplings = (0.5, 1.0) if args.quick else (0.5, 0.9, 0.99, 0.999, 1.0)
    c_ns = (32, 64) if args.quick else (32, 64, 128, 256)
    d_ns = (10, 20) if args.quick else (20, 100, 500)
    a_rows = b_rows = c_rows = d_rows = []
    prob = None
    if "a" in args.parts or "b" in args.parts:
        model, x0, z = digits_setup(16 if args.quick else 64)
        if "a" in args.parts:
            a_rows = part_a(model, x0, z, a_ns, log)
        if "b" in args.parts:
            b_rows = part_b(model, x0, z, couplings, b_ns, log)
    if "c" in args.parts:
        c_rows = part_c(c_ns, log)
    if "d" in args.parts:
        prob, d_rows = part_d(d_ns, 2 if args.quick else 3, log)
    seconds = time.time() - t_start
    if args.parts == "abcd":
        plot(a_rows, b_rows, c_rows, c_ns, d_rows, out / "rex.png")
        write_md(out / "rex.md", info, a_rows, b_rows, c_rows, c_ns, prob, d_rows, seconds)
        log(f"wrote {out / 'rex.md'} and {out / 'rex.png'} in {seconds:.0f} s")
    else:
        log(f"done in {seconds:.0f} s (tables are written only with --parts abcd)")


if __name__ == "__main__":
    main()
