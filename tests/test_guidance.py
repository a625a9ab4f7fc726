"""guide(): optimising (x_T, z, params) through sampling, for every gradient strategy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadeis

from .helpers import GaussianOracle

SCH = jadeis.VPLinear()
ORACLE = GaussianOracle(SCH)
# N = 40: in the asymptotic range of AdjointDEIS on VP schedules (at N <= 16 its gradient is
# far from the discrete one, see notes), so all strategies optimise the same problem.
TS = jadeis.time_grid(SCH, 40)
TARGET = jnp.array([[0.8, -0.4], [-0.3, 0.5], [0.1, 0.9]])


def per_example_loss(x0, target):
    return jnp.sum((x0 - target) ** 2, axis=-1)


STRATEGIES = [
    ("AdjointDEIS-1 ODE", jadeis.DDIM(), jadeis.AdjointDEIS(order=1)),
    ("AdjointDEIS-2 ODE", jadeis.DPMSolver(order=2), jadeis.AdjointDEIS(order=2)),
    (
        "AdjointDEIS-2 reconstruct",
        jadeis.DPMSolver(order=2),
        jadeis.AdjointDEIS(order=2, trajectory="reconstruct"),
    ),
    ("AdjointDEIS-1 SDE", jadeis.SDEDPMSolver(), jadeis.AdjointDEIS(order=1)),
    ("DiscreteAdjoint ODE", jadeis.DPMSolverPP(order=2), jadeis.DiscreteAdjoint()),
    ("DiscreteAdjoint SDE", jadeis.SDEDPMSolverPP(order=2), jadeis.DiscreteAdjoint()),
    ("Backprop", jadeis.DDIM(), jadeis.Backprop()),
]


@pytest.mark.parametrize("name,solver,adjoint", STRATEGIES, ids=[s[0] for s in STRATEGIES])
def test_loss_decreases_for_every_adjoint(name, solver, adjoint):
    x_T = jnp.zeros((3, 2)) + 0.1
    z = jnp.zeros((3, 2))
    key = jax.random.key(3) if solver.stochastic else None
    res = jadeis.guide(
        per_example_loss,
        ORACLE.eps_fn,
        0.09,
        x_T,
        z,
        schedule=SCH,
        ts=TS,
        optimizer=optax.adam(0.05),
        num_iters=25,
        solver=solver,
        adjoint=adjoint,
        key=key,
        loss_args=(TARGET,),
        progress=False,
    )
    assert res.losses.shape == (26, 3)  # history: before every update, and the final loss
    assert np.all(np.isfinite(res.losses))
    assert np.all(res.losses[-1] < 0.3 * res.losses[0]), res.losses[[0, -1]]
    # the returned x_0 is the sample of the returned (x_T, z), and losses[-1] is its loss
    x0 = jadeis.sample(
        ORACLE.eps_fn, 0.09, res.x_T, res.z, schedule=SCH, ts=TS, solver=solver, key=key
    )
    np.testing.assert_allclose(res.x_0, x0, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(res.losses[-1], per_example_loss(x0, TARGET), rtol=1e-10)
    assert res.params == 0.09  # not optimised, returned unchanged


def test_guide_matches_a_hand_written_optax_loop():
    """The same optimisation written by a user around jax.grad gives the same result."""
    opt = optax.sgd(0.1, momentum=0.5)
    x_T, z = jnp.full((3, 2), 0.2), jnp.zeros((3, 2))
    solver, adjoint = jadeis.DPMSolverPP(order=2), jadeis.DiscreteAdjoint()

    def total(v):
        x0 = jadeis.sample(
            ORACLE.eps_fn,
            0.09,
            v["x_T"],
            v["z"],
            schedule=SCH,
            ts=TS,
            solver=solver,
            adjoint=adjoint,
        )
        return per_example_loss(x0, TARGET).sum()

    v = {"x_T": x_T, "z": z}
    state = opt.init(v)
    for _ in range(5):
        g = jax.grad(total)(v)
        upd, state = opt.update(g, state, v)
        v = optax.apply_updates(v, upd)
    res = jadeis.guide(
        per_example_loss,
        ORACLE.eps_fn,
        0.09,
        x_T,
        z,
        schedule=SCH,
        ts=TS,
        optimizer=opt,
        num_iters=5,
        solver=solver,
        adjoint=adjoint,
        loss_args=(TARGET,),
        progress=False,
    )
    np.testing.assert_allclose(res.x_T, v["x_T"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(res.z, v["z"], rtol=1e-10, atol=1e-12)


def test_optimise_params_only_and_keep_x0():
    """wrt=("params",): fit the data variance s^2 so samples from x_T have a target spread."""
    x_T = jnp.array([[1.0, -1.0]])
    res = jadeis.guide(
        lambda x0: jnp.sum((x0 - jnp.array([[0.5, -0.5]])) ** 2),
        ORACLE.eps_fn,
        jnp.asarray(0.01),
        x_T,
        jnp.zeros((1, 2)),
        schedule=SCH,
        ts=TS,
        optimizer=optax.adam(0.02),
        num_iters=40,
        wrt=("params",),
        solver=jadeis.DPMSolver(order=2),
        adjoint=jadeis.AdjointDEIS(order=2),
        progress=False,
        keep_x0=True,
    )
    assert res.losses.shape == (41,)
    assert res.losses[-1] < 1e-2 * res.losses[0]
    # exact flow map: x_0 = x_T * std(t_min)/std(t_max), std^2 = alpha^2 s^2 + sigma^2 -> s ~ 0.5
    assert abs(float(jnp.sqrt(res.params)) - 0.5) < 0.05
    np.testing.assert_array_equal(res.x_T, x_T)
    assert res.x0_history.shape == (40, 1, 2)


def test_progress_bar_shows_the_loss(capsys):
    jadeis.guide(
        lambda x0: jnp.sum(x0**2),
        ORACLE.eps_fn,
        0.09,
        jnp.ones((1, 2)),
        jnp.zeros((1, 2)),
        schedule=SCH,
        ts=TS,
        optimizer=optax.adam(0.1),
        num_iters=3,
        wrt="x_T",
        solver=jadeis.DDIM(),
        progress=True,
        desc="mybar",
    )
    err = capsys.readouterr().err
    assert "mybar" in err and "loss=" in err


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"wrt": ("x_T", "sigma")}, "wrt"),
        ({"wrt": ()}, "wrt"),
        ({"optimizer": "adam"}, "optax"),
        ({"wrt": ("z",), "z": None}, "cannot optimise 'z'"),
        ({"num_iters": -1}, "num_iters"),
    ],
)
def test_static_misuse_is_a_clear_error(kwargs, match):
    args = {"optimizer": optax.adam(0.1), "z": jnp.zeros((1, 2))} | kwargs
    z = args.pop("z")
    with pytest.raises(ValueError, match=match):
        jadeis.guide(
            lambda x0: jnp.sum(x0),
            ORACLE.eps_fn,
            0.09,
            jnp.ones((1, 2)),
            z,
            schedule=SCH,
            ts=TS,
            progress=False,
            **args,
        )
