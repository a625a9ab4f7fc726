"""Bad input gets a clear error naming the argument, never a silent NaN.

Static misuse raises ``ValueError`` while tracing; checks on traced values (the times in
``ts``, ``check_finite``) go through ``equinox.error_if`` and raise a ``RuntimeError``
subclass at run time whose message carries the text.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jadeis

from .helpers import GaussianOracle

SCH = jadeis.VPLinear()
ORACLE = GaussianOracle(SCH)
MU, S2 = jnp.asarray(0.7), jnp.asarray(0.09)
X_T = jnp.asarray([[0.5, -1.0], [1.3, 0.2]])
N = 8
TS = jadeis.time_grid(SCH, N)


def run(eps_fn=ORACLE.eps_fn, x_T=X_T, z=MU, ts=TS, **kw):
    return jadeis.sample(eps_fn, S2, x_T, z, schedule=SCH, ts=ts, **kw)


# ---------------------------------------------------------------------------------------
# ts: monotone and inside the schedule's range (traced checks)

DECREASING = "ts must be strictly decreasing"
OUTSIDE = "ts has times outside the schedule's range"


@pytest.mark.parametrize(
    "bad_ts,match",
    [
        (TS.at[3].set(TS[1]), DECREASING),  # not monotone
        (TS.at[4].set(TS[3]), DECREASING),  # repeated time
        (TS[::-1], DECREASING),  # ascending
        (TS.at[-1].set(-1e-3), OUTSIDE),  # below t_min (a final 0 is allowed: sigma = 0)
        (TS.at[-1].set(SCH.t_min / 2), OUTSIDE),
        (TS.at[0].set(1.5), OUTSIDE),  # above t_max
    ],
    ids=["non-monotone", "repeated", "ascending", "negative", "below-t_min", "above-t_max"],
)
def test_bad_ts_values(bad_ts, match):
    # a concrete ts is checked eagerly, before compiling: a plain ValueError
    with pytest.raises(ValueError, match=match):
        run(ts=bad_ts)


def test_bad_ts_message_names_the_fix():
    with pytest.raises(ValueError, match=r"jadeis.time_grid\(schedule, n\)"):
        run(ts=TS[::-1])
    with pytest.raises(ValueError, match=r"\[t_min, t_max\] = \[0.001, 1.0\]"):
        run(ts=TS.at[-1].set(-1e-3))


def test_bad_ts_traced_inside_jit():
    # inside a user's plain jax.jit the check still fires with the message; JAX reports a
    # failed runtime callback as JaxRuntimeError (a RuntimeError) on the first call and as
    # ValueError on the fast dispatch path of later calls, so accept either type
    f = jax.jit(lambda ts: run(ts=ts))
    np.testing.assert_allclose(np.asarray(f(TS)), np.asarray(run()), rtol=1e-14)
    with pytest.raises((RuntimeError, ValueError), match=DECREASING):
        jax.block_until_ready(f(TS.at[3].set(TS[1])))
    with pytest.raises((RuntimeError, ValueError), match=OUTSIDE):
        jax.block_until_ready(f(TS.at[-1].set(-1e-3)))
    g = eqx.filter_jit(lambda ts: run(ts=ts))
    with pytest.raises(RuntimeError, match=OUTSIDE):
        g(TS.at[0].set(2.0))


def test_good_ts_near_the_ends_pass():
    # exactly the end points of the valid range are allowed
    out = run(ts=jnp.linspace(SCH.t_max, SCH.t_min, N + 1))
    assert bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.parametrize(
    "bad_ts,match",
    [
        (TS[:1], "at least 2 times"),
        (TS[None], "1-D array"),
        (jnp.zeros((3, 3)), "ts must be a 1-D array"),
    ],
)
def test_bad_ts_shape(bad_ts, match):
    with pytest.raises(ValueError, match=match):
        run(ts=bad_ts)


# ---------------------------------------------------------------------------------------
# solvers: unsupported order


@pytest.mark.parametrize(
    "make",
    [
        lambda: jadeis.DPMSolver(order=4),
        lambda: jadeis.DPMSolver(order=0),
        lambda: jadeis.DPMSolver(order=2.0),
        lambda: jadeis.DPMSolver(order=True),
        lambda: jadeis.DPMSolverPP(order=4),
        lambda: jadeis.DPMSolverPP(order=-1),
        lambda: jadeis.SDEDPMSolver(order=2),
        lambda: jadeis.SDEDPMSolverPP(order=3),
    ],
    ids=["dpm4", "dpm0", "dpm-float", "dpm-bool", "pp4", "pp-1", "sde2", "sdepp3"],
)
def test_unsupported_order(make):
    with pytest.raises(ValueError, match=r"order must be .*got order="):
        make()


def test_ddim_has_no_order_to_set():
    # DDIM is first order: it exposes no order or lower_order_final that could only be 1
    assert jadeis.DDIM().order == 1
    with pytest.raises(TypeError, match="order"):
        jadeis.DDIM(order=2)


def test_order_message_lists_the_allowed_orders():
    with pytest.raises(ValueError, match="order must be 1 or 2 or 3"):
        jadeis.DPMSolverPP(order=5)
    with pytest.raises(ValueError, match="order must be 1 or 2, got order=3"):
        jadeis.SDEDPMSolverPP(order=3)


def test_solver_must_be_a_sampler():
    with pytest.raises(ValueError, match="solver must be a jadeis sampler"):
        run(solver="ddim")


# ---------------------------------------------------------------------------------------
# eps_fn output


@pytest.mark.parametrize(
    "bad_eps,got",
    [
        (lambda p, x, t, z: x[:, :1], r"shape \(2, 1\)"),
        (lambda p, x, t, z: x[0], r"shape \(2,\)"),
        (lambda p, x, t, z: jnp.sum(x), r"shape \(\)"),
        (lambda p, x, t, z: x.astype(jnp.int32), "dtype int32"),
    ],
    ids=["narrow", "unbatched", "scalar", "int32"],
)
def test_eps_fn_wrong_shape_or_dtype(bad_eps, got):
    with pytest.raises(ValueError, match=r"eps_fn must return a floating-point array of the shape"):
        run(eps_fn=bad_eps)
    with pytest.raises(ValueError, match=got):
        run(eps_fn=bad_eps)


def test_eps_fn_other_floating_dtype_is_cast_to_the_state():
    # mixed precision: a float32 or bfloat16 prediction for a float64 state is accepted
    # and cast to the state's dtype (docs/precision.md)
    for dt in (jnp.float32, jnp.bfloat16):
        out = run(eps_fn=lambda p, x, t, z, dt=dt: x.astype(dt))
        assert out.dtype == X_T.dtype


def test_eps_fn_not_an_array():
    with pytest.raises(ValueError, match="eps_fn must return"):
        run(eps_fn=lambda p, x, t, z: (x, x))


def test_eps_fn_that_fails_names_eps_fn():
    with pytest.raises(ValueError, match=r"calling eps_fn\(params, x, t, z\) failed"):
        run(eps_fn=lambda p, x, t, z: x @ jnp.ones((3, 3)))


# ---------------------------------------------------------------------------------------
# SDE samplers need randomness


@pytest.mark.parametrize(
    "solver",
    [jadeis.SDEDPMSolver(), jadeis.SDEDPMSolverPP(order=1), jadeis.SDEDPMSolverPP(order=2)],
    ids=["SDEDPMSolver", "SDEDPMSolverPP1", "SDEDPMSolverPP2"],
)
def test_sde_sampler_without_key_or_noise(solver):
    with pytest.raises(ValueError, match=r"needs randomness: pass key=.*or noise="):
        run(solver=solver)


def test_ode_sampler_ignores_no_key():
    # ODE samplers need neither (and run without)
    assert bool(jnp.all(jnp.isfinite(run(solver=jadeis.DDIM()))))


# ---------------------------------------------------------------------------------------
# non-finite values (opt-in)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_non_finite_x_T_with_check_finite(bad):
    with pytest.raises(RuntimeError, match="x_T has non-finite values"):
        run(x_T=X_T.at[1, 0].set(bad), check_finite=True)


def test_check_finite_is_opt_in_and_passes_finite_input():
    out = run(check_finite=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(run()), rtol=1e-14)
    # without the check a NaN input propagates (documented opt-in behaviour)
    assert bool(jnp.isnan(run(x_T=X_T.at[1, 0].set(jnp.nan))[1, 0]))


def test_check_finite_catches_a_model_that_produces_nan():
    def eps_fn(params, x, t, z):
        return jnp.where(t < 0.5, jnp.nan, 1.0) * ORACLE.eps_fn(params, x, t, z)

    with pytest.raises(RuntimeError, match="sampling produced non-finite values"):
        run(eps_fn=eps_fn, check_finite=True)


def test_x_T_must_be_floating():
    with pytest.raises(ValueError, match="x_T must be a floating-point array"):
        run(x_T=jnp.ones((2, 2), jnp.int32))


# ---------------------------------------------------------------------------------------
# PerStep conditioning length


@pytest.mark.parametrize(
    "values",
    [jnp.full((N - 1,), 0.7), jnp.full((N + 1,), 0.7), jnp.asarray(0.7)],
    ids=["short", "long", "scalar"],
)
def test_bad_per_step_length(values):
    with pytest.raises(ValueError, match=rf"z is a PerStep .* length N = {N}"):
        run(z=jadeis.PerStep(values))


def test_bad_per_step_length_in_one_leaf():
    z = jadeis.PerStep({"a": jnp.zeros((N,)), "b": jnp.zeros((N - 2, 3))})
    with pytest.raises(ValueError, match=r"got leaf shapes \[\(8,\), \(6, 3\)\]"):
        run(eps_fn=lambda p, x, t, z: ORACLE.eps_fn(p, x, t, MU), z=z)


def test_good_per_step_runs():
    out = run(z=jadeis.PerStep(jnp.full((N,), 0.7)))
    np.testing.assert_allclose(np.asarray(out), np.asarray(run()), rtol=1e-14)


# ---------------------------------------------------------------------------------------
# other entry points


def test_as_eps_fn_bad_prediction():
    with pytest.raises(ValueError, match="prediction must be one of"):
        jadeis.as_eps_fn(ORACLE.eps_fn, SCH, "score")


def test_adjoint_must_be_a_strategy():
    with pytest.raises(ValueError, match="adjoint must be"):
        run(adjoint="backprop")
