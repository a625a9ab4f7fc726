"""Properties on random valid configurations (hypothesis): every sampler on every
schedule, N in 1..12, float32/float64: finite, deterministic, jit == eager, vmap == loop,
DiscreteAdjoint == Backprop (with respect to x_T and to the time grid ts).

CI-sized: few examples, no deadline, one fixed state shape so compiled code is reused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, Phase, example, given, settings, strategies as st

import jadeis

SOLVERS = [
    jadeis.DDIM(),
    *(jadeis.DPMSolver(order=k) for k in (1, 2, 3)),
    *(jadeis.DPMSolverPP(order=k) for k in (1, 2, 3)),
    *(jadeis.DPMSolverPP(order=k, lower_order_final=False) for k in (2, 3)),
    jadeis.SDEDPMSolver(),
    jadeis.SDEDPMSolverPP(order=1),
    jadeis.SDEDPMSolverPP(order=2),
]
SCHEDULES = [
    jadeis.VPLinear(),
    jadeis.VPCosine(),
    jadeis.RectifiedFlow(),
    jadeis.VE(),
    jadeis.DiscreteVP(np.linspace(1e-4, 2e-2, 1000)),
]
W = np.array([0.7, -0.4, 0.9])


def eps_fn(p, x, t, z):
    """A small nonlinear model, scale-aware so every schedule gives O(1) outputs."""
    t = t.astype(x.dtype)
    return jnp.tanh(p.astype(x.dtype) * x / (1.0 + jnp.abs(x)) + jnp.log1p(t)) + 0.1 * x


CONFIG = st.tuples(
    st.sampled_from(range(len(SOLVERS))),
    st.sampled_from(range(len(SCHEDULES))),
    st.integers(1, 12),
    st.sampled_from([jnp.float32, jnp.float64]),
)
# compile time dominates (each new (solver, schedule, N, dtype) compiles): few examples, no
# shrinking (a failure reports the drawn configuration as is)
SETTINGS = settings(
    max_examples=4,
    deadline=None,
    derandomize=True,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow],
)


def _problem(cfg):
    si, ki, n, dtype = cfg
    solver, sch = SOLVERS[si], SCHEDULES[ki]
    ts = jadeis.time_grid(sch, n).astype(dtype)
    x = jnp.asarray(np.linspace(-1.5, 1.5, 6).reshape(2, 3), dtype)
    if isinstance(sch, jadeis.VE):
        x = x * jnp.asarray(sch.t_max, dtype)
    kw = dict(schedule=sch, solver=solver)
    if solver.stochastic:
        kw["key"] = jax.random.key(7)
    return solver, sch, ts, x, jnp.asarray(W, dtype), kw


def _tol(dtype):
    return (2e-3, 1e-4) if dtype == jnp.float32 else (1e-9, 1e-11)


@SETTINGS
@given(CONFIG)
def test_sampling_properties(cfg):
    """finite, deterministic, jit == eager, vmap == loop."""
    solver, sch, ts, x, p, kw = _problem(cfg)
    rtol, atol = _tol(cfg[3])
    out = jadeis.sample(eps_fn, p, x, ts=ts, **kw)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert bool(jnp.all(jnp.isfinite(out))), cfg
    np.testing.assert_array_equal(out, jadeis.sample(eps_fn, p, x, ts=ts, **kw))
    jitted = jax.jit(lambda x, ts: jadeis.sample(eps_fn, p, x, ts=ts, **kw))(x, ts)
    np.testing.assert_allclose(jitted, out, rtol=rtol, atol=atol)
    rows = jax.vmap(lambda r: jadeis.sample(eps_fn, p, r, ts=ts, **kw))(x)
    loop = jnp.stack([jadeis.sample(eps_fn, p, r, ts=ts, **kw) for r in x])
    np.testing.assert_allclose(rows, loop, rtol=rtol, atol=atol)


@SETTINGS
@given(CONFIG)
@example((3, 0, 1, jnp.float32))  # DPMSolver-3 on one step: d/dts once crashed
def test_discrete_adjoint_equals_backprop(cfg):
    """The exact discrete adjoint equals autodiff through the loop, for x_T and ts."""
    solver, sch, ts, x, p, kw = _problem(cfg)
    rtol, atol = _tol(cfg[3])

    def grads(adjoint):
        def loss(x, ts):
            out = jadeis.sample(eps_fn, p, x, ts=ts, adjoint=adjoint, **kw)
            return jnp.sum(jnp.sin(out))

        return jax.grad(loss, argnums=(0, 1))(x, ts)

    gx, gts = grads(jadeis.DiscreteAdjoint())
    bx, bts = grads(jadeis.Backprop())
    assert bool(jnp.all(jnp.isfinite(gx))) and bool(jnp.all(jnp.isfinite(gts))), cfg
    scale_x = float(jnp.max(jnp.abs(bx))) + 1.0
    scale_t = float(jnp.max(jnp.abs(bts))) + 1.0
    np.testing.assert_allclose(gx, bx, rtol=rtol, atol=atol * scale_x * 10)
    np.testing.assert_allclose(gts, bts, rtol=rtol, atol=atol * scale_t * 10)
