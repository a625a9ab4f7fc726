"""Learned time grids of the benchmark problems, learned once and stored in
``benchmarks/grids/<problem>.json``; the sweep's "learned grid" methods read them from there.

``python benchmarks/grids.py`` learns every grid of ``PLAN`` (about 14 minutes on 2 shared
CPU cores, digits and the unet ~4 minutes each); ``--problems mixture,mlp``,
``--samplers unipc3``, ``--steps 16,32`` restrict it, and the other entries already in a file
are kept.
``benchmarks/run.py --learn-grids`` runs this before the sweep; ``run.py`` never learns grids
otherwise.

For each problem, sampler and step count N: ``jadeis.learn_time_grid`` (Adam, learning rate
0.05 cosine-decayed to 0.005, started from the log-SNR grid, gradients by DiscreteAdjoint)
fits the N + 1 times so that the sampler's x_0 matches a many-step reference x_0 (mean
squared error) on a *training* batch from ``problem.train_inputs(seed)``: other initial
noises (and, where z varies per sample, other conditionings) than the benchmark's, which
stay held out. The file records the settings, the date, the training loss before and after
and the relative x_0 error on a second, validation batch for the learned and the log-SNR
grid. Files are written atomically (a temporary file, then a rename).

``--target gradient`` learns the grids of ``GRAD_PLAN`` instead, with
``learn_time_grid(target="gradient")``: fitted so that the *gradient* of a guidance loss
(``0.5 ||x_0 - y||^2``, y a training target drawn like the benchmark's) with respect to x_T,
z and the parameters matches a many-step reference gradient (the sum of the three relative
squared errors; the benchmark's gradient error is the largest of the three relative errors).
They are stored in the same file under the keys ``<sampler>-grad`` (``dpmpp3-grad``,
``unipc3-grad``), with the gradient error of the learned, the log-SNR and the x_0-learned grid
on ``GRAD_VALID_BATCHES`` held-out batches of the benchmark's size (their median and each
batch's): the benchmark's gradient error of a batch is dominated by its one or two hardest
trajectories, so one large validation batch measures mostly its hardest trajectory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common as C  # noqa: E402
import jadeis  # noqa: E402

GRIDS = HERE / "grids"
log = C.log

SAMPLERS = {
    "dpmpp3": ("DPMSolverPP(order=3)", lambda: jadeis.DPMSolverPP(order=3)),
    "unipc3": ("UniPC(order=3)", lambda: jadeis.UniPC(order=3)),
}
# problem -> {sampler key: step counts}; the sweep's N of the "learned grid" methods are
# those found here. Measured on 2 shared CPU cores (seconds per grid, compile included):
# mixture 10-24, mlp 10-24, digits 15-54, unet 70 (N = 8) and ~130 (N = 16); the whole
# plan ~14 minutes. Left out to stay within 15 minutes: the unet at N = 32 (~4 minutes
# more; only UniPC(3), its best sampler, at all) and the mixture at N = 256 (its learned
# grids moved the training loss by < 5% there: the log-SNR grid is already as good).
PLAN = {
    "mixture": {"dpmpp3": (16, 32, 64, 128), "unipc3": (16, 32, 64, 128)},
    "mlp": {"dpmpp3": (16, 32, 64, 128), "unipc3": (16, 32, 64, 128)},
    "digits": {"dpmpp3": (16, 32, 64, 128), "unipc3": (16, 32, 64, 128)},
    "unet": {"unipc3": (8, 16)},
}
# per problem: training batch, iterations, reference sampler and steps
TRAIN = {
    "mixture": {"batch": 64, "iters": 150, "ref": ("dpmpp3", 2000)},
    "mlp": {"batch": 64, "iters": 150, "ref": ("dpmpp3", 2000)},
    "digits": {"batch": 32, "iters": 150, "ref": ("dpmpp3", 1000)},
    "unet": {"batch": 1, "iters": 40, "ref": ("unipc3", 256)},
}
TRAIN_SEED = 1
VALID_SEED = 2
# --target gradient: problem -> {sampler key: step counts}; stored under "<key>-grad".
# The mixture is the one headline problem whose cells the x_0-learned grids did not move
# (its gradient error, not its x_0 error, decides them); N as in the summary's cells
# (1e-2: N = 64..128; 1e-3: N = 128..256), and N = 32 to see whether a cheaper N gets there.
GRAD_PLAN = {
    "mixture": {"dpmpp3": (32, 64, 128, 256), "unipc3": (32, 64, 128, 256)},
}
# batch 256: at 64 the grid overfits the few trajectories that dominate the training
# gradient error (UniPC(3), N = 64: validation error 1.4e-2 vs 4.0e-3 at batch 256, geometric
# mean over 4 held-out batches of 16; measured with 150 iterations)
GRAD_TRAIN = {"mixture": {"batch": 256, "iters": 150, "ref": ("dpmpp3", 2000)}}
GRAD_WRT = ("x_T", "z", "params")
GRAD_VALID_BATCHES = 8  # held-out batches of the benchmark's batch size (seeds 3, 4, ...)
GRAD_SUFFIX = "-grad"


def path_for(problem_name: str) -> Path:
    return GRIDS / f"{problem_name}.json"


def load(problem_name: str) -> dict | None:
    path = path_for(problem_name)
    if not path.exists():
        return None
    return json.loads(path.read_text())


def available(problem_name: str, sampler_key: str) -> list[int]:
    """The step counts with a learned grid for this problem and sampler (sorted)."""
    data = load(problem_name)
    if data is None:
        return []
    return sorted(int(n) for n in data.get("grids", {}).get(sampler_key, {}))


def load_grid(problem_name: str, sampler_key: str, n: int):
    """The learned ``(n + 1,)`` float64 grid, or None if the file has none for these."""
    data = load(problem_name)
    if data is None:
        return None
    entry = data.get("grids", {}).get(sampler_key, {}).get(str(n))
    if entry is None:
        return None
    ts = jnp.asarray(entry["ts"], jnp.float64)
    if ts.shape != (n + 1,):
        raise ValueError(f"{path_for(problem_name)}: grid {sampler_key} N={n} has {ts.shape}")
    return ts


def write_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def rel(a, b) -> float:
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def learn_problem(problem, samplers=None, steps=None, iters=None) -> dict:
    """Learn the grids of ``PLAN[problem.name]`` (restricted to ``samplers``/``steps``),
    merge them into the problem's JSON file and return its contents."""
    plan = PLAN[problem.name]
    cfg = dict(TRAIN[problem.name])
    if iters is not None:
        cfg["iters"] = iters
    sch, eps_fn, params = problem.schedule, problem.eps_fn, problem.params
    x_tr, z_tr = problem.train_inputs(TRAIN_SEED, cfg["batch"])
    x_va, z_va = problem.train_inputs(VALID_SEED, cfg["batch"])
    ref_key, ref_n = cfg["ref"]
    ref_solver = SAMPLERS[ref_key][1]()

    def run(x_T, z, ts, solver):
        return jadeis.sample(eps_fn, params, x_T, z, schedule=sch, ts=ts, solver=solver)

    run_j = jax.jit(run, static_argnums=3)
    t0 = time.perf_counter()
    ref_ts = jadeis.time_grid(sch, ref_n, dtype=jnp.float64)
    ref_tr = run_j(x_tr, z_tr, ref_ts, ref_solver)
    ref_va = run_j(x_va, z_va, ref_ts, ref_solver)
    half = run_j(x_va, z_va, jadeis.time_grid(sch, ref_n // 2, dtype=jnp.float64), ref_solver)
    ref_err = rel(half, ref_va)
    log(
        f"  {problem.name}: references ({SAMPLERS[ref_key][0]}, N={ref_n}) in "
        f"{time.perf_counter() - t0:.1f}s; N={ref_n // 2} vs N={ref_n}: x0 rel. {ref_err:.1e}"
    )
    data = load(problem.name) or {"problem": problem.name, "grids": {}}
    data["description"] = problem.description
    data["settings"] = {
        "learn": "jadeis.learn_time_grid(init='logsnr', adjoint=DiscreteAdjoint(), default "
        "Adam: lr 0.05 cosine-decayed to 0.005, loss: mean squared error of x_0)",
        "train_inputs": f"problem.train_inputs({TRAIN_SEED}, {cfg['batch']}) (not the "
        "benchmark's x_T)",
        "validation_inputs": f"problem.train_inputs({VALID_SEED}, {cfg['batch']})",
        "reference": f"{SAMPLERS[ref_key][0]}, N={ref_n}, log-SNR grid (N/2 vs N on the "
        f"validation batch: x0 rel. {ref_err:.1e})",
        "dtype": "float64",
    }
    grids = data.setdefault("grids", {})
    for key, ns in plan.items():
        if samplers is not None and key not in samplers:
            continue
        name, make = SAMPLERS[key]
        solver = make()
        for n in ns:
            if steps is not None and n not in steps:
                continue
            t1 = time.perf_counter()
            res = jadeis.learn_time_grid(
                eps_fn,
                params,
                x_tr,
                z_tr,
                schedule=sch,
                n=n,
                solver=solver,
                reference=ref_tr,
                num_iters=cfg["iters"],
            )
            ts = jax.block_until_ready(res.ts)
            secs = time.perf_counter() - t1
            logsnr = jadeis.time_grid(sch, n, dtype=jnp.float64)
            va_learned = rel(run_j(x_va, z_va, ts, solver), ref_va)
            va_logsnr = rel(run_j(x_va, z_va, logsnr, solver), ref_va)
            grids.setdefault(key, {})[str(n)] = {
                "sampler": name,
                "ts": [float(t) for t in np.asarray(ts)],
                "iters": cfg["iters"],
                "train_batch": cfg["batch"],
                "train_loss_initial": float(res.losses[0]),
                "train_loss_final": float(res.losses[-1]),
                "valid_x0_rel_err_learned": va_learned,
                "valid_x0_rel_err_logsnr": va_logsnr,
                "seconds": round(secs, 1),
                "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S"),
            }
            log(
                f"  {problem.name} {key} N={n}: train MSE {res.losses[0]:.2e} -> "
                f"{res.losses[-1]:.2e}; validation x0 rel. err learned {va_learned:.2e} vs "
                f"logsnr {va_logsnr:.2e} ({secs:.1f}s)"
            )
            # written after every grid: an interrupted run keeps what it learned
            data["grids"] = {
                k: dict(sorted(v.items(), key=lambda kv: int(kv[0])))
                for k, v in sorted(grids.items())
            }
            write_atomic(path_for(problem.name), data)
    return data


def guidance_target(problem, seed, batch):
    """A training/validation target y of the guidance loss 0.5 ||x_0 - y||^2: drawn as the
    benchmark's (standard normal, one per sample), from another key."""
    shape = (batch,) + tuple(problem.x_T.shape[1:])
    return jax.random.normal(jax.random.key(20_000 + seed), shape, problem.x_T.dtype)


def rel_grads(a: dict, b: dict) -> dict:
    """Relative error of each gradient of ``a`` against ``b`` (pytrees) and their maximum
    (the benchmark's "grad. error")."""
    import problems as P  # noqa: PLC0415

    out = {k: P.rel_err(a[k], b[k]) for k in b}
    out["max"] = max(out.values())
    return out


def learn_problem_gradient(problem, samplers=None, steps=None, iters=None) -> dict:
    """The gradient-error grids of ``GRAD_PLAN[problem.name]`` (restricted to
    ``samplers``/``steps``), merged into the problem's JSON file under ``<key>-grad``."""
    plan = GRAD_PLAN[problem.name]
    cfg = dict(GRAD_TRAIN[problem.name])
    if iters is not None:
        cfg["iters"] = iters
    sch, eps_fn, params = problem.schedule, problem.eps_fn, problem.params
    x_tr, z_tr = problem.train_inputs(TRAIN_SEED, cfg["batch"])
    y_tr = guidance_target(problem, TRAIN_SEED, cfg["batch"])
    nb = int(problem.x_T.shape[0])
    valid = []  # (x_T, z, y) of each validation batch
    for k in range(GRAD_VALID_BATCHES):
        seed = VALID_SEED + 1 + k
        valid.append((*problem.train_inputs(seed, nb), guidance_target(problem, seed, nb)))
    ref_key, ref_n = cfg["ref"]
    ref_solver = SAMPLERS[ref_key][1]()
    argnums = {"x_T": 0, "z": 1, "params": 2}

    def grads(x_T, z, y, ts, solver):
        def total(x_T, z, params):
            x0 = jadeis.sample(eps_fn, params, x_T, z, schedule=sch, ts=ts, solver=solver)
            return 0.5 * jnp.sum((x0 - y) ** 2)

        gs = jax.grad(total, argnums=tuple(argnums[w] for w in GRAD_WRT))(x_T, z, params)
        return dict(zip(GRAD_WRT, gs, strict=True))

    grads_j = jax.jit(grads, static_argnums=4)
    t0 = time.perf_counter()
    ref_ts = jadeis.time_grid(sch, ref_n, dtype=jnp.float64)
    ref_tr = grads_j(x_tr, z_tr, y_tr, ref_ts, ref_solver)
    ref_va = [grads_j(x, z, y, ref_ts, ref_solver) for x, z, y in valid]
    half_ts = jadeis.time_grid(sch, ref_n // 2, dtype=jnp.float64)
    ref_err = max(
        rel_grads(grads_j(x, z, y, half_ts, ref_solver), r)["max"]
        for (x, z, y), r in zip(valid, ref_va, strict=True)
    )

    def valid_errs(ts, solver):
        return [
            rel_grads(grads_j(x, z, y, ts, solver), r)["max"]
            for (x, z, y), r in zip(valid, ref_va, strict=True)
        ]

    log(
        f"  {problem.name}: reference gradients ({SAMPLERS[ref_key][0]}, N={ref_n}) in "
        f"{time.perf_counter() - t0:.1f}s; N={ref_n // 2} vs N={ref_n}: grad rel. {ref_err:.1e}"
    )
    data = load(problem.name) or {"problem": problem.name, "grids": {}}
    data["settings_gradient"] = {
        "keys": f"<sampler>{GRAD_SUFFIX}",
        "learn": "jadeis.learn_time_grid(target='gradient', wrt=('x_T', 'z', 'params'), "
        "init='logsnr', adjoint=DiscreteAdjoint() (twice differentiable), default Adam: lr "
        "0.05 cosine-decayed to 0.005; loss: sum over x_T, z, params of the relative squared "
        "error of the gradient of 0.5 ||x_0 - y||^2)",
        "train_inputs": f"problem.train_inputs({TRAIN_SEED}, {cfg['batch']}), y = "
        f"guidance_target({TRAIN_SEED}) (not the benchmark's x_T or target)",
        "validation_inputs": f"{GRAD_VALID_BATCHES} batches of {nb}: "
        f"problem.train_inputs(s, {nb}), y = guidance_target(s), s = {VALID_SEED + 1}.."
        f"{VALID_SEED + GRAD_VALID_BATCHES}; error of a batch: max over x_T, z, params of the "
        "relative error of the gradient (the benchmark's)",
        "reference": f"{SAMPLERS[ref_key][0]}, N={ref_n}, log-SNR grid, DiscreteAdjoint "
        f"(N/2 vs N, worst validation batch: grad rel. {ref_err:.1e})",
        "dtype": "float64",
    }
    grids = data.setdefault("grids", {})

    def sample_loss_for(y):
        return lambda x0: 0.5 * jnp.sum((x0 - y) ** 2)

    for key, ns in plan.items():
        if samplers is not None and key not in samplers:
            continue
        name, make = SAMPLERS[key]
        solver = make()
        for n in ns:
            if steps is not None and n not in steps:
                continue
            t1 = time.perf_counter()
            res = jadeis.learn_time_grid(
                eps_fn,
                params,
                x_tr,
                z_tr,
                schedule=sch,
                n=n,
                solver=solver,
                reference=ref_tr,
                num_iters=cfg["iters"],
                target="gradient",
                sample_loss=sample_loss_for(y_tr),
                wrt=GRAD_WRT,
            )
            ts = jax.block_until_ready(res.ts)
            secs = time.perf_counter() - t1
            logsnr = jadeis.time_grid(sch, n, dtype=jnp.float64)
            va = {"learned": valid_errs(ts, solver), "logsnr": valid_errs(logsnr, solver)}
            x0_grid = load_grid(problem.name, key, n)
            if x0_grid is not None:
                va["x0_learned"] = valid_errs(x0_grid, solver)
            entry = {
                "sampler": name,
                "target": "gradient",
                "ts": [float(t) for t in np.asarray(ts)],
                "iters": cfg["iters"],
                "train_batch": cfg["batch"],
                "train_loss_initial": float(res.losses[0]),
                "train_loss_final": float(res.losses[-1]),
                "seconds": round(secs, 1),
                "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S"),
            }
            for g, v in va.items():
                entry[f"valid_grad_rel_err_{g}_median"] = float(np.median(v))
                entry[f"valid_grad_rel_err_{g}_batches"] = v
            grids.setdefault(key + GRAD_SUFFIX, {})[str(n)] = entry
            log(
                f"  {problem.name} {key}{GRAD_SUFFIX} N={n}: train loss {res.losses[0]:.2e} -> "
                f"{res.losses[-1]:.2e}; validation grad rel. err (median of "
                f"{GRAD_VALID_BATCHES} batches) "
                + ", ".join(f"{g} {np.median(v):.2e}" for g, v in va.items())
                + f" ({secs:.1f}s)"
            )
            data["grids"] = {
                k: dict(sorted(v.items(), key=lambda kv: int(kv[0])))
                for k, v in sorted(grids.items())
            }
            write_atomic(path_for(problem.name), data)
    return data


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--problems", default=None, help="comma-separated (default: every problem of the plan)"
    )
    ap.add_argument("--samplers", default=None, help=f"comma-separated, of {','.join(SAMPLERS)}")
    ap.add_argument("--steps", default=None, help="comma-separated N (default: PLAN's)")
    ap.add_argument("--iters", type=int, default=None, help="optimiser iterations per grid")
    ap.add_argument(
        "--target",
        choices=("x0", "gradient"),
        default="x0",
        help="x0: PLAN, fitted to x_0 (default); gradient: GRAD_PLAN, fitted to the gradient, "
        "stored under '<sampler>-grad'",
    )
    args = ap.parse_args(argv)
    import problems as P  # noqa: PLC0415

    t0 = time.perf_counter()
    plan = GRAD_PLAN if args.target == "gradient" else PLAN
    names = args.problems.split(",") if args.problems is not None else list(plan)
    unknown = set(names) - set(plan)
    if unknown:
        raise SystemExit(f"no grid plan for {sorted(unknown)}; known: {', '.join(plan)}")
    samplers = None if args.samplers is None else args.samplers.split(",")
    steps = None if args.steps is None else [int(n) for n in args.steps.split(",")]
    for p in P.build_problems(names, quick=False, log=log, reference=False):
        t1 = time.perf_counter()
        learn = learn_problem_gradient if args.target == "gradient" else learn_problem
        learn(p, samplers, steps, args.iters)
        log(f"  {p.name}: grids in {time.perf_counter() - t1:.0f}s -> {path_for(p.name)}")
    log(f"grids learned in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
