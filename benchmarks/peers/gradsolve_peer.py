"""gradsolve (PyPI 0.2.1) as a peer of the benchmark: the same gradient, by record-and-replay.

gradsolve's general path for a user-written right-hand side is ``engine="tsit5_replay"``
(``gradsolve.grad_closure(problem, y0, params, wrt=..., engine="tsit5_replay", rtol, atol)``,
read from ``gradsolve/api.py`` and ``gradsolve/solvers/tsit5_replay.py`` of the installed
wheel): it first *records* an adaptive Tsit5 solve (an I-controller with a weighted RMS norm,
``safety 0.9``, factors in ``[0.2, 5]``, first step ``(t1 - t0) / 100``), **one step-size
sequence per trajectory** (each row of ``y0`` is its own ODE), then returns a closure that
*replays* the frozen steps as a ``lax.scan`` of ``tsit5_step`` (all 7 stages every step, no
FSAL; trajectories zero-padded to the longest and ``vmap``-ed), so ``jax.grad`` of a loss of
the closure is the exact discrete adjoint of the replayed steps (controller frozen, as in
diffrax and jadeis.Adaptive).

What gradsolve needs, and how the benchmark's problems are put to it here:

- ``problem``: an object with ``name, dim, t0, t1, is_stiff`` and ``f_jax(t, y, p)`` for ONE
  trajectory (``y`` of shape ``(dim,)``, ``p`` of shape ``(P,)``). Time must increase
  (``t0 < t1``; the recorder loops ``while t < t1``), so the probability-flow ODE in t
  (``methods.pf_ode_t``, the variable of the best diffrax method) is solved in ``s = -t``
  from ``-t_max`` to ``-t_min``. The state is ``x`` flattened per sample.
- ``params``: a float64 array ``(n, P)``, ONE PARAMETER VECTOR PER TRAJECTORY. A model's
  parameters are shared by the batch, so for ``dL/dparams`` they are replicated ``n`` times
  (flattened with ``ravel_pytree``, with the sample's ``z`` appended) and the per-row
  gradients are summed; the model then runs as ``n`` per-trajectory evaluations under
  ``vmap`` with batched weights. For ``dL/dx_T`` alone (``wrt="y0"``, the guidance case) the
  model parameters are constants of ``f_jax`` and ``p`` is only the sample's ``z``.
- float64 only on this path (``precision="float32"`` is refused outside the Warp lanes;
  the benchmark is float64 anyway). ``import gradsolve`` sets ``jax_enable_x64`` to True
  (or to False with ``GRADSOLVE_X64=0``) for the whole process; it is imported lazily here
  and the benchmark checks that x64 is on.

Timings (medians over repeats, compilation separate):

- ``t_replay_s`` / ``t_replay_xT_s``: the gradient by the replay alone (a closure recorded
  once, its ``jax.jit(jax.grad(...))`` compiled once): the cost when the mesh can be reused.
- ``t_record_s``: recording the mesh (the device recorder, a vmapped ``lax.while_loop``).
- ``t_grad_s`` / ``t_grad_xT_s``: record + replay, as a guidance loop pays it (x_T moves
  every iteration, so the mesh is recorded again every iteration). The public
  ``grad_closure`` bakes the recorded steps into a new closure each time, so the replay would
  be traced and compiled again every iteration; these two columns instead call gradsolve's
  own module functions ``record_tsit5_jax`` (``recorder="jax"``) and ``replay_solve_jax``
  with the steps as an argument of one compiled function (recompiled only when the longest
  trajectory's step count changes; constant while the timing repeats). They are the cost of
  gradsolve's algorithm without that recompilation.
- ``t_grad_cpu_s``: the process CPU time of ``t_grad_s`` (steadier on a shared core).
- ``t_public_xT_s``: the documented API per guidance iteration, as is: ``grad_closure(...,
  wrt="y0")`` (its ``"auto"`` recorder: the host numpy loop on a CPU with fewer than 32
  trajectories, the device loop otherwise) plus ``jax.jit(jax.grad(loss of the closure))``
  of the new closure, compilation included.

Model evaluations (counted from gradsolve's per-trajectory step counts, one count per call of
the batched model): record ``1 + 6 * max(accepted + rejected)`` (FSAL; the vmapped loop runs
until the slowest trajectory is done), replay ``7 * S`` evaluations and ``7 * S`` VJPs with
``S = max(accepted)``. Every gradient therefore solves the forward problem twice (record,
then replay).

Run on its own: ``python benchmarks/peers/gradsolve_peer.py --problems mixture,mlp`` (writes
``benchmarks/results/gradsolve.csv`` and ``gradsolve.md``); in the benchmark the method
"gradsolve Tsit5 record+replay (t)" (``methods.py``, tag ``gradsolve``) calls
:func:`measure` for each tolerance.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

ENGINE = "tsit5_replay"


def available() -> str | None:
    """gradsolve's version, or None when it is not installed (the method is then skipped)."""
    try:
        import gradsolve  # noqa: PLC0415
    except ImportError:
        return None
    return gradsolve.__version__


def _require_x64():
    if not jax.config.jax_enable_x64:
        raise RuntimeError("gradsolve's general path is float64 only: enable jax_enable_x64")


@dataclasses.dataclass(eq=False)
class PFODE:
    """The probability-flow ODE of a benchmark problem in gradsolve's ``Problem`` protocol:
    ``dy/ds = -f(t = -s, y)`` (``methods.pf_ode_t``), ``s`` from ``-t_max`` to ``-t_min``,
    ``y`` one sample flattened; ``unpack(p) -> (model params, z of the sample)``."""

    name: str
    dim: int
    t0: float
    t1: float
    vf: Callable
    shape: tuple
    unpack: Callable
    is_stiff: bool = False

    def f_jax(self, s, y, p):
        params, z = self.unpack(p)
        x = y.reshape((1,) + self.shape)
        return -self.vf(-s, x, (params, z))[0].reshape(-1)


class Peer:
    """gradsolve on one benchmark problem: the x_T-only ODE (``p`` = the sample's z) and the
    full one (``p`` = [model parameters, z], replicated per sample)."""

    def __init__(self, problem):
        import methods as M  # noqa: PLC0415

        _require_x64()
        self.problem = p = problem
        sch = p.schedule
        self.n = n = p.x_T.shape[0]
        self.shape = shape = tuple(p.x_T.shape[1:])
        vf = M.pf_ode_t(sch, p.eps_fn)
        t0, t1 = -float(sch.t_max), -float(sch.t_min)
        dim = int(np.prod(shape))
        # z: one vector per sample (mlp, digits, unet) or one shared by the batch (mixture)
        self.z_per_sample = np.ndim(p.z) >= 1 and np.shape(p.z)[0] == n and np.ndim(p.z) == 2
        z_flat0, self.unravel_z = ravel_pytree(p.z if not self.z_per_sample else p.z[0])
        self.zdim = z_flat0.shape[0]
        flat_params, self.unravel_params = ravel_pytree(p.params)
        self.P = flat_params.shape[0]
        params_const = p.params
        unravel_z, unravel_params, P = self.unravel_z, self.unravel_params, self.P
        self.ode_xT = PFODE(
            f"jadeis-bench-{p.name}-xT",
            dim,
            t0,
            t1,
            vf,
            shape,
            lambda q: (params_const, unravel_z(q)),
        )
        self.ode_full = PFODE(
            f"jadeis-bench-{p.name}-full",
            dim,
            t0,
            t1,
            vf,
            shape,
            lambda q: (unravel_params(q[:P]), unravel_z(q[P:])),
        )
        self.flat_params = np.asarray(flat_params, np.float64)

    # -- inputs in gradsolve's layout ------------------------------------------------------

    def y0(self, x_T):
        return np.asarray(x_T, np.float64).reshape(self.n, -1)

    def zrows(self, z):
        if self.z_per_sample:
            return np.stack([np.asarray(ravel_pytree(zi)[0]) for zi in z]).astype(np.float64)
        return np.broadcast_to(np.asarray(ravel_pytree(z)[0], np.float64), (self.n, self.zdim))

    def prows(self, params, z):
        flat = np.asarray(ravel_pytree(params)[0], np.float64)
        return np.concatenate(
            [np.broadcast_to(flat, (self.n, flat.shape[0])), self.zrows(z)], axis=1
        )

    def loss_of(self, yT):
        return self.problem.loss_fn(yT.reshape((self.n,) + self.shape))

    # -- the expert path: gradsolve's own record and replay functions ----------------------

    def record(self, ode, y0, prow, tol):
        """``(dts (n, S), accepted (n,), rejected (n,))`` of gradsolve's device recorder."""
        from gradsolve.solvers.tsit5_replay import record_tsit5_jax  # noqa: PLC0415

        _, dts, n_acc, n_rej = record_tsit5_jax(
            ode.f_jax,
            y0,
            prow,
            ode.t0,
            ode.t1,
            rtol=tol,
            atol=tol,
            return_rejected=True,
            recorder="jax",
        )
        return dts, n_acc, n_rej

    def replay_grad_fn(self, ode, full: bool):
        """``jit((y0, prows, dts) -> (x0, dL/dy0, dL/dprows))`` by gradsolve's replay."""
        from gradsolve.warp.warp_replay import replay_solve_jax  # noqa: PLC0415

        def total(y0, prow, dts):
            yT = replay_solve_jax(ode, y0, prow, dts)
            return self.loss_of(yT), yT

        if full:

            def g(y0, prow, dts):
                (_, yT), (gy, gp) = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(
                    y0, prow, dts
                )
                return yT, gy, gp
        else:

            def g(y0, prow, dts):
                (_, yT), gy = jax.value_and_grad(total, has_aux=True)(y0, prow, dts)
                return yT, gy, None

        return jax.jit(g)

    def split_full(self, yT, gy, gp):
        """Benchmark layout ``(x0, dL/dx_T, dL/dz, dL/dparams)`` from the full replay."""
        x0 = yT.reshape((self.n,) + self.shape)
        gx = gy.reshape((self.n,) + self.shape)
        gparams = self.unravel_params(jnp.sum(gp[:, : self.P], axis=0))
        gzr = gp[:, self.P :]
        if self.z_per_sample:
            gz = jax.vmap(self.unravel_z)(gzr)
        else:
            gz = self.unravel_z(jnp.sum(gzr, axis=0))
        return x0, gx, gz, gparams

    # -- the public API as documented -------------------------------------------------------

    def public_xT_grad(self, y0, zrows, tol):
        """One guidance iteration through the public API: ``grad_closure(wrt="y0")`` and
        ``jax.jit(jax.grad(...))`` of the new closure (compiled on this call)."""
        import gradsolve  # noqa: PLC0415

        clo = gradsolve.grad_closure(
            self.ode_xT, y0, zrows, wrt="y0", engine=ENGINE, rtol=tol, atol=tol
        )
        g = jax.jit(jax.grad(lambda y: self.loss_of(clo(y))))(jnp.asarray(y0))
        return jax.block_until_ready(g), clo


def reverse_time_check() -> dict:
    """gradsolve with ``t0 > t1`` (a diffusion sampler runs backwards in time): the recorder
    loops ``while t < t1``, so it records no step and the closure returns ``y0`` unchanged,
    without an error. Measured on dy/dt = -y from t = 1 to t = 0 (exact: y0 * e)."""
    import gradsolve  # noqa: PLC0415

    class Decay:
        name, dim, is_stiff, t0, t1 = "decay-backwards", 2, False, 1.0, 0.0

        def f_jax(self, t, y, p):
            return -p[0] * y

    y0, p = np.ones((4, 2)), np.ones((4, 1))
    clo = gradsolve.grad_closure(Decay(), y0, p, wrt="y0", engine=ENGINE, rtol=1e-8, atol=1e-8)
    got = float(np.asarray(clo(jnp.asarray(y0)))[0, 0])
    return {"returned": got, "exact": float(np.e), "silent_identity": got == 1.0}


def _median_time(fn, reps, min_s=0.05, with_cpu=False):
    """Median seconds per call over ``reps`` batches after one warm-up call (fast calls
    batched to >= ``min_s`` per batch); with ``with_cpu``, also the median process CPU time
    per call (as ``common.time_call``)."""
    fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    calls = max(1, min(100, int(np.ceil(min_s / one))))
    out, cpu = [], []
    for _ in range(reps):
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - t0) / calls)
        cpu.append((time.process_time() - c0) / calls)
    if with_cpu:
        return statistics.median(out), statistics.median(cpu)
    return statistics.median(out)


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def measure(
    problem,
    tol: float,
    reps: int,
    public_reps: int = 2,
    peer: Peer | None = None,
    full: bool = True,
) -> dict[str, Any]:
    """One sweep row's measurements of gradsolve at ``rtol = atol = tol`` on ``problem``
    (see the module docstring for the columns). ``full=False`` skips the gradient with
    respect to z and params (only the x_T columns)."""
    import problems as P  # noqa: PLC0415

    peer = Peer(problem) if peer is None else peer
    pr = problem
    ref = pr.reference
    y0 = peer.y0(pr.x_T)
    zr = peer.zrows(pr.z)
    row: dict[str, Any] = {"gradsolve": available(), "engine": ENGINE}

    # record (first call compiles gradsolve's recorder loop; cached by gradsolve afterwards)
    (dts, n_acc, n_rej), c_rec = _timed(lambda: peer.record(peer.ode_xT, y0, zr, tol))
    S = int(dts.shape[1])
    attempts = n_acc + n_rej
    row.update(
        steps=S,
        steps_mean=float(np.mean(n_acc)),
        rejected_max=int(n_rej.max()),
        rejected_mean=float(np.mean(n_rej)),
        attempts_max=int(attempts.max()),
        evals=int(1 + 6 * attempts.max() + 7 * S),
        vjps=7 * S,
        counted="gradsolve step counts (record 1+6 per attempt, replay 7 per step)",
    )
    t_record = _median_time(lambda: peer.record(peer.ode_xT, y0, zr, tol), reps)

    # x_T only (the guidance case)
    gfn = peer.replay_grad_fn(peer.ode_xT, full=False)
    dts_j = jnp.asarray(dts)
    args = (jnp.asarray(y0), jnp.asarray(zr), dts_j)
    t0 = time.perf_counter()
    compiled_x = gfn.lower(*args).compile()
    c_x = time.perf_counter() - t0
    yT, gy, _ = jax.block_until_ready(compiled_x(*args))
    err_xT_only = P.rel_err(gy.reshape(pr.x_T.shape), ref["x_T"])
    t_replay_x = _median_time(lambda: jax.block_until_ready(compiled_x(*args)), reps)

    def rerecord_x():
        d, _, _ = peer.record(peer.ode_xT, y0, zr, tol)
        return jax.block_until_ready(compiled_x(args[0], args[1], jnp.asarray(d)))

    t_grad_x = _median_time(rerecord_x, reps)
    row.update(
        err_xT_only=err_xT_only,
        t_record_s=t_record,
        t_replay_xT_s=t_replay_x,
        t_grad_xT_s=t_grad_x,
        compile_xT_s=c_x,
    )

    # the documented API, one guidance iteration (record + trace + compile + run)
    pub = []
    for _ in range(public_reps):
        (gpub, clo), tp = _timed(lambda: peer.public_xT_grad(y0, zr, tol))
        pub.append(tp)
    row["t_public_xT_s"] = statistics.median(pub)
    # seconds spent compiling or in the public API's per-call compilation (the sweep's
    # run-time budget leaves them out, as it leaves out the other methods' compilation)
    row["overhead_s"] = c_rec + c_x + sum(pub)
    row["route"] = f"{clo.route.requested}->{clo.route.actual}"
    row["err_xT_public"] = P.rel_err(np.asarray(gpub).reshape(pr.x_T.shape), ref["x_T"])

    row["x0"] = yT.reshape(pr.x_T.shape)
    if not full:
        row.update(err_xT=err_xT_only, err_x0=P.rel_err(row.pop("x0"), ref["x0"]))
        return row

    # the full gradient (x_T, z, params): params replicated per trajectory
    prow = peer.prows(pr.params, pr.z)
    (dts_f, _, _), c_rec_f = _timed(lambda: peer.record(peer.ode_full, y0, prow, tol))
    row["same_mesh"] = bool(dts_f.shape == dts.shape and np.allclose(dts_f, dts, rtol=1e-6))
    gfull = peer.replay_grad_fn(peer.ode_full, full=True)
    fargs = (jnp.asarray(y0), jnp.asarray(prow), jnp.asarray(dts_f))
    t0 = time.perf_counter()
    compiled_f = gfull.lower(*fargs).compile()
    c_f = time.perf_counter() - t0
    yT, gy, gp = jax.block_until_ready(compiled_f(*fargs))
    x0, gx, gz, gparams = peer.split_full(yT, gy, gp)
    errs = {
        "err_x0": P.rel_err(x0, ref["x0"]),
        "err_xT": P.rel_err(gx, ref["x_T"]),
        "err_z": P.rel_err(gz, ref["z"]),
        "err_params": P.rel_err(gparams, ref["params"]),
    }
    errs["err_grad"] = max(errs["err_xT"], errs["err_z"], errs["err_params"])
    row.pop("x0")
    t_replay = _median_time(lambda: jax.block_until_ready(compiled_f(*fargs)), reps)
    t_record_full = _median_time(lambda: peer.record(peer.ode_full, y0, prow, tol), reps)

    def rerecord_full():
        d, _, _ = peer.record(peer.ode_full, y0, prow, tol)
        return jax.block_until_ready(compiled_f(fargs[0], fargs[1], jnp.asarray(d)))

    t_grad, t_grad_cpu = _median_time(rerecord_full, reps, with_cpu=True)
    row.update(
        **errs,
        t_grad_s=t_grad,
        t_grad_cpu_s=t_grad_cpu,
        t_replay_s=t_replay,
        t_record_full_s=t_record_full,
        t_fwd_s=t_record,
        compile_grad_s=c_f + c_rec_f,
    )
    row["overhead_s"] += c_f + c_rec_f
    return row


# ----------------------------------------------------------------------------------------
# Stand-alone run: python benchmarks/peers/gradsolve_peer.py --problems mixture,mlp


def main(argv=None):
    import argparse  # noqa: PLC0415
    import sys  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    here = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(here))
    jax.config.update("jax_enable_x64", True)
    import common as C  # noqa: PLC0415
    import problems as P  # noqa: PLC0415

    ap = argparse.ArgumentParser(description="gradsolve on the benchmark's problems")
    ap.add_argument("--problems", default="mixture,mlp")
    ap.add_argument("--tols", default="1e-2,1e-3,1e-4,1e-5,1e-6,1e-7")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(here / "results"))
    args = ap.parse_args(argv)
    if available() is None:
        raise SystemExit("gradsolve is not installed (pip install gradsolve)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for p in P.build_problems(args.problems.split(","), quick=False, log=C.log):
        peer = Peer(p)
        for tol in (float(t) for t in args.tols.split(",")):
            r = measure(p, tol, args.reps, peer=peer)
            r = {"problem": p.name, "tol": tol, **r}
            rows.append(r)
            C.log(
                f"  {p.name} tol={tol:g}: S={r['steps']} (mean {r['steps_mean']:.1f}, rejected "
                f"max {r['rejected_max']}) err x0 {r['err_x0']:.1e} grad {r['err_grad']:.1e} "
                f"(x_T {r['err_xT']:.1e}) record {1e3 * r['t_record_s']:.1f} ms, replay "
                f"{1e3 * r['t_replay_s']:.1f} ms, record+replay {1e3 * r['t_grad_s']:.1f} ms; "
                f"x_T only: replay {1e3 * r['t_replay_xT_s']:.1f}, record+replay "
                f"{1e3 * r['t_grad_xT_s']:.1f}, public API {1e3 * r['t_public_xT_s']:.0f} ms"
            )
            C.write_csv(out / "gradsolve.csv", rows)
            if r["err_grad"] < 2e-4:
                break
    info = C.machine_info(None, gradsolve=available(), repeats=args.reps)
    info["reverse_time_check"] = reverse_time_check()
    C.log(f"  t0 > t1: {info['reverse_time_check']}")
    (out / "gradsolve.md").write_text(report_md(rows, info))
    return rows


def report_md(rows, info) -> str:
    import common as C  # noqa: PLC0415

    lines = [
        "# gradsolve on the benchmark's problems (benchmarks/peers/gradsolve_peer.py)",
        "",
        f"gradsolve {info.get('gradsolve')}, engine `{ENGINE}` (Tsit5 record-and-replay), "
        f"rtol = atol = tol, float64; {info['cpu']} ({info['cpu_count']} cores, shared), "
        f"{info['jax_backend']}, jax {info['jax']}; {info['date_utc']} UTC; load "
        f"{info['load_average_at_start']}. Times: medians of {info['repeats']} repeats after "
        "a warm-up, compilation separate (the public-API column includes it).",
        "",
    ]
    header = [
        "problem",
        "tol",
        "steps S (mean)",
        "rejected (max)",
        "err x0",
        "err grad",
        "err dL/dx_T",
        "record (ms)",
        "replay (ms)",
        "record+replay (ms)",
        "x_T only: replay (ms)",
        "x_T only: record+replay (ms)",
        "x_T only: public API per iteration (ms)",
        "NFE evals+VJPs",
        "compile (s)",
    ]
    body = []
    for r in rows:
        body.append(
            [
                r["problem"],
                f"{r['tol']:g}",
                f"{r['steps']} ({r['steps_mean']:.1f})",
                r["rejected_max"],
                f"{r['err_x0']:.1e}",
                f"{r['err_grad']:.1e}",
                f"{r['err_xT']:.1e}",
                f"{1e3 * r['t_record_s']:.1f}",
                f"{1e3 * r['t_replay_s']:.1f}",
                f"{1e3 * r['t_grad_s']:.1f}",
                f"{1e3 * r['t_replay_xT_s']:.1f}",
                f"{1e3 * r['t_grad_xT_s']:.1f}",
                f"{1e3 * r['t_public_xT_s']:.0f}",
                f"{r['evals'] + r['vjps']} = {r['evals']}+{r['vjps']}",
                f"{r['compile_grad_s']:.1f}",
            ]
        )
    lines += C.md_table(header, body)
    chk = info.get("reverse_time_check")
    if chk:
        lines += [
            "",
            f"Backwards in time (t0 > t1; dy/dt = -y from t = 1 to 0, y0 = 1): the closure "
            f"returns {chk['returned']:g} (exact {chk['exact']:.6g}): "
            + ("no step recorded and no error." if chk["silent_identity"] else "solved."),
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("JAX_ENABLE_X64", "1")
    main()
