"""UniPC (bh2, data prediction): convergence order on the Gaussian oracle, equality with a
numpy transcription of diffusers' ``UniPCMultistepScheduler``, exact discrete gradients,
jit/vmap/float32 and argument checks (docs/math/samplers.md#unipc)."""

from __future__ import annotations

import concurrent.futures
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jadeis

from .helpers import GaussianOracle, fitted_order


def quick_jit(fn=None, **kw):
    """jax.jit with XLA backend optimisation off: these tiny problems are compile-bound."""
    if fn is None:
        return functools.partial(quick_jit, **kw)
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0}, **kw)


VPLIN = jadeis.VPLinear()
VE = jadeis.VE()
MU = jnp.asarray(0.7)
S2 = jnp.asarray(0.09)
X_T = jnp.asarray([[0.5, -1.0], [1.3, 0.2]])


def test_convergence_order_property():
    for p in (1, 2, 3):
        assert jadeis.UniPC(order=p).convergence_order == p + 1
        assert jadeis.UniPC(order=p, corrector=False).convergence_order == p
    assert jadeis.UniPC().order == 2
    assert jadeis.UniPC().variant == "bh2"


# ---------------------------------------------------------------------------------------
# measured convergence order
#
# Sub-interval [t_max, t(lambda = -0.2)] of VPLinear (as tests/test_samplers.py: the
# solution is not flat at its end, so no super-convergence), float64, N = 32/64/128,
# lower_order_final=False. Measured: UniPC-1/2/3 1.93/2.91/4.07 (UniP-1/2/3 alone, no
# corrector: 1.00/1.97/2.99). With diffusers' default lower_order_final=True the last
# step is first order on *every* grid, which caps the global order at 2 on this interval
# (measured 1.9 for all three orders); on the full range, where the solution is flat at
# t_min, the final steps cost nothing visible (UniPC-2 2.95).

ORDER_NS = [32, 64, 128]
LAMBDA_END = -0.2


@functools.partial(quick_jit, static_argnames=("solver", "n"))
def _oracle_error(solver, n, t_end):
    oracle = GaussianOracle(VPLIN)
    x_T = X_T * VPLIN.prior_std
    ts = jadeis.time_grid(VPLIN, n, t_end=t_end)
    x0 = jadeis.sample(oracle.eps_fn, S2, x_T, MU, schedule=VPLIN, ts=ts, solver=solver)
    return jnp.max(jnp.abs(x0 - oracle.flow(x_T, MU, S2, ts[0], ts[-1])))


@pytest.fixture(scope="module")
def order_errors():
    t_end = float(VPLIN.t_from_log_snr(LAMBDA_END))
    jobs = [(p, n) for p in (1, 2, 3) for n in ORDER_NS]

    def run(job):
        p, n = job
        solver = jadeis.UniPC(order=p, lower_order_final=False)
        return job, float(_oracle_error(solver, n, t_end))

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run, jobs))


@pytest.mark.parametrize("p", [1, 2, 3])
def test_measured_order(order_errors, p):
    errors = [order_errors[p, n] for n in ORDER_NS]
    measured = fitted_order(ORDER_NS, errors)
    nominal = jadeis.UniPC(order=p).convergence_order
    assert abs(measured - nominal) < 0.3, (measured, errors)
    assert errors[-1] < 1e-4


# ---------------------------------------------------------------------------------------
# diffusers' UniPCMultistepScheduler.step, transcribed to numpy (predict_x0=True, epsilon
# model, no thresholding), on the same lambda grid: alpha and sigma at every grid time
# are given directly instead of diffusers' integer timesteps and sigma tables.


def _diffusers_coeffs(h, rks, p, bh):
    # multistep_uni_p_bh_update / multistep_uni_c_bh_update: R, b, h_phi_1, B_h
    hh = -h
    h_phi_1 = np.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial_i = 1
    B_h = np.expm1(hh) if bh == "bh2" else hh
    R, b = [], []
    for i in range(1, p + 1):
        R.append(np.power(rks, i - 1))
        b.append(h_phi_k * factorial_i / B_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial_i
    return np.stack(R), np.array(b), h_phi_1, B_h


def diffusers_unipc(
    eps, x, alphas, sigmas, solver_order, *, lower_order_final=True, bh="bh2", corrector=True
):
    n = len(alphas) - 1
    lam = np.log(alphas) - np.log(sigmas)
    model_outputs = [None] * solver_order
    lower_order_nums = 0
    last_sample = None
    this_order = None
    for i in range(n):  # step_index
        sample = x
        # convert_model_output
        m = (sample - sigmas[i] * eps(sample, alphas[i], sigmas[i])) / alphas[i]
        if corrector and i > 0 and last_sample is not None:
            # multistep_uni_c_bh_update(this_model_output=m, last_sample, this_sample, order)
            p = this_order
            m0 = model_outputs[-1]
            h = lam[i] - lam[i - 1]
            rks, D1s = [], []
            for k in range(1, p):
                rk = (lam[i - 1 - k] - lam[i - 1]) / h
                rks.append(rk)
                D1s.append((model_outputs[-(k + 1)] - m0) / rk)
            rks.append(1.0)
            R, b, h_phi_1, B_h = _diffusers_coeffs(h, np.array(rks), p, bh)
            rhos_c = np.array([0.5]) if p == 1 else np.linalg.solve(R, b)
            x_t_ = sigmas[i] / sigmas[i - 1] * last_sample - alphas[i] * h_phi_1 * m0
            corr_res = sum(r * d for r, d in zip(rhos_c[:-1], D1s)) if D1s else 0.0
            sample = x_t_ - alphas[i] * B_h * (corr_res + rhos_c[-1] * (m - m0))
        model_outputs = model_outputs[1:] + [m]
        this_order = min(solver_order, n - i) if lower_order_final else solver_order
        this_order = min(this_order, lower_order_nums + 1)
        last_sample = sample
        # multistep_uni_p_bh_update(sample, order=this_order)
        p = this_order
        m0 = model_outputs[-1]
        h = lam[i + 1] - lam[i]
        rks, D1s = [], []
        for k in range(1, p):
            rk = (lam[i - k] - lam[i]) / h
            rks.append(rk)
            D1s.append((model_outputs[-(k + 1)] - m0) / rk)
        rks.append(1.0)
        R, b, h_phi_1, B_h = _diffusers_coeffs(h, np.array(rks), p, bh)
        x_t_ = sigmas[i + 1] / sigmas[i] * sample - alphas[i + 1] * h_phi_1 * m0
        if D1s:
            rhos_p = np.array([0.5]) if p == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
            x = x_t_ - alphas[i + 1] * B_h * sum(r * d for r, d in zip(rhos_p, D1s))
        else:
            x = x_t_
        if lower_order_nums < solver_order:
            lower_order_nums += 1
    return x


def np_oracle_eps(x, a, s):
    """The Gaussian oracle's noise prediction in numpy, at a time with alpha a, sigma s."""
    return s * (x - a * float(MU)) / (a * a * float(S2) + s * s)


REF_CASES = [
    ("VPLinear", 1, 6, {}),
    ("VPLinear", 2, 6, {}),
    ("VPLinear", 3, 6, {}),
    ("VPLinear", 3, 20, {}),
    ("VPLinear", 2, 20, {"corrector": False}),
    ("VPLinear", 3, 20, {"lower_order_final": False}),
    ("VPLinear", 3, 20, {"variant": "bh1"}),
    ("VE", 3, 20, {}),
]


REF_IDS = [f"{c[0]}-{c[1]}-{c[2]}-{c[3]}" for c in REF_CASES]


@pytest.mark.parametrize("name,p,n,kw", REF_CASES, ids=REF_IDS)
def test_matches_diffusers_transcription(name, p, n, kw):
    sch = VPLIN if name == "VPLinear" else VE
    oracle = GaussianOracle(sch)
    ts = jadeis.time_grid(sch, n)
    x_T = X_T * sch.prior_std
    solver = jadeis.UniPC(order=p, **kw)
    x0 = quick_jit(
        lambda x: jadeis.sample(oracle.eps_fn, S2, x, MU, schedule=sch, ts=ts, solver=solver)
    )(x_T)
    ref = diffusers_unipc(
        np_oracle_eps,
        np.asarray(x_T),
        np.asarray(sch.alpha(ts)),
        np.asarray(sch.sigma(ts)),
        p,
        lower_order_final=kw.get("lower_order_final", True),
        bh=kw.get("variant", "bh2"),
        corrector=kw.get("corrector", True),
    )
    np.testing.assert_allclose(np.asarray(x0), ref, rtol=1e-10, atol=0)
    # not trivially the exact answer
    exact = oracle.flow(x_T, MU, S2, ts[0], ts[-1])
    assert float(jnp.max(jnp.abs(x0 - exact))) > 1e-7


def test_unip_is_dpm_solver_pp_3m():
    """Without the corrector, UniP-3 is jadeis' DPM-Solver++(3M) (docs: the interpolant
    through three points is unique); its order-2 warm-up step is the midpoint 2M step."""
    oracle = GaussianOracle(VPLIN)
    ts = jadeis.time_grid(VPLIN, 20)

    @quick_jit
    def run():
        return [
            jadeis.sample(oracle.eps_fn, S2, X_T, MU, schedule=VPLIN, ts=ts, solver=s)
            for s in (
                jadeis.UniPC(order=3, corrector=False, lower_order_final=False),
                jadeis.DPMSolverPP(
                    order=3, lower_order_final=False, variant="midpoint", warmup="lower_order"
                ),
            )
        ]

    outs = run()
    np.testing.assert_allclose(np.asarray(outs[0]), np.asarray(outs[1]), rtol=1e-12)


# ---------------------------------------------------------------------------------------
# exact gradients: DiscreteAdjoint (generic path, VJP of UniPC.step) == Backprop

HIDDEN = 4
N_GRAD = 7


def nn_eps(params, x, t, z):
    """A small nonlinear noise model that closes over nothing traced."""
    h = jnp.tanh(x @ params["w1"] + t * params["b"] + z)
    return h @ params["w2"] + 0.1 * x * jnp.sin(t)


PARAMS = {
    "w1": 0.8 * jax.random.normal(jax.random.key(0), (2, HIDDEN), jnp.float64),
    "b": jax.random.normal(jax.random.key(1), (HIDDEN,), jnp.float64),
    "w2": 0.6 * jax.random.normal(jax.random.key(2), (HIDDEN, 2), jnp.float64),
}
XG = jax.random.normal(jax.random.key(3), (3, 2), jnp.float64)
ZG = jnp.linspace(-0.5, 0.5, HIDDEN)
WEIGHT = jnp.array([[1.0, -0.5], [0.3, 0.7], [-1.2, 0.4]])


def _loss(solver, adjoint, p, x, z, ts, beta_max):
    sch = jadeis.VPLinear(beta_max=beta_max)
    x0 = jadeis.sample(nn_eps, p, x, z, schedule=sch, ts=ts, solver=solver, adjoint=adjoint)
    return jnp.sum(WEIGHT * x0) + 0.5 * jnp.sum(jnp.sin(x0) ** 2)


@pytest.mark.parametrize(
    "solver",
    [
        jadeis.UniPC(order=1),
        jadeis.UniPC(order=2),
        jadeis.UniPC(order=3),
        jadeis.UniPC(order=3, corrector=False, variant="bh1"),
    ],
    ids=repr,
)
def test_discrete_adjoint_equals_backprop(solver):
    ts = jadeis.time_grid(VPLIN, N_GRAD)
    beta_max = jnp.asarray(20.0)

    @quick_jit
    def run():
        return [
            jax.grad(functools.partial(_loss, solver, adj), argnums=(0, 1, 2, 3, 4))(
                PARAMS, XG, ZG, ts, beta_max
            )
            for adj in (jadeis.DiscreteAdjoint(), jadeis.Backprop())
        ]

    disc, ref = run()
    names = ["params", "x_T", "z", "ts", "beta_max"]
    for name, a, b in zip(names, disc, ref):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            x, y = np.asarray(x), np.asarray(y)
            scale = float(np.max(np.abs(y)))
            assert scale > 1e-6, name  # not trivially zero
            assert float(np.max(np.abs(x - y))) <= 1e-10 * scale, (name, x, y)


# ---------------------------------------------------------------------------------------
# jit, vmap, float32, errors


def test_jit_vmap_float32():
    solver = jadeis.UniPC(order=3)
    oracle = GaussianOracle(VPLIN)
    ts = jadeis.time_grid(VPLIN, 12)

    @quick_jit
    def one(x):
        return jadeis.sample(oracle.eps_fn, S2, x, MU, schedule=VPLIN, ts=ts, solver=solver)

    batch = jnp.stack([X_T, -X_T, 2.0 * X_T])
    out = jax.vmap(one)(batch)
    for k in range(3):
        np.testing.assert_allclose(np.asarray(out[k]), np.asarray(one(batch[k])), rtol=1e-13)

    out32 = quick_jit(
        lambda x: jadeis.sample(
            oracle.eps_fn,
            S2.astype(jnp.float32),
            x,
            MU.astype(jnp.float32),
            schedule=VPLIN,
            ts=ts.astype(jnp.float32),
            solver=solver,
        )
    )(X_T.astype(jnp.float32))
    assert out32.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out32)))
    np.testing.assert_allclose(np.asarray(out32), np.asarray(out[0]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"order": 0}, "order must be 1 or 2 or 3"),
        ({"order": 4}, "order must be 1 or 2 or 3"),
        ({"order": 2.0}, "order must be 1 or 2 or 3"),
        ({"order": True}, "order must be 1 or 2 or 3"),
        ({"variant": "bh3"}, "variant must be one of 'bh2', 'bh1'"),
        ({"corrector": 1}, "corrector must be True or False"),
        ({"lower_order_final": None}, "lower_order_final must be True or False"),
    ],
)
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        jadeis.UniPC(**kw)
