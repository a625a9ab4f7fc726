"""JAX's default float32 (x64 off), as users run it: grids from ``time_grid`` are accepted by
every entry point, and sampling, gradients (every exact strategy, SDE included),
``solve_adjoint``, ``guide`` and adaptive steps agree with float64 to float32's accuracy.

Every test here is marked ``float32``: ``tests/conftest.py`` runs it under
``jax.enable_x64(False)``; float64 references are computed inside ``jax.enable_x64(True)``.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadeis

from .helpers import RandomMLP

pytestmark = pytest.mark.float32

SCHEDULES = {
    "VPLinear": lambda t_min: jadeis.VPLinear(t_min=t_min or 1e-3),
    "VPCosine": lambda t_min: jadeis.VPCosine(t_min=t_min or 1e-3),
    "RectifiedFlow": lambda t_min: jadeis.RectifiedFlow(t_min=t_min or 1e-3),
    "VE": lambda t_min: jadeis.VE(t_min=t_min or 2e-3),
    "DiscreteVP": lambda t_min: jadeis.DiscreteVP.scaled_linear(),
}
SPACINGS = ("logsnr", "time", "quadratic", "karras")


def lin_eps(p, x, t, z):
    return p * x


def test_float32_is_on():
    assert jnp.asarray(0.1).dtype == jnp.float32
    assert jadeis.time_grid(jadeis.VPLinear(), 4).dtype == jnp.float32


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_time_grid_is_accepted_by_every_entry_point(name):
    """Every schedule, t_min (1e-4 .. 1e-6), spacing, N and final time: the grid time_grid
    builds in float32 passes every entry point's checks (traced with jax.eval_shape: the
    checks run, nothing is compiled). The range check used to compare float32-rounded end
    points with Python floats and refused RectifiedFlow's default grid."""
    t_mins = (None,) if name == "DiscreteVP" else (None, 1e-4, 1e-5, 1e-6)
    for t_min in t_mins:
        sch = SCHEDULES[name](t_min)
        for spacing in SPACINGS:
            for n in (1, 7):
                for final in (None, "zero"):
                    ts = jadeis.time_grid(sch, n, spacing, final=final)
                    assert ts.dtype == jnp.float32
                    _through_every_entry_point(sch, ts, final)
        # the adaptive controller's end points: a one-step grid, or the schedule's own
        for ends in (jadeis.time_grid(sch, 1), jnp.asarray([sch.t_max, sch.t_min])):
            jax.eval_shape(partial(
                jadeis.sample, lin_eps, 0.5, X32(), schedule=sch, ts=ends,
                solver=jadeis.DPMSolverPP(order=3), controller=jadeis.PIDController()))


def X32():
    return jnp.full((2, 3), 0.3)


def _through_every_entry_point(sch, ts, final):
    x = X32()
    key = jax.random.key(0)
    kw = dict(schedule=sch, ts=ts)
    traj = jax.eval_shape(partial(jadeis.sample_trajectory, lin_eps, 0.5, x, **kw))
    jax.eval_shape(partial(jadeis.sample, lin_eps, 0.5, x, **kw))
    jax.eval_shape(partial(jadeis.sample, lin_eps, 0.5, x, solver=jadeis.SDEDPMSolverPP(),
                           key=key, **kw))
    jax.eval_shape(partial(jadeis.encode_ode, lin_eps, 0.5, x, **kw))
    jax.eval_shape(partial(jadeis.encode_sde, lin_eps, 0.5, x, key=key, **kw))
    jax.eval_shape(partial(jadeis.solve_adjoint, lin_eps, 0.5, None, x,
                           trajectory=jnp.zeros(traj.shape), check_trajectory=False, **kw))
    jadeis.Guidance(lambda x0: jnp.sum(x0), lin_eps, optimizer=optax.sgd(0.1), **kw)
    if final is None:
        jax.eval_shape(partial(jadeis.sample, lin_eps, 0.5, x, solver=jadeis.Rex(), **kw))


def test_learn_time_grid_accepts_a_float32_time_grid():
    sch = jadeis.RectifiedFlow()
    res = jadeis.learn_time_grid(lin_eps, 0.5, jnp.ones((4, 2)), None, schedule=sch,
                                 init=jadeis.time_grid(sch, 3), num_iters=1, progress=False)
    assert res.ts.dtype == jnp.float32


def test_time_grid_refuses_a_dtype_that_rounds_onto_a_singular_end():
    """bfloat16 rounds RectifiedFlow's t_max = 0.999 to 1.0, where alpha = 0."""
    with pytest.raises(ValueError, match="log-SNR is not finite"):
        jadeis.time_grid(jadeis.RectifiedFlow(), 5, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="log-SNR is not finite"):
        jadeis.sample(lin_eps, 0.5, jnp.ones(2), schedule=jadeis.RectifiedFlow(),
                      ts=jnp.asarray([1.0, 0.5], jnp.bfloat16))
    ts = jadeis.time_grid(jadeis.VPLinear(), 5, dtype=jnp.bfloat16)  # fine where alpha > 0
    assert ts.dtype == jnp.bfloat16


# ---------------------------------------------------------------------------------------
# values and gradients in float32 against float64

MLP = RandomMLP(dim=3, hidden=8, seed=3)
SCH = jadeis.VPLinear()


def _inputs(dtype, noise_shape=(2, 3)):
    x_T = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3)), dtype)
    z = jnp.asarray(0.1 * np.arange(8), dtype)
    params = jax.tree.map(lambda v: jnp.asarray(np.asarray(v), dtype), MLP.params)
    noise = jnp.asarray(np.random.default_rng(1).standard_normal((8,) + noise_shape), dtype)
    return x_T, z, params, noise


def _grads(solver, adjoint, dtype, controller=None):
    x_T, z, params, noise = _inputs(dtype, solver.noise_shape((2, 3)))
    ts = jadeis.time_grid(SCH, 8, dtype=dtype) if controller is None else jnp.asarray(
        [SCH.t_max, SCH.t_min], dtype)
    extra = {"noise": noise} if solver.stochastic else {}

    def loss(x_T, z, params):
        x = jadeis.sample(MLP.eps_fn, params, x_T, z, schedule=SCH, ts=ts, solver=solver,
                          controller=controller, adjoint=adjoint, **extra)
        return jnp.sum(jnp.sin(x) * x)

    return jax.grad(loss, argnums=(0, 1, 2))(x_T, z, params)


def _flat(g):
    return np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in jax.tree.leaves(g)])


def _rel(a, b):
    a, b = _flat(a), _flat(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


CASES = [
    (jadeis.DPMSolverPP(order=2), jadeis.DiscreteAdjoint()),
    (jadeis.DPMSolverPP(order=3), jadeis.Backprop()),
    (jadeis.UniPC(order=2), jadeis.DiscreteAdjoint()),
    (jadeis.SinglestepDPMSolver(order=3), jadeis.Backprop()),
    (jadeis.SDEDPMSolverPP(order=2), jadeis.DiscreteAdjoint()),
    (jadeis.SDEDPMSolver(), jadeis.Backprop()),
    (jadeis.Rex(), jadeis.ReversibleAdjoint()),
    (jadeis.SDERex(), jadeis.ReversibleAdjoint()),
]


@pytest.mark.parametrize("solver,adjoint", CASES, ids=lambda v: type(v).__name__)
def test_gradients_in_float32_match_float64(solver, adjoint):
    """Exact strategies (SDE samplers with a fixed noise array included) give float32
    gradients within 1e-3 of float64's. Rex/SDERex with ReversibleAdjoint rebuild the
    states by the inverse: before the exact states kept by the forward pass, float32
    gradients on this model were 10-60% (Rex) and 100% (SDERex) off."""
    got = _grads(solver, adjoint, jnp.float32)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(got))
    with jax.enable_x64(True):
        want = _grads(solver, jadeis.Backprop(), jnp.float64)
    assert _rel(got, want) < 1e-3, _rel(got, want)


def test_adaptive_gradient_in_float32():
    ctrl = jadeis.PIDController(rtol=1e-3, atol=1e-3)
    solver = jadeis.DPMSolverPP(order=3)
    got = _grads(solver, jadeis.DiscreteAdjoint(), jnp.float32, ctrl)
    ref = _grads(solver, jadeis.Backprop(), jnp.float32, ctrl)
    assert _rel(got, ref) < 1e-3


def test_solve_adjoint_in_float32():
    x_T, z, params, _ = _inputs(jnp.float32)
    ts = jadeis.time_grid(SCH, 8)
    traj = jadeis.sample_trajectory(MLP.eps_fn, params, x_T, z, schedule=SCH, ts=ts)
    g = jadeis.solve_adjoint(MLP.eps_fn, params, z, 2 * traj[-1], schedule=SCH, ts=ts,
                             trajectory=traj)
    want = jax.grad(lambda x: jnp.sum(jadeis.sample(MLP.eps_fn, params, x, z, schedule=SCH,
                                                    ts=ts) ** 2))(x_T)
    assert g.x_T.dtype == jnp.float32
    np.testing.assert_allclose(g.x_T, want, rtol=1e-4, atol=1e-5)


def test_guide_and_guidance_in_float32():
    x_T, z, params, _ = _inputs(jnp.float32)
    ts = jadeis.time_grid(SCH, 8)
    target = jnp.full((2, 3), 0.5)
    res = jadeis.guide(lambda x0: jnp.sum((x0 - target) ** 2, axis=-1), MLP.eps_fn, params,
                       x_T, z, schedule=SCH, ts=ts, optimizer=optax.adam(0.05), num_iters=15,
                       progress=False)
    assert res.x_T.dtype == jnp.float32 and res.losses.dtype == np.float32
    assert np.all(res.losses[-1] < res.losses[0])
    g = jadeis.Guidance(lambda x0: jnp.sum(x0**2), MLP.eps_fn, schedule=SCH, ts=ts,
                        optimizer=optax.sgd(0.01), wrt=("z",))
    state = g.step(g.init(params, x_T, z))
    assert state.opt_vars["z"].dtype == jnp.float32


def test_sample_in_float32_matches_float64():
    x_T, z, params, _ = _inputs(jnp.float32)
    for sch in (jadeis.VPLinear(), jadeis.RectifiedFlow(), jadeis.VE()):
        scale = sch.prior_std
        ts = jadeis.time_grid(sch, 10)
        got = jadeis.sample(MLP.eps_fn, params, scale * x_T, z, schedule=sch, ts=ts)
        with jax.enable_x64(True):
            x64, z64, p64, _ = _inputs(jnp.float64)
            want = jadeis.sample(MLP.eps_fn, p64, scale * x64, z64, schedule=sch,
                                 ts=jadeis.time_grid(sch, 10))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale)
