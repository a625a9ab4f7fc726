"""Bad input gets a clear error naming the argument, never a silent NaN.

Static misuse raises ``ValueError`` while tracing. What is known only at run time (an adaptive
run out of steps, ``check_finite``) comes back as flags with the result: an eager call raises a
plain ``ValueError`` (also under ``jax.grad``/``vmap``); under a user's ``jit`` (and for a
traced ``ts``) a host callback raises it, which JAX wraps in a ``JaxRuntimeError`` whose text
ends in the sentence, logged first on the "jadeis" logger.
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
    with pytest.raises(ValueError, match="x_T has non-finite values"):
        run(x_T=X_T.at[1, 0].set(bad), check_finite=True)


def test_check_finite_is_opt_in_and_passes_finite_input():
    out = run(check_finite=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(run()), rtol=1e-14)
    # without the check a NaN input propagates (documented opt-in behaviour)
    assert bool(jnp.isnan(run(x_T=X_T.at[1, 0].set(jnp.nan))[1, 0]))


def test_check_finite_catches_a_model_that_produces_nan():
    def eps_fn(params, x, t, z):
        return jnp.where(t < 0.5, jnp.nan, 1.0) * ORACLE.eps_fn(params, x, t, z)

    with pytest.raises(ValueError, match="sampling produced non-finite values"):
        run(eps_fn=eps_fn, check_finite=True)
    f = jax.jit(lambda x: run(eps_fn=eps_fn, x_T=x, check_finite=True))
    with pytest.raises((RuntimeError, ValueError), match="sampling produced non-finite values"):
        jax.block_until_ready(f(X_T))


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


# ---------------------------------------------------------------------------------------
# one line that names the argument and the fix


def _constructors():
    i, f = np.int64, np.float32
    return {
        "DPMSolver": lambda: jadeis.DPMSolver(order=i(3)),
        "DPMSolverPP": lambda: jadeis.DPMSolverPP(order=i(3)),
        "UniPC": lambda: jadeis.UniPC(order=i(3)),
        "SinglestepDPMSolver": lambda: jadeis.SinglestepDPMSolver(order=i(2)),
        "SDEDPMSolver": lambda: jadeis.SDEDPMSolver(order=i(1)),
        "SDEDPMSolverPP": lambda: jadeis.SDEDPMSolverPP(order=i(2)),
        "Rex": lambda: jadeis.Rex(coupling=f(0.99)),
        "SDERex": lambda: jadeis.SDERex(coupling=f(0.99)),
        "PIDController": lambda: jadeis.PIDController(max_steps=i(64), rtol=f(1e-3)),
        "Adaptive": lambda: jadeis.Adaptive(jadeis.DPMSolverPP(i(3)), max_steps=i(64)),
        "AdjointDEIS": lambda: jadeis.AdjointDEIS(order=i(2), steps=i(8)),
        "Truncated": lambda: jadeis.Truncated(i(2)),
        "ReversibleAdjoint": lambda: jadeis.ReversibleAdjoint(checkpoints=i(3)),
    }


def test_numpy_numbers_in_every_constructor():
    """NumPy integers (and floats) become Python numbers in every solver, strategy and
    controller (AdjointDEIS kept np.int64, Rex refused np.float32 couplings), so they are
    static everywhere; bad ones still fail with the argument's name."""
    made = {k: make() for k, make in _constructors().items()}
    for name, obj in made.items():
        for field in ("order", "steps", "max_steps", "k", "checkpoints"):
            v = getattr(obj, field, None)
            assert v is None or type(v) is int, (name, field, type(v))
    assert type(made["Rex"].coupling) is float
    ts = jadeis.time_grid(SCH, np.int64(8))
    for name in ("DPMSolver", "UniPC", "SinglestepDPMSolver", "Rex"):
        assert bool(jnp.all(jnp.isfinite(run(ts=ts, solver=made[name])))), name
    g = jax.grad(lambda x: jnp.sum(run(x_T=x, adjoint=made["AdjointDEIS"])))(X_T)
    assert bool(jnp.all(jnp.isfinite(g)))
    with pytest.raises(ValueError, match="UniPC: order must be 1 or 2 or 3, got order=4"):
        jadeis.UniPC(order=np.int64(4))
    with pytest.raises(ValueError, match="AdjointDEIS: steps must be an int >= 1"):
        jadeis.AdjointDEIS(steps=np.float64(2.5))


def test_unipc_order_3_on_a_one_step_grid_is_its_first_order_step():
    """(Was reported to fail inside scan; it runs, and equals order 1 on 1 step.)"""
    ts = jadeis.time_grid(SCH, 1)
    np.testing.assert_array_equal(run(ts=ts, solver=jadeis.UniPC(order=3)),
                                  run(ts=ts, solver=jadeis.UniPC(order=1)))


def test_a_class_or_none_where_an_instance_is_expected():
    """time_grid(jadeis.VPLinear, 10) raised a TypeError deep in log_snr; adjoint=None an
    AttributeError; each now names the argument (and, for a class, says to call it)."""
    cases = [
        (lambda: jadeis.time_grid(jadeis.VPLinear, 10), "time_grid: schedule must be"),
        (lambda: run(adjoint=None), "sample: adjoint must be a gradient strategy"),
        (lambda: jadeis.sample_trajectory(ORACLE.eps_fn, S2, X_T, MU, schedule=SCH, ts=TS,
                                          adjoint=None), "sample_trajectory: adjoint must"),
        (lambda: jadeis.solve(ORACLE.eps_fn, S2, X_T, MU, schedule=SCH, ts=TS, adjoint=None),
         "solve: adjoint must"),
        (lambda: run(adjoint=jadeis.DiscreteAdjoint), r"pass an instance, DiscreteAdjoint\(\)"),
        (lambda: run(solver=None), "sample: solver must be a jadeis sampler"),
        (lambda: run(solver=jadeis.DDIM), r"pass an instance, DDIM\(\)"),
        (lambda: jadeis.sample(ORACLE.eps_fn, S2, X_T, MU, schedule=jadeis.VE, ts=TS),
         r"schedule must be a jadeis schedule.*pass an instance, VE\(\)"),
        (lambda: jadeis.encode_ode(ORACLE.eps_fn, S2, X_T, MU, schedule=SCH, ts=TS,
                                   solver=None), "encode_ode: solver must be"),
    ]
    for make, match in cases:
        with pytest.raises(ValueError, match=match):
            make()


@pytest.mark.parametrize(
    "out,got",
    [(lambda x: (x, x), "a tuple of 2 entries"), (lambda x: {"eps": x}, "a dict of 1 entries"),
     (lambda x: None, "None")],
    ids=["tuple", "dict", "none"],
)
def test_a_model_returning_a_tuple_is_told_so(out, got):
    """It was told "returned shape None"."""
    with pytest.raises(ValueError, match=f"eps_fn must return a floating-point array.*{got}"):
        run(eps_fn=lambda p, x, t, z: out(x))


def _out_of_steps(x_T=X_T, adjoint=jadeis.DiscreteAdjoint()):
    solver = jadeis.Adaptive(jadeis.DPMSolverPP(order=3), rtol=1e-10, atol=1e-10, max_steps=4)
    return jadeis.sample(ORACLE.eps_fn, S2, x_T, MU, schedule=SCH,
                         ts=jnp.asarray([SCH.t_max, SCH.t_min]), solver=solver, adjoint=adjoint)


BUDGET = r"sample: the adaptive controller did not reach ts\[-1\] within max_steps=4"


@pytest.mark.parametrize("adjoint", [jadeis.DiscreteAdjoint(), jadeis.Backprop()],
                         ids=["discrete", "backprop"])
def test_run_time_errors_are_plain_value_errors_when_eager(adjoint):
    """An adaptive run out of steps ended in a JaxRuntimeError ("CpuCallback error") with
    "jax.debug.callback failed" and a stack logged first; eagerly (also under jax.grad and
    vmap) it is now a ValueError raised in Python, its sentence the whole message."""
    with pytest.raises(ValueError, match=BUDGET) as info:
        _out_of_steps(adjoint=adjoint)
    assert str(info.value).startswith("sample: the adaptive controller")
    with pytest.raises(ValueError, match=BUDGET):
        jax.grad(lambda x: jnp.sum(_out_of_steps(x, adjoint)))(X_T)
    with pytest.raises(ValueError, match=BUDGET):
        jax.vmap(lambda x: _out_of_steps(x, adjoint))(X_T[None])
    with pytest.raises(ValueError, match="encode_ode: the adaptive controller"):
        jadeis.encode_ode(ORACLE.eps_fn, S2, X_T, MU, schedule=SCH,
                          ts=jnp.asarray([SCH.t_max, SCH.t_min]),
                          solver=jadeis.Adaptive(jadeis.SinglestepDPMSolver(3), rtol=1e-10,
                                                 atol=1e-10, max_steps=4))


def test_run_time_errors_under_jit_log_their_sentence_first(caplog):
    """Under a user's jax.jit the flag is checked by a host callback, which JAX wraps; the
    sentence is logged (logger "jadeis", printed to stderr by logging's last-resort handler)
    before JAX's "jax.debug.callback failed" and its stack, and ends the error's text."""
    f = jax.jit(lambda x: _out_of_steps(x))
    with caplog.at_level("ERROR"):
        with pytest.raises((RuntimeError, ValueError)) as info:
            jax.block_until_ready(f(X_T))
    assert str(info.value).strip().splitlines()[-1].startswith("ValueError: sample: the adaptive")
    first = caplog.records[0]
    assert first.name == "jadeis" and first.getMessage().startswith("sample: the adaptive")
