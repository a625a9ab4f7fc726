"""Sampling time grids: shape, order, end points, spacing laws, defaults and errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jadeis

SCHEDULES = {
    "VPLinear": jadeis.VPLinear(),
    "VPCosine": jadeis.VPCosine(),
    "DDPMLinear": jadeis.DiscreteVP.ddpm_linear(),
    "RectifiedFlow": jadeis.RectifiedFlow(),
    "VE": jadeis.VE(),
}
SPACINGS = ["logsnr", "time", "quadratic", "karras"]
N = 12


def _spacing_coordinate(sch, ts, spacing, rho=7.0):
    """The coordinate each spacing is uniform in, computed from the returned times."""
    ts = np.asarray(ts, np.float64)
    if spacing == "time":
        return ts
    if spacing == "quadratic":
        return np.sqrt(ts)
    lam = np.asarray(sch.log_snr(jnp.asarray(ts)))
    if spacing == "logsnr":
        return lam
    return np.exp(-lam / rho)  # karras: rho-spacing of sigma/alpha = exp(-lambda)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_grid_shape_order_endpoints_and_spacing(name, spacing):
    sch = SCHEDULES[name]
    ts = jadeis.time_grid(sch, N, spacing)
    assert ts.shape == (N + 1,)
    assert ts.dtype == jnp.float64
    t = np.asarray(ts)
    assert np.all(np.diff(t) < 0), "times must be strictly descending"
    # defaults: from the schedule's t_max down to its t_min, exactly
    assert t[0] == sch.t_max and t[-1] == sch.t_min
    # uniform in the spacing's coordinate
    u = _spacing_coordinate(sch, ts, spacing)
    d = np.diff(u)
    np.testing.assert_allclose(d, np.full_like(d, (u[-1] - u[0]) / N), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_grid_custom_endpoints(spacing):
    sch = jadeis.VPLinear()
    ts = jadeis.time_grid(sch, 5, spacing, t_start=0.8, t_end=0.05)
    assert float(ts[0]) == 0.8 and float(ts[-1]) == 0.05
    assert np.all(np.diff(np.asarray(ts)) < 0)
    u = _spacing_coordinate(sch, ts, spacing)
    np.testing.assert_allclose(np.diff(u), (u[-1] - u[0]) / 5, rtol=1e-9)


def test_grid_n_equals_one():
    sch = jadeis.VPLinear()
    np.testing.assert_array_equal(np.asarray(jadeis.time_grid(sch, 1)), [sch.t_max, sch.t_min])


def test_logsnr_grid_values():
    # written out independently for VPLinear: lambda uniform between its end values,
    # t(lambda) from the quadratic a t^2 + b t = log(1 + e^{-2 lambda})/2
    b0, b1 = 0.1, 20.0
    log_alpha = lambda t: -(b1 - b0) * t**2 / 4 - b0 * t / 2
    lam = lambda t: log_alpha(t) - 0.5 * np.log(-np.expm1(2 * log_alpha(t)))
    lams = np.linspace(lam(1.0), lam(1e-3), 9)
    big_l = 0.5 * np.log1p(np.exp(-2 * lams))
    a, b = (b1 - b0) / 4, b0 / 2
    expected = (-b + np.sqrt(b * b + 4 * a * big_l)) / (2 * a)
    np.testing.assert_allclose(
        np.asarray(jadeis.time_grid(jadeis.VPLinear(), 8)), expected, rtol=1e-12
    )


def test_karras_grid_is_edm_for_ve():
    # EDM (Karras et al. 2022, eq. 5):
    # sigma_i = (smax^(1/rho) + i/n (smin^(1/rho) - smax^(1/rho)))^rho
    sch = jadeis.VE()
    rho = 7.0
    i = np.arange(11) / 10
    expected = (80.0 ** (1 / rho) + i * (0.002 ** (1 / rho) - 80.0 ** (1 / rho))) ** rho
    ts = jadeis.time_grid(sch, 10, "karras", rho=rho)
    np.testing.assert_allclose(np.asarray(ts), expected, rtol=1e-12)
    # rho changes the grid
    ts3 = jadeis.time_grid(sch, 10, "karras", rho=3.0)
    assert not np.allclose(np.asarray(ts3), np.asarray(ts))


@pytest.mark.parametrize(
    "name,t_max,t_min",
    [
        ("VPLinear", 1.0, 1e-3),
        ("VPCosine", 0.9946, 1e-3),
        ("DDPMLinear", 1.0, 1e-3),
        ("RectifiedFlow", 1.0 - 1e-3, 1e-3),
        ("VE", 80.0, 0.002),
    ],
)
def test_defaults_per_schedule(name, t_max, t_min):
    ts = np.asarray(jadeis.time_grid(SCHEDULES[name], 4))
    assert ts[0] == pytest.approx(t_max, rel=1e-15)
    assert ts[-1] == pytest.approx(t_min, rel=1e-15)
    # the default spacing is uniform in log-SNR
    lam = np.asarray(SCHEDULES[name].log_snr(jnp.asarray(ts)))
    np.testing.assert_allclose(np.diff(lam), (lam[-1] - lam[0]) / 4, rtol=1e-9)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_float32_grid(spacing):
    sch = jadeis.VPLinear()
    ts = jadeis.time_grid(sch, N, spacing, dtype=jnp.float32)
    assert ts.dtype == jnp.float32
    t = np.asarray(ts)
    assert np.all(np.diff(t) < 0)
    assert t[0] == np.float32(sch.t_max) and t[-1] == np.float32(sch.t_min)
    np.testing.assert_allclose(t, np.asarray(jadeis.time_grid(sch, N, spacing)), rtol=2e-6)


def test_grid_traced_endpoints_under_jit():
    sch = jadeis.VPLinear()
    f = jax.jit(lambda a, b: jadeis.time_grid(sch, 6, t_start=a, t_end=b))
    np.testing.assert_allclose(
        np.asarray(f(0.7, 0.01)),
        np.asarray(jadeis.time_grid(sch, 6, t_start=0.7, t_end=0.01)),
        rtol=1e-14,
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n": 0}, "n must be"),
        ({"n": -3}, "n must be"),
        ({"n": 2.5}, "n must be"),
        ({"n": 4.0}, "n must be"),
        ({"n": True}, "n must be"),
        ({"n": np.int64(0)}, "n must be"),
        ({"n": 4, "spacing": "uniform"}, "spacing"),
        ({"n": 4, "spacing": "LOGSNR"}, "spacing"),
        ({"n": 4, "t_start": 1.5}, "t_start"),
        ({"n": 4, "t_start": np.float64(1.5)}, "t_start"),
        ({"n": 4, "t_start": jnp.asarray(1.5)}, "t_start"),
        ({"n": 4, "t_end": 0.0}, "t_end"),
        ({"n": 4, "t_end": 1e-4}, "t_end"),
        ({"n": 4, "t_start": 0.2, "t_end": 0.5}, "t_end < t_start"),
        ({"n": 4, "t_start": 0.5, "t_end": 0.5}, "t_end < t_start"),
    ],
)
def test_grid_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jadeis.time_grid(jadeis.VPLinear(), **kwargs)
