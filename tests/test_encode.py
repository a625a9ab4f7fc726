"""encode_ode (DDIM inversion) and encode_sde (Cycle-SDE noises)."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jadeis

from .helpers import SDE_SOLVERS, GaussianOracle, fitted_order

SCH = jadeis.VPLinear()
ORACLE = GaussianOracle(SCH)
S2, MU = 0.09, 0.2
X0 = jnp.array([[0.5, -0.1], [0.05, 0.3]])


def test_ddim_inversion_converges_to_the_exact_flow_map():
    """x_T of the inversion -> the exact probability-flow ODE solution from t_min to t_max
    (first order for DDIM), and sampling x_T reconstructs x_0 ever more closely."""
    ns = [50, 100, 200]
    exact = ORACLE.flow(X0, MU, S2, SCH.t_min, SCH.t_max)
    enc_err, rec_err = [], []
    for n in ns:
        ts = jadeis.time_grid(SCH, n)
        x_T = jadeis.encode_ode(ORACLE.eps_fn, S2, X0, MU, schedule=SCH, ts=ts)
        back = jadeis.sample(ORACLE.eps_fn, S2, x_T, MU, schedule=SCH, ts=ts, solver=jadeis.DDIM())
        enc_err.append(float(jnp.max(jnp.abs(x_T - exact))))
        rec_err.append(float(jnp.max(jnp.abs(back - X0))))
    assert abs(fitted_order(ns, enc_err) - 1.0) < 0.15, enc_err
    assert abs(fitted_order(ns, rec_err) - 1.0) < 0.15, rec_err
    assert rec_err[-1] < 1e-2


def test_second_order_inversion_is_more_accurate():
    ts = jadeis.time_grid(SCH, 50)
    errs = {}
    for solver in (jadeis.DDIM(), jadeis.DPMSolver(order=2)):
        x_T = jadeis.encode_ode(ORACLE.eps_fn, S2, X0, MU, schedule=SCH, ts=ts, solver=solver)
        back = jadeis.sample(ORACLE.eps_fn, S2, x_T, MU, schedule=SCH, ts=ts, solver=solver)
        errs[solver.order] = float(jnp.max(jnp.abs(back - X0)))
    assert errs[2] < 0.1 * errs[1], errs


def test_inversion_trajectory_and_per_step_z():
    ts = jadeis.time_grid(SCH, 20)
    x_T, traj = jadeis.encode_ode(
        ORACLE.eps_fn, S2, X0, MU, schedule=SCH, ts=ts, return_trajectory=True
    )
    assert traj.shape == (21,) + X0.shape
    np.testing.assert_array_equal(traj[0], x_T)
    np.testing.assert_array_equal(traj[-1], X0)
    # a constant PerStep conditioning gives the same inversion as the plain one
    z = jadeis.PerStep(jnp.full((20,), MU))
    np.testing.assert_allclose(
        jadeis.encode_ode(ORACLE.eps_fn, S2, X0, z, schedule=SCH, ts=ts), x_T, rtol=1e-12
    )


def test_inversion_is_differentiable():
    ts = jadeis.time_grid(SCH, 30)
    f = lambda x: jnp.sum(jadeis.encode_ode(ORACLE.eps_fn, S2, x, MU, schedule=SCH, ts=ts))
    g = jax.grad(f)(X0)
    eps = 1e-6
    e = jnp.zeros_like(X0).at[0, 0].set(eps)
    fd = (f(X0 + e) - f(X0 - e)) / (2 * eps)
    np.testing.assert_allclose(g[0, 0], fd, rtol=1e-6)


@pytest.mark.parametrize("solver", SDE_SOLVERS, ids=lambda s: f"{type(s).__name__}{s.order}")
def test_cycle_sde_noises_reproduce_the_image(solver):
    ts = jadeis.time_grid(SCH, 12)
    x_T, noise = jadeis.encode_sde(
        ORACLE.eps_fn, S2, X0, MU, schedule=SCH, ts=ts, solver=solver, key=jax.random.key(1)
    )
    assert noise.shape == (12,) + X0.shape
    traj = jadeis.sample_trajectory(
        ORACLE.eps_fn,
        S2,
        x_T,
        MU,
        schedule=SCH,
        ts=ts,
        solver=solver,
        noise=noise,
    )
    out = traj[-1]
    np.testing.assert_allclose(out, X0, rtol=0, atol=1e-12)
    # the noises are plausible Gaussian draws (the path comes from the forward process)
    assert 0.3 < float(jnp.std(noise)) < 3.0
    # a given path is reproduced state by state
    x_T2, noise2 = jadeis.encode_sde(
        ORACLE.eps_fn, S2, X0, MU, schedule=SCH, ts=ts, solver=solver, path=traj
    )
    np.testing.assert_allclose(x_T2, traj[0], rtol=0, atol=0)
    np.testing.assert_allclose(noise2, noise, rtol=1e-8, atol=1e-8)


def test_cycle_sde_path_follows_the_forward_process():
    """Across many draws, x_T ~ q(x_T | x_0): mean alpha_{T|0} x_0, std sigma_{T|0}."""
    ts = jadeis.time_grid(SCH, 5)
    x0 = jnp.full((4000, 1), 0.5)
    x_T, _ = jadeis.encode_sde(
        ORACLE.eps_fn, S2, x0, MU, schedule=SCH, ts=ts, key=jax.random.key(7)
    )
    a = SCH.alpha(ts[0]) / SCH.alpha(ts[-1])
    s = jnp.sqrt(SCH.sigma(ts[0]) ** 2 - a**2 * SCH.sigma(ts[-1]) ** 2)
    assert abs(float(jnp.mean(x_T)) - float(a * 0.5)) < 0.05
    assert abs(float(jnp.std(x_T)) - float(s)) < 0.05


def test_encoders_reject_the_wrong_kind_of_sampler():
    ts = jadeis.time_grid(SCH, 5)
    with pytest.raises(ValueError, match="encode_sde"):
        jadeis.encode_ode(
            ORACLE.eps_fn, S2, X0, MU, schedule=SCH, ts=ts, solver=jadeis.SDEDPMSolver()
        )
    with pytest.raises(ValueError, match="encode_ode"):
        jadeis.encode_sde(
            ORACLE.eps_fn,
            S2,
            X0,
            MU,
            schedule=SCH,
            ts=ts,
            solver=jadeis.DDIM(),
            key=jax.random.key(0),
        )
    with pytest.raises(ValueError, match="exactly one of key"):
        jadeis.encode_sde(ORACLE.eps_fn, S2, X0, MU, schedule=SCH, ts=ts)


def test_digits_model_round_trips():
    """With the bundled model (float32): DDIM inversion at N = 100 then sampling gives back
    the test images closely; Cycle-SDE noises reproduce them to float32 rounding."""
    from jadeis.digits import load_denoiser, load_split

    model = load_denoiser()
    images, labels = load_split("test")
    x0 = jnp.asarray(images[:8], jnp.float32)
    z = jnp.asarray(model.z_for(labels[:8]), jnp.float32)
    ts = jadeis.time_grid(model.schedule, 100)
    x_T = jadeis.encode_ode(model.eps_fn, model.params, x0, z, schedule=model.schedule, ts=ts)
    assert x_T.dtype == jnp.float32
    back = jadeis.sample(
        model.eps_fn, model.params, x_T, z, schedule=model.schedule, ts=ts, solver=jadeis.DDIM()
    )
    assert float(jnp.mean(jnp.abs(back - x0))) < 0.05
    ts = jadeis.time_grid(model.schedule, 20)
    x_T, noise = jadeis.encode_sde(
        model.eps_fn, model.params, x0, z, schedule=model.schedule, ts=ts, key=jax.random.key(0)
    )
    out = jadeis.sample(
        model.eps_fn,
        model.params,
        x_T,
        z,
        schedule=model.schedule,
        ts=ts,
        solver=jadeis.SDEDPMSolver(),
        noise=noise,
    )
    np.testing.assert_allclose(out, x0, atol=1e-4)


# ---------------------------------------------------------------------------------------
# grids ending at t = 0 (time_grid(..., final="zero"), diffusers' set_alpha_to_one=True)


def test_every_solver_steps_to_zero_or_refuses_with_the_reason():
    """The step to sigma = 0 is taken in its first-order limit x_0 = D(x, s) (singlestep
    solvers returned NaN there), or refused where it is not defined (Rex, SDERex: NaN)."""
    from .helpers import SOLVER_REGISTRY, RandomMLP

    mlp = RandomMLP(dim=2, hidden=8, seed=3)
    ts = jadeis.time_grid(SCH, 6, final="zero")
    for name, (solver, _) in SOLVER_REGISTRY.items():
        kw = {"key": jax.random.key(0)} if solver.stochastic else {}
        run = partial(jadeis.sample, mlp.eps_fn, mlp.params, X0, None, schedule=SCH, ts=ts,
                      solver=solver, **kw)
        if isinstance(solver, (jadeis.Rex, jadeis.SDERex)):
            with pytest.raises(ValueError, match=r"ends at t = 0.*cannot step: its Lawson time"):
                run()
            continue
        assert bool(jnp.all(jnp.isfinite(run()))), name
    # the first-order limit: the data prediction at the last time before 0
    for order in (1, 2, 3):
        for pred in ("data", "noise"):
            solver = jadeis.SinglestepDPMSolver(order, pred)
            got = jadeis.sample(mlp.eps_fn, mlp.params, X0, None, schedule=SCH, ts=ts,
                                solver=solver)
            x = jadeis.sample(mlp.eps_fn, mlp.params, X0, None, schedule=SCH, ts=ts[:-1],
                              solver=solver)
            t = ts[-2]
            want = (x - SCH.sigma(t) * mlp.eps_fn(mlp.params, x, t, None)) / SCH.alpha(t)
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)


def test_rex_refuses_a_traced_grid_ending_at_zero():
    f = jax.jit(lambda ts: jadeis.sample(ORACLE.eps_fn, S2, X0, MU, schedule=SCH, ts=ts,
                                         solver=jadeis.Rex()))
    with pytest.raises(Exception, match="ends at 0.*Rex cannot step"):
        jax.block_until_ready(f(jadeis.time_grid(SCH, 4, final="zero")))


@pytest.mark.parametrize(
    "solver",
    [jadeis.DDIM(), jadeis.DPMSolverPP(order=2), jadeis.UniPC(order=2),
     jadeis.SinglestepDPMSolver(order=3)],
    ids=lambda s: type(s).__name__,
)
def test_encode_ode_on_a_grid_ending_at_zero(solver):
    """'Invert on the ts I sample with': the first step up from sigma = 0 evaluates the
    model at its upper time (diffusers' DDIMInverseScheduler), not at t = 0 where the noise
    prediction is undefined (it returned NaN); the round trip is as good as on the grid
    ending at t_min."""
    errs = {}
    for final in (None, "zero"):
        ts = jadeis.time_grid(SCH, 100, final=final)
        x_T, traj = jadeis.encode_ode(ORACLE.eps_fn, S2, X0, MU, schedule=SCH, ts=ts,
                                      solver=solver, return_trajectory=True)
        assert traj.shape == (101,) + X0.shape
        np.testing.assert_array_equal(traj[0], x_T)
        np.testing.assert_array_equal(traj[-1], X0)
        back = jadeis.sample(ORACLE.eps_fn, S2, x_T, MU, schedule=SCH, ts=ts, solver=solver)
        errs[final] = float(jnp.max(jnp.abs(back - X0)))
    assert np.isfinite(errs["zero"]) and errs["zero"] < 2 * errs[None] + 1e-6, errs
    # one step, to t = 0 only
    ts1 = jadeis.time_grid(SCH, 1, final="zero")
    x_T = jadeis.encode_ode(ORACLE.eps_fn, S2, X0, MU, schedule=SCH, ts=ts1, solver=solver)
    want = SCH.alpha(ts1[0]) * X0 + SCH.sigma(ts1[0]) * ORACLE.eps_fn(S2, X0, ts1[0], MU)
    np.testing.assert_allclose(x_T, want, rtol=1e-13)


def test_encode_ode_on_a_traced_grid_ending_at_zero_is_refused():
    f = jax.jit(lambda ts: jadeis.encode_ode(ORACLE.eps_fn, S2, X0, MU, schedule=SCH, ts=ts))
    with pytest.raises(Exception, match="concrete"):
        jax.block_until_ready(f(jadeis.time_grid(SCH, 4, final="zero")))
    np.testing.assert_allclose(f(jadeis.time_grid(SCH, 4)), jadeis.encode_ode(
        ORACLE.eps_fn, S2, X0, MU, schedule=SCH, ts=jadeis.time_grid(SCH, 4)), rtol=1e-13)
