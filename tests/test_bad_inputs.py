"""Unclear-error cases: each gives a clear error naming the argument and the fix
(or now works)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadeis

SCH = jadeis.VPLinear()
TS = jadeis.time_grid(SCH, 5)
X = jnp.ones((2, 3))


def f(p, x, t, z):
    return p * x


def run(**kw):
    kw.setdefault("schedule", SCH)
    kw.setdefault("ts", TS)
    return jadeis.sample(f, 0.5, X, **kw)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: run(schedule="vp"), "schedule must be a jadeis schedule"),
        (lambda: run(schedule=None), "schedule must be a jadeis schedule"),
        (lambda: run(solver=None), "solver must be a jadeis sampler"),
        (lambda: run(solver=jadeis.SDEDPMSolver(), key=0), r"jax.random.key\(0\)"),
        (
            lambda: run(solver=jadeis.SDEDPMSolver(), key=jax.random.split(jax.random.key(0))),
            "single PRNG key",
        ),
        (lambda: run(ts=TS[::-1]), "strictly decreasing"),
        (lambda: run(ts=TS.at[2].set(jnp.nan)), "non-finite"),
        (lambda: run(noise=jnp.ones(3)), "ODE sampler"),
    ],
    ids=[
        "schedule-str",
        "schedule-None",
        "solver-None",
        "key-int",
        "key-batch",
        "ts-ascending",
        "ts-nan",
        "ode-noise",
    ],
)
def test_clear_value_error(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert len(str(info.value).splitlines()) == 1


def test_numpy_integers_accepted():
    assert jadeis.DPMSolverPP(order=np.int64(2)).order == 2
    assert jadeis.AdjointDEIS(steps=np.int64(5)).steps == 5


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("mode", ["cached", "reconstruct"])
def test_adjointdeis_order3_on_a_short_grid(n, mode):
    """Was "All input arrays must have the same shape": a grid of fewer steps than the
    order now works and equals the lower orders (the warm-up uses order <= step index)."""
    ts = jadeis.time_grid(SCH, n)

    def grad(order):
        adj = jadeis.AdjointDEIS(order=order, trajectory=mode)
        return jax.grad(lambda x: jnp.sum(run(ts=ts, adjoint=adj) ** 2))(X)

    g3 = grad(3)
    assert bool(jnp.all(jnp.isfinite(g3)))
    np.testing.assert_allclose(g3, grad(min(n, 2)), rtol=1e-10)


def test_traced_ascending_ts_under_jit_ends_in_one_clear_line():
    """Under a user's jax.jit the check runs at run time; the error (JAX wraps it in a
    JaxRuntimeError) ends in the line 'ValueError: sample: ts must be strictly decreasing'
    instead of equinox's boilerplate."""
    f_jit = jax.jit(lambda t: run(ts=t))
    with pytest.raises((RuntimeError, ValueError)) as info:
        jax.block_until_ready(f_jit(TS[::-1]))
    last = str(info.value).strip().splitlines()[-1]
    assert last.startswith("ValueError: sample: ts must be strictly decreasing"), last
    # a good traced grid, and vmap over grids, still work
    np.testing.assert_allclose(f_jit(TS), run(), rtol=1e-12)
    out = jax.vmap(lambda t: run(ts=t))(jnp.stack([TS, TS]))
    np.testing.assert_allclose(out[1], run(), rtol=1e-12)


@pytest.mark.parametrize(
    "loss,match",
    [
        (lambda x0: (jnp.sum(x0), x0), "one real array"),
        (lambda x0: jnp.sum(x0).astype(jnp.complex128), "real floating-point"),
    ],
    ids=["tuple", "complex"],
)
def test_guide_rejects_tuple_or_complex_loss(loss, match):
    with pytest.raises(ValueError, match=match):
        jadeis.guide(
            loss,
            f,
            0.5,
            X,
            schedule=SCH,
            ts=TS,
            optimizer=optax.adam(0.1),
            wrt="x_T",
            progress=False,
        )


def test_guide_stops_at_the_first_non_finite_loss():
    with pytest.raises(FloatingPointError, match="not finite"):
        jadeis.guide(
            lambda x0: jnp.sum(jnp.log(x0 - 100.0)),
            f,
            0.5,
            X,
            schedule=SCH,
            ts=TS,
            optimizer=optax.adam(0.1),
            wrt="x_T",
            progress=False,
        )


def test_a_grid_checked_once_is_checked_again_when_it_can_change():
    """sample remembers the last (ts, schedule) pairs that passed its host-side checks by
    identity (a JAX array is immutable): a NumPy grid changed in place after a successful
    call is checked again, and a new schedule with the same grid is checked on its own."""
    ts = np.array(jadeis.time_grid(SCH, 5))  # a writable copy
    run(ts=ts)
    ts[2] = ts[0]  # no longer strictly decreasing
    with pytest.raises(ValueError, match="strictly decreasing"):
        run(ts=ts)
    grid = jadeis.time_grid(SCH, 5)
    run(ts=grid)
    run(ts=grid)  # the same objects: the remembered check
    with pytest.raises(ValueError, match="outside the schedule's range"):
        run(ts=grid, schedule=jadeis.VPLinear(t_max=0.5))
