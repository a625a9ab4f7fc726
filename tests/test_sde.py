"""SDE samplers (docs/math/samplers.md) on Gaussian data N(mu, s^2): distribution, noise, errors.

With the exact eps of Gaussian data every SDE sampler is a linear-Gaussian Markov chain
(second order: in the pair (x_i, x_{i-1})), so the mean and variance of its output are
computable exactly. ``chain_moments`` does that in numpy from the formulas in
docs/math/samplers.md, written out independently of the library. The tests then check that

- sampled moments (a big batch) equal the chain's moments within statistical tolerances
  derived from the sample size (the library implements the documented step, noise included);
- the chain's moments converge to the data distribution's as N grows, at the rate of the
  sampler (so the sampler reproduces the data distribution);
- sampled moments equal the data moments within the statistical tolerance plus the
  chain's (known, small) discretisation bias.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jadeis

from ._shared import np_alpha, np_lambda, np_sigma
from .helpers import SDE_SOLVERS, GaussianOracle

SCH = jadeis.VPLinear()
ORACLE = GaussianOracle(SCH)
MU_F, S2_F = 0.7, 0.09
MU, S2 = jnp.asarray(MU_F), jnp.asarray(S2_F)
SDE_IDS = ["SDEDPMSolver", "SDEDPMSolverPP1", "SDEDPMSolverPP2"]
KINDS = dict(zip(SDE_IDS, ["eps1", "data1", "data2"]))


def chain_moments(ts, kind, m0=0.0, v0=1.0):
    """Exact mean and variance (per coordinate) of the SDE sampler's output.

    eps(x, s) = sigma_s (x - alpha_s mu)/(alpha_s^2 s^2 + sigma_s^2) = pe x + qe, and the data
    prediction D = (x - sigma eps)/alpha = pd x + qd, are affine in x. Steps
    (docs/math/samplers.md):
      eps1:  x_t = (alpha_t/alpha_s) x_s - 2 sigma_t expm1(h) eps_s + sigma_t sqrt(expm1(2h)) xi
      data1: x_t = (sigma_t/sigma_s) e^{-h} x_s - alpha_t expm1(-2h) D_s
                   + sigma_t sqrt(-expm1(-2h)) xi
      data2: data1 + the D1 term with the exact phi weight,
             2 alpha_t int_0^h e^{2(u-h)} u du (D_s - D_prev)/h_prev
             = alpha_t (2h + expm1(-2h))/2 (D_s - D_prev)/h_prev
             (the documented -alpha_t expm1(-2h) D1/2 agrees with it to O(h^3) per step),
             first step first order.
    """
    m, v = m0, v0  # mean, variance of x_i
    m_prev, v_prev, cov = m0, v0, v0  # of x_{i-1}, and Cov(x_i, x_{i-1})
    p_prev = q_prev = None
    for i in range(len(ts) - 1):
        s, t = ts[i], ts[i + 1]
        h = np_lambda(t) - np_lambda(s)
        a_s, s_s, a_t, s_t = np_alpha(s), np_sigma(s), np_alpha(t), np_sigma(t)
        den = a_s**2 * S2_F + s_s**2
        pe, qe = s_s / den, -s_s * a_s * MU_F / den
        pd, qd = (1 - s_s * pe) / a_s, -s_s * qe / a_s
        b = 0.0  # coefficient of x_{i-1}
        if kind == "eps1":
            a = a_t / a_s - 2 * s_t * np.expm1(h) * pe
            c = -2 * s_t * np.expm1(h) * qe
            noise = s_t * np.sqrt(np.expm1(2 * h))
        else:
            w0 = -a_t * np.expm1(-2 * h)
            a = s_t / s_s * np.exp(-h) + w0 * pd
            c = w0 * qd
            noise = s_t * np.sqrt(-np.expm1(-2 * h))
            if kind == "data2" and i > 0:
                h_prev = np_lambda(s) - np_lambda(ts[i - 1])
                w1 = a_t * (2 * h + np.expm1(-2 * h)) / 2 / h_prev
                a += w1 * pd
                c += w1 * (qd - q_prev)
                b = -w1 * p_prev
        m_new = a * m + b * m_prev + c
        v_new = a * a * v + 2 * a * b * cov + b * b * v_prev + noise**2
        cov_new = a * v + b * cov
        m_prev, v_prev, cov = m, v, cov_new
        m, v = m_new, v_new
        p_prev, q_prev = pd, qd
    return m, v


def data_moments(t):
    """Mean and variance of the data distribution diffused to time t (t = t_min ~ data)."""
    return np_alpha(t) * MU_F, np_alpha(t) ** 2 * S2_F + np_sigma(t) ** 2


# ---------------------------------------------------------------------------------------
# the chain converges to the data distribution (numpy only)


@pytest.mark.parametrize("sid", SDE_IDS)
def test_chain_moments_converge_to_data(sid):
    kind = KINDS[sid]
    biases = []
    for n in (50, 100, 200, 400):
        ts = np.asarray(jadeis.time_grid(SCH, n))
        m, v = chain_moments(ts, kind)
        m_data, v_data = data_moments(ts[-1])
        assert abs(m - m_data) < 1e-3
        biases.append(v / v_data - 1)
    biases = np.abs(biases)
    # measured |var bias| at N = 50..400: SDE-DPM-Solver-1 .0066 -> .00013 (4x per doubling),
    # SDE-DPM-Solver++(1) .17 -> .024 (2x: first order in the variance), ++(2M) 4x.
    assert np.all(biases[1:] < 0.6 * biases[:-1]), biases
    assert biases[-1] < 0.03
    if kind != "data1":
        assert np.all(biases[1:] < 0.35 * biases[:-1]), biases
        assert biases[1] < 0.02  # already at N = 100


# ---------------------------------------------------------------------------------------
# big-batch sampling against the chain's and the data's moments

BATCH, DIM, N_STEPS = 20000, 4, 100


@pytest.mark.parametrize("solver,sid", list(zip(SDE_SOLVERS, SDE_IDS)), ids=SDE_IDS)
def test_sde_reproduces_gaussian_data_moments(solver, sid):
    ts = jadeis.time_grid(SCH, N_STEPS)
    x_T = jax.random.normal(jax.random.key(1), (BATCH, DIM)) * SCH.prior_std
    x0 = jadeis.sample(
        ORACLE.eps_fn, S2, x_T, MU, schedule=SCH, ts=ts, solver=solver, key=jax.random.key(7)
    )
    x = np.asarray(x0).ravel()  # the coordinates are independent and identically distributed
    n = x.size
    mean, var = x.mean(), x.var(ddof=1)
    # start the chain from the moments of this x_T sample: only the sampler's noise is random
    x_T_np = np.asarray(x_T).ravel()
    m_chain, v_chain = chain_moments(np.asarray(ts), KINDS[sid], x_T_np.mean(), x_T_np.var())
    m_data, v_data = data_moments(float(ts[-1]))
    # standard errors of the sample mean and variance of n Gaussian draws
    se_mean = np.sqrt(v_chain / n)
    se_var = v_chain * np.sqrt(2.0 / (n - 1))
    z = 5.0
    assert abs(mean - m_chain) < z * se_mean, (mean, m_chain, se_mean)
    assert abs(var - v_chain) < z * se_var, (var, v_chain, se_var)
    # against the data distribution: the same tolerance plus the chain's discretisation bias
    assert abs(mean - m_data) < z * se_mean + abs(m_chain - m_data)
    assert abs(var - v_data) < z * se_var + abs(v_chain - v_data), (var, v_data, v_chain)
    # the tolerance is tight enough to matter: within 4% of the data variance
    assert z * se_var < 0.04 * v_data
    if sid != "SDEDPMSolverPP1":
        assert abs(var / v_data - 1) < 0.04


# ---------------------------------------------------------------------------------------
# randomness: keys, noise arrays

SMALL_N = 10
X_SMALL = jnp.asarray([[0.3, -1.2], [0.8, 0.1], [-0.4, 2.0]])


def _sample_small(solver, **kw):
    return jadeis.sample(
        ORACLE.eps_fn,
        S2,
        X_SMALL,
        MU,
        schedule=SCH,
        ts=jadeis.time_grid(SCH, SMALL_N),
        solver=solver,
        **kw,
    )


@pytest.mark.parametrize("solver", SDE_SOLVERS, ids=SDE_IDS)
def test_same_key_reproduces_different_keys_differ(solver):
    a = _sample_small(solver, key=jax.random.key(3))
    b = _sample_small(solver, key=jax.random.key(3))
    c = _sample_small(solver, key=jax.random.key(4))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.min(np.abs(np.asarray(a) - np.asarray(c))) > 0
    # the noise matters: not the deterministic (probability-flow) answer
    ode = _sample_small(jadeis.DDIM())
    assert np.max(np.abs(np.asarray(a) - np.asarray(ode))) > 1e-3
    # a legacy uint32 key gives the same stream as the typed key
    legacy = _sample_small(solver, key=jax.random.PRNGKey(3))
    np.testing.assert_array_equal(np.asarray(legacy), np.asarray(a))


@pytest.mark.parametrize("solver", SDE_SOLVERS, ids=SDE_IDS)
def test_noise_array_equals_key_drawn_noise(solver):
    key = jax.random.key(11)
    # step i uses fold_in(key, i): draw the same values by hand
    noise = jnp.stack(
        [
            jax.random.normal(jax.random.fold_in(key, i), X_SMALL.shape, X_SMALL.dtype)
            for i in range(SMALL_N)
        ]
    )
    with_key = _sample_small(solver, key=key)
    with_noise = _sample_small(solver, noise=noise)
    np.testing.assert_allclose(np.asarray(with_noise), np.asarray(with_key), rtol=1e-14, atol=1e-15)
    # and a different noise array gives a different answer
    other = _sample_small(solver, noise=-noise)
    assert np.max(np.abs(np.asarray(other) - np.asarray(with_key))) > 1e-3


@pytest.mark.parametrize(
    "shape",
    [
        (SMALL_N - 1,) + X_SMALL.shape,
        (SMALL_N + 1,) + X_SMALL.shape,
        (SMALL_N, 3, 3),
        X_SMALL.shape,
    ],
)
def test_noise_shape_errors(shape):
    with pytest.raises(ValueError, match=r"noise must have shape \(N,\) \+ x_T.shape"):
        _sample_small(jadeis.SDEDPMSolverPP(order=2), noise=jnp.zeros(shape))


def test_key_and_noise_together_is_an_error():
    noise = jnp.zeros((SMALL_N,) + X_SMALL.shape)
    with pytest.raises(ValueError, match="either key or noise"):
        _sample_small(jadeis.SDEDPMSolver(), key=jax.random.key(0), noise=noise)
