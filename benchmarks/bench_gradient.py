"""Cost and memory of a gradient through ``jadeis.sample``, per gradient strategy.

1. Gradient cost versus the forward pass at the same N: wall time of
   ``jit(grad(loss o sample))`` (gradients with respect to params, x_T and z) divided by
   the wall time of ``jit(sample)``, for AdjointDEIS (orders 1-3, cached and reconstruct),
   DiscreteAdjoint and Backprop. One model evaluation plus one vector-Jacobian product per
   step is the floor (a VJP costs about 2 model evaluations, so ~3x); target <= 3.5x.
   Timing: median over repeats after a warm-up call, every call synchronised with
   ``block_until_ready``; the forward pass and all strategies are timed round-robin inside
   each repeat, so machine-load drift affects them alike. Compile time (trace + lower +
   XLA compile) is measured separately and reported in its own column.
2. Memory versus N: ``temp_size_in_bytes`` of the compiled gradient
   (``jax.jit(grad_fn).lower(...).compile().memory_analysis()``): XLA's scratch memory for
   the whole forward + backward computation, arguments and outputs excluded.

    .venv/bin/python benchmarks/bench_gradient.py            # writes benchmarks/results/
    .venv/bin/python benchmarks/bench_gradient.py --quick    # a smoke run, prints only

Writes ``benchmarks/results/gradient_cost.{md,csv}`` and
``benchmarks/results/memory_vs_n.{md,csv,png}``.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import common as C  # noqa: E402
import jadeis  # noqa: E402

RESULTS = C.RESULTS
SCHEDULE = jadeis.VPLinear()
SOLVER = jadeis.DPMSolverPP(order=2)

STRATEGIES = {
    "AdjointDEIS-1 cached": jadeis.AdjointDEIS(order=1),
    "AdjointDEIS-2 cached": jadeis.AdjointDEIS(order=2),
    "AdjointDEIS-3 cached": jadeis.AdjointDEIS(order=3),
    "AdjointDEIS-1 reconstruct": jadeis.AdjointDEIS(order=1, trajectory="reconstruct"),
    "AdjointDEIS-2 reconstruct": jadeis.AdjointDEIS(order=2, trajectory="reconstruct"),
    "AdjointDEIS-3 reconstruct": jadeis.AdjointDEIS(order=3, trajectory="reconstruct"),
    "DiscreteAdjoint": jadeis.DiscreteAdjoint(),
    "Backprop": jadeis.Backprop(),
}
FLOOR = "floor: forward + N model VJPs"
MEMORY_STRATEGIES = (
    "AdjointDEIS-2 cached",
    "AdjointDEIS-2 reconstruct",
    "DiscreteAdjoint",
    "Backprop",
)


# ----------------------------------------------------------------------------------------
# The model: the benchmark MLP (common.py) with a time embedding and a conditioning vector:
# [x, sin/cos(t freqs), z] -> dense -> silu -> dense -> silu -> dense

mlp_eps = C.mlp_eps
EMB, ZDIM = 16, 8


def make_problem(batch, dim, hidden, dtype=jnp.float32):
    sizes = [dim + EMB + ZDIM, hidden, hidden, dim]
    freqs = C.time_embedding_freqs(EMB, 4.0, dtype=dtype)
    params = C.init_mlp(jax.random.key(0), sizes, dtype, freqs=freqs)
    x_T = jax.random.normal(jax.random.key(1), (batch, dim), dtype)
    z = jax.random.normal(jax.random.key(2), (ZDIM,), dtype)
    return params, x_T, z


def forward_fn(ts):
    def run(params, x_T, z):
        return jadeis.sample(mlp_eps, params, x_T, z, schedule=SCHEDULE, ts=ts, solver=SOLVER)

    return run


def floor_fn(ts):
    """The floor of any rematerialising gradient: the forward pass, then one model VJP per
    step at the stored states (a hand-written ``lax.scan``; the adjoint recursion itself is
    left out, only the model's cost is kept)."""

    def run(params, x_T, z):
        traj = jadeis.sample_trajectory(
            mlp_eps, params, x_T, z, schedule=SCHEDULE, ts=ts, solver=SOLVER
        )
        traj = jax.lax.stop_gradient(traj)

        def body(carry, inp):
            ct, gp, gz = carry
            x, t = inp
            _, vjp = jax.vjp(lambda p, xx, zz: mlp_eps(p, xx, t, zz), params, x, z)
            dp, dx, dz = vjp(ct)
            gp = jax.tree.map(jnp.add, gp, dp)
            return (dx, gp, gz + dz), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        ct0 = 2.0 * traj[-1] / traj[-1].size
        (gx, gp, gz), _ = jax.lax.scan(
            body,
            (ct0, zeros, jnp.zeros_like(z)),
            (traj[:-1], ts[:-1].astype(x_T.dtype)),
            reverse=True,
        )
        return gp, gx, gz

    return run


def grad_fn(ts, adjoint):
    def loss(params, x_T, z):
        x0 = jadeis.sample(
            mlp_eps, params, x_T, z, schedule=SCHEDULE, ts=ts, solver=SOLVER, adjoint=adjoint
        )
        return jnp.mean(x0**2)

    return jax.grad(loss, argnums=(0, 1, 2))


# ----------------------------------------------------------------------------------------
# Measurement


def bench_cost(label, n, problem, reps, min_batch_s, log):
    """Rows of the cost table at one N: forward and every strategy, timed round-robin."""
    args = problem
    ts = jadeis.time_grid(SCHEDULE, n)
    fns = {"forward (sample)": forward_fn(ts), FLOOR: floor_fn(ts)}
    fns.update({name: grad_fn(ts, adj) for name, adj in STRATEGIES.items()})
    compiled, compile_s, calls = {}, {}, {}
    for name, fn in fns.items():
        compiled[name], compile_s[name], _ = C.compile_timed(fn, args)
        calls[name] = C.calls_per_batch(compiled[name], args, min_batch_s)
        log(f"  N={n} compiled {name} in {compile_s[name]:.2f} s")
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name in fns:
            samples[name].append(C.timed_batch(compiled[name], args, calls[name]))
    fwd = statistics.median(samples["forward (sample)"])
    floor = statistics.median(samples[FLOOR])
    rows = []
    for name in fns:
        med = statistics.median(samples[name])
        q1, _, q3 = C.quartiles(samples[name])
        rows.append(
            {
                "problem": label,
                "N": n,
                "method": name,
                "median_ms": 1e3 * med,
                "q1_ms": 1e3 * q1,
                "q3_ms": 1e3 * q3,
                "ratio_to_forward": med / fwd,
                "ratio_to_floor": med / floor,
                "compile_s": compile_s[name],
            }
        )
    return rows


def bench_memory(ns, problem, log):
    rows = []
    x_bytes = problem[1].size * problem[1].dtype.itemsize
    for n in ns:
        ts = jadeis.time_grid(SCHEDULE, n)
        for name in MEMORY_STRATEGIES:
            b = C.compile_timed(grad_fn(ts, STRATEGIES[name]), problem)[2]
            rows.append({"N": n, "method": name, "temp_bytes": b, "x_bytes": x_bytes})
            log(f"  N={n} {name}: {b / 2**20:.3f} MiB")
    return rows


# ----------------------------------------------------------------------------------------
# Reporting


machine_md = C.machine_md


def cost_md(rows, info, setup):
    lines = [
        "# Gradient cost versus a forward `sample` at the same N",
        "",
        f"{setup}. Loss mean(x_0^2); gradients with respect to params, x_T and z.",
        "Wall time: median over repeats (quartiles in brackets) after a warm-up call, each",
        "repeat timed round-robin over all rows; `ratio to forward` = median / forward",
        "median at the same N. Target for AdjointDEIS and DiscreteAdjoint: ratio <= 3.5.",
        "The `floor` row is the least a rematerialising gradient can cost with this model:",
        "the forward pass plus one VJP of the model per step at the stored states (a",
        "hand-written scan without the adjoint recursion); `ratio to floor` shows each",
        "strategy's own overhead. Compile time (trace + lower + XLA compile) is separate.",
        "",
        "Machine and versions:",
        "",
        machine_md(info),
        "",
    ]
    for label, n in dict.fromkeys((r["problem"], r["N"]) for r in rows):
        lines += [
            f"## {label}, N = {n}",
            "",
            "| method | median ms [q1, q3] | ratio to forward | ratio to floor | compile s |",
            "|---|---|---|---|---|",
        ]
        for r in (r for r in rows if r["N"] == n and r["problem"] == label):
            lines.append(
                f"| {r['method']} | {r['median_ms']:.3f} [{r['q1_ms']:.3f}, {r['q3_ms']:.3f}] "
                f"| {r['ratio_to_forward']:.2f} | {r['ratio_to_floor']:.2f} "
                f"| {r['compile_s']:.2f} |"
            )
        sel = [r for r in rows if r["N"] == n and r["problem"] == label]
        adj = [r for r in sel if r["method"].startswith(("AdjointDEIS", "DiscreteAdjoint"))]
        floor = next(r for r in sel if r["method"] == FLOOR)["ratio_to_forward"]
        worst = max(r["ratio_to_forward"] for r in adj)
        lines += [
            "",
            f"AdjointDEIS / DiscreteAdjoint: {min(r['ratio_to_forward'] for r in adj):.2f}x "
            f"to {worst:.2f}x the forward pass (target 3.5x: "
            f"{'met' if worst <= 3.5 else 'NOT met'}); the floor is {floor:.2f}x, i.e. one "
            f"VJP of this model costs about {floor - 1:.1f} forward sampling steps here, "
            f"and the strategies run at {min(r['ratio_to_floor'] for r in adj):.2f}x to "
            f"{max(r['ratio_to_floor'] for r in adj):.2f}x the floor.",
            "",
        ]
    lines += [
        "## Reading",
        "",
        "Every rematerialising strategy pays the forward pass plus one model VJP per step, so",
        "its ratio to the forward pass is about 1 + (VJP cost / forward step cost). The 3.5x",
        "target assumes a VJP costs about 2.5 forward steps or less; where this machine's VJP",
        "of the model costs more (the medium MLP on CPU: ~4), no rematerialising gradient",
        "can meet it, and the ratio to the floor is the measure of the library's own",
        "overhead. Backprop avoids the re-evaluation but stores every activation, which",
        "costs memory (see memory_vs_n.md) and, at large N, time.",
        "",
    ]
    return "\n".join(lines)


def memory_md(rows, info, setup, png_name):
    ns = sorted({r["N"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    x_bytes = rows[0]["x_bytes"]
    table = {(r["N"], r["method"]): r["temp_bytes"] for r in rows}
    lines = [
        "# Gradient memory versus N",
        "",
        f"{setup}. |x| = {x_bytes} bytes.",
        "Compiled scratch memory of the gradient (`temp_size_in_bytes` of",
        "`jax.jit(grad_fn).lower(...).compile().memory_analysis()`, in MiB): everything XLA",
        "allocates for the forward and backward passes, arguments and outputs excluded.",
        "",
        "Machine and versions:",
        "",
        machine_md(info),
        "",
        "| N | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for n in ns:
        cells = [f"{table[(n, m)] / 2**20:.3f}" for m in methods]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "Growth per step between the smallest and largest N, in units of |x|:", ""]
    for m in methods:
        per = (table[(ns[-1], m)] - table[(ns[0], m)]) / (ns[-1] - ns[0]) / x_bytes
        lines.append(f"- {m}: {per:.2f} |x| per step")
    lines += ["", f"![memory versus N]({png_name})", ""]
    return "\n".join(lines)


def plot_memory(rows, path, setup):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["N"], r["temp_bytes"] / 2**20) for r in rows if r["method"] == m)
        ax.plot(*zip(*pts), marker="o", label=m)
    x_mib = rows[0]["x_bytes"] / 2**20
    ns = sorted({r["N"] for r in rows})
    ax.plot(ns, [n * x_mib for n in ns], "k:", label="N x |x| (the states)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sampling steps N")
    ax.set_ylabel("compiled scratch memory of the gradient (MiB)")
    ax.set_title(f"Gradient memory vs N\n{setup}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: small sizes, prints only")
    args = p.parse_args(argv)
    log = C.log

    if args.quick:
        cost_ns, reps, min_batch_s, mem_ns = (10,), 3, 0.01, (10, 50)
        sizes = {"small": (16, 8, 32)}
        mem_size = "small"
    else:
        cost_ns, reps, min_batch_s, mem_ns = (25, 100), 15, 0.1, (10, 50, 100, 200, 500)
        sizes = {"small": (16, 8, 32), "medium": (64, 32, 256)}
        mem_size = "medium"
    label = lambda k: f"{k} (batch {sizes[k][0]}, dim {sizes[k][1]}, hidden {sizes[k][2]})"
    common = (
        f"float32 MLP eps(x, t, z) with two silu hidden layers, "
        f"{type(SOLVER).__name__}(order={SOLVER.order}), VPLinear, log-SNR grid"
    )
    info = C.machine_info()
    log(common)
    log(info)

    cost_rows = []
    for key, (batch, dim, hidden) in sizes.items():
        problem = make_problem(batch, dim, hidden)
        for n in cost_ns:
            cost_rows += bench_cost(label(key), n, problem, reps, min_batch_s, log)
    for r in cost_rows:
        log(
            f"{r['problem'][:6]} N={r['N']:4d} {r['method']:30s} {r['median_ms']:9.3f} ms  "
            f"ratio {r['ratio_to_forward']:5.2f} (floor {r['ratio_to_floor']:5.2f})  "
            f"compile {r['compile_s']:.2f} s"
        )
    setup = f"Problem: {common}; sizes {', '.join(label(k) for k in sizes)}"
    problem = make_problem(*sizes[mem_size])
    mem_setup = f"Problem: {common}, {label(mem_size)}"
    mem_rows = bench_memory(mem_ns, problem, log)
    info["load_average_at_end"] = C.load_average()

    if args.quick:
        print(cost_md(cost_rows, info, setup))
        print(memory_md(mem_rows, info, mem_setup, "memory_vs_n.png"))
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    C.write_csv(RESULTS / "gradient_cost.csv", cost_rows, float_format=".6g")
    (RESULTS / "gradient_cost.md").write_text(cost_md(cost_rows, info, setup))
    C.write_csv(RESULTS / "memory_vs_n.csv", mem_rows, float_format=".6g")
    (RESULTS / "memory_vs_n.md").write_text(memory_md(mem_rows, info, mem_setup, "memory_vs_n.png"))
    plot_memory(mem_rows, RESULTS / "memory_vs_n.png", f"{label(mem_size)}, float32")
    log(f"wrote {RESULTS}/gradient_cost.{{md,csv}} and memory_vs_n.{{md,csv,png}}")


if __name__ == "__main__":
    sys.exit(main())
