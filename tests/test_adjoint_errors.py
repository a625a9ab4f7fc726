"""Misuse of the gradient API raises ValueError with a message naming the argument."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

import jadeis

SCH = jadeis.VPLinear()
N = 5
TS = jadeis.time_grid(SCH, N)
X = jnp.ones((2, 3))
TRAJ = jnp.ones((N + 1, 2, 3))
DEIS = jadeis.AdjointDEIS(order=2)


def eps_fn(params, x, t, z):
    return params * x + z


def solve(grad_x0=X, **kw):
    kw.setdefault("schedule", SCH)
    kw.setdefault("ts", TS)
    return jadeis.solve_adjoint(eps_fn, 0.5, 0.1, grad_x0, **kw)


def sample(**kw):
    kw.setdefault("schedule", SCH)
    kw.setdefault("ts", TS)
    z = kw.pop("z", 0.1)
    return jadeis.sample(eps_fn, 0.5, X, z, **kw)


@pytest.mark.parametrize(
    ("call", "names"),
    [
        # grad_x0 of the wrong shape, with either source of states
        (lambda: solve(jnp.ones((2, 4)), trajectory=TRAJ), ["grad_x0", "(2, 3)", "(2, 4)"]),
        (lambda: solve(jnp.ones((2, 4)), x_0=X, adjoint=DEIS), ["grad_x0", "(2, 3)", "(2, 4)"]),
        # both or neither of trajectory / x_0
        (lambda: solve(trajectory=TRAJ, x_0=X), ["trajectory=", "x_0=", "both"]),
        (lambda: solve(), ["trajectory=", "x_0=", "neither"]),
        # trajectory length not matching ts (and a trajectory without the time axis)
        (lambda: solve(trajectory=TRAJ[:-1]), ["trajectory", "N + 1 = 6", "(5, 2, 3)"]),
        (lambda: solve(trajectory=TRAJ[0]), ["trajectory", "N + 1 = 6"]),
        # steps < 1, and not an int
        (lambda: jadeis.AdjointDEIS(steps=0), ["steps", "steps=0"]),
        (lambda: jadeis.AdjointDEIS(steps=-3), ["steps", "steps=-3"]),
        (lambda: jadeis.AdjointDEIS(steps=2.0), ["steps", "steps=2.0"]),
        # unsupported order
        (lambda: jadeis.AdjointDEIS(order=4), ["order", "order=4"]),
        (lambda: jadeis.AdjointDEIS(order=0), ["order", "order=0"]),
        (lambda: jadeis.AdjointDEIS(order=True), ["order"]),
        (lambda: jadeis.AdjointDEIS(trajectory="stored"), ["trajectory", "'stored'"]),
        # reconstruct with an SDE sampler: in sample and in solve_adjoint
        (
            lambda: sample(
                solver=jadeis.SDEDPMSolver(),
                adjoint=jadeis.AdjointDEIS(trajectory="reconstruct"),
                key=jax.random.key(0),
            ),
            ["trajectory='reconstruct'", "SDEDPMSolver", "cached"],
        ),
        (
            lambda: sample(
                solver=jadeis.SDEDPMSolverPP(order=2),
                adjoint=jadeis.AdjointDEIS(order=1, trajectory="reconstruct"),
                noise=jnp.zeros((N, 2, 3)),
            ),
            ["trajectory='reconstruct'", "SDEDPMSolverPP"],
        ),
        (lambda: solve(x_0=X, adjoint=DEIS, solver=jadeis.SDEDPMSolver()), ["x_0=", "trajectory="]),
        # per-step z whose length does not match N (sample, solve_adjoint, ConditioningFn ok)
        (lambda: sample(z=jadeis.PerStep(jnp.ones(N + 1))), ["z", "PerStep", "N = 5", "(6,)"]),
        (
            lambda: sample(z=jadeis.PerStep({"a": jnp.ones(N), "b": jnp.ones(N - 1)})),
            ["z", "PerStep", "N = 5"],
        ),
        (
            lambda: jadeis.solve_adjoint(
                eps_fn,
                0.5,
                jadeis.PerStep(jnp.ones(N - 1)),
                X,
                schedule=SCH,
                ts=TS,
                x_0=X,
                adjoint=DEIS,
            ),
            ["z", "PerStep", "N = 5", "(4,)"],
        ),
        # other misuse of the gradient strategies
        (
            lambda: sample(
                solver=jadeis.SDEDPMSolver(),
                adjoint=jadeis.AdjointDEIS(steps=3),
                key=jax.random.key(0),
            ),
            ["steps=3", "SDEDPMSolver"],
        ),
        (
            lambda: jadeis.sample_trajectory(
                eps_fn, 0.5, X, 0.1, schedule=SCH, ts=TS, adjoint=jadeis.AdjointDEIS(steps=3)
            ),
            ["steps=3", "sample_trajectory"],
        ),
        (lambda: sample(adjoint="deis"), ["adjoint", "'deis'"]),
        (lambda: solve(trajectory=TRAJ, adjoint="deis"), ["adjoint", "'deis'"]),
        (lambda: solve(trajectory=TRAJ, adjoint=jadeis.Backprop()), ["Backprop", "adjoint="]),
        # a trajectory that is not a path of the solver (here: constant states)
        (
            lambda: solve(trajectory=TRAJ, adjoint=jadeis.DiscreteAdjoint()),
            ["solver=", "trajectory[0]"],
        ),
        (
            lambda: solve(x_0=X, adjoint=jadeis.DiscreteAdjoint(), solver=jadeis.DDIM()),
            ["DiscreteAdjoint", "trajectory="],
        ),
        (
            lambda: solve(
                trajectory=TRAJ, adjoint=jadeis.AdjointDEIS(steps=3), solver=jadeis.SDEDPMSolver()
            ),
            ["SDE sampler", "steps must be None"],
        ),
    ],
    ids=lambda v: "" if callable(v) else "-".join(v[:1]),
)
def test_value_error_names_argument(call, names):
    with pytest.raises(ValueError) as info:
        call()
    msg = str(info.value)
    for name in names:
        assert name in msg, (name, msg)


def test_errors_raise_under_grad_and_jit():
    """The static checks fire when sample is differentiated or jitted too (at trace time)."""
    bad = jadeis.PerStep(jnp.ones(N + 1))
    with pytest.raises(ValueError, match=re.escape("PerStep")):
        jax.grad(lambda v: jnp.sum(sample(z=jadeis.PerStep(v))))(bad.values)
    with pytest.raises(ValueError, match="grad_x0"):
        jax.jit(lambda g: solve(g, trajectory=TRAJ).x_T)(jnp.ones((2, 4)))


def test_return_trajectory_is_deprecated():
    """sample(..., return_trajectory=True) still returns (x_0, trajectory), with a
    DeprecationWarning that names sample_trajectory (the one test of the old argument)."""
    with pytest.warns(DeprecationWarning, match="sample_trajectory"):
        x_0, traj = sample(return_trajectory=True)
    new = jadeis.sample_trajectory(eps_fn, 0.5, X, 0.1, schedule=SCH, ts=TS)
    assert jnp.array_equal(traj, new) and jnp.array_equal(x_0, new[-1])


def test_sde_argument_deprecated_and_checked():
    """sde= still works but warns; a value disagreeing with solver= is an error."""
    traj = jadeis.sample_trajectory(
        eps_fn,
        0.5,
        X,
        0.1,
        schedule=SCH,
        ts=TS,
        solver=jadeis.SDEDPMSolver(),
        key=jax.random.key(0),
    )
    with pytest.warns(DeprecationWarning, match="sde="):
        old = solve(traj[-1], trajectory=traj, sde=True, adjoint=DEIS)
    new = solve(traj[-1], trajectory=traj, solver=jadeis.SDEDPMSolver(), adjoint=DEIS)
    assert jnp.allclose(old.x_T, new.x_T)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="sde=True.*DDIM"):
        solve(traj[-1], trajectory=traj, solver=jadeis.DDIM(), sde=True)


# a state of 1024 numbers: enough to tell Gaussian noise from an ODE step's residual
XL = jax.random.normal(jax.random.key(2), (16, 64))


def _paths():
    ode = jadeis.sample_trajectory(eps_fn, 0.5, XL, 0.1, schedule=SCH, ts=TS)
    sde = jadeis.sample_trajectory(
        eps_fn,
        0.5,
        XL,
        0.1,
        schedule=SCH,
        ts=TS,
        solver=jadeis.SDEDPMSolverPP(),
        key=jax.random.key(1),
    )
    return ode, sde


@pytest.mark.parametrize("adjoint", [jadeis.DiscreteAdjoint(), DEIS], ids=["discrete", "deis"])
def test_trajectory_must_match_solver_and_ts(adjoint):
    """solve_adjoint's defaults match sample's, and a trajectory that is not a path of the
    solver on ts (reversed, another grid, an SDE path with an ODE solver = a forgotten
    sde=True, an ODE path with an SDE solver) is refused with a clear error."""
    ode, sde = _paths()
    # defaults (DiscreteAdjoint, DPMSolverPP(2)) equal sample's gradient
    g = jax.grad(lambda x: jnp.sum(jadeis.sample(eps_fn, 0.5, x, 0.1, schedule=SCH, ts=TS) ** 2))(
        XL
    )
    if isinstance(adjoint, jadeis.DiscreteAdjoint):
        res = jadeis.solve_adjoint(
            eps_fn, 0.5, 0.1, 2 * ode[-1], schedule=SCH, ts=TS, trajectory=ode
        )
        assert jnp.allclose(res.x_T, g, rtol=1e-10)
    sde_solver = jadeis.SDEDPMSolverPP()
    ts2 = TS * 0.9 + 0.1 * TS[-1]
    cases = {
        "reversed": dict(trajectory=ode[::-1]),
        "other grid": dict(trajectory=ode, ts=ts2),
        "forgotten sde": dict(trajectory=sde),
        "ode path, sde solver": dict(trajectory=ode, solver=sde_solver),
        "reversed sde": dict(trajectory=sde[::-1], solver=sde_solver),
    }
    for name, kw in cases.items():
        with pytest.raises(ValueError, match="trajectory") as info:
            solve(kw["trajectory"][-1], adjoint=adjoint, **kw)
        msg = str(info.value)
        assert "solver=" in msg and "check_trajectory=False" in msg, (name, msg)
    # the correct SDE path is accepted, and the check can be turned off
    solve(sde[-1], trajectory=sde, solver=sde_solver, adjoint=adjoint)
    solve(ode[-1], trajectory=ode[::-1], adjoint=adjoint, check_trajectory=False)


# ---------------------------------------------------------------------------------------
# what the trajectory check sees (docs/checks.md)


def _ddim_path_with_default_solver(n, dtype):
    from .helpers import RandomMLP

    mlp = RandomMLP(dim=3, hidden=8, seed=3)
    params = jax.tree.map(lambda v: v.astype(dtype), mlp.params)
    x_T = jax.random.normal(jax.random.key(0), (2, 3), dtype)
    ts = jadeis.time_grid(SCH, n, dtype=dtype)
    traj = jadeis.sample_trajectory(mlp.eps_fn, params, x_T, None, schedule=SCH, ts=ts,
                                    solver=jadeis.DDIM())
    return lambda **kw: jadeis.solve_adjoint(mlp.eps_fn, params, None, 2 * traj[-1],
                                             schedule=SCH, ts=ts, trajectory=traj, **kw)


@pytest.mark.parametrize("n", [8, 20])
def test_a_ddim_path_given_with_the_default_solver_is_refused(n):
    """The first and last steps it used to re-run are first order (or within the
    tolerance), so a DDIM path passed for DPMSolverPP(2)'s and the gradient was 5-14% off
    (50% on the digits model); every step is checked now (the middle ones differ by
    1e-3 .. 1e-1)."""
    solve = _ddim_path_with_default_solver(n, jnp.float64)
    with pytest.raises(ValueError, match=r"does not match the sampler DPMSolverPP.*steps checked"):
        solve()
    solve(solver=jadeis.DDIM())  # the right solver passes


@pytest.mark.float32
@pytest.mark.parametrize("n", [8, 20])
def test_a_ddim_path_given_with_the_default_solver_is_refused_in_float32(n):
    solve = _ddim_path_with_default_solver(n, jnp.float32)
    with pytest.raises(ValueError, match="does not match the sampler DPMSolverPP"):
        solve()
    solve(solver=jadeis.DDIM())


def test_an_ode_path_given_with_an_sde_solver_is_refused_for_a_small_state():
    """The implied noise of an ODE path is smooth in the step (lag-1 correlation 0.98-1.00)
    and its mean square can look plausible (0.9-1.1 for the 8-element state below); the old
    per-step 10-sigma bound on the mean square alone passed it for small states (its lower
    end was negative). The correlation across steps refuses it, down to 2 elements at
    N = 20; below (N - 1) d ~ 36 it cannot (docs/checks.md)."""
    ts = jadeis.time_grid(SCH, 20)
    for x_T in (jnp.asarray([[0.3, -0.2]]),
                jnp.asarray([[0.3, -0.2, 0.5, 0.1], [1.0, -1.2, 0.0, 0.4]])):
        ode = jadeis.sample_trajectory(eps_fn, 0.5, x_T, 0.1, schedule=SCH, ts=ts)
        for solver in (jadeis.SDEDPMSolverPP(), jadeis.SDEDPMSolver(), jadeis.SDEDPMSolverPP(2)):
            with pytest.raises(ValueError, match="correlated from one step to the next"):
                jadeis.solve_adjoint(eps_fn, 0.5, 0.1, ode[-1], schedule=SCH, ts=ts,
                                     trajectory=ode, solver=solver)
            sde = jadeis.sample_trajectory(eps_fn, 0.5, x_T, 0.1, schedule=SCH, ts=ts,
                                           solver=solver, key=jax.random.key(3))
            jadeis.solve_adjoint(eps_fn, 0.5, 0.1, sde[-1], schedule=SCH, ts=ts,
                                 trajectory=sde, solver=solver)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
def test_every_solver_accepts_its_own_path(dtype):
    """No false alarms: every solver's own trajectory passes (every step checked where the
    state can be rebuilt), in float64 and float32 states."""
    from .helpers import SOLVER_REGISTRY, RandomMLP

    mlp = RandomMLP(dim=3, hidden=8, seed=3)
    params = jax.tree.map(lambda v: v.astype(dtype), mlp.params)
    x_T = jax.random.normal(jax.random.key(0), (4, 3), dtype)
    ts = jadeis.time_grid(SCH, 12, dtype=dtype)
    for solver, _ in SOLVER_REGISTRY.values():
        kw = {"key": jax.random.key(2)} if solver.stochastic else {}
        traj = jadeis.sample_trajectory(mlp.eps_fn, params, x_T, None, schedule=SCH, ts=ts,
                                        solver=solver, **kw)
        if isinstance(solver, (jadeis.Rex, jadeis.SDERex)):
            continue  # no solve_adjoint path for ReversibleAdjoint; DiscreteAdjoint needs xh
        jadeis.solve_adjoint(mlp.eps_fn, params, None, traj[-1], schedule=SCH, ts=ts,
                             trajectory=traj, solver=solver)
