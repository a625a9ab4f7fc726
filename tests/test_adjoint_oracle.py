"""AdjointDEIS against the closed-form Gaussian oracle (docs/math/adjoint.md#adjointdeis-steps,
docs/math/oracles.md#gaussian-flow-map and #gaussian-pathwise-sde).

Data N(mu, s^2 I): the model is the exact noise predictor ``GaussianOracle.eps_fn`` with
``params = s^2`` and conditioning ``z = mu``. The exact gradients of a loss of the
probability-flow ODE's flow map are ``jax.grad`` of the closed-form flow map; for the
diffusion SDE the exact pathwise gradient is derived below (``_pathwise_x0``).

About the step counts: AdjointDEIS-k is a k-th order method, but on the full VPLinear
range (lambda from about -5 to +7) its frozen-integrand exponential steps are far off at
small N: in the high-noise region alpha_l^2 a^T eps_x grows like e^lambda across a step,
so a step of size |h| amplifies instead of damping once e^|h| is not close to 1. For
s = 0.3 the asymptotic range starts at about N = 64; the order tests fit N = 128..1024 (a
larger s is not cheaper: s = 0.6 or 0.8 is further from the asymptote at N = 16..128) and
``test_small_n_regime`` documents the pre-asymptotic behaviour at N = 8.

Every per-N computation (time grid, sampler gradient, exact gradient) runs as one jitted
function, so the cost is one compilation per grid size; it is compiled with XLA's backend
optimisation level 0 (``quick_jit``), which halves the compile time of these tiny
problems and changes no number beyond rounding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jadeis

from .helpers import GaussianOracle, fitted_order

SCH = jadeis.VPLinear()
ORACLE = GaussianOracle(SCH)
X_T = jnp.array([[0.5, -1.0]])
MU = jnp.asarray(0.7)
S2 = jnp.asarray(0.3**2)
W = jnp.array([[1.3, -0.4]])
NS = (128, 362, 1024)


def quad_loss(x0):
    return jnp.sum(W * x0) + 0.5 * jnp.sum(x0**2)


def lin_loss(x0):
    return jnp.sum(W * x0)


def exact_ode_grads(ts, loss):
    """(dL/dx_T, dL/dmu, dL/ds2) of the exact PF-ODE flow map from ts[0] to ts[-1]."""

    def f(x_T, mu, s2):
        return loss(ORACLE.flow(x_T, mu, s2, ts[0], ts[-1]))

    return jax.grad(f, argnums=(0, 1, 2))(X_T, MU, S2)


def sample_grads(ts, solver, adjoint, loss):
    def f(x_T, mu, s2):
        x0 = jadeis.sample(
            ORACLE.eps_fn, s2, x_T, mu, schedule=SCH, ts=ts, solver=solver, adjoint=adjoint
        )
        return loss(x0)

    return jax.grad(f, argnums=(0, 1, 2))(X_T, MU, S2)


def quick_jit(fn=None, **kw):
    """jax.jit with XLA backend optimisation off: these problems are compile-bound."""
    if fn is None:
        return functools.partial(quick_jit, **kw)
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0}, **kw)


def _max_err(got, want):
    return jnp.stack([jnp.max(jnp.abs(g - w)) for g, w in zip(got, want)])


@quick_jit(static_argnums=(0, 1, 2, 3))
def ode_errors(n, solver, adjoint, loss):
    """Max errors of (dL/dx_T, dL/dmu, dL/ds2) against the exact flow map on an n-step grid."""
    ts = jadeis.time_grid(SCH, n)
    return _max_err(sample_grads(ts, solver, adjoint, loss), exact_ode_grads(ts, loss))


@pytest.mark.parametrize("mode", ["cached", "reconstruct"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_adjoint_deis_order(k, mode):
    """The measured order of AdjointDEIS-k is k (within 0.3) for dL/dx_T, dL/dz, dL/dparams.

    The forward pass uses the k-th order multistep DPM-Solver so that the error of x_0
    (which enters dL/dx_0 of the quadratic loss) is of the same order. Asymptotic range
    N = 128, 362, 1024 (see the module docstring for why small N is excluded; N = 64..512
    works too). Measured (x_T, z, params): k=1 0.94/0.98/1.00 (reconstruct params 0.98),
    k=2 2.05/2.09/2.02, k=3 3.07/3.07/3.12 (reconstruct params 3.17).
    """
    solver = jadeis.DPMSolver(order=k)
    adjoint = jadeis.AdjointDEIS(order=k, trajectory=mode)
    errs = np.asarray([ode_errors(n, solver, adjoint, quad_loss) for n in NS])
    orders = [fitted_order(NS, errs[:, j]) for j in range(3)]
    for name, p in zip(("x_T", "z", "params"), orders):
        assert abs(p - k) < 0.3, (name, orders, errs)
    assert np.all(np.diff(errs, axis=0) < 0), errs


@pytest.mark.parametrize(("k", "mode"), [(1, "cached"), (2, "reconstruct"), (3, "cached")])
def test_adjoint_grid_independent_of_sampling_grid(k, mode):
    """AdjointDEIS(steps=M) with M != N converges in M at order k (within 0.3).

    The sampling grid is fixed at N = 200 steps of the 3rd order DPM-Solver++ (forward
    error about 1e-8); the loss is linear, so dL/dx_0 does not depend on x_0 and the
    measured error is the adjoint solver's (cached: states re-solved on the M-grid with the
    same sampler; reconstruct: states solved backwards from x_0 on the M-grid), M = 64,
    181, 512. Measured (x_T, z, params): k=1 cached 0.88/0.88/1.02, k=2 reconstruct
    2.11/2.11/2.06, k=3 cached 3.13/3.13/3.10.
    """
    ms = (64, 181, 512)

    @quick_jit(static_argnums=0)
    def errors(m):
        ts = jadeis.time_grid(SCH, 200)
        adjoint = jadeis.AdjointDEIS(order=k, steps=m, trajectory=mode)
        got = sample_grads(ts, jadeis.DPMSolverPP(order=3), adjoint, lin_loss)
        return _max_err(got, exact_ode_grads(ts, lin_loss))

    errs = np.asarray([errors(m) for m in ms])
    orders = [fitted_order(ms, errs[:, j]) for j in range(3)]
    for name, p in zip(("x_T", "z", "params"), orders):
        assert abs(p - k) < 0.3, (name, orders, errs)


def _ddim_by_hand(x_T, mu, s2, ts):
    """DDIM written out step by step (independent of jadeis' coefficient tables)."""
    x = x_T
    for i in range(ts.shape[0] - 1):
        s, t = ts[i], ts[i + 1]
        h = SCH.log_snr(t) - SCH.log_snr(s)
        eps = ORACLE.eps_fn(s2, x, s, mu)
        x = SCH.alpha(t) / SCH.alpha(s) * x - SCH.sigma(t) * jnp.expm1(h) * eps
    return x


def test_small_n_regime():
    """At N = 8 AdjointDEIS-1 is far from every reference, by the method's own error.

    The exact gradient of the 8-step DDIM sampler (DiscreteAdjoint, checked here against
    jax.grad of a hand-written DDIM loop) is within a factor of a few of the continuous
    gradient, while AdjointDEIS-1's dL/dx_T is off by more than ten times the size of the
    gradient itself: with 8 steps over lambda in [-5, 7] each adjoint step has |h| ~ 1.5,
    and the frozen-integrand exponential step amplifies where the exact flow contracts.
    This is the method's pre-asymptotic regime, not a bug: the same estimator converges at
    order 1 from N ~ 64 on (``test_adjoint_deis_order``). At small N use DiscreteAdjoint
    (exact for the sampler actually run) or more adjoint steps (``steps=M``), as checked
    at the end.
    """

    @quick_jit
    def run():
        ts = jadeis.time_grid(SCH, 8)
        solver = jadeis.DDIM()
        disc = sample_grads(ts, solver, jadeis.DiscreteAdjoint(), quad_loss)
        by_hand = jax.grad(
            lambda a, b, c: quad_loss(_ddim_by_hand(a, b, c, ts)), argnums=(0, 1, 2)
        )(X_T, MU, S2)
        deis = sample_grads(ts, solver, jadeis.AdjointDEIS(order=1), quad_loss)
        many = jadeis.AdjointDEIS(order=2, steps=256, trajectory="reconstruct")
        fine = sample_grads(ts, solver, many, quad_loss)
        exact = exact_ode_grads(ts, quad_loss)
        return disc, by_hand, deis, fine, exact

    disc, by_hand, deis, fine, exact = run()
    for g, r in zip(disc, by_hand):
        np.testing.assert_allclose(g, r, rtol=1e-11, atol=1e-13)
    size = float(jnp.max(jnp.abs(exact[0])))
    deis_err = float(_max_err(deis, exact)[0])
    disc_err = float(_max_err(disc, exact)[0])
    assert deis_err > 10.0 * size, (deis_err, size)
    assert disc_err < 5.0 * size, (disc_err, size)
    # 256 adjoint steps along the states reconstructed from the 8-step x_0: the adjoint's
    # own error is gone; what is left is the error of the 8-step x_0 itself
    assert float(_max_err(fine, exact)[0]) < 0.1 * deis_err


# --------------------------------------------------------------------------------------
# The diffusion SDE: exact pathwise gradient for Gaussian data
#
# Reverse SDE (time runs from T down to 0), beta = g^2, f = -beta/2 (VP):
#     dx = [f x + (g^2/sigma) eps*(x, t)] dt + g dw.
# With eps*(x, t) = sigma (x - alpha mu)/v, v = alpha^2 s^2 + sigma^2, the drift is
# (f + beta/v) x - beta alpha mu / v: linear in x, additive noise. For a VP schedule
# (sigma^2 = 1 - alpha^2, d(alpha^2)/dt = -beta alpha^2): beta/v = beta + d log(v)/dt, so
# the propagator from r to t < r is
#     Phi(t, r) = exp(int_r^t (f + beta/v) du) = (alpha_r v_t) / (alpha_t v_r),
# independent of the noise path, and
#     x_0 = Phi(0, T) x_T + mu K + int_T^0 Phi(0, r) g_r dw_r,
#     K = int_0^T Phi(0, r) beta_r alpha_r / v_r dr = (1 - v_0/v_T) / (alpha_0 (1 - s^2)).
# So dx_0/dx_T = Phi(0, T) and dx_0/dmu = K, exactly and path-independently, and dx_0/ds^2
# is the s^2-derivative of the deterministic part plus the stochastic integral of
# dPhi(0, r)/ds^2 (a smooth deterministic integrand) against the path.
#
# The Brownian path is given by its increments on a fine grid of 2^14 steps uniform in
# lambda: g_r dw_r over a fine interval is N(0, 2 |d log alpha|) (beta dt = -2 d log alpha).
# The stochastic integral is the float64 sum of the integrand at the interval midpoints
# times the increments (quadrature error O(2^-14) per path). Each coarse sampler gets the
# noise xi_i that the same fine path implies for its own noise term,
#     c_i xi_i = sum over the fine intervals inside step i of Phi_lin(t_{i+1}, r) g_r dw_r,
# with Phi_lin the sampler's linear propagator (alpha_t/alpha_r in the noise form,
# sigma_t^2 alpha_r / (sigma_r^2 alpha_t) in the data form), so every N is driven by the
# same Brownian paths. x_0, and hence the exact gradient, is jax.grad of ``_pathwise_x0``.

# A shorter, less stiff time range for the SDE: on the full VPLinear range the first-order
# SDE adjoint step in the high-noise region multiplies a_x by 3 e^d - 2 e^{2d} (d = |h|)
# instead of about e^{-d}, which changes sign at d = log 1.5, so N would have to be in the
# thousands before the error is asymptotic.
SDE_SCH = jadeis.VPLinear(t_min=0.01, t_max=0.5)
SDE_ORACLE = GaussianOracle(SDE_SCH)
SDE_S2 = jnp.asarray(0.5**2)
SDE_W = jnp.array([1.3, -0.4])
N_FINE = 2**14
N_PATHS = 32
SDE_NS = (32, 90, 256)
SDE_DRAWS = jnp.asarray(np.random.default_rng(3).standard_normal((N_FINE, N_PATHS, 2)))


def _v(la, s2):
    a2 = jnp.exp(2.0 * la)
    return a2 * s2 + 1.0 - a2


def _fine_path(z):
    """Fine grid log alpha (m + 1, increasing) and increments g dw from standard normal
    draws ``z`` of shape (m,) + state shape. (The draws come from numpy outside the jitted
    functions: compiling random-number kernels would dominate these tests' run time.)"""
    m = z.shape[0]
    la = SDE_SCH.log_alpha(jadeis.time_grid(SDE_SCH, m))
    return la, z * jnp.sqrt(2.0 * (la[1:] - la[:-1])).reshape((m,) + (1,) * (z.ndim - 1))


def _pathwise_x0(la, dw, x_T, mu, s2):
    """Exact x_0 of the reverse SDE from x_T along the path with increments dw (m, ...)."""
    la0, la_T = la[-1], la[0]
    la_mid = 0.5 * (la[1:] + la[:-1])
    v0 = _v(la0, s2)
    phi_T = jnp.exp(la_T - la0) * v0 / _v(la_T, s2)
    k = (1.0 - v0 / _v(la_T, s2)) / (jnp.exp(la0) * (1.0 - s2))
    phi_r = jnp.exp(la_mid - la0) * v0 / _v(la_mid, s2)
    return phi_T * x_T + mu * k + jnp.tensordot(phi_r, dw, 1)


def _coarse(la, dw, n, solver):
    """(ts, noise) of an n-step run of ``solver`` driven by the fine path."""
    m = dw.shape[0]
    stride = m // n
    ts = jadeis.time_grid(SDE_SCH, m)[::stride]
    owner = np.arange(m) // stride
    la_mid = 0.5 * (la[1:] + la[:-1])
    la_end = la[stride::stride][owner]
    if solver.prediction == "eps":
        w = jnp.exp(la_end - la_mid)
    else:
        var_end, var_mid = -jnp.expm1(2.0 * la_end), -jnp.expm1(2.0 * la_mid)
        w = var_end * jnp.exp(la_mid) / (var_mid * jnp.exp(la_end))
    bcast = (1,) * (dw.ndim - 1)
    sums = jax.ops.segment_sum(w.reshape((m,) + bcast) * dw, jnp.asarray(owner), n)
    c = solver.coefficients(SDE_SCH, ts).c
    return ts, sums / c.reshape((n,) + bcast)


@quick_jit(static_argnums=(0, 1, 2))
def sde_errors(n, solver, adjoint):
    """RMS over the paths of the errors of (dL/dx_T, dL/dmu, dL/ds2), L = w . x_0 per path."""
    la, dw = _fine_path(SDE_DRAWS)
    x_T = jnp.linspace(-1.0, 1.0, 2 * N_PATHS).reshape(N_PATHS, 2)

    def exact_one(x_T1, dw1):
        f = lambda a, mu, s2: jnp.sum(SDE_W * _pathwise_x0(la, dw1, a, mu, s2))
        return jax.grad(f, argnums=(0, 1, 2))(x_T1, MU, SDE_S2)

    ts, noise = _coarse(la, dw, n, solver)

    def got_one(x_T1, noise1):
        def f(a, mu, s2):
            x0 = jadeis.sample(
                SDE_ORACLE.eps_fn,
                s2,
                a,
                mu,
                schedule=SDE_SCH,
                ts=ts,
                solver=solver,
                adjoint=adjoint,
                noise=noise1,
            )
            return jnp.sum(SDE_W * x0)

        return jax.grad(f, argnums=(0, 1, 2))(x_T1, MU, SDE_S2)

    exact = jax.vmap(exact_one, in_axes=(0, 1))(x_T, dw)
    got = jax.vmap(got_one, in_axes=(0, 1))(x_T, noise)
    return jnp.stack([jnp.sqrt(jnp.mean((g - e) ** 2)) for g, e in zip(got, exact)])


def test_sde_oracle_self_check():
    """The oracle itself: the closed-form K equals its quadrature, and the pathwise x_0
    from x_T ~ p_T has the data marginal N(alpha_0 mu, alpha_0^2 s^2 + sigma_0^2)."""

    rng = np.random.default_rng(0)
    draws, x_draws = rng.standard_normal((2**10, 4000)), rng.standard_normal(4000)

    @quick_jit
    def run(draws, x_draws):
        la, dw = _fine_path(draws)
        la_mid = 0.5 * (la[1:] + la[:-1])
        v0, v_T = _v(la[-1], SDE_S2), _v(la[0], SDE_S2)
        phi_r = jnp.exp(la_mid - la[-1]) * v0 / _v(la_mid, SDE_S2)
        beta_dt = 2.0 * (la[1:] - la[:-1])
        k_quad = jnp.sum(phi_r * jnp.exp(la_mid) / _v(la_mid, SDE_S2) * beta_dt)
        k_closed = (1.0 - v0 / v_T) / (jnp.exp(la[-1]) * (1.0 - SDE_S2))
        x_T = jnp.exp(la[0]) * MU + jnp.sqrt(v_T) * x_draws
        x0 = _pathwise_x0(la, dw, x_T, MU, SDE_S2)
        return k_quad, k_closed, jnp.mean(x0), jnp.var(x0), jnp.exp(la[-1]) * MU, v0

    k_quad, k_closed, mean, var, mean_want, var_want = run(draws, x_draws)
    np.testing.assert_allclose(k_quad, k_closed, rtol=1e-5)
    np.testing.assert_allclose(mean, mean_want, atol=0.05)
    np.testing.assert_allclose(var, var_want, rtol=0.08)


@pytest.mark.parametrize(
    "solver", [jadeis.SDEDPMSolver(), jadeis.SDEDPMSolverPP(order=2)], ids=["noise", "data2"]
)
def test_sde_adjoint_converges_to_pathwise_gradient(solver):
    """With an SDE sampler, AdjointDEIS solves the SDE adjoint along the sampled path and
    converges to the exact pathwise gradient of the diffusion SDE as N grows.

    What is measured: RMS errors over 32 Brownian paths, N = 32, 90, 256, every N driven by
    the same paths. dL/dx_T and dL/dmu do not depend on the path for Gaussian data, so
    their errors are deterministic; fitted slopes 0.96 and 0.96. dL/ds^2 depends on the
    path: its error is a strong (pathwise) error, a random quantity; fitted slopes 1.05
    (noise form) and 1.10 (data form, 2nd order) for these paths, 0.96 to 1.11 over three
    seeds (with only 8 paths it varied from 0.67 to 1.2). All three slopes are asserted
    within 0.3 of 1, with a threefold decrease of the s^2 error. The exact discrete
    gradient (DiscreteAdjoint) is checked to converge to the same oracle, which validates
    the oracle independently of AdjointDEIS (for the data-prediction SDE sampler its
    dL/dx_T and dL/dmu are even exact at every N, to rounding).
    """
    errs = np.asarray([sde_errors(n, solver, jadeis.AdjointDEIS(order=1)) for n in SDE_NS])
    orders = [fitted_order(SDE_NS, errs[:, j]) for j in range(3)]
    for name, p in zip(("x_T", "z", "params"), orders):
        assert abs(p - 1.0) < 0.3, (name, orders, errs)
    assert errs[-1, 2] < errs[0, 2] / 3.0, errs
    # the discrete gradient of the same sampler tends to the same limit
    disc = np.asarray([sde_errors(n, solver, jadeis.DiscreteAdjoint()) for n in SDE_NS[::2]])
    assert np.all(disc[-1] <= disc[0] / 3.0 + 1e-12), disc
    assert disc[-1, 2] < 0.05, disc
