"""Learned time grids: validity of every grid, loss decrease, held-out gain
over the initial grid, float32/float64, one compilation, and the argument errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadeis
from jadeis._learned_grid import LearnedGrid, grid_from_logits, learn_time_grid, logits_from_grid

SCH = jadeis.VPLinear()
S2 = 0.25  # data N(z, S2 I), as in the README quickstart
N = 4


def eps_fn(params, x, t, z):
    """The exact noise prediction of data N(z, params I)."""
    a = SCH.alpha(t).astype(x.dtype)
    s = SCH.sigma(t).astype(x.dtype)
    return s * (x - a * z) / (a**2 * params + s**2)


def exact_x0(x_T, z, t_start, t_end):
    """Exact probability-flow ODE map of the Gaussian model from t_start to t_end."""

    def std(t):
        return jnp.sqrt(SCH.alpha(t) ** 2 * S2 + SCH.sigma(t) ** 2)

    ratio = (std(t_end) / std(t_start)).astype(x_T.dtype)
    a0 = SCH.alpha(t_start).astype(x_T.dtype)
    a1 = SCH.alpha(t_end).astype(x_T.dtype)
    return a1 * z + (x_T - a0 * z) * ratio


def noise(seed, batch, dtype):
    return jax.random.normal(jax.random.key(seed), (batch, 2), dtype)


def rmse(x_T, z, ts, solver):
    x0 = jadeis.sample(eps_fn, S2, x_T, z, schedule=SCH, ts=ts, solver=solver)
    ref = exact_x0(x_T, z, ts[0], ts[-1])
    return float(jnp.sqrt(jnp.mean((x0 - ref) ** 2)))


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_learned_grid_is_valid_lowers_the_loss_and_beats_the_initial_grid(dtype):
    solver = jadeis.DDIM()
    z = jnp.asarray([1.0, -0.5], dtype)
    res = learn_time_grid(
        eps_fn,
        jnp.asarray(S2, dtype),
        noise(0, 32, dtype),
        z,
        schedule=SCH,
        n=N,
        solver=solver,
        num_iters=30,
    )
    assert isinstance(res, LearnedGrid)
    ts = np.asarray(res.ts)
    assert res.ts.dtype == dtype and res.initial_ts.dtype == dtype
    assert ts.shape == (N + 1,)
    assert np.all(np.diff(ts) < 0), ts
    # end points exactly those of the initial grid
    assert ts[0] == res.initial_ts[0] == np.asarray(SCH.t_max, dtype)
    assert ts[-1] == res.initial_ts[-1] == np.asarray(SCH.t_min, dtype)
    np.testing.assert_allclose(
        res.initial_ts, jadeis.time_grid(SCH, N, "logsnr", dtype=dtype), rtol=0, atol=0
    )
    assert res.losses.shape == (31,)
    assert np.all(np.isfinite(res.losses))
    assert res.losses[-1] < 0.7 * res.losses[0]  # measured: 0.45
    # held-out noise (and conditioning): the learned grid beats the one it started from
    x_te = noise(1, 256, dtype)
    z_te = jnp.asarray([-0.3, 0.8], dtype)
    before = rmse(x_te, z_te, res.initial_ts, solver)
    after = rmse(x_te, z_te, res.ts, solver)
    assert after < 0.8 * before, (before, after)  # measured: 0.67


def test_user_reference_init_grid_optimizer_and_loss_fn_compile_once():
    solver = jadeis.DPMSolverPP(order=2)
    x_T, z = noise(2, 16, jnp.float64), jnp.asarray([0.5, 0.5])
    init = jadeis.time_grid(SCH, 5, "quadratic")
    ref = exact_x0(x_T, z, init[0], init[-1])
    traces = []

    def loss_fn(x_0, reference):
        traces.append(1)  # runs once per trace
        return jnp.mean(jnp.abs(x_0 - reference))

    res = learn_time_grid(
        eps_fn,
        S2,
        x_T,
        z,
        schedule=SCH,
        init=init,
        solver=solver,
        reference=ref,
        optimizer=optax.sgd(0.5),
        num_iters=15,
        loss_fn=loss_fn,
    )
    assert len(traces) == 1  # the update step is compiled once
    assert res.ts.shape == (6,)
    np.testing.assert_array_equal(res.initial_ts, init)
    np.testing.assert_array_equal(res.reference, ref)
    assert res.ts[0] == init[0] and res.ts[-1] == init[-1]
    assert np.all(np.diff(np.asarray(res.ts)) < 0)
    assert res.losses[-1] < res.losses[0]
    # the logits reproduce the grid
    np.testing.assert_allclose(grid_from_logits(SCH, res.logits, init[0], init[-1]), res.ts)


def test_default_reference_and_zero_iterations_return_the_initial_grid():
    x_T, z = noise(3, 8, jnp.float64), jnp.zeros(2)
    res = learn_time_grid(
        eps_fn, S2, x_T, z, schedule=SCH, n=3, init="karras", num_iters=0, reference_steps=200
    )
    np.testing.assert_allclose(res.ts, res.initial_ts, rtol=1e-12)
    assert res.losses.shape == (1,)
    # the default reference: DPMSolverPP(3) on 200 log-SNR steps, close to the exact map
    exact = exact_x0(x_T, z, res.initial_ts[0], res.initial_ts[-1])
    np.testing.assert_allclose(res.reference, exact, atol=1e-6)


def test_logits_round_trip_every_spacing():
    for spacing in ("logsnr", "time", "quadratic", "karras"):
        ts = jadeis.time_grid(SCH, 7, spacing)
        back = grid_from_logits(SCH, logits_from_grid(SCH, ts), ts[0], ts[-1])
        np.testing.assert_allclose(back, ts, rtol=1e-10)


def test_discrete_adjoint_learns_the_same_grid_as_backprop():
    # DiscreteAdjoint differentiates ts exactly: the same optimisation path as Backprop
    x_T, z = noise(4, 16, jnp.float64), jnp.zeros(2)
    kw = dict(schedule=SCH, n=N, solver=jadeis.DPMSolverPP(order=2), num_iters=20)
    a = learn_time_grid(eps_fn, S2, x_T, z, adjoint=jadeis.DiscreteAdjoint(), **kw)
    b = learn_time_grid(eps_fn, S2, x_T, z, adjoint=jadeis.Backprop(), **kw)
    assert a.losses[-1] < 0.7 * a.losses[0]
    np.testing.assert_allclose(np.asarray(a.ts), np.asarray(b.ts), rtol=1e-9)


def test_adjoint_deis_refuses_to_learn_a_grid():
    x_T, z = noise(4, 16, jnp.float64), jnp.zeros(2)
    with pytest.raises(ValueError, match="ts or the schedule"):
        learn_time_grid(eps_fn, S2, x_T, z, schedule=SCH, n=N, adjoint=jadeis.AdjointDEIS(),
                        num_iters=2)


def test_zero_gradient_is_an_error():
    x_T = noise(5, 4, jnp.float64)
    with pytest.raises(ValueError, match="exactly zero"):
        learn_time_grid(
            eps_fn,
            S2,
            x_T,
            jnp.zeros(2),
            schedule=SCH,
            n=2,
            num_iters=3,
            reference=x_T,
            loss_fn=lambda x0, ref: jnp.sum(jax.lax.stop_gradient(x0) ** 2) + 1.0,
        )


def _bad(**kw):
    args = dict(
        eps_fn=eps_fn,
        params=S2,
        x_T=noise(6, 4, jnp.float64),
        z=jnp.zeros(2),
        schedule=SCH,
        n=2,
        num_iters=1,
        reference_steps=10,
    )
    args.update(kw)
    return learn_time_grid(
        args.pop("eps_fn"), args.pop("params"), args.pop("x_T"), args.pop("z"), **args
    )


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(n=0), "n must be an int >= 1"),
        (dict(n=True), "n must be an int >= 1"),
        (dict(n=2.0), "n must be an int >= 1"),
        (dict(n=None), "give n"),
        (dict(num_iters=-1), "num_iters must be an int >= 0"),
        (dict(num_iters=1.5), "num_iters must be an int >= 0"),
        (dict(reference_steps=0), "reference_steps must be an int >= 1"),
        (dict(x_T=jnp.zeros((4, 2), jnp.int32)), "x_T must be a floating-point array"),
        (dict(x_T=jnp.asarray(1.0)), "x_T must be a non-empty batch"),
        (dict(reference=jnp.zeros((3, 2))), "reference must be the target x_0"),
        (dict(init="cosine"), "init must be one of"),
        (dict(init=jnp.asarray([0.5, 0.7, 0.1])), "init must be strictly decreasing"),
        (dict(init=jnp.asarray([1.0, 0.5, 0.2, 0.1])), "not n \\+ 1 = 3"),
        (dict(init=jnp.asarray([2.0, 0.5, 0.1])), "outside the schedule's range"),
        (dict(init=jnp.asarray([1.0, 0.5, 0.1]), t_end=0.01), "t_start/t_end"),
        (dict(t_end=2.0), "t_end=2.0 is outside"),
        (dict(solver=jadeis.SDEDPMSolverPP()), "solver must be an ODE"),
        (dict(reference_solver="ddim"), "reference_solver must be a jadeis sampler"),
        (dict(optimizer="adam"), "optimizer must be an optax.GradientTransformation"),
        (dict(adjoint="backprop"), "adjoint must be a jadeis gradient strategy"),
        (dict(loss_fn=3), "loss_fn must be callable"),
        (dict(loss_fn=lambda x0, ref: (x0 - ref) ** 2), "loss_fn must return a scalar"),
        (dict(schedule="vp"), "schedule must be a jadeis schedule"),
    ],
)
def test_errors_name_the_argument(kw, match):
    with pytest.raises(ValueError, match=match):
        _bad(**kw)
