"""Shared test utilities: the Gaussian-data oracle (docs/math/oracles.md) and tree comparisons."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

import jadeis


def tree_allclose(a, b, rtol=1e-7, atol=1e-9):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(
        np.allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol) for x, y in zip(la, lb)
    )


def fitted_order(ns, errors):
    """Slope of -log(error) against log(n): the measured convergence order."""
    return float(
        -np.polyfit(np.log(np.asarray(ns, float)), np.log(np.asarray(errors, float)), 1)[0]
    )


class GaussianOracle:
    """Data N(mu, s^2 I): exact eps, and the exact probability-flow ODE flow map.

    eps*(x, t) = sigma_t (x - alpha_t mu) / (alpha_t^2 s^2 + sigma_t^2). Along the
    probability-flow ODE, (x_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2) is constant.
    Here ``params`` is s^2 and the conditioning ``z`` is mu, so dL/dparams and dL/dz of
    the exact flow map are available by autodiff of the closed form.
    """

    def __init__(self, schedule):
        self.schedule = schedule

    def eps_fn(self, s2, x, t, mu):
        sch = self.schedule
        a = sch.alpha(t).astype(x.dtype)
        s = sch.sigma(t).astype(x.dtype)
        return s * (x - a * mu) / (a**2 * s2 + s**2)

    def std(self, t, s2):
        sch = self.schedule
        return jnp.sqrt(sch.alpha(t) ** 2 * s2 + sch.sigma(t) ** 2)

    def flow(self, x_T, mu, s2, t_start, t_end):
        """Exact probability-flow ODE solution from t_start to t_end."""
        sch = self.schedule
        ratio = self.std(t_end, s2) / self.std(t_start, s2)
        return sch.alpha(t_end) * mu + (x_T - sch.alpha(t_start) * mu) * ratio


ODE_SOLVERS = [
    jadeis.DDIM(),
    jadeis.DPMSolver(order=1),
    jadeis.DPMSolver(order=2),
    jadeis.DPMSolver(order=3),
    jadeis.DPMSolverPP(order=1),
    jadeis.DPMSolverPP(order=2),
    jadeis.DPMSolverPP(order=3),
]
SDE_SOLVERS = [
    jadeis.SDEDPMSolver(),
    jadeis.SDEDPMSolverPP(order=1),
    jadeis.SDEDPMSolverPP(order=2),
]


# ---------------------------------------------------------------------------------------
# A non-Gaussian model and a tight reference solution (docs/math/samplers.md, "warm-up")


class RandomMLP:
    """A small random-weight tanh MLP noise predictor: a smooth, non-Gaussian test model.

    ``eps_fn(params, x, t, z)`` for ``x`` of shape ``(batch, dim)``: two tanh layers of
    width ``hidden`` on ``[x, t, sin(2 pi t), cos(2 pi t)]``, weights drawn once from
    ``seed`` (``params``, a dict of float64 arrays, so ``dL/dparams`` is a tree). ``z``
    (``None`` or an array broadcastable to ``(hidden,)``) is added to the first layer's
    pre-activation. The Gaussian oracle's exact score is linear in ``x`` and its
    multistep error constants nearly cancel; this model has neither property.
    """

    def __init__(self, dim: int = 2, hidden: int = 16, seed: int = 0, scale: float = 1.0):
        rng = np.random.default_rng(seed)
        d_in = dim + 3

        def w(shape, fan_in):
            return jnp.asarray(rng.standard_normal(shape) / np.sqrt(fan_in))

        self.dim = dim
        self.params = {
            "w1": w((d_in, hidden), d_in),
            "b1": w((hidden,), 4.0),
            "w2": w((hidden, hidden), hidden),
            "b2": w((hidden,), 4.0),
            "w3": scale * w((hidden, dim), hidden),
            "b3": scale * w((dim,), 4.0),
        }

    @staticmethod
    def eps_fn(params, x, t, z):
        t = jnp.asarray(t).astype(x.dtype)
        ang = (2.0 * np.pi) * t
        emb = jnp.stack([t, jnp.sin(ang), jnp.cos(ang)])
        emb = jnp.broadcast_to(emb, x.shape[:-1] + (3,))
        h = jnp.concatenate([x, emb], axis=-1) @ params["w1"].astype(x.dtype)
        h = h + params["b1"].astype(x.dtype)
        if z is not None:
            h = h + jnp.asarray(z).astype(x.dtype)
        h = jnp.tanh(h)
        h = jnp.tanh(h @ params["w2"].astype(x.dtype) + params["b2"].astype(x.dtype))
        return h @ params["w3"].astype(x.dtype) + params["b3"].astype(x.dtype)


def diffrax_reference(
    eps_fn, params, x_T, z, schedule, t_start, t_end, rtol=1e-10, atol=1e-10, max_steps=16384
):
    """x at ``t_end`` of the probability-flow ODE from ``x_T`` at ``t_start`` (float64).

    Solved in log-SNR for ``y = x / alpha`` (``dy/dlambda = -e^{-lambda} eps(alpha y, t)``,
    docs/math/samplers.md) with diffrax ``Tsit5`` and ``PIDController(rtol, atol)``.
    Differentiable: ``jax.grad`` through it uses diffrax's ``RecursiveCheckpointAdjoint``,
    the exact gradient of the tight solve.
    """
    import diffrax

    lam0 = schedule.log_snr(jnp.asarray(t_start, jnp.float64))
    lam1 = schedule.log_snr(jnp.asarray(t_end, jnp.float64))

    def field(lam, y, args):
        p, zz = args
        t = schedule.t_from_log_snr(lam)
        alpha = schedule.alpha(t)
        return -jnp.exp(-lam) * eps_fn(p, alpha * y, t, zz)

    y0 = x_T / schedule.alpha(jnp.asarray(t_start, jnp.float64))
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        diffrax.Tsit5(),
        t0=lam0,
        t1=lam1,
        dt0=(lam1 - lam0) / 256,
        y0=y0,
        args=(params, z),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        adjoint=diffrax.RecursiveCheckpointAdjoint(),
        max_steps=max_steps,
    )
    return schedule.alpha(jnp.asarray(t_end, jnp.float64)) * sol.ys[-1]


# ---------------------------------------------------------------------------------------
# One registry of every solver: the generic tests (tests/test_compatibility.py,
# tests/test_registry.py) are driven by it. A new solver is tested by adding it here.

#: name -> (an instance on a fixed grid, an instance under an adaptive controller or None
#: where the class has no configuration with an error estimate)
SOLVER_REGISTRY = {
    "DDIM": (jadeis.DDIM(), jadeis.DDIM()),
    "DPMSolver": (jadeis.DPMSolver(order=3), jadeis.DPMSolver(order=3)),
    "DPMSolverPP": (jadeis.DPMSolverPP(order=2), jadeis.DPMSolverPP(order=3)),
    "UniPC": (jadeis.UniPC(order=2), jadeis.UniPC(order=2)),
    "SinglestepDPMSolver": (
        jadeis.SinglestepDPMSolver(order=3),
        jadeis.SinglestepDPMSolver(order=2, prediction="noise"),
    ),
    "Rex": (jadeis.Rex(scheme="midpoint"), jadeis.Rex(scheme="rk3")),
    "SDEDPMSolver": (jadeis.SDEDPMSolver(), jadeis.SDEDPMSolver()),
    "SDEDPMSolverPP": (jadeis.SDEDPMSolverPP(order=2), jadeis.SDEDPMSolverPP(order=2)),
    "SDERex": (jadeis.SDERex(scheme="shark"), jadeis.SDERex(scheme="euler")),
}


def all_solver_classes():
    """Every concrete solver class that jadeis exports."""
    return sorted(
        name
        for name in jadeis.__all__
        if isinstance(getattr(jadeis, name), type)
        and issubclass(getattr(jadeis, name), jadeis.AbstractSolver)
        and not name.startswith("Abstract")
    )


# ---------------------------------------------------------------------------------------
# counting compilations (a public JAX mechanism, not a counter kept in the library)

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compilations():
    """Count XLA compilations inside the block: ``with count_compilations() as n: ...``,
    then ``len(n)`` (``jax.monitoring``'s backend-compile events; a cached program is not
    compiled again)."""
    events: list = []

    def listener(event, duration, **kwargs):
        if event == _COMPILE_EVENT:
            events.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
