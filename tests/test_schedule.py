"""Noise schedules (docs/math/schedules.md): identities, inverses, beta tables, pytree
behaviour, errors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy import integrate

import jadeis

SCHEDULES = {
    "VPLinear": jadeis.VPLinear(),
    "VPCosine": jadeis.VPCosine(),
    "DDPMLinear": jadeis.DiscreteVP.ddpm_linear(),
    "ScaledLinear": jadeis.DiscreteVP.scaled_linear(),
    "RectifiedFlow": jadeis.RectifiedFlow(),
    "VE": jadeis.VE(),
}
VP_NAMES = ["VPLinear", "VPCosine", "DDPMLinear", "ScaledLinear"]
ALL = pytest.mark.parametrize("name", list(SCHEDULES))
VP = pytest.mark.parametrize("name", VP_NAMES)


def dense_times(sch, n=2001, dtype=jnp.float64):
    """n times covering [t_min, t_max], both end points included."""
    return jnp.linspace(sch.t_min, sch.t_max, n, dtype=dtype)


@jax.jit
def evaluate(sch, t):
    """Every schedule method at the times t, in one compiled call (the schedule is traced)."""
    lam = sch.log_snr(t)
    return {
        "alpha": sch.alpha(t),
        "sigma": sch.sigma(t),
        "log_alpha": sch.log_alpha(t),
        "log_sigma": sch.log_sigma(t),
        "lam": lam,
        "back": sch.t_from_log_snr(lam),
        "dlam": jax.vmap(jax.grad(sch.log_snr))(t),
    }


@jax.jit
def transformed_calls(sch, t):
    """log_snr under vmap (over t, over stacked schedules) and grad wrt the schedule."""
    stacked = jax.tree.map(lambda v: jnp.stack([jnp.asarray(v), jnp.asarray(v)]), sch)
    return {
        "vmap_t": jax.vmap(sch.log_snr)(t),
        "vmap_schedule": jax.vmap(lambda s: s.log_snr(t))(stacked)[1],
        "grad_schedule": jax.grad(lambda s: s.log_snr(t).sum())(sch),
    }


# ---------------------------------------------------------------------------------------
# inverse round trip


@ALL
def test_round_trip_float64(name):
    sch = SCHEDULES[name]
    t = dense_times(sch)
    back = evaluate(sch, t)["back"]
    assert back.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(back), np.asarray(t), rtol=1e-12, atol=0)


@ALL
def test_round_trip_lambda_side_float64(name):
    # the other composition: log_snr(t_from_log_snr(lam)) == lam on the valid lambda range
    sch = SCHEDULES[name]
    lam = jnp.linspace(sch.log_snr(sch.t_max), sch.log_snr(sch.t_min), 1001)
    np.testing.assert_allclose(
        np.asarray(sch.log_snr(sch.t_from_log_snr(lam))), np.asarray(lam), rtol=0, atol=1e-11
    )


@ALL
def test_round_trip_float32(name):
    sch = SCHEDULES[name]
    t = dense_times(sch, dtype=jnp.float32)
    out = evaluate(sch, t)
    lam, back = out["lam"], out["back"]
    assert lam.dtype == jnp.float32 and back.dtype == jnp.float32
    # a few ulps of float32, relative to t (t spans 1e-3 .. 80)
    np.testing.assert_allclose(np.asarray(back), np.asarray(t), rtol=1e-5, atol=0)
    # and float32 lambda agrees with the float64 one
    lam64 = evaluate(sch, t.astype(jnp.float64))["lam"]
    np.testing.assert_allclose(np.asarray(lam, np.float64), np.asarray(lam64), atol=1e-4)


@ALL
@settings(max_examples=40, deadline=None)
@given(u=st.floats(min_value=0.0, max_value=1.0, allow_nan=False))
def test_round_trip_property(name, u):
    sch = SCHEDULES[name]
    t = sch.t_min + u * (sch.t_max - sch.t_min)
    t = min(max(t, sch.t_min), sch.t_max)
    back = float(sch.t_from_log_snr(sch.log_snr(jnp.asarray(t, jnp.float64))))
    assert back == pytest.approx(t, rel=1e-12, abs=0)
    back32 = sch.t_from_log_snr(sch.log_snr(jnp.asarray(t, jnp.float32)))
    assert back32.dtype == jnp.float32
    assert float(back32) == pytest.approx(float(np.float32(t)), rel=1e-5, abs=0)


# ---------------------------------------------------------------------------------------
# monotonicity and identities


@ALL
def test_log_snr_strictly_decreasing(name):
    sch = SCHEDULES[name]
    out = evaluate(sch, dense_times(sch))
    lam = np.asarray(out["lam"])
    assert np.all(np.isfinite(lam))
    assert np.all(np.diff(lam) < 0)
    # and its derivative is negative (autodiff through the schedule)
    assert np.all(np.asarray(out["dlam"]) < 0)


@ALL
def test_log_snr_is_log_alpha_over_sigma(name):
    sch = SCHEDULES[name]
    out = {k: np.asarray(v) for k, v in evaluate(sch, dense_times(sch)).items()}
    direct = np.log(out["alpha"]) - np.log(out["sigma"])
    np.testing.assert_allclose(out["lam"], direct, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out["log_alpha"], np.log(out["alpha"]), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(out["log_sigma"], np.log(out["sigma"]), rtol=1e-12, atol=1e-15)


@VP
def test_vp_alpha2_plus_sigma2_is_one(name):
    sch = SCHEDULES[name]
    out = {k: np.asarray(v) for k, v in evaluate(sch, dense_times(sch)).items()}
    np.testing.assert_allclose(out["alpha"] ** 2 + out["sigma"] ** 2, 1.0, rtol=0, atol=1e-14)
    assert sch.prior_std == 1.0
    # alpha decreases, sigma increases
    assert np.all(np.diff(out["alpha"]) < 0)
    assert np.all(np.diff(out["sigma"]) > 0)


def test_rectified_flow_closed_form():
    sch = jadeis.RectifiedFlow()
    t = np.linspace(sch.t_min, sch.t_max, 101)
    np.testing.assert_allclose(np.asarray(sch.alpha(jnp.asarray(t))), 1 - t, rtol=1e-13)
    np.testing.assert_allclose(np.asarray(sch.sigma(jnp.asarray(t))), t, rtol=1e-14)
    np.testing.assert_allclose(
        np.asarray(sch.log_snr(jnp.asarray(t))), np.log((1 - t) / t), rtol=1e-12, atol=1e-14
    )
    assert float(sch.log_snr(0.5)) == 0.0


def test_ve_closed_form():
    sch = jadeis.VE(t_min=0.01, t_max=50.0)
    t = np.geomspace(sch.t_min, sch.t_max, 101)
    np.testing.assert_allclose(np.asarray(sch.alpha(jnp.asarray(t))), 1.0, rtol=0)
    np.testing.assert_allclose(np.asarray(sch.sigma(jnp.asarray(t))), t, rtol=1e-15)
    np.testing.assert_allclose(np.asarray(sch.log_snr(jnp.asarray(t))), -np.log(t), rtol=1e-14)
    assert sch.prior_std == 50.0
    assert jadeis.VE().prior_std == 80.0


def test_vp_cosine_matches_nichol_dhariwal():
    # alpha_bar(t) = f(t) / f(0), f(t) = cos((t + s)/(1 + s) pi/2)^2, written out independently
    s = 0.008
    sch = jadeis.VPCosine()
    t = np.linspace(sch.t_min, sch.t_max, 1001)
    f = lambda u: np.cos((u + s) / (1 + s) * np.pi / 2) ** 2
    alpha_bar = f(t) / f(0.0)
    np.testing.assert_allclose(np.asarray(sch.alpha(jnp.asarray(t))) ** 2, alpha_bar, rtol=1e-12)
    assert float(sch.alpha(0.0)) == pytest.approx(1.0, abs=1e-15)
    # float32 keeps relative accuracy of log alpha near t = 0 (no cancellation)
    t32 = jnp.asarray([1e-3, 1e-2, 0.1], jnp.float32)
    la32 = np.asarray(sch.log_alpha(t32), np.float64)
    la64 = 0.5 * np.log(f(np.asarray(t32, np.float64)) / f(0.0))
    np.testing.assert_allclose(la32, la64, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# VPLinear against the integral of beta(t)


@pytest.mark.parametrize("beta_min,beta_max", [(0.1, 20.0), (0.5, 5.0), (0.0, 12.0)])
def test_vp_linear_closed_form_vs_integral(beta_min, beta_max):
    sch = jadeis.VPLinear(beta_min=beta_min, beta_max=beta_max)
    beta = lambda u: beta_min + u * (beta_max - beta_min)
    ts = np.linspace(sch.t_min, sch.t_max, 25)
    # log alpha_t = -1/2 int_0^t beta(u) du; sigma_t^2 = 1 - exp(-int_0^t beta)
    integral = np.array([integrate.quad(beta, 0.0, t, epsrel=1e-13)[0] for t in ts])
    np.testing.assert_allclose(
        np.asarray(sch.log_alpha(jnp.asarray(ts))), -0.5 * integral, rtol=1e-12
    )
    np.testing.assert_allclose(
        np.asarray(sch.sigma(jnp.asarray(ts))) ** 2, -np.expm1(-integral), rtol=1e-12
    )
    # and with the trapezoid rule on a fine grid (exact for a linear integrand)
    u = np.linspace(0.0, 0.7, 10001)
    trap = np.trapezoid(beta(u), u)
    assert float(sch.log_alpha(0.7)) == pytest.approx(-0.5 * trap, rel=1e-12)


# ---------------------------------------------------------------------------------------
# DiscreteVP against its beta table


def _ddpm_betas():
    return np.linspace(1e-4, 0.02, 1000)


def _scaled_linear_betas():
    return np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2


@pytest.mark.parametrize(
    "make,betas",
    [
        (jadeis.DiscreteVP.ddpm_linear, _ddpm_betas()),
        (jadeis.DiscreteVP.scaled_linear, _scaled_linear_betas()),
        (
            lambda: jadeis.DiscreteVP(np.array([0.1, 0.2, 0.3, 0.45])),
            np.array([0.1, 0.2, 0.3, 0.45]),
        ),
    ],
)
def test_discrete_vp_matches_beta_table(make, betas):
    sch = make()
    n = betas.size
    t_n = np.arange(1, n + 1) / n
    assert sch.t_min == pytest.approx(1.0 / n) and sch.t_max == 1.0
    log_alpha = np.asarray(sch.log_alpha(jnp.asarray(t_n)))
    # log alpha_{t_n} = 1/2 cumsum log(1 - beta)
    np.testing.assert_allclose(log_alpha, 0.5 * np.cumsum(np.log1p(-betas)), rtol=1e-12)
    # independently: alpha_{t_n}^2 = cumprod(1 - beta) (diffusers' alphas_cumprod)
    alphas_cumprod = np.cumprod(1.0 - betas)
    np.testing.assert_allclose(
        np.asarray(sch.alpha(jnp.asarray(t_n))) ** 2, alphas_cumprod, rtol=1e-12
    )
    np.testing.assert_allclose(
        np.asarray(sch.sigma(jnp.asarray(t_n))) ** 2, 1.0 - alphas_cumprod, rtol=1e-10
    )
    # between grid points log alpha is linear in t
    mid = 0.5 * (t_n[1:] + t_n[:-1])
    np.testing.assert_allclose(
        np.asarray(sch.log_alpha(jnp.asarray(mid))),
        0.5 * (log_alpha[1:] + log_alpha[:-1]),
        rtol=1e-12,
    )
    # and the inverse lands back on the grid points
    np.testing.assert_allclose(
        np.asarray(sch.t_from_log_snr(sch.log_snr(jnp.asarray(t_n)))), t_n, rtol=1e-12
    )


# ---------------------------------------------------------------------------------------
# pytrees under jit / vmap / grad


@ALL
def test_schedule_is_pytree_and_jit_vmap_grad(name):
    sch = SCHEDULES[name]
    leaves, treedef = jax.tree.flatten(sch)
    assert leaves, "a schedule must have array/float leaves"
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert type(rebuilt) is type(sch)
    t = dense_times(sch)

    # methods work with the schedule itself passed through jit (its leaves become tracers)
    # and agree with eager evaluation
    jitted = evaluate(sch, t)
    eager = {
        "alpha": sch.alpha(t),
        "sigma": sch.sigma(t),
        "lam": sch.log_snr(t),
        "back": sch.t_from_log_snr(sch.log_snr(t)),
    }
    for k, v in eager.items():
        np.testing.assert_allclose(np.asarray(jitted[k]), np.asarray(v), rtol=1e-13, atol=1e-15)

    transformed = transformed_calls(sch, t)
    # vmap over t (scalar calls) equals the elementwise call
    np.testing.assert_allclose(
        np.asarray(transformed["vmap_t"]), np.asarray(eager["lam"]), rtol=1e-13, atol=1e-14
    )
    # vmap over a batch of two schedules (stacked leaves) equals calling each one
    np.testing.assert_allclose(
        np.asarray(transformed["vmap_schedule"]), np.asarray(eager["lam"]), rtol=1e-13, atol=1e-14
    )
    # the gradient with respect to the schedule's own leaves is a schedule-shaped pytree
    gs = transformed["grad_schedule"]
    assert jax.tree.structure(gs) == treedef
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(gs))

    # grad of lambda(t) against a central finite difference (interior points)
    dt = 1e-6 * t
    fd = (evaluate(sch, t + dt)["lam"] - evaluate(sch, t - dt)["lam"]) / (2 * dt)
    # DiscreteVP is piecewise linear: the finite difference can straddle a kink
    rtol = 2e-2 if name in ("DDPMLinear", "ScaledLinear") else 1e-6
    np.testing.assert_allclose(np.asarray(jitted["dlam"])[1:-1], np.asarray(fd)[1:-1], rtol=rtol)


def test_schedule_parameters_differentiable():
    # d lambda_t / d beta_max for VPLinear in closed form: lambda = log a - 1/2 log(1 - a^2)
    # with log a = -(b1 - b0) t^2/4 - b0 t/2, so d lambda/d log a = 1/(1 - a^2)
    t = 0.5

    def lam(b1):
        return jadeis.VPLinear(beta_max=b1).log_snr(t)

    b1 = 20.0
    log_a = -(b1 - 0.1) * t**2 / 4 - 0.1 * t / 2
    expected = (-(t**2) / 4) / (1 - math.exp(2 * log_a))
    assert float(jax.grad(lam)(b1)) == pytest.approx(expected, rel=1e-12)
    # also when the schedule is built inside jit (its checks must not concretise tracers)
    assert float(jax.jit(jax.grad(lam))(b1)) == pytest.approx(expected, rel=1e-12)
    cos_grad = jax.jit(jax.grad(lambda s: jadeis.VPCosine(s=s).log_snr(t)))(0.008)
    assert np.isfinite(float(cos_grad))
    ve = jax.jit(jax.vmap(lambda tm: jadeis.VE(t_max=tm).t_from_log_snr(0.0)))(jnp.ones(2))
    np.testing.assert_allclose(np.asarray(ve), 1.0)


# ---------------------------------------------------------------------------------------
# constructor errors


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: jadeis.VPLinear(beta_min=1.0, beta_max=0.5), "beta_min"),
        (lambda: jadeis.VPLinear(beta_min=-0.1), "beta_min"),
        (lambda: jadeis.VPLinear(t_min=0.0), "t_min"),
        (lambda: jadeis.VPLinear(t_min=0.5, t_max=0.4), "t_max"),
        (lambda: jadeis.VPCosine(s=0.0), "s must be positive"),
        (lambda: jadeis.VPCosine(t_max=1.0), "t_max"),
        (lambda: jadeis.VPCosine(t_min=-0.1), "t_min"),
        (lambda: jadeis.DiscreteVP(np.full((2, 2), 0.1)), "betas"),
        (lambda: jadeis.DiscreteVP(np.array([0.1])), "betas"),
        (lambda: jadeis.DiscreteVP(np.array([0.1, 1.0])), "beta"),
        (lambda: jadeis.DiscreteVP(np.array([0.1, 0.0])), "beta"),
        (lambda: jadeis.DiscreteVP(np.array([0.1, np.nan])), "beta"),
        (lambda: jadeis.RectifiedFlow(t_max=1.0), "t_max"),
        (lambda: jadeis.RectifiedFlow(t_min=0.0), "t_min"),
        (lambda: jadeis.VE(t_min=0.0), "t_min"),
        (lambda: jadeis.VE(t_min=5.0, t_max=1.0), "t_max"),
    ],
)
def test_constructor_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()
