"""DiscreteAdjoint against Backprop, AdjointDEIS against the discrete gradient, per-step
conditioning, and ``solve_adjoint`` against ``sample``'s own gradients (float64)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jadeis

from .helpers import ODE_SOLVERS, SDE_SOLVERS, GaussianOracle, fitted_order

SCH = jadeis.VPLinear()
N = 7
HIDDEN = 5


def quick_jit(fn=None, **kw):
    """jax.jit with XLA backend optimisation off: these tiny problems are compile-bound."""
    if fn is None:
        return functools.partial(quick_jit, **kw)
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0}, **kw)


def eps_fn(params, x, t, z):
    """A small nonlinear noise model; z is a dict {"c": (HIDDEN,), "scale": ()}."""
    h = jnp.tanh(x @ params["w1"] + t * params["b"] + z["c"])
    return (h @ params["w2"]) * z["scale"] + 0.1 * x * jnp.sin(t)


def make_params(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "w1": 0.8 * jax.random.normal(k1, (2, HIDDEN), jnp.float64),
        "b": jax.random.normal(k2, (HIDDEN,), jnp.float64),
        "w2": 0.6 * jax.random.normal(k3, (HIDDEN, 2), jnp.float64),
    }


PARAMS = make_params(jax.random.key(0))
X_T = jax.random.normal(jax.random.key(1), (3, 2), jnp.float64)
Z = {"c": jnp.linspace(-0.5, 0.5, HIDDEN), "scale": jnp.asarray(0.9)}
TS = jadeis.time_grid(SCH, N)


def z_fn(p, t):
    return {"c": p["c0"] + t * p["c1"], "scale": p["s"] * (1.0 + t)}


Z_PER_STEP = jadeis.PerStep(
    {
        "c": jnp.linspace(-0.5, 0.5, HIDDEN)[None]
        + 0.1 * jnp.arange(N, dtype=jnp.float64)[:, None],
        "scale": 0.9 + 0.05 * jnp.arange(N, dtype=jnp.float64),
    }
)
Z_FN = jadeis.ConditioningFn(
    z_fn,
    {"c0": jnp.linspace(-0.5, 0.5, HIDDEN), "c1": jnp.full((HIDDEN,), 0.3), "s": jnp.asarray(0.8)},
)
WEIGHT = jnp.array([[1.0, -0.5], [0.3, 0.7], [-1.2, 0.4]])


def loss_x0(x0):
    return jnp.sum(WEIGHT * x0) + 0.5 * jnp.sum(jnp.sin(x0) ** 2)


def assert_trees_close(a, b, rtol=1e-10, msg=""):
    """Leafwise max|a - b| <= rtol * max|b| (plus a tiny floor), same structure."""
    assert jax.tree.structure(a) == jax.tree.structure(b), (
        jax.tree.structure(a),
        jax.tree.structure(b),
    )
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape, msg
        scale = float(np.max(np.abs(y)))
        err = float(np.max(np.abs(x - y)))
        assert err <= rtol * scale + 1e-14, (msg, err, scale)


def _grads(solver, adjoint, z, **kw):
    """jax.grad of loss_x0(sample(...)) with respect to (params, x_T, z[, noise])."""
    noise = kw.pop("noise", None)

    def f(p, x, zz, nz):
        x0 = jadeis.sample(
            eps_fn, p, x, zz, schedule=SCH, ts=TS, solver=solver, adjoint=adjoint, noise=nz, **kw
        )
        return loss_x0(x0)

    argnums = (0, 1, 2) if noise is None else (0, 1, 2, 3)
    return jax.grad(f, argnums=argnums)(PARAMS, X_T, z, noise)


Z_KINDS = {"dict": Z, "per_step": Z_PER_STEP, "fn": Z_FN}


@pytest.mark.parametrize("solver", ODE_SOLVERS, ids=repr)
def test_discrete_equals_backprop_ode(solver):
    """DiscreteAdjoint == Backprop to rounding (rtol 1e-10) for dL/dparams, dL/dx_T and
    dL/dz, with z a dict, a PerStep and a ConditioningFn (gradient w.r.t. its params)."""

    @quick_jit
    def run():
        return {
            name: (
                _grads(solver, jadeis.DiscreteAdjoint(), z),
                _grads(solver, jadeis.Backprop(), z),
            )
            for name, z in Z_KINDS.items()
        }

    res = run()
    for name, (disc, ref) in res.items():
        assert_trees_close(disc, ref, msg=name)
        # and the gradients are not trivially zero
        assert all(float(jnp.max(jnp.abs(leaf))) > 1e-3 for leaf in jax.tree.leaves(ref)), name
    assert isinstance(res["per_step"][0][2], jadeis.PerStep)
    assert isinstance(res["fn"][0][2], jadeis.ConditioningFn)


@pytest.mark.parametrize("solver", SDE_SOLVERS, ids=repr)
def test_discrete_equals_backprop_sde(solver):
    """SDE samplers: DiscreteAdjoint == Backprop with noise= for params, x_T, z of every
    kind and the noise array itself, and with key= (dict z; the key-driven noise kernels are
    slow to compile, so one z kind is enough there)."""
    noise = jax.random.normal(jax.random.key(7), (N,) + X_T.shape, jnp.float64)
    key = jax.random.key(5)

    @quick_jit
    def run():
        out = {
            name: (
                _grads(solver, jadeis.DiscreteAdjoint(), z, noise=noise),
                _grads(solver, jadeis.Backprop(), z, noise=noise),
            )
            for name, z in Z_KINDS.items()
        }
        out["key"] = (
            _grads(solver, jadeis.DiscreteAdjoint(), Z, key=key),
            _grads(solver, jadeis.Backprop(), Z, key=key),
        )
        return out

    res = run()
    for name, (disc, ref) in res.items():
        assert_trees_close(disc, ref, msg=name)
        assert all(float(jnp.max(jnp.abs(leaf))) > 1e-3 for leaf in jax.tree.leaves(ref)), name
    assert isinstance(res["per_step"][0][2], jadeis.PerStep)
    assert isinstance(res["fn"][0][2], jadeis.ConditioningFn)
    g_noise = res["dict"][0][3]
    assert g_noise.shape == noise.shape
    assert float(jnp.min(jnp.max(jnp.abs(g_noise), axis=(1, 2)))) > 0.0  # every step counts


def test_noise_gradient_matches_finite_difference():
    """dL/dnoise of DiscreteAdjoint against a central difference in one random direction."""
    solver = jadeis.SDEDPMSolverPP(order=2)
    noise = jax.random.normal(jax.random.key(7), (N,) + X_T.shape, jnp.float64)
    d = jax.random.normal(jax.random.key(8), noise.shape, jnp.float64)

    @quick_jit
    def run():
        f = lambda nz: loss_x0(
            jadeis.sample(eps_fn, PARAMS, X_T, Z, schedule=SCH, ts=TS, solver=solver, noise=nz)
        )
        eps = 1e-6
        return jnp.vdot(jax.grad(f)(noise), d), (f(noise + eps * d) - f(noise - eps * d)) / (
            2 * eps
        )

    g, fd = run()
    np.testing.assert_allclose(g, fd, rtol=1e-7)


@pytest.mark.parametrize(
    "solver", [jadeis.DPMSolverPP(order=3), jadeis.SDEDPMSolverPP(order=2)], ids=repr
)
def test_trajectory_loss(solver):
    """sample_trajectory with a loss of intermediate states: DiscreteAdjoint == Backprop,
    and the trajectory has traj[0] = x_T and traj[-1] = x_0."""
    wt = jnp.linspace(-1.0, 1.0, (N + 1) * 6).reshape((N + 1,) + X_T.shape)
    kw = {"key": jax.random.key(2)} if solver.stochastic else {}

    def loss(adjoint, p, x, z):
        traj = jadeis.sample_trajectory(
            eps_fn,
            p,
            x,
            z,
            schedule=SCH,
            ts=TS,
            solver=solver,
            adjoint=adjoint,
            **kw,
        )
        x0 = traj[-1]
        return loss_x0(x0) + jnp.sum(wt * traj) + jnp.sum(traj[N // 2] ** 2), (x0, traj)

    @quick_jit
    def run():
        outs = {}
        for name, adj in (("disc", jadeis.DiscreteAdjoint()), ("ref", jadeis.Backprop())):
            outs[name] = jax.grad(functools.partial(loss, adj), argnums=(0, 1, 2), has_aux=True)(
                PARAMS, X_T, Z
            )
        return outs

    outs = run()
    assert_trees_close(outs["disc"][0], outs["ref"][0])
    x0, traj = outs["disc"][1]
    assert traj.shape == (N + 1,) + X_T.shape
    np.testing.assert_array_equal(traj[0], X_T)
    np.testing.assert_array_equal(traj[-1], x0)


def test_adjoint_deis_trajectory_loss():
    """AdjointDEIS-1 with a loss on an intermediate state traj[j] equals AdjointDEIS-1 of
    the same loss of the final state of the j-step run on ts[:j + 1] (before t_j the adjoint
    is zero, so the two backward passes do the same arithmetic)."""
    j = 4
    w = jnp.linspace(-1.0, 1.0, 6).reshape(X_T.shape)
    adj = jadeis.AdjointDEIS(order=1)
    solver = jadeis.DDIM()

    @quick_jit
    def run():
        def full(p, x, z):
            traj = jadeis.sample_trajectory(
                eps_fn,
                p,
                x,
                z,
                schedule=SCH,
                ts=TS,
                solver=solver,
                adjoint=adj,
            )
            return jnp.sum(w * traj[j])

        def short(p, x, z):
            xj = jadeis.sample(
                eps_fn, p, x, z, schedule=SCH, ts=TS[: j + 1], solver=solver, adjoint=adj
            )
            return jnp.sum(w * xj)

        g = jax.grad(full, argnums=(0, 1, 2))(PARAMS, X_T, Z)
        return g, jax.grad(short, argnums=(0, 1, 2))(PARAMS, X_T, Z)

    g, ref = run()
    assert_trees_close(g, ref, rtol=1e-12)


def test_deis_gap_to_discrete_shrinks_like_one_over_n():
    """The gap between AdjointDEIS-1 and the exact discrete gradient through DDIM is
    O(1/N): fitted slope within 0.3 of 1 for all three gradients (Gaussian oracle, s = 0.3,
    N = 128, 362, 1024; below N ~ 64 the gap is pre-asymptotic, see test_adjoint_oracle).
    Measured slopes: params 0.82, x_T 0.94, z 0.94."""
    oracle = GaussianOracle(SCH)
    x_T = jnp.array([[0.5, -1.0]])
    ns = (128, 362, 1024)

    @quick_jit(static_argnums=0)
    def gap(n):
        ts = jadeis.time_grid(SCH, n)

        def g(adjoint):
            f = lambda s2, x, mu: jnp.sum(
                jadeis.sample(
                    oracle.eps_fn,
                    s2,
                    x,
                    mu,
                    schedule=SCH,
                    ts=ts,
                    solver=jadeis.DDIM(),
                    adjoint=adjoint,
                )
                ** 2
            )
            return jax.grad(f, argnums=(0, 1, 2))(jnp.asarray(0.09), x_T, jnp.asarray(0.7))

        a, b = g(jadeis.AdjointDEIS(order=1)), g(jadeis.DiscreteAdjoint())
        return jnp.stack([jnp.max(jnp.abs(u - v)) for u, v in zip(a, b)])

    gaps = np.asarray([gap(n) for n in ns])
    for j, name in enumerate(("params", "x_T", "z")):
        assert abs(fitted_order(ns, gaps[:, j]) - 1.0) < 0.3, (name, gaps)


@pytest.mark.parametrize(
    "adjoint", [jadeis.DiscreteAdjoint(), jadeis.AdjointDEIS(order=2)], ids=repr
)
def test_per_step_gradients_sum_to_constant_z_gradient(adjoint):
    """A constant z repeated per step: the per-step gradients (a PerStep) sum over the steps
    to the constant-z gradient, and dL/dparams and dL/dx_T are unchanged."""
    solver = jadeis.DPMSolverPP(order=2)
    rep = jadeis.PerStep(jax.tree.map(lambda v: jnp.broadcast_to(v, (N,) + v.shape), Z))

    @quick_jit
    def run():
        return _grads(solver, adjoint, Z), _grads(solver, adjoint, rep)

    (gp, gx, gz), (gp_r, gx_r, gz_r) = run()
    assert isinstance(gz_r, jadeis.PerStep)
    assert jax.tree.leaves(gz_r.values)[0].shape[0] == N
    summed = jax.tree.map(lambda v: jnp.sum(v, axis=0), gz_r.values)
    assert_trees_close(summed, gz, rtol=1e-12)
    assert_trees_close(gp_r, gp, rtol=1e-12)
    assert_trees_close(gx_r, gx, rtol=1e-12)
    # the per-step gradients do differ between steps (the test is not vacuous)
    c = np.asarray(gz_r.values["c"])
    assert np.max(np.abs(c - c.mean(axis=0))) > 1e-4


# --------------------------------------------------------------------------------------
# solve_adjoint


def _dl_dx0(x0):
    return jax.grad(loss_x0)(x0)


@pytest.mark.parametrize("z_kind", ["dict", "fn"])
def test_solve_adjoint_matches_sample(z_kind):
    """solve_adjoint (under jit) reproduces sample's gradients: trajectory= equals the
    cached AdjointDEIS gradient (also with steps=M != N, the states re-solved from
    trajectory[0] with the given solver), x_0= equals reconstruct mode, and DiscreteAdjoint
    with the solver equals sample's DiscreteAdjoint. The result is an AdjointResult with fields
    x_T, z, params."""
    z = Z_KINDS[z_kind]
    solver = jadeis.DPMSolverPP(order=2)
    deis = jadeis.AdjointDEIS(order=2)

    @quick_jit
    def run():
        traj = jadeis.sample_trajectory(
            eps_fn, PARAMS, X_T, z, schedule=SCH, ts=TS, solver=solver
        )
        x0 = traj[-1]
        gx0 = _dl_dx0(x0)
        common = {"schedule": SCH, "ts": TS}
        return {
            "cached": (
                jadeis.solve_adjoint(
                    eps_fn, PARAMS, z, gx0, trajectory=traj, adjoint=deis, **common
                ),
                _grads(solver, deis, z),
            ),
            "reconstruct": (
                jadeis.solve_adjoint(eps_fn, PARAMS, z, gx0, x_0=x0, adjoint=deis, **common),
                _grads(solver, jadeis.AdjointDEIS(order=2, trajectory="reconstruct"), z),
            ),
            "steps": (
                jadeis.solve_adjoint(
                    eps_fn,
                    PARAMS,
                    z,
                    gx0,
                    trajectory=traj,
                    adjoint=jadeis.AdjointDEIS(order=2, steps=11),
                    solver=solver,
                    **common,
                ),
                _grads(solver, jadeis.AdjointDEIS(order=2, steps=11), z),
            ),
            "discrete": (
                jadeis.solve_adjoint(
                    eps_fn,
                    PARAMS,
                    z,
                    gx0,
                    trajectory=traj,
                    adjoint=jadeis.DiscreteAdjoint(),
                    solver=solver,
                    **common,
                ),
                _grads(solver, jadeis.DiscreteAdjoint(), z),
            ),
        }

    for name, (res, (gp, gx, gz)) in run().items():
        assert isinstance(res, jadeis.AdjointResult), name
        assert res._fields == ("x_T", "z", "params")
        assert_trees_close(res.x_T, gx, rtol=1e-12, msg=name)
        assert_trees_close(res.z, gz, rtol=1e-12, msg=name)
        assert_trees_close(res.params, gp, rtol=1e-12, msg=name)


def test_solve_adjoint_sde_trajectory_matches_sample():
    """solve_adjoint(solver=<SDE solver>, trajectory=) along an SDE path equals sample's AdjointDEIS
    gradient with the same noise."""
    solver = jadeis.SDEDPMSolver()
    noise = jax.random.normal(jax.random.key(3), (N,) + X_T.shape, jnp.float64)
    adj = jadeis.AdjointDEIS(order=1)

    @quick_jit
    def run():
        traj = jadeis.sample_trajectory(
            eps_fn,
            PARAMS,
            X_T,
            Z,
            schedule=SCH,
            ts=TS,
            solver=solver,
            noise=noise,
        )
        x0 = traj[-1]
        res = jadeis.solve_adjoint(
            eps_fn,
            PARAMS,
            Z,
            _dl_dx0(x0),
            schedule=SCH,
            ts=TS,
            trajectory=traj,
            solver=solver,
            adjoint=adj,
        )
        return res, _grads(solver, adj, Z, noise=noise)

    res, (gp, gx, gz, _) = run()
    assert_trees_close(res.x_T, gx, rtol=1e-12)
    assert_trees_close(res.z, gz, rtol=1e-12)
    assert_trees_close(res.params, gp, rtol=1e-12)
