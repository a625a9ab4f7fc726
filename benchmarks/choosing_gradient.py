"""The gradient dial, measured: greedy, truncated, continuous and exact gradients on the
bundled digits model and the conv U-Net (``python benchmarks/choosing_gradient.py``).

For each problem (a batch of x_T and conditionings z, DDIM on N steps, the loss
``0.5 ||x_0 - target||^2`` per example, summed) and each setting of the dial:

- time per guidance iteration: one jitted ``value_and_grad`` of the loss with respect to
  ``(x_T, z)`` (for greedy: one greedy sample), median over repeats after a warm-up; the
  compile time (trace + lower + XLA compile) separately;
- peak memory: the compiled program's temp bytes (``memory_analysis().temp_size_in_bytes``);
- gradient error and cosine to the exact gradient, ``DiscreteAdjoint`` of the same sampler
  (the Rex row: of Rex). Greedy forms no gradient of the inputs: its cosine compares, at every
  step, the direction it follows, ``d L(x0_hat) / d eps_i`` (the one-step map), with the exact
  ``d L(x_0) / d eps_i`` through the rest of the sampler (the median over the steps);
- the loss reached after a budget of model evaluations: Adam on ``(x_T, z)`` with
  ``jadeis.guide`` for as many iterations as the budget buys (each iteration's NFE from the
  strategy's ``jadeis.Stats``: forward evaluations + the gradient's evaluations and VJPs; the
  final sample's N counted), greedy: one greedy sample (N), and DiscreteAdjoint followed by a
  greedy final sample.

Writes ``benchmarks/results/choosing_gradient.{json,md,png}`` and copies the plot to
``docs/choosing-a-gradient.png``. ``--problems digits`` or ``unet`` runs one; ``--quick``:
fewer repeats and a smaller budget (a smoke test, not committed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import common as C  # noqa: E402
import jadeis  # noqa: E402
import problems as P  # noqa: E402

log = C.log
RESULTS = HERE / "results"
DOCS = HERE.parent / "docs"
#: Greedy-DiM*'s published inner loop: 50 Adam steps (lr 0.01, b1 0.5, b2 0.9) per step
GREEDY_INNER = 50


# ----------------------------------------------------------------------------------------
# the problems


class Setup:
    """One problem: model, inputs, a per-example loss, the grid, the budget."""

    def __init__(self, name, problem, target, steps, budget, reps, lr):
        self.name = name
        self.p = problem
        self.target = target
        self.steps = steps
        self.ts = jadeis.time_grid(problem.schedule, steps)
        self.budget = budget
        self.reps = reps
        self.lr = lr

    def per_example(self, x0):
        axes = tuple(range(1, x0.ndim))
        return 0.5 * jnp.sum((x0 - self.target) ** 2, axis=axes)

    def sample(self, x_T, z, solver, adjoint, **kw):
        p = self.p
        return jadeis.sample(
            p.eps_fn,
            p.params,
            x_T,
            z,
            schedule=p.schedule,
            ts=self.ts,
            solver=solver,
            adjoint=adjoint,
            **kw,
        )


def digits_setup(quick):
    p = P.digits_problem(batch=4, log=log)
    from jadeis.digits import load_split

    images, labels = load_split("test")
    # targets: real test digits (of other classes than the conditioning asks for)
    want = (np.arange(4) + 5) % 10
    idx = [int(np.flatnonzero(labels == c)[0]) for c in want]
    target = jnp.asarray(images[idx], jnp.float64)
    return Setup("digits", p, target, 20, 300 if quick else 1260, 3 if quick else 7, 0.05)


def unet_setup(quick):
    import unet

    p = P.unet_problem(batch=1, log=log)
    target = unet.SIGMA_DATA * jax.random.normal(jax.random.key(44), p.x_T.shape, jnp.float64)
    # the budget: what one CPU core does in about 10 minutes, compilation included
    return Setup("unet", p, target, 10, 100 if quick else 250, 2 if quick else 3, 0.05)


# ----------------------------------------------------------------------------------------
# the rows


def rows(n):
    ks = sorted({1, 2, 5, n // 2})
    out = [("greedy", "Greedy (noise; 50 x Adam per step)", jadeis.DDIM(), None)]
    for k in ks:
        half = " = N/2" if k == n // 2 else ""
        out.append(
            (
                f"trunc{k}",
                f"Truncated K={k}{half} (x_T: linear)",
                jadeis.DDIM(),
                jadeis.Truncated(k, x_T_gradient="linear"),
            )
        )
    out += [
        ("deis1", "AdjointDEIS-1", jadeis.DDIM(), jadeis.AdjointDEIS(order=1)),
        ("deis2", "AdjointDEIS-2", jadeis.DDIM(), jadeis.AdjointDEIS(order=2)),
        ("discrete", "DiscreteAdjoint", jadeis.DDIM(), jadeis.DiscreteAdjoint()),
        ("rex", "ReversibleAdjoint (Rex)", jadeis.Rex(), jadeis.ReversibleAdjoint()),
        ("backprop", "Backprop", jadeis.DDIM(), jadeis.Backprop()),
    ]
    return out


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in jax.tree.leaves(tree)])


def compare(g, ref):
    a, b = flat(g), flat(ref)
    err = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return err, cos


def timed(fn, args, reps):
    """``(compiled, compile s, temp bytes, median s per call)``."""
    compiled, compile_s, temp = C.compile_timed(fn, args)
    jax.block_until_ready(compiled(*args))  # warm-up
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        samples.append(time.perf_counter() - t0)
    return compiled, compile_s, temp, statistics.median(samples)


def guidance_run(s: Setup, solver, adjoint, budget=None):
    """One compiled ``value_and_grad`` of the loss w.r.t. ``(x_T, z)`` (with the run's Stats),
    used for everything: the gradient at the start, the NFE of an iteration, and Adam for as
    many iterations as the budget buys (the loss before each update, then of the result)."""
    p = s.p

    def objective(v):
        sol = jadeis.solve(
            p.eps_fn,
            p.params,
            v[0],
            v[1],
            schedule=p.schedule,
            ts=s.ts,
            solver=solver,
            adjoint=adjoint,
        )
        losses = s.per_example(sol.x_0)
        return jnp.sum(losses), (losses, sol.stats)

    f = jax.value_and_grad(objective, has_aux=True)
    v = (p.x_T, p.z)
    compiled, compile_s, temp = C.compile_timed(f, (v,))
    (_, (_, st)), g0 = jax.block_until_ready(compiled(v))  # also the warm-up
    fwd = int(st.model_evals)
    per_iter = fwd + int(st.grad_model_evals) + int(st.grad_vjps)
    budget = s.budget if budget is None else budget
    iters = max(0, (budget - fwd) // per_iter)
    opt = optax.adam(s.lr)
    state = opt.init(v)
    losses, times = [], []
    for _ in range(iters):
        t0 = time.perf_counter()
        (_, (ls, _)), g = jax.block_until_ready(compiled(v))
        times.append(time.perf_counter() - t0)
        losses.append(float(jnp.mean(ls)))
        upd, state = opt.update(g, state, v)
        v = optax.apply_updates(v, upd)
    (_, (ls, _)), _ = compiled(v)
    losses.append(float(jnp.mean(ls)))
    while len(times) < s.reps:  # too few iterations to time: repeat at the start
        t0 = time.perf_counter()
        jax.block_until_ready(compiled((p.x_T, p.z)))
        times.append(time.perf_counter() - t0)
    return {
        "grad0": g0,
        "v": v,
        "seconds": statistics.median(times),
        "compile_s": compile_s,
        "temp_bytes": temp,
        "fwd": fwd,
        "nfe_per_iter": per_iter,
        "iters": int(iters),
        "trace_nfe": [int(k * per_iter + fwd) for k in range(len(losses))],
        "trace_loss": losses,
    }


GREEDY_OPT = optax.adam(0.01, b1=0.5, b2=0.9)


def greedy_fn(s: Setup):
    p = s.p

    def f(x_T, z):
        sol = jadeis.greedy_sample(
            s.per_example,
            p.eps_fn,
            p.params,
            x_T,
            z,
            schedule=p.schedule,
            ts=s.ts,
            optimizer=GREEDY_OPT,
            inner_steps=GREEDY_INNER,
            solver=jadeis.DDIM(),
        )
        return sol.x_0, sol.stats.model_evals, sol.loss_evals, sol.loss_vjps

    return f


def greedy_step_cosines(s: Setup):
    """Per DDIM step i: the cosine of greedy's direction d L(x0_hat_i)/d eps_i with the exact
    d L(x_0)/d eps_i (an additive perturbation of step i's prediction, through the rest of
    the sampler), along the plain trajectory."""
    p = s.p
    n = s.steps
    sch = p.schedule

    def eps_pert(params, x, t, zz):
        return p.eps_fn(params, x, t, zz["z"]) + zz["d"]

    zs = jax.tree.map(lambda v: jnp.broadcast_to(v, (n,) + v.shape), p.z)
    d0 = jnp.zeros((n,) + p.x_T.shape, p.x_T.dtype)

    def exact_and_greedy(d):
        def total(d):
            x0 = jadeis.sample(
                eps_pert,
                p.params,
                p.x_T,
                jadeis.PerStep({"z": zs, "d": d}),
                schedule=sch,
                ts=s.ts,
                solver=jadeis.DDIM(),
            )
            return jnp.sum(s.per_example(x0))

        traj = jadeis.sample_trajectory(
            p.eps_fn, p.params, p.x_T, p.z, schedule=sch, ts=s.ts, solver=jadeis.DDIM()
        )

        def greedy_dir(x, t):
            eps = p.eps_fn(p.params, x, t, p.z)
            a, sg = sch.alpha(t).astype(x.dtype), sch.sigma(t).astype(x.dtype)
            return jax.grad(lambda u: jnp.sum(s.per_example((x - sg * u) / a)))(eps)

        dirs = jax.lax.map(lambda xt: greedy_dir(*xt), (traj[:-1], s.ts[:-1]))
        return jax.grad(total)(d), dirs

    exact, greedy = jax.jit(exact_and_greedy)(d0)
    return [compare(greedy[i], exact[i])[1] for i in range(n)]


# ----------------------------------------------------------------------------------------
# one problem


def measure(s: Setup):
    p = s.p
    n = s.steps
    x_T, z = p.x_T, p.z
    out = {
        "problem": s.name,
        "description": p.description.replace("issue 5; ", ""),
        "N": n,
        "budget": s.budget,
        "lr": s.lr,
        "reps": s.reps,
        "rows": [],
    }
    runs = {}
    for key, label, solver, adjoint in rows(n):
        t_row = time.perf_counter()
        row = {"key": key, "label": label, "solver": type(solver).__name__}
        if adjoint is None:  # greedy: one sample
            compiled, comp_s, temp, sec = timed(greedy_fn(s), (x_T, z), s.reps)
            x0, evals, l_ev, l_vj = compiled(x_T, z)
            cos = greedy_step_cosines(s)
            loss = float(jnp.mean(s.per_example(x0)))
            row.update(
                seconds=sec,
                compile_s=comp_s,
                temp_bytes=temp,
                grad_error=None,
                cosine=float(np.median(cos)),
                step_cosines=cos,
                nfe_per_iter=int(evals),
                iters=0,
                loss_evals=int(l_ev),
                loss_vjps=int(l_vj),
                trace_nfe=[int(evals)],
                trace_loss=[loss],
                loss_after_budget=loss,
            )
        else:
            r = guidance_run(s, solver, adjoint)
            runs[key] = r
            row.update({k: v for k, v in r.items() if k not in ("grad0", "v", "fwd")})
            row.update(
                loss_evals=r["iters"], loss_vjps=r["iters"], loss_after_budget=r["trace_loss"][-1]
            )
        row["row_seconds"] = time.perf_counter() - t_row
        out["rows"].append(row)
        log(
            f"  {s.name} {label:38s} {1e3 * row['seconds']:9.1f} ms/it  compile "
            f"{row['compile_s']:6.1f} s  temp {row['temp_bytes'] / 2**20:8.2f} MiB  "
            f"{row['iters']:3d} it  loss {row['loss_after_budget']:.4f}"
            f"  ({row['row_seconds']:.0f} s)"
        )
    # gradient error and cosine at the start, against DiscreteAdjoint of the same sampler
    ref = {"DDIM": runs["discrete"]["grad0"]}
    t1 = time.perf_counter()
    ref["Rex"] = guidance_run(s, jadeis.Rex(), jadeis.DiscreteAdjoint(), budget=0)["grad0"]
    out["rex_reference_seconds"] = round(time.perf_counter() - t1, 1)
    for row in out["rows"]:
        if row["key"] in runs:
            g, r = runs[row["key"]]["grad0"], ref[row["solver"]]
            row["grad_error"], row["cosine"] = compare(g, r)
            row["grad_error_x_T"], row["cosine_x_T"] = compare(g[0], r[0])
            row["grad_error_z"], row["cosine_z"] = compare(g[1], r[1])
            log(
                f"  {s.name} {row['label']:38s} rel. error x_T {row['grad_error_x_T']:.2e} "
                f"z {row['grad_error_z']:.2e}  cosine x_T {row['cosine_x_T']:.4f} "
                f"z {row['cosine_z']:.4f}"
            )
    # the hybrid: DiscreteAdjoint's iterations, then the final sample taken greedily
    disc = runs["discrete"]
    x0, _, l_ev, l_vj = jax.jit(greedy_fn(s))(*disc["v"])
    hyb = {
        "key": "hybrid",
        "label": "DiscreteAdjoint + greedy final sample",
        "iters": disc["iters"],
        "nfe_per_iter": disc["nfe_per_iter"],
        "loss_evals": int(disc["iters"] + l_ev),
        "loss_vjps": int(disc["iters"] + l_vj),
        "loss_after_budget": float(jnp.mean(s.per_example(x0))),
        "nfe": disc["trace_nfe"][-1],
    }
    out["rows"].append(hyb)
    log(
        f"  {s.name} {hyb['label']:38s} {hyb['iters']} it + greedy  loss "
        f"{hyb['loss_after_budget']:.4f}"
    )
    out["loss_start"] = runs["discrete"]["trace_loss"][0]
    return out


# ----------------------------------------------------------------------------------------
# output


def fmt_mib(b):
    return f"{b / 2**20:.2f}" if b >= 0 else "n/a"


def table(res) -> list[str]:
    n = res["N"]
    head = [
        "setting",
        "ms / iteration",
        "compile s",
        "temp MiB",
        "rel. error x_T / z",
        "cosine x_T / z",
        "NFE / iteration",
        f"iterations in {res['budget']} NFE",
        "loss after budget",
        "loss net evals + VJPs",
    ]
    body = []
    for r in res["rows"]:
        if "seconds" not in r:  # the hybrid
            body.append(
                [
                    r["label"],
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    f"{r['nfe_per_iter']}",
                    f"{r['iters']} + greedy sample",
                    f"{r['loss_after_budget']:.4f}",
                    f"{r['loss_evals']} + {r['loss_vjps']}",
                ]
            )
            continue
        greedy = r["grad_error"] is None
        body.append(
            [
                r["label"],
                f"{1e3 * r['seconds']:.1f}" + (" (sample)" if greedy else ""),
                f"{r['compile_s']:.1f}",
                fmt_mib(r["temp_bytes"]),
                "-" if greedy else f"{r['grad_error_x_T']:.1e} / {r['grad_error_z']:.1e}",
                f"{r['cosine']:.3f} (per step, median)"
                if greedy
                else f"{r['cosine_x_T']:.3f} / {r['cosine_z']:.3f}",
                f"{r['nfe_per_iter']}" + (" (the sample)" if greedy else ""),
                "1 sample" if greedy else f"{r['iters']}",
                f"{r['loss_after_budget']:.4f}",
                f"{r['loss_evals']} + {r['loss_vjps']}",
            ]
        )
    lines = [
        f"**{res['problem']}** ({res['description']}; DDIM, N = {n}; loss at the start "
        f"{res['loss_start']:.4f}, per example)",
        "",
    ]
    return lines + C.md_table(head, body)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(2, len(results), figsize=(6.2 * len(results), 8.6), squeeze=False)
    for j, res in enumerate(results):
        ax = axes[0, j]
        for r in res["rows"]:
            if "trace_nfe" not in r:
                continue
            if r["grad_error"] is None:
                ax.scatter(
                    r["trace_nfe"],
                    r["trace_loss"],
                    marker="*",
                    s=120,
                    color="k",
                    label=r["label"],
                    zorder=4,
                )
            else:
                ax.plot(r["trace_nfe"], r["trace_loss"], lw=1.3, label=r["label"])
        hyb = next(r for r in res["rows"] if r["key"] == "hybrid")
        disc = next(r for r in res["rows"] if r["key"] == "discrete")
        ax.scatter(
            [disc["trace_nfe"][-1]],
            [hyb["loss_after_budget"]],
            marker="P",
            s=90,
            color="crimson",
            label=hyb["label"],
            zorder=4,
        )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("NFE (diffusion-model evaluations + VJPs)")
        ax.set_ylabel("loss of the sample (per example)")
        ax.set_title(f"{res['problem']}: loss per NFE (DDIM, N = {res['N']})", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6.5, loc="best")
        ax = axes[1, j]
        for r in res["rows"]:
            if "seconds" not in r:
                continue
            x = 1e3 * r["seconds"]
            if r["grad_error"] is None:
                ax.scatter(x, r["cosine"], s=90, marker="*", color="k")
                ys = [r["cosine"]]
            else:
                ax.scatter(x, r["cosine_z"], s=40, marker="o", color="C0")
                ax.scatter(x, r["cosine_x_T"], s=40, marker="o", facecolors="none", edgecolors="C3")
                ys = [r["cosine_z"]]
            dy = 6 if r["key"] in ("backprop", "trunc2", "deis2") else -9
            ax.annotate(
                r["label"].split(" (")[0],
                (x, ys[0]),
                fontsize=6.5,
                xytext=(5, dy),
                textcoords="offset points",
            )

        ax.scatter([], [], marker="o", color="C0", label="dL/dz")
        ax.scatter([], [], marker="o", facecolors="none", edgecolors="C3", label="dL/dx_T")
        ax.scatter([], [], marker="*", color="k", label="greedy: per step (median)")
        ax.legend(fontsize=7, loc="lower right")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("ms per guidance iteration (greedy: per sample), 1 CPU core")
        ax.set_ylabel("cosine to the exact gradient")
        ax.set_title(f"{res['problem']}: cost against accuracy", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--problems", default="digits,unet")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    out_dir = RESULTS / "quick" if args.quick else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.problems.split(","):
        t1 = time.perf_counter()
        log(f"problem {name}:")
        s = digits_setup(args.quick) if name == "digits" else unet_setup(args.quick)
        res = measure(s)
        res["seconds"] = round(time.perf_counter() - t1, 1)
        log(f"  {name}: {res['seconds']:.0f} s")
        results.append(res)
    info = C.machine_info(t0)
    (out_dir / "choosing_gradient.json").write_text(
        json.dumps({"machine": info, "results": results}, indent=1) + "\n"
    )
    md = []
    for res in results:
        md += table(res) + [""]
    (out_dir / "choosing_gradient.md").write_text("\n".join(md))
    plot(results, out_dir / "choosing_gradient.png")
    if not args.quick:
        shutil.copy(out_dir / "choosing_gradient.png", DOCS / "choosing-a-gradient.png")
    log("\n".join(md))
    log(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
