"""Rex (reversible exponential solvers), SDERex, RexLatent encoding and ReversibleAdjoint."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadeis

from .helpers import GaussianOracle, fitted_order

SCH = jadeis.VPLinear()
ORACLE = GaussianOracle(SCH)
S2, MU = 0.09, 0.2
X = jnp.array([[0.5, -0.1], [0.05, 0.3]])
SCHEDULES = [
    jadeis.VPLinear(),
    jadeis.VPCosine(),
    jadeis.DiscreteVP.ddpm_linear(),
    jadeis.RectifiedFlow(),
    jadeis.VE(),
]


def model_of(eps_fn, params, z):
    return lambda x, t: eps_fn(params, x, t, z)


def base_scan(solver, n, x=X):
    """N uncoupled steps of the base scheme in the Lawson variables."""
    ts = jadeis.time_grid(SCH, n)
    inp = solver.inputs(SCH, ts, x.dtype)
    model = model_of(ORACLE.eps_fn, S2, MU)
    out, _ = jax.lax.scan(lambda x, row: (solver.base_step(model, row, x), None), x, inp)
    return out


def rel(a, b):
    nb = float(jnp.linalg.norm(b))
    diff = float(jnp.linalg.norm(a - b))
    return diff if nb == 0.0 else diff / nb


# --- Euler is DDIM ----------------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["data", "noise"])
def test_euler_in_lawson_variables_is_ddim(prediction):
    """Uncoupled Euler in the Lawson variables is DDIM (N steps), and one coupled step
    from (x_T, x_T) is one DDIM step, whatever the coupling."""
    solver = jadeis.Rex(scheme="euler", prediction=prediction, coupling=0.7)
    ts = jadeis.time_grid(SCH, 12)
    ddim = jadeis.sample(ORACLE.eps_fn, S2, X, MU, schedule=SCH, ts=ts, solver=jadeis.DDIM())
    np.testing.assert_allclose(base_scan(solver, 12), ddim, rtol=1e-12, atol=1e-13)
    ts1 = ts[:2]
    one = jadeis.sample(ORACLE.eps_fn, S2, X, MU, schedule=SCH, ts=ts1, solver=solver)
    ddim1 = jadeis.sample(ORACLE.eps_fn, S2, X, MU, schedule=SCH, ts=ts1, solver=jadeis.DDIM())
    np.testing.assert_allclose(one, ddim1, rtol=1e-12, atol=1e-13)


def test_euler_maruyama_in_rho_is_sde_dpm_solver_pp1():
    """One SDERex(euler) step from (x_T, x_T) is one SDE-DPM-Solver++(1) step with the same
    noise: Euler-Maruyama on dy = D drho + dW_rho (docs/math/reversible.md (5.10))."""
    ts = jadeis.time_grid(SCH, 7)[:2]
    key = jax.random.key(5)
    a = jadeis.sample(ORACLE.eps_fn, S2, X, MU, schedule=SCH, ts=ts,
                      solver=jadeis.SDERex("euler"), key=key)
    b = jadeis.sample(ORACLE.eps_fn, S2, X, MU, schedule=SCH, ts=ts,
                      solver=jadeis.SDEDPMSolverPP(order=1), key=key)
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)


# --- orders -----------------------------------------------------------------------------

NS = [20, 40, 80]


@pytest.mark.parametrize("scheme", ["euler", "midpoint", "rk3", "rk4"])
def test_orders_on_the_gaussian_oracle(scheme):
    """Fitted slopes of the error against the exact flow map, N = 20, 40, 80 (VPLinear,
    logSNR grid, data form, default coupling 0.999). Measured over N = 20..160 (see
    docs/math/reversible.md): coupled 2.30, 3.85, 3.90, 3.98 (at least the base order; the
    coupling cancels part of the error); the uncoupled base schemes 0.98, 2.99 (midpoint is
    superconvergent on this linear oracle), 3.09, 3.96."""
    solver = jadeis.Rex(scheme=scheme)
    exact = ORACLE.flow(X, MU, S2, SCH.t_max, SCH.t_min)
    coupled = []
    for n in NS:
        out = jadeis.sample(ORACLE.eps_fn, S2, X, MU, schedule=SCH,
                            ts=jadeis.time_grid(SCH, n), solver=solver)
        coupled.append(float(jnp.max(jnp.abs(out - exact))))
    assert fitted_order(NS, coupled) >= solver.order - 0.25, coupled


@pytest.mark.parametrize("scheme", ["midpoint", "rk4"])
def test_base_scheme_orders_noise_form(scheme):
    """The uncoupled base scheme in the noise-form Lawson variables: measured 2.99 and 4.01."""
    solver = jadeis.Rex(scheme=scheme, prediction="noise")
    exact = ORACLE.flow(X, MU, S2, SCH.t_max, SCH.t_min)
    base = [float(jnp.max(jnp.abs(base_scan(solver, n) - exact))) for n in NS]
    assert fitted_order(NS, base) >= solver.order - 0.25, base


# --- exact inversion --------------------------------------------------------------------


def test_round_trip_float64_and_float32():
    """encode_ode -> RexLatent -> sample gives x_0 back: <= 1e-9 (float64, measured <= 5e-15)
    and <= 1e-5 (float32, measured <= 4e-7) relative, N = 10 and 100 (default Rex)."""
    solver = jadeis.Rex()
    for n in (10, 100):
        ts = jadeis.time_grid(SCH, n)
        for dtype, tol in ((jnp.float64, 1e-9), (jnp.float32, 1e-5)):
            x0 = X.astype(dtype)
            lat = jadeis.encode_ode(ORACLE.eps_fn, S2, x0, MU, schedule=SCH, ts=ts,
                                    solver=solver)
            assert isinstance(lat, jadeis.RexLatent) and lat.num_steps == n
            back = jadeis.sample(ORACLE.eps_fn, S2, lat, MU, schedule=SCH, ts=ts, solver=solver)
            assert back.dtype == dtype
            assert rel(back, x0) <= tol, (n, dtype, rel(back, x0))


@pytest.mark.parametrize("sch", SCHEDULES[1:], ids=lambda s: type(s).__name__)
def test_round_trip_every_schedule(sch):
    """float32, N = 10, every schedule: <= 1e-5 (measured <= 5e-7; float64 <= 1e-15)."""
    oracle = GaussianOracle(sch)
    ts = jadeis.time_grid(sch, 10)
    x0 = X.astype(jnp.float32)
    lat = jadeis.encode_ode(oracle.eps_fn, S2, x0, MU, schedule=sch, ts=ts, solver=jadeis.Rex())
    back = jadeis.sample(oracle.eps_fn, S2, lat, MU, schedule=sch, ts=ts, solver=jadeis.Rex())
    assert rel(back, x0) <= 1e-5, rel(back, x0)


@pytest.mark.parametrize(("scheme", "prediction"), [("rk4", "data"), ("rk4", "noise")])
def test_round_trip_other_schemes(scheme, prediction):
    if True:
        solver = jadeis.Rex(scheme=scheme, prediction=prediction)
        ts = jadeis.time_grid(SCH, 50)
        lat = jadeis.encode_ode(ORACLE.eps_fn, S2, X, MU, schedule=SCH, ts=ts, solver=solver)
        back = jadeis.sample(ORACLE.eps_fn, S2, lat, MU, schedule=SCH, ts=ts, solver=solver)
        # noise form: measured up to 5e-11 (its state x / alpha is ~150 |x| at t_max)
        assert rel(back, X) <= (1e-12 if prediction == "data" else 1e-9), rel(back, X)


def test_sde_round_trip(scheme="shark"):
    """encode_sde with SDERex returns (latent, noise); sample with the same key, or with the
    noise array, maps the latent back to x_0."""
    solver = jadeis.SDERex(scheme)
    ts = jadeis.time_grid(SCH, 10)
    key = jax.random.key(1)
    lat, noise = jadeis.encode_sde(ORACLE.eps_fn, S2, X, MU, schedule=SCH, ts=ts,
                                   solver=solver, key=key)
    assert noise.shape == (10,) + solver.noise_shape(X.shape)
    b1 = jadeis.sample(ORACLE.eps_fn, S2, lat, MU, schedule=SCH, ts=ts, solver=solver, key=key)
    b2 = jadeis.sample(ORACLE.eps_fn, S2, lat, MU, schedule=SCH, ts=ts, solver=solver,
                       noise=noise)
    assert rel(b1, X) <= 1e-9 and rel(b2, X) <= 1e-9, (rel(b1, X), rel(b2, X))


def test_round_trip_trajectory_and_per_step_z():
    ts = jadeis.time_grid(SCH, 15)
    solver = jadeis.Rex()
    lat, traj = jadeis.encode_ode(ORACLE.eps_fn, S2, X, MU, schedule=SCH, ts=ts,
                                  solver=solver, return_trajectory=True)
    assert traj.shape == (16,) + X.shape
    np.testing.assert_array_equal(traj[0], lat.x)
    z = jadeis.PerStep(jnp.linspace(0.1, 0.3, 15))
    lat = jadeis.encode_ode(ORACLE.eps_fn, S2, X, z, schedule=SCH, ts=ts, solver=solver)
    back = jadeis.sample(ORACLE.eps_fn, S2, lat, z, schedule=SCH, ts=ts, solver=solver)
    assert rel(back, X) <= 1e-12


# --- ReversibleAdjoint ------------------------------------------------------------------


def mlp_eps(p, x, t, z):
    return ORACLE.eps_fn(p["s2"], x, t, z) + 0.1 * jnp.tanh(x @ p["w"] + t)


P = {"s2": jnp.asarray(S2), "w": jnp.array([[0.3, -0.2], [0.1, 0.4]])}


@pytest.mark.parametrize(
    ("solver", "kw"),
    # Rex() and SDERex() (midpoint, shark) are cells of docs/compatibility.md
    [
        (jadeis.Rex(scheme="rk4", prediction="noise"), {}),
        (jadeis.Rex(scheme="euler", coupling=0.9), {}),
        (jadeis.SDERex("euler"), {"key": 3}),
    ],
    ids=["rk4-noise", "euler-0.9", "sde-em"],
)
def test_reversible_adjoint_equals_backprop(solver, kw):
    """dL/d(params, x_T, z, ts) agree with Backprop to <= 1e-9 relative (measured <= 1e-10)."""
    kw = {k: jax.random.key(v) for k, v in kw.items()}
    ts = jadeis.time_grid(SCH, 20)

    def loss(p, x, z, ts, adjoint):
        out = jadeis.sample(mlp_eps, p, x, z, schedule=SCH, ts=ts, solver=solver,
                            adjoint=adjoint, **kw)
        return jnp.sum(out**2 + out)

    grad = jax.grad(loss, argnums=(0, 1, 2, 3))
    ref = grad(P, X, jnp.asarray(MU), ts, jadeis.Backprop())
    got = grad(P, X, jnp.asarray(MU), ts, jadeis.ReversibleAdjoint())
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        assert rel(a, b) <= 1e-9, (rel(a, b), a, b)


def test_reversible_adjoint_schedule_params_latent_and_trajectory():
    """Gradients reach the schedule's parameters, a RexLatent x_T and trajectory states."""
    solver = jadeis.Rex(scheme="rk3")
    ts = jadeis.time_grid(SCH, 12)
    lat = jadeis.encode_ode(ORACLE.eps_fn, S2, X, MU, schedule=SCH, ts=ts, solver=solver)

    def loss(sch, lat, adjoint):
        traj = jadeis.sample_trajectory(mlp_eps, P, lat, MU, schedule=sch, ts=ts,
                                        solver=solver, adjoint=adjoint)
        return jnp.sum(traj[-1] ** 2) + jnp.sum(jnp.sin(traj[5]))

    ref = jax.grad(loss, argnums=(0, 1))(SCH, lat, jadeis.Backprop())
    got = jax.grad(loss, argnums=(0, 1))(SCH, lat, jadeis.ReversibleAdjoint())
    assert isinstance(got[1], jadeis.RexLatent)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        assert rel(a, b) <= 1e-9, (a, b)


def test_reversible_adjoint_noise_array():
    solver = jadeis.SDERex()
    ts = jadeis.time_grid(SCH, 10)
    noise = jax.random.normal(jax.random.key(0), (10, 2) + X.shape)

    def loss(nz, adjoint):
        return jnp.sum(jadeis.sample(mlp_eps, P, X, MU, schedule=SCH, ts=ts, solver=solver,
                                     noise=nz, adjoint=adjoint) ** 2)

    ref = jax.grad(loss)(noise, jadeis.Backprop())
    got = jax.grad(loss)(noise, jadeis.ReversibleAdjoint())
    assert rel(got, ref) <= 1e-9


B, D, H = 16, 8, 256
_RNG = np.random.default_rng(0)
MEM_PARAMS = {
    "w1": jnp.asarray(_RNG.standard_normal((D, H)) / 4),
    "w2": jnp.asarray(_RNG.standard_normal((H, D)) / 20),
}
MEM_X = jnp.asarray(_RNG.standard_normal((B, D)))


def mem_eps(p, x, t, z):
    return jnp.tanh(x @ p["w1"] + t) @ p["w2"] + z


def temp_bytes(adjoint, n, solver, **kw):
    ts = jadeis.time_grid(SCH, n)

    def loss(p, x, z):
        out = jadeis.sample(mem_eps, p, x, z, schedule=SCH, ts=ts, solver=solver,
                            adjoint=adjoint, **kw)
        return jnp.sum(out**2)

    grad_fn = jax.grad(loss, argnums=(0, 1, 2))
    analysis = jax.jit(grad_fn).lower(MEM_PARAMS, MEM_X, jnp.asarray(0.1)).compile()
    return analysis.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize(("solver", "kw"), [(jadeis.Rex(scheme="rk4"), {}),
                                            (jadeis.SDERex(), {"key": 0})], ids=["ode", "sde"])
def test_reversible_adjoint_memory_is_flat_in_n(solver, kw):
    """Compiled scratch memory at N = 1000 within 1.1x of N = 10 (measured: equal), where
    DiscreteAdjoint grows by one state per step."""
    kw = {k: jax.random.key(v) for k, v in kw.items()}
    small = temp_bytes(jadeis.ReversibleAdjoint(), 10, solver, **kw)
    large = temp_bytes(jadeis.ReversibleAdjoint(), 1000, solver, **kw)
    assert large <= 1.1 * small, (small, large)
    if solver.stochastic:
        return
    grow = temp_bytes(jadeis.DiscreteAdjoint(), 1000, solver, **kw)
    assert grow > large + 990 * 2 * MEM_X.nbytes, (grow, large)


# --- SDE moments ------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["euler", "shark"])
def test_sde_rex_moments_on_the_gaussian_oracle(scheme):
    """Samples of SDERex from x_T ~ N(0, 1) have the data's moments at t_min:
    mean alpha mu, variance alpha^2 s^2 + sigma^2 (40 000 paths, N = 40)."""
    m = 40000
    ts = jadeis.time_grid(SCH, 40)
    x_T = jax.random.normal(jax.random.key(2), (m, 1))
    out = jadeis.sample(ORACLE.eps_fn, S2, x_T, MU, schedule=SCH, ts=ts,
                        solver=jadeis.SDERex(scheme), key=jax.random.key(7))
    a, s = SCH.alpha(SCH.t_min), SCH.sigma(SCH.t_min)
    mean, var = float(jnp.mean(out)), float(jnp.var(out))
    v = float(a**2 * S2 + s**2)
    assert abs(mean - float(a * MU)) < 4 * np.sqrt(v / m) + 2e-3, mean
    assert abs(var - v) < 4 * v * np.sqrt(2 / m) + 2e-3, (var, v)


# --- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, True, "0.5", float("nan")])
def test_coupling_outside_unit_interval(bad):
    with pytest.raises(ValueError, match=r"coupling must be a number in \(0, 1\]"):
        jadeis.Rex(coupling=bad)
    with pytest.raises(ValueError, match=r"coupling must be a number in \(0, 1\]"):
        jadeis.SDERex(coupling=bad)


def test_bad_scheme_and_prediction():
    with pytest.raises(ValueError, match="scheme must be one of"):
        jadeis.Rex(scheme="shark")
    with pytest.raises(ValueError, match="prediction must be one of"):
        jadeis.Rex(prediction="v")
    with pytest.raises(ValueError, match="scheme must be one of"):
        jadeis.SDERex(scheme="rk4")


def test_latent_errors():
    ts = jadeis.time_grid(SCH, 10)
    lat = jadeis.encode_ode(ORACLE.eps_fn, S2, X, MU, schedule=SCH, ts=ts, solver=jadeis.Rex())
    with pytest.raises(ValueError, match="RexLatent made by Rex.*decode it with that solver"):
        jadeis.sample(ORACLE.eps_fn, S2, lat, MU, schedule=SCH, ts=ts, solver=jadeis.DDIM())
    with pytest.raises(ValueError, match="RexLatent made by"):
        jadeis.sample(ORACLE.eps_fn, S2, lat, MU, schedule=SCH, ts=ts,
                      solver=jadeis.Rex(coupling=0.9))
    with pytest.raises(ValueError, match="grid of 10 steps, but ts has 12 steps"):
        jadeis.sample(ORACLE.eps_fn, S2, lat, MU, schedule=SCH,
                      ts=jadeis.time_grid(SCH, 12), solver=jadeis.Rex())


def test_sde_rex_needs_a_key():
    ts = jadeis.time_grid(SCH, 10)
    with pytest.raises(ValueError, match="SDERex needs randomness"):
        jadeis.sample(ORACLE.eps_fn, S2, X, MU, schedule=SCH, ts=ts, solver=jadeis.SDERex())
    with pytest.raises(ValueError, match="SDERex needs randomness"):
        jadeis.encode_sde(ORACLE.eps_fn, S2, X, MU, schedule=SCH, ts=ts, solver=jadeis.SDERex())
    with pytest.raises(ValueError, match="encode with jadeis.encode_sde"):
        jadeis.encode_ode(ORACLE.eps_fn, S2, X, MU, schedule=SCH, ts=ts, solver=jadeis.SDERex())
    with pytest.raises(ValueError, match=r"noise must have shape \(N,\) \+ noise_shape"):
        jadeis.sample(ORACLE.eps_fn, S2, X, MU, schedule=SCH, ts=ts, solver=jadeis.SDERex(),
                      noise=jnp.zeros((10,) + X.shape))


def test_reversible_adjoint_needs_an_inverse():
    ts = jadeis.time_grid(SCH, 5)
    with pytest.raises(ValueError, match="ReversibleAdjoint needs a reversible solver"):
        jadeis.sample(ORACLE.eps_fn, S2, X, MU, schedule=SCH, ts=ts, solver=jadeis.DDIM(),
                      adjoint=jadeis.ReversibleAdjoint())


# --- transforms and dtypes --------------------------------------------------------------


def test_jit_vmap_float32():
    solver = jadeis.Rex()
    ts = jadeis.time_grid(SCH, 10)

    @jax.jit
    def f(x):
        return jadeis.sample(ORACLE.eps_fn, S2, x, MU, schedule=SCH, ts=ts, solver=solver)

    xs = jnp.stack([X, 2 * X])
    out = jax.vmap(f)(xs)
    np.testing.assert_allclose(out[1], f(2 * X), rtol=1e-12)
    x32 = X.astype(jnp.float32)

    def loss(x, adjoint):
        return jnp.sum(jadeis.sample(ORACLE.eps_fn, jnp.float32(S2), x, jnp.float32(MU),
                                     schedule=SCH, ts=ts, solver=solver, adjoint=adjoint) ** 2)

    g = jax.grad(loss)(x32, jadeis.ReversibleAdjoint())
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(g, jax.grad(loss)(x32, jadeis.Backprop()), rtol=1e-4, atol=1e-6)
    lat = jax.vmap(lambda x: jadeis.encode_ode(ORACLE.eps_fn, S2, x, MU, schedule=SCH, ts=ts,
                                               solver=solver))(xs)
    back = jax.vmap(lambda la: jadeis.sample(ORACLE.eps_fn, S2, la, MU, schedule=SCH, ts=ts,
                                             solver=solver))(lat)
    np.testing.assert_allclose(back, xs, rtol=1e-12, atol=1e-14)


# --- guidance ---------------------------------------------------------------------------


def _guide_rex(x_T, adjoint, wrt, num_iters=4):
    ts = jadeis.time_grid(SCH, 8)
    return jadeis.guide(lambda x0: jnp.sum((x0 - 1.0) ** 2, axis=-1), mlp_eps, P, x_T,
                        jnp.asarray(MU), schedule=SCH, ts=ts, optimizer=optax.adam(0.05),
                        num_iters=num_iters, wrt=wrt, solver=jadeis.Rex(), adjoint=adjoint,
                        progress=False)


@pytest.mark.parametrize("latent", [False, True], ids=["array", "rex-latent"])
def test_guide_with_rex_and_reversible_adjoint(latent):
    """guide with Rex + ReversibleAdjoint optimises (x_T, z, params) from a plain x_T or from
    an exact RexLatent (both states optimised; its static num_steps/solver kept), along the
    same path as Backprop (float64, <= 1e-9 relative), and lowers the loss."""
    ts = jadeis.time_grid(SCH, 8)
    x_T = (jadeis.encode_ode(ORACLE.eps_fn, S2, X, MU, schedule=SCH, ts=ts, solver=jadeis.Rex())
           if latent else X)
    wrt = ("x_T", "z", "params")
    got = _guide_rex(x_T, jadeis.ReversibleAdjoint(), wrt)
    ref = _guide_rex(x_T, jadeis.Backprop(), wrt)
    if latent:
        assert isinstance(got.x_T, jadeis.RexLatent) and got.x_T.num_steps == 8
        assert got.x_T.solver == jadeis.Rex()
        assert rel(got.x_T.xh, x_T.xh) > 0 and rel(got.x_T.x, x_T.x) > 0
    for a, b in zip(jax.tree.leaves((got.x_T, got.z, got.params, got.losses)),
                    jax.tree.leaves((ref.x_T, ref.z, ref.params, ref.losses))):
        assert rel(jnp.asarray(a), jnp.asarray(b)) <= 1e-9
    assert got.losses[-1].sum() < got.losses[0].sum()


# --- conditioning of the inverse (docs/math/reversible.md#conditioning) -----------------

MLP_REX = None


def _mlp():
    from .helpers import RandomMLP

    global MLP_REX
    if MLP_REX is None:
        MLP_REX = RandomMLP(dim=3, hidden=8, seed=3)
    return MLP_REX


def _flat(g):
    return jnp.concatenate([jnp.ravel(v) for v in jax.tree.leaves(g)])


def _rex_grads(solver, adjoint, n, dtype=jnp.float64):
    mlp = _mlp()
    x_T = jax.random.normal(jax.random.key(0), (2, 3), dtype)
    z = 0.1 * jnp.arange(8, dtype=dtype)
    params = jax.tree.map(lambda v: v.astype(dtype), mlp.params)
    ts = jadeis.time_grid(SCH, n, dtype=dtype)
    extra = {"key": jax.random.key(1)} if solver.stochastic else {}

    def loss(x_T, z, params):
        x = jadeis.sample(mlp.eps_fn, params, x_T, z, schedule=SCH, ts=ts, solver=solver,
                          adjoint=adjoint, **extra)
        return jnp.sum(jnp.sin(x) * x)

    return _flat(jax.grad(loss, argnums=(0, 1, 2))(x_T, z, params))


@pytest.mark.parametrize(
    "solver,n",
    [(jadeis.SDERex(), 20), (jadeis.SDERex(scheme="euler"), 10),
     (jadeis.Rex(coupling=0.5), 40), (jadeis.Rex(coupling=0.2), 20)],
    ids=["sderex-20", "sderex-em-10", "rex-0.5-40", "rex-0.2-20"],
)
def test_reversible_adjoint_keeps_exact_states_where_the_inverse_amplifies(solver, n):
    """The inverse amplifies rounding by (tau_n+1 / tau_n)^2 / zeta per step (the Lawson
    state grows with tau where the data prediction is nearly linear, as for this random
    MLP): rebuilding every state (checkpoints=0, the previous behaviour) was 2-26% off
    Backprop for SDERex and 70% for Rex(coupling=0.5) at N = 40; with the exact states the
    forward pass keeps, it agrees to 1e-12."""
    want = _rex_grads(solver, jadeis.Backprop(), n)
    got = _rex_grads(solver, jadeis.ReversibleAdjoint(), n)
    assert float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))) < 1e-12
    bare = _rex_grads(solver, jadeis.ReversibleAdjoint(checkpoints=0), n)
    assert float(jnp.max(jnp.abs(bare - want)) / jnp.max(jnp.abs(want))) > 1e-6


def test_reversible_adjoint_checkpoints_do_not_grow_with_n():
    """How many exact states a run keeps: set from the schedule's log-SNR span, the coupling
    and the dtype (VPLinear, default coupling: Rex 2 / 4, SDERex 4 / 9 in float64 /
    float32), the same at N = 5 and N = 1000; only a small coupling adds N log(1/zeta)."""
    from jadeis._sample import prepare

    def kept(solver, n, dtype):
        kw = {"key": jax.random.key(0)} if solver.stochastic else {}
        _, _, adj = prepare("t", ORACLE.eps_fn, S2, jnp.ones(2, dtype), MU, schedule=SCH,
                            ts=jadeis.time_grid(SCH, n, dtype=dtype), solver=solver,
                            controller=None, adjoint=jadeis.ReversibleAdjoint(), **kw)
        return adj.checkpoints

    for dtype, rex, sde in ((jnp.float64, 2, 4), (jnp.float32, 4, 9)):
        assert kept(jadeis.Rex(), 20, dtype) == rex
        assert kept(jadeis.Rex(), 1000, dtype) in (rex, rex + 1)
        assert kept(jadeis.SDERex(), 20, dtype) == sde
    assert kept(jadeis.Rex(prediction="noise"), 100, jnp.float64) == 0
    assert kept(jadeis.Rex(coupling=0.5), 1000, jnp.float64) > 50


def test_reversible_adjoint_checkpoints_under_jit_and_adaptive():
    """A traced ts (the schedule's range bounds the amplification) and an adaptive run (the
    accepted steps) keep exact states the same way: equal to Backprop to 1e-12."""
    solver = jadeis.SDERex()
    mlp = _mlp()
    x_T = jax.random.normal(jax.random.key(0), (2, 3))

    def loss(x_T, ts, adjoint):
        x = jadeis.sample(mlp.eps_fn, mlp.params, x_T, None, schedule=SCH, ts=ts,
                          solver=solver, adjoint=adjoint, key=jax.random.key(1))
        return jnp.sum(jnp.sin(x) * x)

    ts = jadeis.time_grid(SCH, 10)
    g = jax.jit(jax.grad(loss), static_argnums=2)(x_T, ts, jadeis.ReversibleAdjoint())
    want = jax.grad(loss)(x_T, ts, jadeis.Backprop())
    assert rel(g, want) < 1e-12

    rex = jadeis.Adaptive(jadeis.Rex("rk3"), rtol=1e-3, atol=1e-3)

    def loss_ad(x_T, adjoint):
        x = jadeis.sample(mlp.eps_fn, mlp.params, x_T, None, schedule=SCH,
                          ts=jnp.asarray([SCH.t_max, SCH.t_min]), solver=rex, adjoint=adjoint)
        return jnp.sum(jnp.sin(x) * x)

    g = jax.grad(loss_ad)(x_T, jadeis.ReversibleAdjoint())
    want = jax.grad(loss_ad)(x_T, jadeis.Backprop())
    assert rel(g, want) < 1e-12


def test_inversion_beyond_the_coupling_bound_is_refused():
    """Encoding divides by zeta at every step: the round trip of Rex(coupling=0.5) over 50
    steps was 9e-11 (float64, Gaussian oracle; 0.07 in float32), 7e34 over 200. Refused
    where zeta^-N > eps^-1/4 with the largest N and smallest zeta that are allowed; at the
    bound the round trip is back to rounding."""
    ts = jadeis.time_grid(SCH, 50)
    with pytest.raises(ValueError, match=r"coupling >= 0\.83.* at most 13 steps"):
        jadeis.encode_ode(ORACLE.eps_fn, S2, X, MU, schedule=SCH, ts=ts,
                          solver=jadeis.Rex(coupling=0.5))
    with pytest.raises(ValueError, match="eps\\^-1/4"):
        jadeis.encode_sde(ORACLE.eps_fn, S2, X, MU, schedule=SCH, ts=ts,
                          solver=jadeis.SDERex(coupling=0.5), key=jax.random.key(0))
    for dtype, n in ((jnp.float64, 13), (jnp.float32, 5)):
        solver = jadeis.Rex(coupling=0.5)
        ts = jadeis.time_grid(SCH, n, dtype=dtype)
        x, s2, mu = X.astype(dtype), jnp.asarray(S2, dtype), jnp.asarray(MU, dtype)
        lat = jadeis.encode_ode(ORACLE.eps_fn, s2, x, mu, schedule=SCH, ts=ts, solver=solver)
        back = jadeis.sample(ORACLE.eps_fn, s2, lat, mu, schedule=SCH, ts=ts, solver=solver)
        assert rel(back, x) < (1e-13 if dtype == jnp.float64 else 5e-6)


def test_latent_decoded_on_another_grid_of_the_same_length_is_refused():
    """A RexLatent records a fingerprint of its grid's times: decoding on another grid of
    the same length (here, uniform in t instead of in log-SNR) used to return another image
    (0.5 off) without a word."""
    ts = jadeis.time_grid(SCH, 10)
    lat = jadeis.encode_ode(ORACLE.eps_fn, S2, X, MU, schedule=SCH, ts=ts, solver=jadeis.Rex())
    assert lat.grid is not None and "10 steps" in lat.grid
    with pytest.raises(ValueError, match="encoded on another grid"):
        jadeis.sample(ORACLE.eps_fn, S2, lat, MU, schedule=SCH,
                      ts=jadeis.time_grid(SCH, 10, "time"), solver=jadeis.Rex())
    with pytest.raises(ValueError, match="encoded on another grid"):  # same times, float32
        jadeis.sample(ORACLE.eps_fn, S2, lat, MU, schedule=SCH, ts=ts.astype(jnp.float32),
                      solver=jadeis.Rex())
    back = jadeis.sample(ORACLE.eps_fn, S2, lat, MU, schedule=SCH, ts=ts, solver=jadeis.Rex())
    assert rel(back, X) < 1e-13
    # the fingerprint is static: the same grid shares one compilation, and a latent made
    # by hand (no fingerprint) is decoded unchecked
    bare = jadeis.RexLatent(lat.x, lat.xh, lat.num_steps, lat.solver)
    assert bare.grid is None
    jadeis.sample(ORACLE.eps_fn, S2, bare, MU, schedule=SCH, ts=jadeis.time_grid(SCH, 10, "time"),
                  solver=jadeis.Rex())
