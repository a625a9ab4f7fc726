"""Greedy guidance (jadeis.greedy_sample).

- zero inner steps is plain sampling, bitwise, for every kind of solver and both controllers;
- DDIM and DPM-Solver++(2M), noise and state variants, against a hand-written numpy loop
  (own DDIM / 2M coefficients, the Gaussian-data model, Adam written out, best iterate per
  example with strict <): the multistep history holds the optimised data prediction;
- an example whose loss is zero keeps the plain prediction bitwise; the cost in Stats terms;
- jit, vmap, pytree states, a sharded batch (4 emulated CPU devices), the adaptive controller;
  compiled once per configuration; no gradient (a ValueError); misuse errors.
"""

from __future__ import annotations

import json
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadeis

from ._shared import np_alpha, np_gaussian_eps, np_lambda, np_sigma, run_on_cpu_devices
from .helpers import RandomMLP

SCH = jadeis.VPLinear()
MLP = RandomMLP(dim=3, hidden=8, seed=5)
X_T = jax.random.normal(jax.random.key(0), (4, 3), jnp.float64)
TARGET = jax.random.normal(jax.random.key(1), (4, 3), jnp.float64)
Z = 0.1 * jnp.arange(8, dtype=jnp.float64)
N = 6
TS = jadeis.time_grid(SCH, N)
OPT = optax.adam(0.05)


def sq_loss(x0, target):
    return jnp.sum((x0 - target) ** 2, axis=-1)


def _greedy(solver, inner=3, variable="eps", **kw):
    kw.setdefault("ts", TS)
    return jadeis.greedy_sample(
        sq_loss,
        MLP.eps_fn,
        MLP.params,
        X_T,
        Z,
        schedule=SCH,
        optimizer=OPT,
        inner_steps=inner,
        variable=variable,
        solver=solver,
        loss_args=(TARGET,),
        **kw,
    )


def _plain(solver, **kw):
    kw.setdefault("ts", TS)
    return jadeis.solve(MLP.eps_fn, MLP.params, X_T, Z, schedule=SCH, solver=solver, **kw)


SOLVERS = [
    jadeis.DDIM(),
    jadeis.DPMSolverPP(order=2),
    jadeis.DPMSolver(order=3),
    jadeis.UniPC(order=2),
    jadeis.SinglestepDPMSolver(order=3),
    jadeis.Rex(),
    jadeis.SDEDPMSolverPP(order=2),
]


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_zero_inner_steps_is_plain_sampling_bitwise(solver):
    kw = {"key": jax.random.key(3)} if solver.stochastic else {}
    got = _greedy(solver, inner=0, **kw)
    want = _plain(solver, **kw)
    assert np.array_equal(got.x_0, want.x_0)
    assert int(got.stats.model_evals) == int(want.stats.model_evals)
    assert int(got.loss_evals) == 0 and int(got.loss_vjps) == 0
    if isinstance(solver, jadeis.DDIM | jadeis.DPMSolverPP):
        got_x = _greedy(solver, inner=0, variable="x", **kw)
        assert np.array_equal(got_x.x_0, want.x_0)


def test_zero_inner_steps_is_plain_sampling_bitwise_adaptive():
    ts = jnp.asarray([1.0, 1e-3])
    for solver in (jadeis.DPMSolverPP(order=3), jadeis.SinglestepDPMSolver(order=3)):
        pid = jadeis.PIDController(rtol=1e-3, atol=1e-3)
        got = _greedy(solver, inner=0, ts=ts, controller=pid)
        want = _plain(solver, ts=ts, controller=pid)
        assert np.array_equal(got.x_0, want.x_0)
        assert int(got.stats.num_steps) == int(want.stats.num_steps)
        assert int(got.stats.num_rejected) == int(want.stats.num_rejected)


# ---------------------------------------------------------------------------------------
# a hand-written reference: Gaussian data, DDIM / DPM-Solver++(2M) written out, Adam by hand

MU, S2 = 0.3, 0.25


def gauss_eps(s2, x, t, mu):
    a, s = SCH.alpha(t).astype(x.dtype), SCH.sigma(t).astype(x.dtype)
    return s * (x - a * mu) / (a**2 * s2 + s**2)


def weighted_loss(x0, target, w):
    return jnp.sum(w * (x0 - target) ** 2, axis=-1)


def np_reference(x_T, ts, target, w, *, solver, variable, inner, lr, b1, b2, eps_adam=1e-8):
    """The greedy sampler in numpy: returns x_0 and the chosen iterate index per step and
    example (for checking that the test exercises the best-iterate selection)."""
    ts = np.asarray(ts, np.float64)
    x = np.asarray(x_T, np.float64).copy()
    d_prev = h_prev = None
    chosen = []
    for i in range(len(ts) - 1):
        s, t = ts[i], ts[i + 1]
        a_s, s_s, a_t, s_t = np_alpha(s), np_sigma(s), np_alpha(t), np_sigma(t)
        h = np_lambda(t) - np_lambda(s)
        eps = np_gaussian_eps(x, s, MU, S2)
        if variable == "eps":
            x0_of = lambda u, x=x, a=a_s, sg=s_s: (x - sg * u) / a  # noqa: E731
            dx0 = -s_s / a_s
            u = eps.copy()
        else:
            x0_of = lambda u, e=eps, a=a_s, sg=s_s: (u - sg * e) / a  # noqa: E731
            dx0 = 1.0 / a_s
            u = x.copy()
        m, v = np.zeros_like(u), np.zeros_like(u)
        best_u, best_l = u.copy(), np.full(u.shape[0], np.inf)
        best_k = np.zeros(u.shape[0], int)
        for k in range(inner + 1):
            r = x0_of(u) - target
            loss = np.sum(w * r**2, axis=-1)
            better = loss < best_l
            best_u[better], best_l[better], best_k[better] = u[better], loss[better], k
            if k == inner:
                break
            g = 2 * w * r * dx0
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            mh, vh = m / (1 - b1 ** (k + 1)), v / (1 - b2 ** (k + 1))
            u = u - lr * mh / (np.sqrt(vh) + eps_adam)
        chosen.append(best_k)
        xs, e = (x, best_u) if variable == "eps" else (best_u, eps)
        if solver == "ddim":
            x = (a_t / a_s) * xs - s_t * np.expm1(h) * e
        else:  # DPM-Solver++(2M), midpoint form, first step first order
            d = (xs - s_s * e) / a_s
            d_eff = d
            if d_prev is not None:
                r_i = h_prev / h
                d_eff = d + (d - d_prev) / (2 * r_i)
            x = (s_t / s_s) * xs - a_t * np.expm1(-h) * d_eff
            d_prev, h_prev = d, h
    return x, np.stack(chosen)


@pytest.mark.parametrize("variable", ["eps", "x"])
@pytest.mark.parametrize("solver", ["ddim", "2m"])
def test_against_a_hand_written_loop(solver, variable):
    x_T = np.asarray(jax.random.normal(jax.random.key(4), (5, 3), jnp.float64))
    target = np.asarray(jax.random.normal(jax.random.key(5), (5, 3), jnp.float64))
    w = np.array([1.0, 0.5, 2.0])
    lr = 0.4 if variable == "eps" else 0.1  # large: iterates overshoot, the best is not the last
    inner, ts = 7, jadeis.time_grid(SCH, 5)
    want, chosen = np_reference(
        x_T, ts, target, w, solver=solver, variable=variable, inner=inner, lr=lr, b1=0.5, b2=0.9
    )
    # the reference exercises the selection: some choose an earlier iterate, some the last
    assert np.any(chosen == inner) and np.any((0 < chosen) & (chosen < inner))
    jsolver = (
        jadeis.DDIM()
        if solver == "ddim"
        else jadeis.DPMSolverPP(order=2, variant="midpoint", lower_order_final=False)
    )
    plain_ref, _ = np_reference(
        x_T, ts, target, w, solver=solver, variable=variable, inner=0, lr=lr, b1=0.5, b2=0.9
    )
    plain = jadeis.sample(
        gauss_eps,
        jnp.asarray(S2),
        jnp.asarray(x_T),
        jnp.asarray(MU),
        schedule=SCH,
        ts=ts,
        solver=jsolver,
    )
    np.testing.assert_allclose(plain, plain_ref, rtol=1e-11, atol=1e-12)  # the formulas agree
    got = jadeis.greedy_sample(
        weighted_loss,
        gauss_eps,
        jnp.asarray(S2),
        jnp.asarray(x_T),
        jnp.asarray(MU),
        schedule=SCH,
        ts=ts,
        optimizer=optax.adam(lr, b1=0.5, b2=0.9),
        inner_steps=inner,
        variable=variable,
        solver=jsolver,
        loss_args=(jnp.asarray(target), jnp.asarray(w)),
    )
    np.testing.assert_allclose(got.x_0, want, rtol=1e-10, atol=1e-11)
    assert not np.allclose(want, plain_ref, atol=1e-3)


def test_examples_with_zero_loss_keep_the_plain_prediction_bitwise():
    """A hinge loss that is zero for example 0: its prediction is the model's, bitwise (and
    so, at every step, its sample is plain sampling's, to the rounding of a differently
    fused program)."""
    from jadeis._guidance._greedy import GreedyModel

    def hinge(x0, target, radius):
        return jax.nn.relu(jnp.sum((x0 - target) ** 2, axis=-1) - radius)

    radius = jnp.asarray([1e6, 0.0, 0.0, 0.0])
    model = GreedyModel(MLP.eps_fn, hinge, OPT, 5)
    t = TS[3]
    eps = MLP.eps_fn(MLP.params, X_T, t, Z)
    u = jax.jit(model)((MLP.params, SCH, (TARGET, radius)), X_T, t, Z)
    assert np.array_equal(u[0], eps[0]) and not np.allclose(u[1:], eps[1:], atol=1e-6)
    for solver in (jadeis.DDIM(), jadeis.DPMSolverPP(order=2)):
        got = jadeis.greedy_sample(
            hinge,
            MLP.eps_fn,
            MLP.params,
            X_T,
            Z,
            schedule=SCH,
            ts=TS,
            optimizer=OPT,
            inner_steps=5,
            solver=solver,
            loss_args=(TARGET, radius),
        ).x_0
        want = _plain(solver).x_0
        np.testing.assert_allclose(got[0], want[0], rtol=1e-14, atol=0)
        assert not np.allclose(got[1:], want[1:], atol=1e-4)


def test_cost_in_stats_terms():
    for solver, per_step in ((jadeis.DDIM(), 1), (jadeis.Rex(), 4)):
        sol = _greedy(solver, inner=3)
        assert int(sol.stats.num_steps) == N
        assert int(sol.stats.model_evals) == per_step * N
        assert int(sol.loss_evals) == per_step * N * 4 and int(sol.loss_vjps) == per_step * N * 3
        assert int(sol.stats.grad_vjps) == 0 and int(sol.stats.grad_model_evals) == 0
    # the greedy sample lowers the loss
    plain = _plain(jadeis.DDIM()).x_0
    assert np.all(sq_loss(_greedy(jadeis.DDIM(), inner=10).x_0, TARGET) < sq_loss(plain, TARGET))


def test_adaptive_controller_runs_and_counts():
    ts = jnp.asarray([1.0, 1e-3])
    pid = jadeis.PIDController(rtol=1e-3, atol=1e-3)
    sol = _greedy(jadeis.DPMSolverPP(order=2), inner=4, ts=ts, controller=pid)
    plain = _plain(jadeis.DPMSolverPP(order=2), ts=ts, controller=pid)
    assert np.all(np.isfinite(sol.x_0))
    assert np.mean(sq_loss(sol.x_0, TARGET)) < np.mean(sq_loss(plain.x_0, TARGET))
    assert int(sol.loss_evals) == 5 * int(sol.stats.model_evals)
    assert int(sol.stats.num_attempts) >= int(sol.stats.num_steps) > 0
    solx = _greedy(jadeis.DPMSolverPP(order=2), inner=4, variable="x", ts=ts, controller=pid)
    assert np.mean(sq_loss(solx.x_0, TARGET)) < np.mean(sq_loss(plain.x_0, TARGET))


def test_jit_and_vmap():
    solver = jadeis.DPMSolverPP(order=2)
    want = _greedy(solver).x_0
    jitted = jax.jit(lambda x: _greedy_x(solver, x))(X_T)
    np.testing.assert_allclose(jitted, want, rtol=1e-12, atol=1e-13)

    def one(x, target):  # one example, a scalar loss
        return jadeis.greedy_sample(
            lambda x0, tg: jnp.sum((x0 - tg) ** 2),
            MLP.eps_fn,
            MLP.params,
            x,
            Z,
            schedule=SCH,
            ts=TS,
            optimizer=OPT,
            inner_steps=3,
            solver=solver,
            loss_args=(target,),
        ).x_0

    np.testing.assert_allclose(jax.vmap(one)(X_T, TARGET), want, rtol=1e-12, atol=1e-13)


def _greedy_x(solver, x):
    return jadeis.greedy_sample(
        sq_loss,
        MLP.eps_fn,
        MLP.params,
        x,
        Z,
        schedule=SCH,
        ts=TS,
        optimizer=OPT,
        inner_steps=3,
        solver=solver,
        loss_args=(TARGET,),
    ).x_0


def test_pytree_state_equals_the_flat_state():
    """A pytree state {"a": (B, 3), "b": (B, 2, 2)} with an elementwise model gives what the
    flattened (B, 7) state gives."""
    x_flat = jax.random.normal(jax.random.key(6), (4, 7), jnp.float64)
    tg_flat = jax.random.normal(jax.random.key(7), (4, 7), jnp.float64)
    split = lambda v: {"a": v[:, :3], "b": v[:, 3:].reshape(-1, 2, 2)}  # noqa: E731
    eps_flat = lambda p, x, t, z: jnp.tanh(p * x) + z  # noqa: E731
    eps_tree = lambda p, x, t, z: jax.tree.map(lambda v: eps_flat(p, v, t, z), x)  # noqa: E731

    def loss_flat(x0, tg):
        return jnp.sum((x0 - tg) ** 2, axis=-1)

    def loss_tree(x0, tg):
        return loss_flat(x0["a"], tg["a"]) + jnp.sum((x0["b"] - tg["b"]) ** 2, axis=(1, 2))

    kw = dict(schedule=SCH, ts=TS, optimizer=OPT, inner_steps=4, solver=jadeis.DPMSolverPP())
    p, z = jnp.asarray(0.7), jnp.asarray(0.1)
    for variable in ("eps", "x"):
        flat = jadeis.greedy_sample(
            loss_flat, eps_flat, p, x_flat, z, loss_args=(tg_flat,), variable=variable, **kw
        ).x_0
        tree = jadeis.greedy_sample(
            loss_tree,
            eps_tree,
            p,
            split(x_flat),
            z,
            loss_args=(split(tg_flat),),
            variable=variable,
            **kw,
        ).x_0
        np.testing.assert_allclose(tree["a"], flat[:, :3], rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(tree["b"], split(flat)["b"], rtol=1e-12, atol=1e-13)


def test_compiled_once_per_configuration():
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *a, **k: compiles.append(name) if "backend_compile" in name else None
    )
    solver = jadeis.DDIM()
    _greedy(solver, inner=2)  # the first call compiles
    before = len(compiles)
    x2 = _greedy(solver, inner=2).x_0  # the same configuration: nothing
    assert len(compiles) == before
    assert np.all(np.isfinite(x2))


def test_no_gradient():
    def f(x):
        return jnp.sum(_greedy_x(jadeis.DDIM(), x))

    with pytest.raises(ValueError, match="defines no gradient"):
        jax.grad(f)(X_T)


def test_misuse():
    with pytest.raises(ValueError, match="variable='x' edits the state"):
        _greedy(jadeis.UniPC(order=2), variable="x")
    with pytest.raises(ValueError, match="variable must be"):
        _greedy(jadeis.DDIM(), variable="z")
    with pytest.raises(ValueError, match="inner_steps must be"):
        _greedy(jadeis.DDIM(), inner=-1)
    with pytest.raises(ValueError, match="optimizer must be"):
        jadeis.greedy_sample(
            sq_loss,
            MLP.eps_fn,
            MLP.params,
            X_T,
            Z,
            schedule=SCH,
            ts=TS,
            optimizer="adam",
            loss_args=(TARGET,),
        )
    with pytest.raises(ValueError, match="one loss per example"):
        jadeis.greedy_sample(
            lambda x0: jnp.sum(x0, axis=0),
            MLP.eps_fn,
            MLP.params,
            X_T[:, None],
            Z,
            schedule=SCH,
            ts=TS,
            optimizer=OPT,
            inner_steps=1,
        )
    with pytest.raises(ValueError, match="loss of the optimised inputs"):
        jadeis.greedy_sample(
            jadeis.ChiPrior(), MLP.eps_fn, MLP.params, X_T, Z, schedule=SCH, ts=TS, optimizer=OPT
        )


SHARD_SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import NamedSharding, PartitionSpec as P
    jax.config.update("jax_enable_x64", True)
    import jadeis
    assert jax.device_count() == 4
    mesh = jax.make_mesh((4,), ("batch",))
    sharding = NamedSharding(mesh, P("batch"))
    sch = jadeis.VPLinear()
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x_T = jax.random.normal(k1, (8, 3))
    target = jax.random.normal(k2, (8, 3))
    w = jax.random.normal(k3, (3, 3)) / 2
    eps_fn = lambda p, x, t, z: jnp.tanh(x @ p + t * z)
    loss = lambda x0, tg: jnp.sum((x0 - tg) ** 2, axis=-1)
    opt = optax.adam(0.05)
    out = {}
    for variable in ("eps", "x"):
        kw = dict(schedule=sch, ts=jadeis.time_grid(sch, 6), optimizer=opt, inner_steps=4,
                  solver=jadeis.DPMSolverPP(order=2), variable=variable)
        one = jadeis.greedy_sample(loss, eps_fn, w, x_T, 0.1, loss_args=(target,), **kw).x_0
        xs, ts_ = jax.device_put((x_T, target), sharding)
        many = jadeis.greedy_sample(loss, eps_fn, w, xs, 0.1, loss_args=(ts_,), **kw).x_0
        assert len(many.sharding.device_set) == 4, many.sharding
        assert many.sharding.is_equivalent_to(sharding, 2), many.sharding
        out[variable] = float(np.max(np.abs(np.asarray(many) - np.asarray(one))))
    print(json.dumps(out))
    """
)


def test_sharded_batch_matches_one_device():
    res = run_on_cpu_devices(SHARD_SCRIPT, n=4, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    diffs = json.loads(res.stdout.strip().splitlines()[-1])
    assert all(d < 1e-12 for d in diffs.values()), diffs
