"""Gradient methods under test: jadeis, diffrax (in t and in rho = sigma/alpha), hand-written
scan, and gradsolve's record-and-replay Tsit5 (``peers/gradsolve_peer.py``).

Every method builds, for a problem and a setting (step count N or tolerance), two functions of
``(x_T, z, params, extra)`` where ``extra`` is the time grid ``ts`` (fixed-grid methods) or the
tolerance (adaptive methods; a traced scalar, so one compilation serves every tolerance):

- ``fwd``: x_0 only (sampling cost);
- ``grad``: ``(x_0, dL/dx_T, dL/dz, dL/dparams, num_steps)`` for the problem's loss.

Model evaluations and vector-Jacobian products (VJPs) are counted analytically for the fixed
grids (stated per method below) and by instrumenting the model (a host callback per primal call
and per VJP) for diffrax, whose step counts and checkpoint recomputations depend on the run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import diffrax as dfx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jadeis

# ----------------------------------------------------------------------------------------
# The probability-flow ODE in the forms diffrax needs


def pf_ode_t(schedule, eps_fn):
    """dx/dt = f(t) x + g^2(t)/(2 sigma_t) eps = f x - sigma dlambda/dt eps
    (docs/math/schedules.md)."""
    dlog_alpha = jax.grad(lambda t: schedule.log_alpha(t))
    dlam = jax.grad(lambda t: schedule.log_snr(t))

    def vf(t, x, args):
        params, z = args
        t = jnp.asarray(t, x.dtype)
        eps = eps_fn(params, x, t, z)
        return dlog_alpha(t) * x - schedule.sigma(t) * dlam(t) * eps

    return vf


def t_of_rho(schedule, rho):
    return schedule.t_from_log_snr(-jnp.log(rho))


def rho_of_t(schedule, t):
    return jnp.exp(-schedule.log_snr(t))


def pf_ode_rho(schedule, eps_fn):
    """Change of variables Z = x/alpha, rho = sigma/alpha: dZ/drho = eps(alpha Z, t(rho))."""

    def vf(rho, zz, args):
        params, z = args
        t = t_of_rho(schedule, rho).astype(zz.dtype)
        return eps_fn(params, schedule.alpha(t) * zz, t, z)

    return vf


# ----------------------------------------------------------------------------------------
# Method definitions


@dataclasses.dataclass(frozen=True)
class Method:
    """A gradient method. ``name`` is for display only (tables, plots, CSV ``method``
    column); code selects methods by ``tags`` (see :func:`select`)."""

    name: str
    family: str  # "jadeis" | "diffrax" | "scan"
    variable: str  # "N" (fixed grid) or "tol" (adaptive)
    make: Callable  # make(problem) -> (fwd, grad), functions of (x_T, z, params, extra)
    counts: Callable | None = None  # counts(N) -> (evals, vjps) for fixed grids
    forward_key: str = ""  # methods sharing a forward pass share its timing
    note: str = ""
    spacing: str = "logsnr"  # time_grid spacing of the fixed-grid settings, or "learned"
    tags: frozenset = frozenset()
    grid_key: str = ""  # spacing "learned": the sampler key of benchmarks/grids/<problem>.json
    # the setting is static (a Python float passed as make(..., tol=setting)): one
    # compilation per setting (jadeis.Adaptive's tolerances are part of the solver)
    static_setting: bool = False
    stages: int = 0  # model evaluations per attempted step (adaptive jadeis methods)
    # a method whose gradient is not one jit-compilable function (gradsolve records its step
    # mesh with host code between compiled calls): measure(problem, setting, reps, quick)
    # -> the sweep row's measured columns; ``make`` is then unused (it raises)
    measure: Callable | None = None


# ----------------------------------------------------------------------------------------
# Tags
#
# Every method carries descriptive tags (its family "jadeis"/"diffrax"/"scan"; strategy
# "adjointdeis"/"discrete"/"backprop"/"backsolve"/"recursive"/"checkpoint"/"plain"; solver
# "dpm1".."dpm3"/"dpmpp2"/"dpmpp3"/"tsit5"/"euler"/"heun"; "cached"/"reconstruct"; grid
# "logsnr"/"karras"/"quadratic"; diffrax variable "t"/"rho"; "fixed"/"adaptive") and the
# role tags the benchmark jobs select by:
#
#   redundant      dominated or duplicate variants, run only with --all-methods
#   quick          the --quick sweep (and, with "grid", the digits sweep)
#   unet           the unet sweep (a gradient step costs ~0.4 s on 2 CPU cores: four methods)
#   grid           a non-default time grid (karras, quadratic)
#   per-example    jadeis.PerExamplePIDController (the worst example of the batch decides)
#   gaussian       the sanity check against the Gaussian closed form
#   compile-quick  the --quick cold-compile table
#   memory, memory-quick      the memory-vs-N job (full, --quick)
#   e2e, e2e-quick            the end-to-end Adam job (full, --quick)
#   gpu-quick      the --gpu-quick sweep of the headline problems (the unet: "unet"): the
#                  methods that won or came close in a headline cell of a full run


def parse_selector(spec) -> list[tuple[frozenset, frozenset]]:
    """``"a+b,c+!d"`` -> [({a, b}, {}), ({c}, {d})]: terms separated by commas are
    alternatives (OR); tags joined by ``+`` in a term are all required (AND); ``!tag``
    excludes. A list or tuple of such strings is joined by commas."""
    if not isinstance(spec, str):
        spec = ",".join(spec)
    terms = []
    for term in spec.split(","):
        term = term.strip()
        if not term:
            continue
        parts = [t.strip() for t in term.split("+") if t.strip()]
        need = frozenset(t for t in parts if not t.startswith("!"))
        avoid = frozenset(t[1:] for t in parts if t.startswith("!"))
        terms.append((need, avoid))
    return terms


def matches(method: Method, spec) -> bool:
    return any(
        need <= method.tags and not (avoid & method.tags) for need, avoid in parse_selector(spec)
    )


def select(methods, spec) -> list[Method]:
    """The methods matching the tag selector ``spec`` (see :func:`parse_selector`), in the
    order given. Raises if ``spec`` names a tag no method has (a typo would silently select
    nothing)."""
    known = frozenset().union(*(m.tags for m in methods)) if methods else frozenset()
    for need, avoid in parse_selector(spec):
        unknown = (need | avoid) - known
        if unknown:
            raise ValueError(f"unknown method tag(s) {sorted(unknown)}; known: {sorted(known)}")
    return [m for m in methods if matches(m, spec)]


def all_tags(methods) -> list[str]:
    return sorted(frozenset().union(*(m.tags for m in methods)))


def _loss_grad(problem, x0_fn, xT_only=False):
    """grad(x_T, z, params, extra) -> (x0, gx, gz, gp, num_steps) from x0_fn -> (x0, steps).

    With ``xT_only``, only dL/dx_T is computed (gz, gp are None): the guidance use case."""

    def total(x_T, z, params, extra):
        x0, steps = x0_fn(x_T, z, params, extra)
        return problem.loss_fn(x0), (x0, steps)

    def grad(x_T, z, params, extra):
        if xT_only:
            (_, (x0, steps)), gx = jax.value_and_grad(total, has_aux=True)(x_T, z, params, extra)
            return x0, gx, None, None, steps
        (_, (x0, steps)), (gx, gz, gp) = jax.value_and_grad(total, argnums=(0, 1, 2), has_aux=True)(
            x_T, z, params, extra
        )
        return x0, gx, gz, gp, steps

    return grad


def jadeis_method(name, solver, adjoint, counts, note="", spacing="logsnr", tags=(), grid_key=""):
    def make(problem, eps_fn=None, xT_only=False):
        eps_fn = problem.eps_fn if eps_fn is None else eps_fn

        def x0_fn(x_T, z, params, ts, adj=adjoint):
            x0 = jadeis.sample(
                eps_fn, params, x_T, z, schedule=problem.schedule, ts=ts, solver=solver, adjoint=adj
            )
            return x0, jnp.asarray(ts.shape[0] - 1)

        def fwd(x_T, z, params, ts):
            return x0_fn(x_T, z, params, ts, jadeis.DiscreteAdjoint())[0]

        return fwd, _loss_grad(problem, x0_fn, xT_only)

    key = f"jadeis {type(solver).__name__}({solver.order}) {spacing}"
    tags = frozenset({"jadeis", "fixed", spacing, *tags})
    return Method(name, "jadeis", "N", make, counts, key, note, spacing, tags, grid_key)


def adaptive_max_steps(tol: float) -> int:
    """The attempt budget of the adaptive jadeis methods at a tolerance: 256 down to 1e-5,
    1024 below. A gradient keeps a buffer of ``max_steps`` states (zero-filled on every call:
    8 MB on the mixture at 1024, ~0.3 ms of CPU time), so the budget is sized to the
    tolerance, as a user would; every run of the sweep stays below it (a run that reaches it
    fails with an error, recorded as a failed setting)."""
    return 256 if tol >= 1e-5 else 1024


def jadeis_adaptive(name, inner, adjoint, pid=(0.0, 1.0, 0.0), max_steps=None, note="",
                    tags=(), controller_cls=None):
    """inner under jadeis.PIDController(rtol=atol=tol) (or ``controller_cls``) from t_max to
    t_min; the tolerance is static (one compilation per tolerance); ``max_steps`` None:
    :func:`adaptive_max_steps`; evaluations and VJPs counted by instrumentation, accepted
    steps from the run's jadeis.Stats."""
    pcoeff, icoeff, dcoeff = pid
    cls = jadeis.PIDController if controller_cls is None else controller_cls

    def make(problem, eps_fn=None, xT_only=False, tol=1e-3):
        eps_fn = problem.eps_fn if eps_fn is None else eps_fn
        sch = problem.schedule
        budget = adaptive_max_steps(float(tol)) if max_steps is None else max_steps
        controller = cls(
            rtol=float(tol), atol=float(tol), pcoeff=pcoeff, icoeff=icoeff,
            dcoeff=dcoeff, max_steps=budget,
        )

        def x0_fn(x_T, z, params, extra, adj=adjoint):
            ends = jnp.asarray([sch.t_max, sch.t_min], x_T.dtype)
            sol = jadeis.solve(
                eps_fn, params, x_T, z, schedule=sch, ts=ends, solver=inner,
                controller=controller, adjoint=adj,
            )
            return sol.x_0, sol.stats.num_steps

        def fwd(x_T, z, params, extra):
            return x0_fn(x_T, z, params, extra)[0]

        return fwd, _loss_grad(problem, x0_fn, xT_only)

    kind = type(inner).__name__
    key = f"jadeis Adaptive {kind}({inner.order}) {pid} {cls.__name__}"
    tags = frozenset({"jadeis", "adaptive", *tags})
    stages = inner.evals_per_step  # model evaluations per attempted step
    return Method(
        name, "jadeis", "tol", make, None, key, note, tags=tags, static_setting=True,
        stages=stages,
    )


def _diffrax_solve(problem, eps_fn, variable, solver, controller_fn, adjoint, max_steps):
    sch = problem.schedule
    if variable == "t":
        term = dfx.ODETerm(pf_ode_t(sch, eps_fn))
    else:
        term = dfx.ODETerm(pf_ode_rho(sch, eps_fn))

    def x0_fn(x_T, z, params, extra):
        dtype = x_T.dtype
        t0 = jnp.asarray(sch.t_max, dtype)
        t1 = jnp.asarray(sch.t_min, dtype)
        controller, dt0 = controller_fn(extra, variable)
        adj, steps_cap = adjoint, max_steps
        if max_steps is None:  # fixed grid: exactly N steps, every state checkpointed
            steps_cap = extra.shape[0] - 1
            adj = dfx.RecursiveCheckpointAdjoint(checkpoints=steps_cap)
        if variable == "t":
            y0, s0, s1 = x_T, t0, t1
        else:
            y0 = x_T / sch.alpha(t0).astype(dtype)
            s0, s1 = rho_of_t(sch, t0).astype(dtype), rho_of_t(sch, t1).astype(dtype)
        sol = dfx.diffeqsolve(
            term,
            solver,
            s0,
            s1,
            dt0,
            y0,
            args=(params, z),
            saveat=dfx.SaveAt(t1=True),
            stepsize_controller=controller,
            adjoint=adj,
            max_steps=steps_cap,
        )
        y1 = sol.ys[-1]
        if variable == "rho":
            y1 = sch.alpha(t1).astype(dtype) * y1
        return y1, sol.stats["num_steps"]

    return x0_fn


def diffrax_adaptive(name, variable, adjoint_name, max_steps=4096, tags=()):
    adjoint = (
        dfx.BacksolveAdjoint() if adjoint_name == "backsolve" else dfx.RecursiveCheckpointAdjoint()
    )

    def controller_fn(tol, variable):
        return dfx.PIDController(rtol=tol, atol=tol, pcoeff=0.0, icoeff=1.0), None

    def make(problem, eps_fn=None, xT_only=False):
        eps_fn = problem.eps_fn if eps_fn is None else eps_fn
        x0_fn = _diffrax_solve(
            problem, eps_fn, variable, dfx.Tsit5(), controller_fn, adjoint, max_steps
        )
        fwd_fn = _diffrax_solve(
            problem,
            eps_fn,
            variable,
            dfx.Tsit5(),
            controller_fn,
            dfx.RecursiveCheckpointAdjoint(),
            max_steps,
        )
        return (lambda *a: fwd_fn(*a)[0]), _loss_grad(problem, x0_fn, xT_only)

    return Method(
        name,
        "diffrax",
        "tol",
        make,
        None,
        f"diffrax Tsit5 {variable}",
        "Tsit5 + PIDController(rtol=atol=tol); evaluations and VJPs counted by instrumentation",
        tags=frozenset({"diffrax", "adaptive", "tsit5", variable, adjoint_name, *tags}),
    )


def diffrax_fixed(name, variable, solver, stages, tags=()):
    def make(problem, eps_fn=None, xT_only=False):
        eps_fn = problem.eps_fn if eps_fn is None else eps_fn
        sch = problem.schedule

        def cfn(ts, variable):
            grid = ts if variable == "t" else rho_of_t(sch, ts).astype(ts.dtype)
            return dfx.StepTo(grid), None

        x0_fn = _diffrax_solve(
            problem, eps_fn, variable, solver, cfn, dfx.RecursiveCheckpointAdjoint(), None
        )
        return (lambda *a: x0_fn(*a)[0]), _loss_grad(problem, x0_fn, xT_only)

    # RecursiveCheckpointAdjoint(checkpoints=N) on StepTo stores every state; evaluations
    # and VJPs are counted by instrumentation.
    return Method(
        name,
        "diffrax",
        "N",
        make,
        None,
        f"diffrax {type(solver).__name__} {variable}",
        f"{type(solver).__name__} on the log-SNR grid (StepTo), RecursiveCheckpointAdjoint",
        tags=frozenset(
            {"diffrax", "fixed", "recursive", type(solver).__name__.lower(), variable, *tags}
        ),
    )


def gradsolve_tsit5(name, tags=()):
    """gradsolve's general record-and-replay path (``engine="tsit5_replay"``) on the
    probability-flow ODE in t, rtol = atol = tol: one adaptive Tsit5 step sequence recorded
    per trajectory, then replayed as a ``lax.scan`` and differentiated. Its record is host
    code between compiled calls, so the sweep calls ``measure`` (``peers/gradsolve_peer.py``)
    instead of compiling ``make``; the row's ``t_grad_s`` is record + replay (a guidance loop
    records again every iteration), ``t_replay_s`` the replay alone."""

    def make(problem, eps_fn=None, xT_only=False):
        raise TypeError(
            f"{name}: gradsolve records its step mesh with host code, so its gradient is not "
            "one jit-compilable function; the sweep calls Method.measure instead"
        )

    def measure(problem, setting, reps, quick=False):
        from peers import gradsolve_peer  # noqa: PLC0415 - gradsolve is optional

        return gradsolve_peer.measure(problem, float(setting), reps,
                                      public_reps=1 if quick else 2)

    return Method(
        name,
        "gradsolve",
        "tol",
        make,
        None,
        "gradsolve Tsit5 t",
        "gradsolve.grad_closure(engine='tsit5_replay'): Tsit5 mesh recorded per trajectory "
        "(rtol=atol=tol), replayed by lax.scan and differentiated; params replicated per "
        "trajectory for dL/dparams; counts from gradsolve's step counts",
        tags=frozenset({"gradsolve", "adaptive", "tsit5", "t", "replay", *tags}),
        measure=measure,
    )


def scan_dpmpp2m(name, checkpoint, tags=()):
    """A hand-written DPM-Solver++(2M) (first step order 1) in lax.scan, plain reverse mode."""

    def make(problem, eps_fn=None, xT_only=False):
        eps_fn = problem.eps_fn if eps_fn is None else eps_fn
        sch = problem.schedule

        def x0_fn(x_T, z, params, ts):
            dtype = x_T.dtype
            lam = sch.log_snr(ts)
            alpha, sigma = sch.alpha(ts), sch.sigma(ts)
            h = lam[1:] - lam[:-1]
            r = jnp.concatenate([jnp.ones((1,), dtype), h[:-1] / h[1:]])
            c1 = jnp.concatenate([jnp.zeros((1,), dtype), 0.5 / r[1:]])
            inputs = (
                ts[:-1],
                alpha[:-1],
                sigma[:-1],
                sigma[1:] / sigma[:-1],
                -alpha[1:] * jnp.expm1(-h),
                c1,
            )

            def body(carry, inp):
                x, d_prev = carry
                t, a_s, s_s, ratio, coef, c = inp
                d = (x - s_s * eps_fn(params, x, t, z)) / a_s
                x_next = ratio * x + coef * ((1 + c) * d - c * d_prev)
                return (x_next, d), None

            if checkpoint:
                body = jax.checkpoint(body)
            (x0, _), _ = lax.scan(body, (x_T, jnp.zeros_like(x_T)), inputs)
            return x0, jnp.asarray(ts.shape[0] - 1)

        return (lambda *a: x0_fn(*a)[0]), _loss_grad(problem, x0_fn, xT_only)

    counts = (lambda n: (2 * n, n)) if checkpoint else (lambda n: (n, n))
    note = (
        "jax.checkpoint on the step: stores states, recomputes each step in the backward pass"
        if checkpoint
        else "plain jax.grad through lax.scan: stores every step's activations"
    )
    tags = frozenset(
        {"scan", "fixed", "dpmpp2", "logsnr", "checkpoint" if checkpoint else "plain", *tags}
    )
    return Method(name, "scan", "N", make, counts, "scan DPM++(2M)", note, tags=tags)


def all_methods() -> list[Method]:
    """Every method, with its tags (the role tags decide which job runs it, see above)."""
    deis_roles = {  # (order, trajectory) -> role tags
        (1, "reconstruct"): ("memory",),
        (2, "cached"): ("gaussian", "memory"),
        (2, "reconstruct"): (
            "quick",
            "gaussian",
            "compile-quick",
            "memory",
            "memory-quick",
            "e2e-quick",
        ),
        (3, "cached"): ("quick", "e2e"),
        (3, "reconstruct"): ("memory",),
    }
    ms = []
    for k in (1, 2, 3):
        for mode in ("cached", "reconstruct"):
            ms.append(
                jadeis_method(
                    f"AdjointDEIS-{k} {mode}",
                    jadeis.DPMSolver(order=k),
                    jadeis.AdjointDEIS(order=k, trajectory=mode),
                    lambda n: (2 * n, n),
                    f"sampler DPMSolver({k}); one VJP per step (its primal reused)",
                    tags=("adjointdeis", f"dpm{k}", mode, *deis_roles.get((k, mode), ())),
                )
            )
    # DiscreteAdjoint (2M) is within noise of, or slower than, the (3M) form: redundant
    discrete_roles = {
        2: ("redundant",),
        3: (
            "quick",
            "gaussian",
            "compile-quick",
            "memory",
            "memory-quick",
            "e2e",
            "e2e-quick",
        ),
    }
    for k in (2, 3):
        ms.append(
            jadeis_method(
                f"DiscreteAdjoint DPM++({k}M)",
                jadeis.DPMSolverPP(order=k),
                jadeis.DiscreteAdjoint(),
                lambda n: (2 * n, n),
                "exact gradient of the sampler; stores states, rematerialises each step",
                tags=("discrete", f"dpmpp{k}", *discrete_roles[k]),
            )
        )
    for spacing in ("karras", "quadratic"):
        ms.append(
            jadeis_method(
                f"DiscreteAdjoint DPM++(3M) {spacing} grid",
                jadeis.DPMSolverPP(order=3),
                jadeis.DiscreteAdjoint(),
                lambda n: (2 * n, n),
                f"as DiscreteAdjoint DPM++(3M), on time_grid(..., spacing={spacing!r})",
                spacing=spacing,
                tags=("discrete", "dpmpp3", "grid", *(("e2e",) if spacing == "karras" else ())),
            )
        )
    # UniPC (bh2, data prediction, corrector on): the corrector reuses the next step's model
    # evaluation, so one evaluation per step; UniPC is not a linear multistep solver of the
    # hand-derived sweep, so DiscreteAdjoint takes the VJP of each whole step with its
    # evaluation rematerialised: 2N evaluations and N VJPs (checked by instrumentation).
    # lower_order_final=True (the default): on the mixture its gradient error is 5-15% lower
    # than without at N = 16..128, for both orders.
    unipc_roles = {2: (), 3: ("quick", "unet")}
    for k in (2, 3):
        ms.append(
            jadeis_method(
                f"DiscreteAdjoint UniPC({k})",
                jadeis.UniPC(order=k),
                jadeis.DiscreteAdjoint(),
                lambda n: (2 * n, n),
                f"UniPC(order={k}, corrector=True, lower_order_final=True, variant='bh2') "
                f"(order {k + 1}); exact gradient, rematerialises each step",
                tags=("discrete", f"unipc{k}", *unipc_roles[k]),
            )
        )
    # grids learned once per problem, sampler and N by benchmarks/grids.py (held-out x_T)
    for label, solver, key, roles in (
        ("DPM++(3M)", jadeis.DPMSolverPP(order=3), "dpmpp3", ("gpu-quick",)),
        ("UniPC(3)", jadeis.UniPC(order=3), "unipc3", ("quick", "unet", "gpu-quick")),
    ):
        ms.append(
            jadeis_method(
                f"DiscreteAdjoint {label} learned grid",
                solver,
                jadeis.DiscreteAdjoint(),
                lambda n: (2 * n, n),
                f"as DiscreteAdjoint {label}, on the grid learn_time_grid fitted for this "
                f"problem and N (benchmarks/grids/<problem>.json, key {key!r}; learned on other "
                "x_T and z than the benchmark's)",
                spacing="learned",
                tags=("discrete", key, "grid", *roles),
                grid_key=key,
            )
        )
    # grids learned against the gradient error (benchmarks/grids.py --target gradient; so far
    # the mixture only): learn_time_grid(target="gradient") fits the gradient of a guidance
    # loss w.r.t. x_T, z and the parameters on other x_T and targets than the benchmark's
    for label, solver, key in (
        ("DPM++(3M)", jadeis.DPMSolverPP(order=3), "dpmpp3"),
        ("UniPC(3)", jadeis.UniPC(order=3), "unipc3"),
    ):
        m = jadeis_method(
            f"DiscreteAdjoint {label} grad-learned grid",
            solver,
            jadeis.DiscreteAdjoint(),
            lambda n: (2 * n, n),
            f"as DiscreteAdjoint {label}, on the grid learn_time_grid(target='gradient') "
            f"fitted for this problem and N (benchmarks/grids/<problem>.json, key "
            f"{key + '-grad'!r}; learned on other x_T and loss targets than the benchmark's)",
            spacing="learned",
            tags=("discrete", key, "grid", "grad-learned"),
            grid_key=key + "-grad",
        )
        # its own forward timing (the x_0-learned grid has the same forward key otherwise)
        ms.append(dataclasses.replace(m, forward_key=m.forward_key + " grad"))
    ms.append(
        jadeis_method(
            "Backprop DPM++(3M)",
            jadeis.DPMSolverPP(order=3),
            jadeis.Backprop(),
            lambda n: (n, n),
            "jax.grad through the sampler's scan",
            tags=("backprop", "dpmpp3", "quick", "memory", "memory-quick", "e2e", "gpu-quick"),
        )
    )
    ms.append(
        jadeis_method(
            "Backprop DPM(2M)",
            jadeis.DPMSolver(order=2),
            jadeis.Backprop(),
            lambda n: (n, n),
            "jax.grad through the sampler's scan",
            tags=("backprop", "dpm2", "redundant"),  # slower than Backprop DPM++(3M)
        )
    )
    for pid, label, roles in (((0.0, 1.0, 0.0), "", ("quick",)),
                              ((0.4, 0.3, 0.0), " PI", ())):
        ms.append(
            jadeis_adaptive(
                f"Adaptive DPM++(3M){label}",
                jadeis.DPMSolverPP(order=3),
                jadeis.DiscreteAdjoint(),
                pid=pid,
                note="jadeis.Adaptive(DPMSolverPP(3)): 3M minus 2M weights as the estimate, "
                "one model evaluation per accepted step, DiscreteAdjoint of the accepted steps",
                tags=("discrete", "dpmpp3", "ms", *(("pi",) if label else ()), *roles),
            )
        )
    for order, roles in ((3, ("gpu-quick",)), (2, ("redundant",))):
        ms.append(
            jadeis_adaptive(
                f"Adaptive DPM-Solver-{order - 1}{order} (data)",
                jadeis.SinglestepDPMSolver(order, "data"),
                jadeis.DiscreteAdjoint(),
                note=f"jadeis.Adaptive(SinglestepDPMSolver({order})): the DPM-Solver-"
                f"{order - 1}{order} pair, I-controller in log-SNR, DiscreteAdjoint of the "
                "accepted steps",
                tags=("discrete", f"ss{order}", *roles),
            )
        )
    ms.append(
        jadeis_adaptive(
            "Adaptive DPM-Solver-23 (data) per-example",
            jadeis.SinglestepDPMSolver(3, "data"),
            jadeis.DiscreteAdjoint(),
            controller_cls=jadeis.PerExamplePIDController,
            note="as Adaptive DPM-Solver-23 under jadeis.PerExamplePIDController: the error "
            "norm is each example's RMS, the worst example decides (a step is accepted when "
            "every example's trajectory meets the tolerance)",
            tags=("discrete", "ss3", "per-example"),
        )
    )
    ms.append(
        jadeis_adaptive(
            "Adaptive DPM-Solver-23 (data) PI",
            jadeis.SinglestepDPMSolver(3, "data"),
            jadeis.DiscreteAdjoint(),
            pid=(0.4, 0.3, 0.0),
            note="as Adaptive DPM-Solver-23 with a PI controller (pcoeff 0.4, icoeff 0.3)",
            tags=("discrete", "ss3", "pi", "redundant"),
        )
    )
    ms.append(
        jadeis_adaptive(
            "Adaptive Rex rk3 ReversibleAdjoint",
            jadeis.Rex("rk3"),
            jadeis.ReversibleAdjoint(),
            note="jadeis.Adaptive(Rex('rk3')) with ReversibleAdjoint: memory independent of "
            "the number of steps",
            tags=("reversible", "rex"),
        )
    )
    adaptive_roles = {
        ("t", "backsolve"): ("quick", "e2e", "gpu-quick"),
        # not on the unet: at tol 1e-3..1e-4 its 6 stages per step cost ~5 minutes there
        ("t", "recursive"): ("quick", "e2e", "e2e-quick", "gpu-quick"),
        ("rho", "recursive"): ("gaussian",),
    }
    for var in ("t", "rho"):
        for adj, label in (("backsolve", "Backsolve"), ("recursive", "RecursiveCheckpoint")):
            ms.append(
                diffrax_adaptive(
                    f"diffrax Tsit5 {label} ({var})",
                    var,
                    adj,
                    tags=adaptive_roles.get((var, adj), ()),
                )
            )
    for var in ("t", "rho"):
        # Euler in t is first order: it never reaches 1e-2
        euler_roles = ("redundant",) if var == "t" else ()
        ms.append(diffrax_fixed(f"diffrax Euler ({var})", var, dfx.Euler(), 1, tags=euler_roles))
        heun_roles = (
            ("quick", "compile-quick", "memory", "unet", "gpu-quick") if var == "rho"
            else ("gpu-quick",)
        )
        ms.append(diffrax_fixed(f"diffrax Heun ({var})", var, dfx.Heun(), 2, tags=heun_roles))
    # gradsolve (PyPI; optional): on the quick problems too, not on the unet by default
    # (Tsit5's 7 stages per replayed step on ~0.1 s model calls; select it with --methods)
    ms.append(
        gradsolve_tsit5("gradsolve Tsit5 record+replay (t)", tags=("quick", "gpu-quick"))
    )
    ms.append(scan_dpmpp2m("scan DPM++(2M)", checkpoint=False, tags=("memory",)))
    ms.append(
        scan_dpmpp2m(
            "scan DPM++(2M) + checkpoint",
            checkpoint=True,
            tags=("quick", "gaussian", "memory", "memory-quick", "e2e", "unet", "gpu-quick"),
        )
    )
    return ms


def by_tags(spec) -> Method:
    """The one method matching ``spec`` (raises unless exactly one does)."""
    found = select(all_methods(), spec)
    if len(found) != 1:
        raise ValueError(f"{spec!r} selects {[m.name for m in found]}, not exactly one method")
    return found[0]


# ----------------------------------------------------------------------------------------
# Counting model evaluations and VJPs by instrumentation


class Counter:
    def __init__(self):
        self.evals = 0
        self.vjps = 0

    def _eval(self):
        self.evals += 1

    def _vjp(self):
        self.vjps += 1


def counting_eps_fn(eps_fn, counter: Counter):
    """eps_fn with a host callback per primal evaluation and per VJP (for counting only)."""

    @jax.custom_vjp
    def f(params, x, t, z):
        jax.debug.callback(counter._eval)
        return eps_fn(params, x, t, z)

    def f_fwd(params, x, t, z):
        jax.debug.callback(counter._eval)
        return eps_fn(params, x, t, z), (params, x, t, z)

    def f_bwd(res, g):
        params, x, t, z = res
        jax.debug.callback(counter._vjp)
        _, vjp = jax.vjp(lambda p, xx, zz: eps_fn(p, xx, t, zz), params, x, z)
        gp, gx, gz = vjp(g)
        return gp, gx, jnp.zeros_like(t), gz

    f.defvjp(f_fwd, f_bwd)
    return f


# ----------------------------------------------------------------------------------------
# References


def jadeis_reference(problem, n: int, solver=None) -> dict:
    ts = jadeis.time_grid(problem.schedule, n, dtype=jnp.float64)
    solver = jadeis.DPMSolverPP(order=3) if solver is None else solver
    m = jadeis_method("ref", solver, jadeis.DiscreteAdjoint(), None)
    _, grad = m.make(problem)
    x0, gx, gz, gp, _ = jax.jit(grad)(problem.x_T, problem.z, problem.params, ts)
    return {"x0": x0, "x_T": gx, "z": gz, "params": gp}


def diffrax_tsit5_reference(problem, tol: float) -> tuple[dict, int]:
    m = diffrax_adaptive("ref", "t", "recursive", max_steps=65536)
    _, grad = m.make(problem)
    x0, gx, gz, gp, steps = jax.jit(grad)(
        problem.x_T, problem.z, problem.params, jnp.asarray(tol, jnp.float64)
    )
    return {"x0": x0, "x_T": gx, "z": gz, "params": gp}, int(steps)


def as_np(tree: Any):
    return jax.tree.map(np.asarray, tree)
