"""ODE samplers against the closed-form Gaussian oracle (docs/math/samplers.md,
docs/math/oracles.md).

Data N(mu, s^2 I): the probability-flow ODE has the exact solution ``GaussianOracle.flow``,
so the sampler error is measurable exactly and its convergence order can be fitted.

Grid sizes are shared between tests on purpose: ``sample`` is compiled once per static
configuration and array shape, so reusing (schedule, solver, N, x_T shape) keeps this file
fast.
"""

from __future__ import annotations

import concurrent.futures
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jadeis

from ._shared import (
    B0,
    B1,
    np_alpha,
    np_gaussian_data,
    np_gaussian_eps,
    np_lambda,
    np_sigma,
)
from .helpers import GaussianOracle, fitted_order, tree_allclose

MU = jnp.asarray(0.7)
S2 = jnp.asarray(0.09)
X_T = jnp.asarray([[0.5, -1.0], [1.3, 0.2]])

VPLIN = jadeis.VPLinear()
VE = jadeis.VE()
ORACLES = {"VPLinear": GaussianOracle(VPLIN), "VE": GaussianOracle(VE)}

# the five distinct ODE maps (DPMSolver(1) and DPMSolverPP(1) are DDIM, tested separately)
ORDER_SOLVERS = [
    (jadeis.DDIM(), 1),
    (jadeis.DPMSolver(order=2), 2),
    (jadeis.DPMSolverPP(order=2), 2),
    (jadeis.DPMSolver(order=3), 3),
    (jadeis.DPMSolverPP(order=3), 3),
]
ORDER_IDS = ["DDIM", "DPMSolver2", "DPMSolverPP2", "DPMSolver3", "DPMSolverPP3"]
ORDER_NS = [64, 128, 256]
# log-SNR at the end of the "asymptotic" sub-interval [t_max, t(lambda = -0.2)], see below
LAMBDA_END = -0.2


def oracle_error(name, solver, n, t_end=None):
    """Max-abs error of ``sample`` against the exact flow map, on an n-step logsnr grid."""
    sch = ORACLES[name].schedule
    return float(_oracle_error(name, solver, n, sch.t_min if t_end is None else t_end))


@functools.partial(jax.jit, static_argnames=("name", "solver", "n"))
def _oracle_error(name, solver, n, t_end):
    # grid, sampling and the exact flow in one compiled program per (schedule, solver, n)
    oracle = ORACLES[name]
    sch = oracle.schedule
    x_T = X_T * sch.prior_std
    ts = jadeis.time_grid(sch, n, t_end=t_end)
    x0 = jadeis.sample(oracle.eps_fn, S2, x_T, MU, schedule=sch, ts=ts, solver=solver)
    exact = oracle.flow(x_T, MU, S2, ts[0], ts[-1])
    return jnp.max(jnp.abs(x0 - exact))


# ---------------------------------------------------------------------------------------
# convergence orders
#
# Measured (float64, x_T = [[.5,-1],[1.3,.2]] * prior_std, mu = .7, s = .3):
#   full VPLinear range [1, 1e-3], N = 64/128/256: DDIM 0.98-0.99, DPMSolver2 1.96-1.98,
#   DPMSolverPP2 2.01-2.02, but DPMSolver3 ~4.0 and DPMSolverPP3 ~3.8: super-convergence.
#   For this oracle the leading O(h^3) error term of the third-order multistep methods
#   nearly cancels over the whole log-SNR range (the solution is flat in lambda at both
#   ends), and N = 1024 is still pre-asymptotic. On the sub-interval
#   [t_max, t(lambda = -0.2)] the solution is not flat at the end, the cancellation goes,
#   and every solver shows its nominal order already from N = 32 (third order 2.85-2.99
#   on VPLinear, VE, VPCosine and RectifiedFlow). So: nominal order within 0.3 on the
#   sub-interval, and on the full range order >= nominal - 0.3 with third order beating
#   second order by a wide margin.


@pytest.fixture(scope="module")
def order_errors():
    """Oracle errors for every (schedule, solver, range, N) of the order tests.

    The 30 compilations (2 schedules x 5 solvers x 3 grid sizes) dominate this file's run
    time; they run on two threads (XLA compiles outside the GIL), and the full-range runs
    reuse the sub-interval compilations (same shapes, t_end is traced).
    """
    jobs = []
    for name in ORACLES:
        sch = ORACLES[name].schedule
        ranges = {"sub": float(sch.t_from_log_snr(LAMBDA_END)), "full": float(sch.t_min)}
        for sid, (solver, _) in zip(ORDER_IDS, ORDER_SOLVERS):
            for n in ORDER_NS:
                jobs.append((name, sid, solver, n, ranges))

    def run(job):
        name, sid, solver, n, ranges = job
        return {
            (name, sid, r, n): oracle_error(name, solver, n, t_end) for r, t_end in ranges.items()
        }

    out = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        for res in pool.map(run, jobs):
            out.update(res)
    return out


@pytest.mark.parametrize("name", ["VPLinear", "VE"])
@pytest.mark.parametrize("sid,order", [(i, k) for i, (_, k) in zip(ORDER_IDS, ORDER_SOLVERS)])
def test_measured_order(order_errors, name, sid, order):
    # asymptotic regime: the sub-interval, nominal order within 0.3
    errors = [order_errors[name, sid, "sub", n] for n in ORDER_NS]
    measured = fitted_order(ORDER_NS, errors)
    assert abs(measured - order) < 0.3, (measured, errors)
    assert errors[-1] < 1e-3
    # full range: orders 1 and 2 within 0.3, third order at least nominal (super-convergent
    # on this oracle, see above)
    errors = [order_errors[name, sid, "full", n] for n in ORDER_NS]
    measured = fitted_order(ORDER_NS, errors)
    if order < 3:
        assert abs(measured - order) < 0.3, (measured, errors)
    else:
        assert measured > order - 0.3, (measured, errors)


@pytest.mark.parametrize("name", ["VPLinear", "VE"])
def test_third_order_beats_second_order_full_range(order_errors, name):
    errors = {sid: [order_errors[name, sid, "full", n] for n in ORDER_NS] for sid in ORDER_IDS}
    # third order clearly beats second order at every N, in both parameterisations
    # (measured ratios 40-300 on VPLinear and VE)
    for third, second in (("DPMSolver3", "DPMSolver2"), ("DPMSolverPP3", "DPMSolverPP2")):
        for e3, e2 in zip(errors[third], errors[second]):
            assert e3 < e2 / 20, (third, errors[third], second, errors[second])
    # and second order beats first order
    for e2, e1 in zip(errors["DPMSolverPP2"], errors["DDIM"]):
        assert e2 < e1 / 5


# ---------------------------------------------------------------------------------------
# DDIM == DPM-Solver-1 == DPM-Solver++(1)


def test_first_order_solvers_are_the_same_map():
    oracle = ORACLES["VPLinear"]
    ts = jadeis.time_grid(VPLIN, 64)
    outs = [
        jadeis.sample(oracle.eps_fn, S2, X_T, MU, schedule=VPLIN, ts=ts, solver=s)
        for s in (jadeis.DDIM(), jadeis.DPMSolver(order=1), jadeis.DPMSolverPP(order=1))
    ]
    np.testing.assert_allclose(np.asarray(outs[1]), np.asarray(outs[0]), rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(np.asarray(outs[2]), np.asarray(outs[0]), rtol=1e-13, atol=1e-14)
    # ... and they are not trivially equal to the exact answer (so the test can fail)
    exact = oracle.flow(X_T, MU, S2, ts[0], ts[-1])
    assert float(jnp.max(jnp.abs(outs[0] - exact))) > 1e-4


# ---------------------------------------------------------------------------------------
# first steps of DPM-Solver++(2M) and DPM-Solver-2M by hand (docs/math/samplers.md), in numpy,
# with VPLinear and the Gaussian oracle written out independently of the library.

MU_F, S2_F = 0.7, 0.09


def np_eps(x, t):
    return np_gaussian_eps(x, t, MU_F, S2_F)


def np_data(x, t):
    return np_gaussian_data(x, t, MU_F, S2_F)


def pp_step(x_s, s, t, d_s, d_prev=None, h_prev=None, form="phi"):
    """One DPM-Solver++ step from s to t (order 1 when d_prev is None).

    docs:   x_t = (sigma_t/sigma_s) x_s - alpha_t expm1(-h) (D_s + D1/2),
            D1 = (D_s - D_prev)/r, r = h_prev/h        ("midpoint" form)
    phi:    x_t = (sigma_t/sigma_s) x_s - alpha_t expm1(-h) D_s
                  + alpha_t (h + expm1(-h)) (D_s - D_prev)/h_prev
            i.e. the linear interpolant of D in lambda integrated exactly:
            alpha_t int_0^h e^{u-h} u du = alpha_t h^2 phi_2(-h) = alpha_t (h - 1 + e^{-h}).
    """
    h = np_lambda(t) - np_lambda(s)
    x_t = np_sigma(t) / np_sigma(s) * x_s - np_alpha(t) * np.expm1(-h) * d_s
    if d_prev is None:
        return x_t
    if form == "midpoint":
        d1 = (d_s - d_prev) / (h_prev / h)
        return x_t - np_alpha(t) * np.expm1(-h) * d1 / 2
    return x_t + np_alpha(t) * (h + np.expm1(-h)) * (d_s - d_prev) / h_prev


def noise_step(x_s, s, t, e_s, e_prev=None, h_prev=None):
    """One DPM-Solver (noise prediction) step; order 2 integrates the linear interpolant of
    eps exactly: x_t = (alpha_t/alpha_s) x_s - sigma_t expm1(h) eps_s
                       - sigma_t (expm1(h) - h) (eps_s - eps_prev)/h_prev."""
    h = np_lambda(t) - np_lambda(s)
    x_t = np_alpha(t) / np_alpha(s) * x_s - np_sigma(t) * np.expm1(h) * e_s
    if e_prev is None:
        return x_t
    return x_t - np_sigma(t) * (np.expm1(h) - h) * (e_s - e_prev) / h_prev


def np_multistep(x_T, ts, orders, kind="pp"):
    """Run the order-1/2 multistep recursion with the given per-step orders."""
    xs = [np.asarray(x_T, np.float64)]
    prev = None
    for i, k in enumerate(orders):
        s, t = ts[i], ts[i + 1]
        m = np_data(xs[-1], s) if kind == "pp" else np_eps(xs[-1], s)
        h_prev = None if i == 0 else np_lambda(s) - np_lambda(ts[i - 1])
        step = pp_step if kind == "pp" else noise_step
        if k == 1:
            xs.append(step(xs[-1], s, t, m))
        else:
            xs.append(step(xs[-1], s, t, m, prev, h_prev))
        prev = m
    return np.stack(xs)


def test_dpmpp_2m_first_steps_by_hand():
    oracle = ORACLES["VPLinear"]
    n = 20
    ts = jadeis.time_grid(VPLIN, n)
    kw = dict(schedule=VPLIN, ts=ts, solver=jadeis.DPMSolverPP(order=2))
    traj = jadeis.sample_trajectory(oracle.eps_fn, S2, X_T, MU, **kw)
    x0 = jadeis.sample(oracle.eps_fn, S2, X_T, MU, **kw)
    assert traj.shape == (n + 1,) + X_T.shape
    np.testing.assert_array_equal(np.asarray(traj[0]), np.asarray(X_T))
    np.testing.assert_array_equal(np.asarray(traj[-1]), np.asarray(x0))
    t = np.asarray(ts)
    x = np.asarray(traj)

    # step 1 has no history: first order, the documented DPM-Solver++(1)
    d0 = np_data(x[0], t[0])
    x1 = pp_step(x[0], t[0], t[1], d0)
    np.testing.assert_allclose(x[1], x1, rtol=1e-12, atol=1e-14)

    # steps 2 and 3 are second order with the exact phi_2 weight
    d1 = np_data(x1, t[1])
    h0 = np_lambda(t[1]) - np_lambda(t[0])
    x2 = pp_step(x1, t[1], t[2], d1, d0, h0)
    np.testing.assert_allclose(x[2], x2, rtol=1e-12, atol=1e-14)
    d2 = np_data(x2, t[2])
    h1 = np_lambda(t[2]) - np_lambda(t[1])
    x3 = pp_step(x2, t[2], t[3], d2, d1, h1)
    np.testing.assert_allclose(x[3], x3, rtol=1e-12, atol=1e-14)

    # the whole trajectory equals the hand-written recursion (N >= 15: no lower-order final)
    ref = np_multistep(np.asarray(X_T), t, [1] + [2] * (n - 1))
    np.testing.assert_allclose(x, ref, rtol=1e-11, atol=1e-13)

    # Relation to the documented midpoint form D_s + D1/2 at each second-order step (from the
    # library's own x_s and history): the two differ by exactly
    #   alpha_t (D_s - D_prev)/h_prev * [h + expm1(-h) + h expm1(-h)/2],
    # and the bracket is h^3/12 + O(h^4) (0 < bracket <= h^3/12): an O(h^3) local
    # difference, so both forms are second order; jadeis uses the exact phi form.
    for i in range(1, n):
        s, tt = t[i], t[i + 1]
        d_s, d_p = np_data(x[i], s), np_data(x[i - 1], t[i - 1])
        h = np_lambda(tt) - np_lambda(s)
        h_prev = np_lambda(s) - np_lambda(t[i - 1])
        mid = pp_step(x[i], s, tt, d_s, d_p, h_prev, form="midpoint")
        bracket = h + np.expm1(-h) + h * np.expm1(-h) / 2
        assert 0 < bracket <= h**3 / 12
        expected_diff = np_alpha(tt) * (d_s - d_p) / h_prev * bracket
        np.testing.assert_allclose(x[i + 1] - mid, expected_diff, rtol=1e-6, atol=1e-13)
    # and the bracket really is h^3/12 to leading order
    h = 1e-2
    assert (h + np.expm1(-h) + h * np.expm1(-h) / 2) / h**3 == pytest.approx(1 / 12, rel=1e-2)


def test_dpm_solver_2m_first_steps_by_hand():
    oracle = ORACLES["VPLinear"]
    n = 20
    ts = jadeis.time_grid(VPLIN, n)
    traj = jadeis.sample_trajectory(
        oracle.eps_fn, S2, X_T, MU, schedule=VPLIN, ts=ts, solver=jadeis.DPMSolver(order=2)
    )
    ref = np_multistep(np.asarray(X_T), np.asarray(ts), [1] + [2] * (n - 1), kind="eps")
    np.testing.assert_allclose(np.asarray(traj)[:4], ref[:4], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.asarray(traj), ref, rtol=1e-11, atol=1e-13)


def test_lower_order_final_on_short_grid():
    oracle = ORACLES["VPLinear"]
    n = 6
    ts = jadeis.time_grid(VPLIN, n)
    t = np.asarray(ts)

    def traj_of(solver):
        return np.asarray(
            jadeis.sample_trajectory(
                oracle.eps_fn, S2, X_T, MU, schedule=VPLIN, ts=ts, solver=solver
            )
        )

    # DPM-Solver++(2M): the final step of a grid shorter than 15 steps is first order
    with_lof = traj_of(jadeis.DPMSolverPP(order=2))
    without = traj_of(jadeis.DPMSolverPP(order=2, lower_order_final=False))
    np.testing.assert_allclose(
        with_lof, np_multistep(np.asarray(X_T), t, [1, 2, 2, 2, 2, 1]), rtol=1e-11, atol=1e-13
    )
    np.testing.assert_allclose(
        without, np_multistep(np.asarray(X_T), t, [1, 2, 2, 2, 2, 2]), rtol=1e-11, atol=1e-13
    )
    np.testing.assert_array_equal(with_lof[:-1], without[:-1])
    assert np.max(np.abs(with_lof[-1] - without[-1])) > 1e-6

    # DPM-Solver++(3M): orders 1, 2, 3, 3, then 2 and 1 at the end
    with3 = traj_of(jadeis.DPMSolverPP(order=3))
    # the second-last step is the second-order step from the library's own states
    d = [np_data(with3[i], t[i]) for i in range(n)]
    h_prev = np_lambda(t[4]) - np_lambda(t[3])
    np.testing.assert_allclose(
        with3[5], pp_step(with3[4], t[4], t[5], d[4], d[3], h_prev), rtol=1e-12, atol=1e-14
    )
    # the last step is DPM-Solver++(1)
    np.testing.assert_allclose(
        with3[6], pp_step(with3[5], t[5], t[6], d[5]), rtol=1e-12, atol=1e-14
    )
    # the first two steps are the corrected warm-up (docs/math/samplers.md): step 1 is
    # first order; step 2 first corrects x_1 with the linear interpolant of D through
    # D_0 and D_1 (D_1 from the uncorrected x_1), then takes the second-order step
    np.testing.assert_allclose(with3[:2], np_multistep(np.asarray(X_T), t, [1]), rtol=1e-12)
    h0 = np_lambda(t[1]) - np_lambda(t[0])
    x1c = with3[1] + np_alpha(t[1]) * (h0 + np.expm1(-h0)) * (d[1] - d[0]) / h0
    np.testing.assert_allclose(
        with3[2], pp_step(x1c, t[1], t[2], d[1], d[0], h0), rtol=1e-12, atol=1e-14
    )
    # warmup="lower_order": the plain order-1 and order-2 warm-up (DPM-Solver, diffusers)
    plain3 = traj_of(jadeis.DPMSolverPP(order=3, warmup="lower_order"))
    np.testing.assert_allclose(plain3[:3], np_multistep(np.asarray(X_T), t, [1, 2]), rtol=1e-12)
    # order 2 keeps the plain warm-up by default ("auto")
    np.testing.assert_array_equal(
        with_lof, traj_of(jadeis.DPMSolverPP(order=2, warmup="lower_order"))
    )


# ---------------------------------------------------------------------------------------
# jit, vmap, dtypes, grad


def test_jit_traces_once_per_static_configuration():
    oracle = ORACLES["VPLinear"]
    calls = {"n": 0}

    def eps_fn(params, x, t, z):
        calls["n"] += 1  # runs only while tracing
        return oracle.eps_fn(params, x, t, z)

    ts = jadeis.time_grid(VPLIN, 8)
    kw = dict(schedule=VPLIN, solver=jadeis.DPMSolverPP(order=2))
    out1 = jadeis.sample(eps_fn, S2, X_T, MU, ts=ts, **kw)
    traced = calls["n"]
    assert traced >= 1
    # new values of x_T, params, z and ts (same shapes, dtypes): no retrace
    ts2 = jadeis.time_grid(VPLIN, 8, t_start=0.9)
    out2 = jadeis.sample(eps_fn, S2 * 1.1, X_T + 1.0, MU - 0.2, ts=ts2, **kw)
    out3 = jadeis.sample(eps_fn, S2, -X_T, MU, ts=ts, **kw)
    assert calls["n"] == traced
    assert not np.allclose(np.asarray(out1), np.asarray(out2))
    assert not np.allclose(np.asarray(out1), np.asarray(out3))
    # a new static configuration (shape or solver) traces again: the counter works
    jadeis.sample(eps_fn, S2, X_T[:1], MU, ts=ts, **kw)
    assert calls["n"] > traced


def test_vmap_over_x_T_equals_batched_call():
    oracle = ORACLES["VPLinear"]
    ts = jadeis.time_grid(VPLIN, 64)
    solver = jadeis.DPMSolverPP(order=2)
    x_T = X_T  # same shape as the order tests: the batched call is already compiled
    batched = jadeis.sample(oracle.eps_fn, S2, x_T, MU, schedule=VPLIN, ts=ts, solver=solver)
    per_row = jax.vmap(
        lambda x: jadeis.sample(oracle.eps_fn, S2, x, MU, schedule=VPLIN, ts=ts, solver=solver)
    )(x_T)
    assert per_row.shape == batched.shape
    np.testing.assert_allclose(np.asarray(per_row), np.asarray(batched), rtol=1e-13, atol=1e-14)
    # and each row agrees with the exact flow to the solver's accuracy
    exact = oracle.flow(x_T, MU, S2, ts[0], ts[-1])
    assert float(jnp.max(jnp.abs(batched - exact))) < 1e-3


@pytest.mark.parametrize("ts_dtype", [jnp.float64, jnp.float32])
def test_float32_preserves_dtype_and_is_close_to_float64(ts_dtype):
    oracle = ORACLES["VPLinear"]
    solver = jadeis.DPMSolverPP(order=2)
    ts64 = jadeis.time_grid(VPLIN, 64)
    ts = jadeis.time_grid(VPLIN, 64, dtype=ts_dtype)
    x64 = jadeis.sample(oracle.eps_fn, S2, X_T, MU, schedule=VPLIN, ts=ts64, solver=solver)
    f32 = jnp.float32
    args32 = (S2.astype(f32), X_T.astype(f32), MU.astype(f32))
    kw = dict(schedule=VPLIN, ts=ts, solver=solver)
    x32 = jadeis.sample(oracle.eps_fn, *args32, **kw)
    traj = jadeis.sample_trajectory(oracle.eps_fn, *args32, **kw)
    assert x32.dtype == jnp.float32 and traj.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(traj)))
    np.testing.assert_allclose(np.asarray(x32, np.float64), np.asarray(x64), rtol=1e-4, atol=1e-5)


def test_grad_through_sample():
    oracle = ORACLES["VPLinear"]
    ts = jadeis.time_grid(VPLIN, 64)
    solver = jadeis.DPMSolverPP(order=2)
    w = jnp.asarray([[1.0, -2.0], [0.5, 3.0]])

    def loss(adjoint):
        def f(x_T, mu, s2):
            x0 = jadeis.sample(
                oracle.eps_fn, s2, x_T, mu, schedule=VPLIN, ts=ts, solver=solver, adjoint=adjoint
            )
            return jnp.sum(w * x0**2)

        return f

    args = (X_T, MU, S2)
    g_default = jax.grad(loss(jadeis.DiscreteAdjoint()), argnums=(0, 1, 2))(*args)
    g_backprop = jax.grad(loss(jadeis.Backprop()), argnums=(0, 1, 2))(*args)
    assert tree_allclose(g_default, g_backprop, rtol=1e-10, atol=1e-12)

    # close to the gradient of the exact flow map (second-order discretisation error)
    def exact_loss(x_T, mu, s2):
        return jnp.sum(w * oracle.flow(x_T, mu, s2, ts[0], ts[-1]) ** 2)

    g_exact = jax.grad(exact_loss, argnums=(0, 1, 2))(*args)
    for a, b in zip(g_default, g_exact):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-2, atol=1e-3)
    # and it is not zero
    assert float(jnp.max(jnp.abs(g_default[0]))) > 0.1


# ---------------------------------------------------------------------------------------
# model parameterisations


def _vp_linear_dlog_alpha(t):
    return -(B1 - B0) * t / 2 - B0 / 2


def _models_from_oracle(oracle, sch):
    """x0, v and flow-velocity networks built from the exact eps of the Gaussian oracle."""

    def x0_model(params, x, t, z):
        a, s = sch.alpha(t).astype(x.dtype), sch.sigma(t).astype(x.dtype)
        return (x - s * oracle.eps_fn(params, x, t, z)) / a

    def v_model(params, x, t, z):
        a, s = sch.alpha(t).astype(x.dtype), sch.sigma(t).astype(x.dtype)
        eps = oracle.eps_fn(params, x, t, z)
        return a * eps - s * x0_model(params, x, t, z)

    def flow_model(params, x, t, z):
        # u = dx/dt = alpha' x0 + sigma' eps, derivatives written out per schedule
        a, s = sch.alpha(t).astype(x.dtype), sch.sigma(t).astype(x.dtype)
        if isinstance(sch, jadeis.RectifiedFlow):
            da, ds = -jnp.ones_like(a), jnp.ones_like(s)
        else:  # VPLinear: alpha' = alpha dlog(alpha)/dt, sigma' = -alpha alpha'/sigma
            da = a * _vp_linear_dlog_alpha(t)
            ds = -a * da / s
        return da * x0_model(params, x, t, z) + ds * oracle.eps_fn(params, x, t, z)

    return {"x0": x0_model, "v": v_model, "flow": flow_model}


@pytest.mark.parametrize(
    "sch_name,prediction",
    [
        ("VPLinear", "x0"),
        ("VPLinear", "v"),
        ("VPLinear", "flow"),
        ("RectifiedFlow", "flow"),
        ("RectifiedFlow", "x0"),
        ("RectifiedFlow", "v"),
    ],
)
def test_as_eps_fn_recovers_eps(sch_name, prediction):
    # pointwise over the whole time range: the converter recovers the oracle's eps
    sch = {"VPLinear": VPLIN, "RectifiedFlow": jadeis.RectifiedFlow()}[sch_name]
    oracle = ORACLES["VPLinear"] if sch_name == "VPLinear" else GaussianOracle(sch)
    eps_fn = jadeis.as_eps_fn(_models_from_oracle(oracle, sch)[prediction], sch, prediction)
    ts = jnp.linspace(sch.t_min, sch.t_max, 33)
    got = jax.jit(jax.vmap(lambda t: eps_fn(S2, X_T, t, MU)))(ts)
    want = jax.vmap(lambda t: oracle.eps_fn(S2, X_T, t, MU))(ts)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("prediction", ["x0", "v", "flow"])
def test_as_eps_fn_gives_the_same_samples(prediction):
    oracle = ORACLES["VPLinear"]
    eps_fn = jadeis.as_eps_fn(_models_from_oracle(oracle, VPLIN)[prediction], VPLIN, prediction)
    ts = jadeis.time_grid(VPLIN, 64)
    solver = jadeis.DPMSolverPP(order=2)
    ref = jadeis.sample(oracle.eps_fn, S2, X_T, MU, schedule=VPLIN, ts=ts, solver=solver)
    out = jadeis.sample(eps_fn, S2, X_T, MU, schedule=VPLIN, ts=ts, solver=solver)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-9, atol=1e-10)


def test_as_eps_fn_eps_is_identity():
    oracle = ORACLES["VPLinear"]
    eps_fn = oracle.eps_fn
    assert jadeis.as_eps_fn(eps_fn, VPLIN, "eps") is eps_fn
