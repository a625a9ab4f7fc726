"""diffusers conventions for DiscreteVP: timesteps, spacings, final step to sigma = 0,
zero terminal SNR, prediction-type names. The references are DDIM / DPM-Solver++(2M) loops
on integer timesteps written in numpy from diffusers' formulas (float64)."""

import re

import jax.numpy as jnp
import numpy as np
import pytest

import jadeis

N = 1000
MU, S2 = 0.7, 0.25  # data N(MU, S2): the exact eps / v of the oracle below


def _eps_np(x, ac):
    a, s = np.sqrt(ac), np.sqrt(1.0 - ac)
    return s * (x - a * MU) / (a * a * S2 + s * s)


def _v_np(x, ac):
    a, s = np.sqrt(ac), np.sqrt(1.0 - ac)
    eps = _eps_np(x, ac)
    return a * eps - s * (x - s * eps) / a


def _model(sch, kind="eps"):
    """The same oracle as a jadeis model on integer timesteps: t -> k -> alphas_cumprod[k]."""
    table = np.asarray(sch.alphas_cumprod)

    def fn(params, x, t, z):
        k = jnp.round(sch.t_to_timestep(t)).astype(jnp.int32)
        ac = jnp.asarray(table)[k]
        a, s = jnp.sqrt(ac), jnp.sqrt(1.0 - ac)
        eps = s * (x - a * MU) / (a * a * S2 + s * s)
        return eps if kind == "eps" else a * eps - s * (x - s * eps) / a

    return fn


def ddim_np(x, ac, timesteps, final_ac, prev=None):
    """diffusers' DDIMScheduler.step, eta = 0, epsilon prediction."""
    for i, k in enumerate(timesteps):
        kp = prev[i] if prev is not None else (timesteps[i + 1] if i + 1 < len(timesteps) else -1)
        a_t = ac[k]
        a_p = ac[kp] if kp >= 0 else final_ac
        eps = _eps_np(x, a_t)
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        x = a_p**0.5 * x0 + (1 - a_p) ** 0.5 * eps
    return x


def dpmpp2m_np(x, ac, timesteps, final_zero, pred="eps", lower_order_final=True):
    """diffusers' DPMSolverMultistepScheduler, dpmsolver++, solver_order=2, midpoint."""
    n = len(timesteps)
    sig = np.sqrt((1 - ac) / ac)[timesteps]
    sig = np.concatenate([sig, [0.0 if final_zero else np.sqrt((1 - ac[0]) / ac[0])]])
    alpha = 1 / np.sqrt(sig**2 + 1)
    sigma = sig * alpha
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)
    outs, lower = [], 0
    for i, k in enumerate(timesteps):
        if pred == "eps":
            x0 = (x - sigma[i] * _eps_np(x, ac[k])) / alpha[i]
        else:
            x0 = alpha[i] * x - sigma[i] * _v_np(x, ac[k])
        outs.append(x0)
        lof = i == n - 1 and ((lower_order_final and n < 15) or final_zero)
        los = i == n - 2 and lower_order_final and n < 15
        h = lam[i + 1] - lam[i]
        em = np.expm1(-h)
        if lower < 1 or lof:
            x = (sigma[i + 1] / sigma[i]) * x - alpha[i + 1] * em * x0
        else:
            r0 = (lam[i] - lam[i - 1]) / h
            d1 = (outs[-1] - outs[-2]) / r0
            x = (sigma[i + 1] / sigma[i]) * x - alpha[i + 1] * em * outs[-1] \
                - 0.5 * alpha[i + 1] * em * d1
        del los
        lower = min(lower + 1, 2)
    return x


X_T = np.linspace(-1.5, 2.0, 6)


def _sample(sch, ts, solver, kind="eps"):
    fn = _model(sch, kind)
    if kind != "eps":
        fn = jadeis.as_eps_fn(fn, sch, "v_prediction")
    return np.asarray(jadeis.sample(fn, None, jnp.asarray(X_T), None, schedule=sch, ts=ts,
                                    solver=solver))


@pytest.fixture(scope="module")
def sch():
    return jadeis.DiscreteVP.scaled_linear()


@pytest.mark.parametrize(
    "spacing,offset,n,final",
    [("leading", 1, 10, None), ("trailing", 0, 20, "zero"), ("linspace", 0, 10, "zero")],
)
def test_ddim_matches_diffusers_loop(sch, spacing, offset, n, final):
    ac = np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, N) ** 2)
    k = jadeis.diffusers_timesteps(N, n, spacing, steps_offset=offset, convention="ddim")
    ts = jadeis.time_grid(sch, n, spacing, steps_offset=offset, final=final, convention="ddim")
    np.testing.assert_allclose(np.asarray(ts[:-1]), (k + 1) / N, rtol=0, atol=1e-15)
    final_ac = 1.0 if final == "zero" else ac[0]  # set_alpha_to_one
    if spacing != "linspace":
        # diffusers' own prev_timestep = k - N // n is the next timestep on these grids
        prev = k - N // n
        np.testing.assert_array_equal(prev[:-1], k[1:])
        assert prev[-1] < 0
    else:
        prev = None  # (DDIM's linspace prev_timestep is not the next timestep; see docs)
    ref = ddim_np(X_T.copy(), ac, k, final_ac, prev)
    for solver in (jadeis.DDIM(), jadeis.DPMSolverPP(order=1)):
        np.testing.assert_allclose(_sample(sch, ts, solver), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "spacing,n,final",
    [("leading", 10, None), ("trailing", 10, "zero"), ("linspace", 20, "zero")],
)
def test_dpmsolverpp_2m_matches_diffusers_loop(sch, spacing, n, final):
    ac = np.asarray(sch.alphas_cumprod)
    k = jadeis.diffusers_timesteps(N, n, spacing, convention="dpmsolver")
    ts = jadeis.time_grid(sch, n, spacing, final=final, convention="dpmsolver")
    ref = dpmpp2m_np(X_T.copy(), ac, k, final == "zero")
    got = _sample(sch, ts, jadeis.DPMSolverPP(order=2, variant="midpoint"))
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)


def test_zero_terminal_snr_v_prediction_matches_diffusers(sch):
    # DPMSolverMultistepScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction",
    # timestep_spacing="trailing"): alphas_cumprod[-1] floored at 2**-24, first step from t = 1
    zs = jadeis.DiscreteVP.scaled_linear(rescale_betas_zero_snr=True)
    ac = np.cumprod(1 - jadeis.rescale_betas_zero_snr(np.linspace(0.00085**0.5, 0.012**0.5,
                                                                   N) ** 2))
    ac[-1] = 2.0**-24
    np.testing.assert_allclose(np.asarray(zs.alphas_cumprod), ac, rtol=1e-12)
    ts = jadeis.time_grid(zs, 10, "trailing", final="zero")
    assert float(ts[0]) == 1.0
    k = jadeis.diffusers_timesteps(N, 10, "trailing")
    ref = dpmpp2m_np(X_T.copy(), ac, k, True, pred="v")
    got = _sample(zs, ts, jadeis.DPMSolverPP(order=2, variant="midpoint"), kind="v")
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, ref, rtol=1e-8, atol=1e-10)


def test_zero_snr_table_properties(sch):
    betas = np.linspace(0.00085**0.5, 0.012**0.5, N) ** 2
    b = jadeis.rescale_betas_zero_snr(betas)
    ac0, ac = np.cumprod(1 - betas), np.cumprod(1 - b)
    assert b[-1] == 1.0 and ac[-1] == 0.0
    assert np.all(np.diff(ac) < 0) and np.all((b[:-1] > 0) & (b[:-1] < 1))
    assert np.sqrt(ac[0]) == pytest.approx(np.sqrt(ac0[0]), rel=1e-12)  # first unchanged
    # sqrt(alphas_cumprod) is an affine map of the original one
    s0, s = np.sqrt(ac0), np.sqrt(ac)
    np.testing.assert_allclose(s, (s0 - s0[-1]) * s0[0] / (s0[0] - s0[-1]), atol=1e-12)
    zs = jadeis.DiscreteVP(betas, rescale_betas_zero_snr=True)
    assert float(zs.alphas_cumprod[-1]) == pytest.approx(2.0**-24, rel=1e-12)
    assert np.isfinite(float(zs.log_snr(1.0)))
    np.testing.assert_allclose(
        np.asarray(jadeis.DiscreteVP.from_alphas_cumprod(ac).log_alpha_table),
        np.asarray(zs.log_alpha_table), rtol=1e-12)


def test_timestep_round_trip(sch):
    k = np.arange(N)
    t = sch.timestep_to_t(k)
    np.testing.assert_allclose(np.asarray(t), (k + 1) / N, rtol=1e-15)
    np.testing.assert_allclose(np.asarray(sch.t_to_timestep(t)), k, atol=1e-9)
    k32 = np.asarray(jnp.round(sch.t_to_timestep(t.astype(jnp.float32))))
    np.testing.assert_array_equal(k32, k)
    # the table nodes are diffusers' alphas_cumprod at those timesteps
    np.testing.assert_allclose(np.asarray(sch.alpha(t)) ** 2, np.asarray(sch.alphas_cumprod),
                               rtol=1e-12)


def test_from_alphas_cumprod_equals_betas_constructor(sch):
    ac = np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, N) ** 2)
    other = jadeis.DiscreteVP.from_alphas_cumprod(ac)
    np.testing.assert_allclose(np.asarray(other.log_alpha_table),
                               np.asarray(sch.log_alpha_table), rtol=1e-12)
    assert other.t_min == sch.t_min and other.t_max == sch.t_max
    with pytest.raises(ValueError, match="strictly decreasing"):
        jadeis.DiscreteVP.from_alphas_cumprod(ac[::-1])


def test_final_zero_ends_at_clean_data(sch):
    ts = jadeis.time_grid(sch, 8, final="zero")
    assert ts.shape == (9,) and float(ts[-1]) == 0.0 and float(ts[-2]) == sch.t_min
    assert float(sch.sigma(0.0)) == 0.0 and float(sch.alpha(0.0)) == 1.0
    for solver in (jadeis.DPMSolverPP(order=3), jadeis.DPMSolver(order=2), jadeis.DDIM()):
        x0 = _sample(sch, ts, solver)
        assert np.all(np.isfinite(x0))


def test_as_eps_fn_diffusers_names(sch):
    x = jnp.asarray(X_T)
    out = lambda p, x, t, z: 0.3 * x - 0.1  # noqa: E731
    for alias, name in (("epsilon", "eps"), ("v_prediction", "v"), ("sample", "x0")):
        a = jadeis.as_eps_fn(out, sch, alias)(None, x, 0.4, None)
        b = jadeis.as_eps_fn(out, sch, name)(None, x, 0.4, None)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="v_prediction"):
        jadeis.as_eps_fn(out, sch, "velocity")


def test_diffusers_spacing_needs_discrete_schedule():
    with pytest.raises(ValueError, match="DiscreteVP"):
        jadeis.time_grid(jadeis.VPLinear(), 10, "trailing")
    with pytest.raises(ValueError, match="final='zero'"):
        jadeis.time_grid(jadeis.DiscreteVP.ddpm_linear(), 10, "leading")  # ends at k = 0


def test_diffusers_helpers_refuse_what_they_would_ignore():
    """Unknown spacing names, convention values, non-integer steps_offset or
    num_train_timesteps, and options that a spacing ignores are a ValueError naming the
    argument (each was accepted and ignored, or truncated)."""
    sch = jadeis.DiscreteVP.scaled_linear()
    cases = [
        (lambda: jadeis.diffusers_timesteps(1000, 10, "bogus"), "spacing must be one of"),
        (lambda: jadeis.diffusers_timesteps(1000, 10, "leading", steps_offset=0.5),
         "steps_offset must be an int"),
        (lambda: jadeis.diffusers_timesteps(1000.5, 10, "leading"),
         "num_train_timesteps must be an int"),
        (lambda: jadeis.diffusers_timesteps(1000, 2.0, "leading"), "n must be an int"),
        (lambda: jadeis.diffusers_timesteps(1000, 10, "trailing", convention="DDIM"),
         "convention must be one of"),
        (lambda: jadeis.time_grid(sch, 10, "leading", steps_offset=1.5),
         "steps_offset must be an int"),
        (lambda: jadeis.time_grid(sch, 10, "leading", steps_offset=-1),
         "steps_offset must be an int >= 0"),
        (lambda: jadeis.time_grid(sch, 10, "trailing", convention=None),
         "convention must be one of"),
        (lambda: jadeis.time_grid(jadeis.VPLinear(), 10, convention="dpmsolver"),
         "convention='dpmsolver' applies to diffusers' spacings"),
        (lambda: jadeis.time_grid(jadeis.VPLinear(), 10, steps_offset=1),
         "steps_offset=1 applies to diffusers' spacings"),
    ]
    for make, match in cases:
        with pytest.raises(ValueError, match=re.escape(match)):
            make()
    # NumPy integers are integers; diffusers ignores steps_offset outside "leading", so do we
    k = jadeis.diffusers_timesteps(np.int64(1000), np.int64(10), "leading",
                                   steps_offset=np.int64(1))
    assert k.tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    np.testing.assert_array_equal(jadeis.diffusers_timesteps(1000, 10, "trailing", steps_offset=1),
                                  jadeis.diffusers_timesteps(1000, 10, "trailing"))
