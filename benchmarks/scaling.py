"""Scaling benchmark: samples/s, gradients/s and per-device compiled memory versus the
number of devices, with x_T sharded along a "batch" mesh axis (a fixed global batch).

Host devices (the default): one subprocess per device count, with
``XLA_FLAGS=--xla_force_host_platform_device_count=n``. They share this machine's CPU
cores, so throughput does not grow with n here; what the table shows is that the work and
the memory split: the per-device program holds batch/n rows and its compiled memory falls
like 1/n.

On a GPU/TPU machine (all counts in one process, meshes over the first n accelerators):

    python benchmarks/scaling.py --in-process --counts 1 2 4 8 --batch 4096 --dim 256 \
        --hidden 1024 --out benchmarks/results/scaling_gpu

Writes ``<out>.md`` (table) and ``<out>.png``; default ``benchmarks/results/scaling``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(n, batch, dim, hidden, steps, repeats):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import jadeis

    devices = jax.devices()[:n]
    assert len(devices) == n, (n, jax.devices())
    mesh = Mesh(np.asarray(devices), ("batch",))
    rows = NamedSharding(mesh, P("batch"))
    rep = NamedSharding(mesh, P())
    k = jax.random.split(jax.random.key(0), 4)
    params = jax.device_put(
        (
            jax.random.normal(k[1], (dim, hidden)) / np.sqrt(dim),
            jnp.zeros(hidden),
            jax.random.normal(k[2], (hidden, dim)) / 30,
        ),
        rep,
    )

    def eps_fn(p, x, t, z):
        w1, b1, w2 = p
        return 0.9 * x + jnp.tanh(x @ w1 + b1 + t.astype(x.dtype)) @ w2

    x_T = jax.device_put(jax.random.normal(k[0], (batch, dim)), rows)
    sch = jadeis.VPLinear()
    ts = jadeis.time_grid(sch, steps)
    fwd = jax.jit(lambda p, x: jadeis.sample(eps_fn, p, x, schedule=sch, ts=ts))
    grad = jax.jit(
        jax.grad(
            lambda p, x: jnp.sum(
                jadeis.sample(eps_fn, p, x, schedule=sch, ts=ts, adjoint=jadeis.DiscreteAdjoint())
                ** 2
            ),
            argnums=(0, 1),
        )
    )
    out = {"devices": n, "batch": batch, "local_batch": batch // n}
    for name, f in (("sample", fwd), ("grad", grad)):
        compiled = f.lower(params, x_T).compile()
        mem = compiled.memory_analysis()
        out[f"{name}_mem_bytes"] = int(
            mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
        )
        out[f"{name}_temp_bytes"] = int(mem.temp_size_in_bytes)
        jax.block_until_ready(compiled(params, x_T))
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(params, x_T))
            best = min(best, time.perf_counter() - t0)
        out[f"{name}_per_s"] = batch / best
    return out


def write(results, out, args, platform):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [
        "# Scaling with the number of devices",
        "",
        f"`python benchmarks/scaling.py {' '.join(sys.argv[1:])}` on {platform}: global batch "
        f'{args.batch} (x_T sharded along "batch"), state dim {args.dim}, MLP hidden '
        f"{args.hidden}, {args.steps} DPM-Solver++(2M) steps, gradients by DiscreteAdjoint "
        f"with respect to the parameters and x_T; best of {args.repeats} runs. Memory: XLA's "
        "compiled per-device memory (arguments + outputs + temporaries).",
        "",
        "| devices | rows per device | samples/s | gradients/s | per-device memory, sample "
        "| per-device memory, gradient | of which temporaries (gradient) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['devices']} | {r['local_batch']} | {r['sample_per_s']:.0f} | "
            f"{r['grad_per_s']:.0f} | {r['sample_mem_bytes'] / 1024:.0f} KiB | "
            f"{r['grad_mem_bytes'] / 1024:.0f} KiB | {r['grad_temp_bytes'] / 1024:.0f} KiB |"
        )
    if not args.in_process:
        lines += [
            "",
            "**Host devices share this machine's CPU cores** (here 2 cores, shared with other "
            "jobs), so samples/s and gradients/s do not grow with the device count (and are "
            "noisy: other jobs run on the same cores): every "
            '"device" is a slice of the same CPUs. The point of this table is that the work '
            "and the memory split: each device's compiled program holds batch / n rows "
            "(tests/test_sharding_split.py checks its HLO), and its memory falls about like "
            "1 / n. On a machine with n accelerators the throughput scales instead; run:",
            "",
            "```",
            "python benchmarks/scaling.py --in-process --counts 1 2 4 8 --batch 4096 --dim 256 "
            "--hidden 1024 --out benchmarks/results/scaling_gpu",
            "```",
        ]
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    d = [r["devices"] for r in results]
    ax[0].plot(d, [r["sample_per_s"] for r in results], "o-", label="samples/s")
    ax[0].plot(d, [r["grad_per_s"] for r in results], "s-", label="gradients/s")
    ax[0].set(xlabel="devices", ylabel="per second", title="throughput", xticks=d)
    ax[0].legend()
    ax[1].plot(d, [r["sample_mem_bytes"] / 1024 for r in results], "o-", label="sample")
    ax[1].plot(d, [r["grad_mem_bytes"] / 1024 for r in results], "s-", label="gradient")
    ax[1].plot(d, [results[0]["grad_mem_bytes"] / 1024 / n for n in d], "k:", label="1/n")
    ax[1].set(
        xlabel="devices",
        ylabel="KiB per device",
        title="compiled memory per device",
        xticks=d,
        xscale="log",
        yscale="log",
    )
    ax[1].legend()
    fig.suptitle(f"jadeis scaling ({platform})", fontsize=10)
    fig.tight_layout()
    fig.savefig(f"{out}.png", dpi=110)


def main():
    p = argparse.ArgumentParser(description="scaling benchmark")
    p.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--in-process",
        action="store_true",
        help="use the first n devices of this process (GPU/TPU machines)",
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaling"))
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    shape = (args.batch, args.dim, args.hidden, args.steps, args.repeats)
    if args.worker is not None:
        print("RESULT " + json.dumps(measure(args.worker, *shape)), flush=True)
        return
    results = []
    if args.in_process:
        import jax

        platform = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
        for n in args.counts:
            results.append(measure(n, *shape))
            print(results[-1], flush=True)
    else:
        platform = f"host CPU devices ({os.cpu_count()} cores shared)"
        for n in args.counts:
            env = dict(
                os.environ,
                JAX_PLATFORMS="cpu",
                XLA_FLAGS=(
                    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
                ).strip(),
            )
            env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")])
            )
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                str(n),
                "--batch",
                str(args.batch),
                "--dim",
                str(args.dim),
                "--hidden",
                str(args.hidden),
                "--steps",
                str(args.steps),
                "--repeats",
                str(args.repeats),
            ]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                raise SystemExit(proc.stdout + proc.stderr)
            results.append(json.loads(line[0][7:]))
            print(results[-1], flush=True)
    write(results, args.out, args, platform)
    Path(f"{args.out}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
