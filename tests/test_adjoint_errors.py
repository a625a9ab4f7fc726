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
        (lambda: solve(jnp.ones((2, 4)), x_0=X), ["grad_x0", "(2, 3)", "(2, 4)"]),
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
        (lambda: solve(x_0=X, sde=True), ["x_0=", "trajectory="]),
        # per-step z whose length does not match N (sample, solve_adjoint, ConditioningFn ok)
        (lambda: sample(z=jadeis.PerStep(jnp.ones(N + 1))), ["z", "PerStep", "N = 5", "(6,)"]),
        (
            lambda: sample(z=jadeis.PerStep({"a": jnp.ones(N), "b": jnp.ones(N - 1)})),
            ["z", "PerStep", "N = 5"],
        ),
        (
            lambda: jadeis.solve_adjoint(
                eps_fn, 0.5, jadeis.PerStep(jnp.ones(N - 1)), X, schedule=SCH, ts=TS, x_0=X
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
            lambda: sample(adjoint=jadeis.AdjointDEIS(steps=3), return_trajectory=True),
            ["steps=3", "return_trajectory"],
        ),
        (lambda: sample(adjoint="deis"), ["adjoint", "'deis'"]),
        (lambda: solve(trajectory=TRAJ, adjoint="deis"), ["adjoint", "'deis'"]),
        (lambda: solve(trajectory=TRAJ, adjoint=jadeis.Backprop()), ["Backprop", "adjoint="]),
        (lambda: solve(trajectory=TRAJ, adjoint=jadeis.DiscreteAdjoint()), ["solver="]),
        (
            lambda: solve(x_0=X, adjoint=jadeis.DiscreteAdjoint(), solver=jadeis.DDIM()),
            ["DiscreteAdjoint", "trajectory="],
        ),
        (
            lambda: solve(
                trajectory=TRAJ, adjoint=jadeis.DiscreteAdjoint(), solver=jadeis.DDIM(), sde=True
            ),
            ["sde=True", "DDIM"],
        ),
        (
            lambda: solve(trajectory=TRAJ, adjoint=jadeis.AdjointDEIS(steps=3), sde=True),
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
