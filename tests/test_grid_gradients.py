"""Gradients with respect to the time grid ``ts`` and the schedule's parameters.

``DiscreteAdjoint`` differentiates the step inputs (coefficients and the model's time) and
pulls their cotangents back through ``solver.inputs`` (docs/math/adjoint.md, "gradients
with respect to the time grid and schedule"); it must equal ``Backprop`` to round-off for
every sampler, on the fast linear-multistep path and on the generic path (the VJP of
``solver.step``). ``AdjointDEIS`` cannot give these gradients: it raises, never a zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jadeis

from .helpers import ODE_SOLVERS, SDE_SOLVERS

N = 7
X_T = jax.random.normal(jax.random.key(3), (3, 2), jnp.float64)
Z = jnp.array([0.3, -0.2])
PARAMS = {"w": jnp.array([[0.9, 0.2], [-0.3, 0.7]]), "b": jnp.array([0.1, -0.05])}


def eps_fn(p, x, t, z):
    # a non-linear, time-dependent stand-in network (does not close over traced values)
    h = jnp.tanh(x @ p["w"] + p["b"] + z * jnp.cos(3.0 * t))
    return h + 0.2 * t * x


SCHEDULES = {
    "vplinear": (lambda v: jadeis.VPLinear(beta_max=v), 20.0),
    "vpcosine": (lambda v: jadeis.VPCosine(s=v), 0.008),
    "rectified": (lambda v: jadeis.RectifiedFlow(t_max=v), 0.99),
    "ve": (lambda v: jadeis.VE(t_max=v), 80.0),
}


def _loss(solver, adjoint, make, key=None):
    def loss(ts, v, x_T, params, z):
        sch = make(v)
        kw = {"key": key} if solver.stochastic else {}
        x0 = jadeis.sample(eps_fn, params, x_T, z, schedule=sch, ts=ts, solver=solver,
                           adjoint=adjoint, **kw)
        return jnp.sum(jnp.sin(x0) * x0)

    return loss


def _grid(make, v):
    sch = make(v)
    if isinstance(sch, jadeis.VE):  # sigma from 5 to 0.05: a well-conditioned range
        return jadeis.time_grid(sch, N, t_start=5.0, t_end=0.05)
    return jadeis.time_grid(sch, N, t_end=max(float(sch.t_min), 1e-3) * 5)


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-300))


# the fast (linear multistep) sweep on the configurations that tests/test_compatibility.py
# does not already check with respect to ts and a schedule parameter (its registry's DDIM,
# DPMSolver(3), DPMSolverPP(2), SDEDPMSolver, SDEDPMSolverPP(2) are there)
_IN_COMPATIBILITY = ("DDIM()", "DPMSolver(order=3)", "DPMSolverPP()", "SDEDPMSolver()",
                     "SDEDPMSolverPP(order=2)")
ALL = [(s, None, True) for s in ODE_SOLVERS if repr(s) not in _IN_COMPATIBILITY]
ALL += [(s, 7, True) for s in SDE_SOLVERS if repr(s) not in _IN_COMPATIBILITY]
# the generic path (VJP of solver.step) on one solver of each kind
ALL += [
    (jadeis.DDIM(), None, False),
    (jadeis.DPMSolverPP(order=3), None, False),
    (jadeis.SDEDPMSolverPP(order=2), 7, False),
]


@pytest.mark.parametrize(
    "solver,key,fast", ALL, ids=lambda v: repr(v) if not isinstance(v, (int, bool)) else str(v)
)
def test_discrete_equals_backprop_wrt_ts_and_schedule(solver, key, fast):
    key = None if key is None else jax.random.key(key)
    make, v = SCHEDULES["vplinear"]
    ts = _grid(make, v)
    argnums = (0, 1, 2, 3, 4)
    ref = jax.grad(_loss(solver, jadeis.Backprop(), make, key), argnums)(ts, v, X_T, PARAMS, Z)
    got = jax.grad(_loss(solver, jadeis.DiscreteAdjoint(fast=fast), make, key), argnums)(
        ts, v, X_T, PARAMS, Z
    )
    assert float(jnp.max(jnp.abs(ref[0]))) > 1e-3  # the ts gradient is not trivially zero
    for r, g in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        assert _rel(g, r) <= 1e-10


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_schedule_parameter(name):
    make, v = SCHEDULES[name]
    ts = _grid(make, v)
    solver = jadeis.DPMSolverPP(order=3)
    ref = jax.grad(_loss(solver, jadeis.Backprop(), make), (0, 1))(ts, v, X_T, PARAMS, Z)
    got = jax.grad(_loss(solver, jadeis.DiscreteAdjoint(), make), (0, 1))(ts, v, X_T, PARAMS, Z)
    for r, g in zip(ref, got):
        assert _rel(g, r) <= 1e-10


def test_discrete_vp_table_gradient():
    # the log-alpha table of DiscreteVP is a schedule parameter like any other: the
    # gradient with respect to the schedule module itself
    betas = jadeis.DiscreteVP.ddpm_linear()
    make = lambda s: s  # noqa: E731
    ts = jadeis.time_grid(betas, N)
    solver = jadeis.DPMSolverPP(order=2)
    ref = jax.grad(_loss(solver, jadeis.Backprop(), make), 1)(ts, betas, X_T, PARAMS, Z)
    got = jax.grad(_loss(solver, jadeis.DiscreteAdjoint(), make), 1)(ts, betas, X_T, PARAMS, Z)
    leaves_r, leaves_g = jax.tree.leaves(ref), jax.tree.leaves(got)
    assert leaves_r and any(float(jnp.max(jnp.abs(x))) > 0 for x in leaves_r)
    for r, g in zip(leaves_r, leaves_g):
        assert _rel(g, r) <= 1e-10


def test_finite_differences_wrt_ts():
    make, v = SCHEDULES["vplinear"]
    ts = _grid(make, v)
    loss = _loss(jadeis.DPMSolverPP(order=2), jadeis.DiscreteAdjoint(), make)
    g = jax.grad(loss)(ts, v, X_T, PARAMS, Z)
    eps = 1e-6
    for i in (1, N // 2, N - 1):
        d = jnp.zeros_like(ts).at[i].set(eps)
        fd = (loss(ts + d, v, X_T, PARAMS, Z) - loss(ts - d, v, X_T, PARAMS, Z)) / (2 * eps)
        np.testing.assert_allclose(float(g[i]), float(fd), rtol=1e-6, atol=1e-9)


def test_only_requested_gradients_are_computed_and_unrequested_are_not_zeroed():
    # d/dx_T alone and d/dts alone agree with the joint gradient
    make, v = SCHEDULES["vplinear"]
    ts = _grid(make, v)
    loss = _loss(jadeis.DPMSolverPP(order=2), jadeis.DiscreteAdjoint(), make)
    joint = jax.grad(loss, (0, 2))(ts, v, X_T, PARAMS, Z)
    only_ts = jax.grad(loss, 0)(ts, v, X_T, PARAMS, Z)
    only_x = jax.grad(loss, 2)(ts, v, X_T, PARAMS, Z)
    np.testing.assert_allclose(np.asarray(only_ts), np.asarray(joint[0]), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(only_x), np.asarray(joint[1]), rtol=1e-12)


@pytest.mark.parametrize("trajectory", ["cached", "reconstruct"])
def test_adjoint_deis_raises_for_ts_and_schedule(trajectory):
    make, v = SCHEDULES["vplinear"]
    ts = _grid(make, v)
    loss = _loss(jadeis.DDIM(), jadeis.AdjointDEIS(order=1, trajectory=trajectory), make)
    for argnum in (0, 1):
        with pytest.raises(ValueError, match=r"AdjointDEIS cannot differentiate .*ts"):
            jax.grad(loss, argnum)(ts, v, X_T, PARAMS, Z)
    # with ts held fixed it works as before
    g = jax.grad(loss, 2)(jax.lax.stop_gradient(ts), v, X_T, PARAMS, Z)
    assert np.all(np.isfinite(np.asarray(g)))


def test_jit_and_vmap_of_ts_gradient():
    make, v = SCHEDULES["vplinear"]
    ts = _grid(make, v)
    loss = _loss(jadeis.DPMSolverPP(order=2), jadeis.DiscreteAdjoint(), make)
    g = jax.grad(loss)(ts, v, X_T, PARAMS, Z)
    gj = jax.jit(jax.grad(loss))(ts, v, X_T, PARAMS, Z)
    np.testing.assert_allclose(np.asarray(gj), np.asarray(g), rtol=1e-12)
    batch = jnp.stack([X_T, 0.5 * X_T])
    gv = jax.vmap(lambda x: jax.grad(loss)(ts, v, x, PARAMS, Z))(batch)
    np.testing.assert_allclose(np.asarray(gv[0]), np.asarray(g), rtol=1e-12)
