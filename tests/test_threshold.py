"""Clipping and dynamic thresholding of the data prediction (jadeis.ClipX0,
jadeis.DynamicThreshold): diffusers' formulas transcribed in numpy, the solvers that take
it, every gradient strategy through it, and the refusal of the noise-prediction solvers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jadeis

N_TRAIN = 1000
MU, S2 = 0.7, 0.25  # data N(MU, S2): its exact x0 prediction leaves [-1, 1] for large x


def threshold_np(sample, ratio, max_value):
    """diffusers' ``_threshold_sample`` (DDIMScheduler, DPMSolverMultistepScheduler, ...)."""
    batch = sample.shape[0]
    flat = sample.reshape(batch, -1)
    s = np.quantile(np.abs(flat), ratio, axis=1)  # torch.quantile: linear interpolation
    s = np.clip(s, 1, max_value)[:, None]
    return (np.clip(flat, -s, s) / s).reshape(sample.shape)


def _eps_np(x, ac):
    a, s = np.sqrt(ac), np.sqrt(1.0 - ac)
    return s * (x - a * MU) / (a * a * S2 + s * s)


def ddim_np(x, ac, timesteps, final_ac, x0_map):
    """diffusers' DDIMScheduler.step (eta = 0) with clip_sample / thresholding: the noise is
    recomputed from the clipped x0."""
    for i, k in enumerate(timesteps):
        a_t = ac[k]
        a_p = ac[timesteps[i + 1]] if i + 1 < len(timesteps) else final_ac
        x0 = x0_map((x - (1 - a_t) ** 0.5 * _eps_np(x, a_t)) / a_t**0.5)
        eps = (x - a_t**0.5 * x0) / (1 - a_t) ** 0.5
        x = a_p**0.5 * x0 + (1 - a_p) ** 0.5 * eps
    return x


def dpmpp2m_np(x, ac, timesteps, x0_map):
    """diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint, lower order
    final on < 15 steps) with thresholding in ``convert_model_output``."""
    n = len(timesteps)
    sig = np.sqrt((1 - ac) / ac)[timesteps]
    sig = np.concatenate([sig, [np.sqrt((1 - ac[0]) / ac[0])]])
    alpha = 1 / np.sqrt(sig**2 + 1)
    sigma = sig * alpha
    lam = np.log(alpha) - np.log(sigma)
    outs = []
    for i, k in enumerate(timesteps):
        outs.append(x0_map((x - sigma[i] * _eps_np(x, ac[k])) / alpha[i]))
        h = lam[i + 1] - lam[i]
        em = np.expm1(-h)
        x = (sigma[i + 1] / sigma[i]) * x - alpha[i + 1] * em * outs[-1]
        if i > 0 and i != n - 1:
            d1 = (outs[-1] - outs[-2]) * h / (lam[i] - lam[i - 1])
            x = x - 0.5 * alpha[i + 1] * em * d1
    return x


def _oracle(sch):
    """The same model in jadeis, on the integer timesteps of the table."""
    table = jnp.asarray(sch.alphas_cumprod)

    def eps_fn(params, x, t, z):
        ac = table[jnp.round(sch.t_to_timestep(t)).astype(jnp.int32)]
        a, s = jnp.sqrt(ac), jnp.sqrt(1.0 - ac)
        return s * (x - a * MU) / (a * a * S2 + s * s)

    return eps_fn


X = np.linspace(-2.5, 3.0, 24).reshape(2, 3, 4)  # two examples


def test_dynamic_threshold_is_diffusers_formula():
    rng = np.random.default_rng(0)
    for shape, ratio, max_value in [((3, 4, 5), 0.995, 1.0), ((2, 50), 0.9, 2.5),
                                    ((4, 2, 3, 3), 0.5, 10.0), ((1, 7), 1.0, 1.5)]:
        x = 2.0 * rng.standard_normal(shape)
        got = jadeis.DynamicThreshold(ratio, max_value)(jnp.asarray(x))
        np.testing.assert_allclose(got, threshold_np(x, ratio, max_value), rtol=1e-12)
    # per_example=False: the whole array is one example (e.g. under jax.vmap)
    x = 2.0 * rng.standard_normal((3, 4))
    got = jadeis.DynamicThreshold(0.8, 3.0, per_example=False)(jnp.asarray(x))
    np.testing.assert_allclose(got, threshold_np(x[None], 0.8, 3.0)[0], rtol=1e-12)
    np.testing.assert_array_equal(jadeis.ClipX0(-0.5, 2.0)(jnp.asarray(x)), np.clip(x, -0.5, 2))
    # a pytree: leaf by leaf
    tree = jadeis.ClipX0()({"a": jnp.asarray(x), "b": jnp.asarray(-x)})
    np.testing.assert_array_equal(tree["b"], np.clip(-x, -1, 1))


@pytest.mark.parametrize("kind", ["clip", "dynamic"])
def test_solvers_match_diffusers_loops_with_clipping(kind):
    """DPMSolverPP(order=1, threshold=...) is DDIMScheduler(clip_sample=True) /
    (thresholding=True); DPMSolverPP(order=2, variant="midpoint", threshold=...) is
    DPMSolverMultistepScheduler(thresholding=True)."""
    sch = jadeis.DiscreteVP.scaled_linear()
    ac = np.asarray(sch.alphas_cumprod)
    if kind == "clip":
        thr, x0_map = jadeis.ClipX0(-1.0, 1.0), lambda v: np.clip(v, -1.0, 1.0)
    else:
        thr, x0_map = jadeis.DynamicThreshold(0.9, 1.6), lambda v: threshold_np(v, 0.9, 1.6)
    eps_fn = _oracle(sch)
    n = 10
    k = jadeis.diffusers_timesteps(N_TRAIN, n, "leading", steps_offset=1, convention="ddim")
    ts = jadeis.time_grid(sch, n, "leading", steps_offset=1, convention="ddim")
    got = jadeis.sample(eps_fn, None, jnp.asarray(X), schedule=sch, ts=ts,
                        solver=jadeis.DPMSolverPP(order=1, threshold=thr))
    ref = ddim_np(X.copy(), ac, k, ac[0], x0_map)
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)
    unclipped = ddim_np(X.copy(), ac, k, ac[0], lambda v: v)
    assert np.max(np.abs(ref - unclipped)) > 0.1  # the clipping matters here
    k = jadeis.diffusers_timesteps(N_TRAIN, n, "leading", convention="dpmsolver")
    ts = jadeis.time_grid(sch, n, "leading", convention="dpmsolver")
    got = jadeis.sample(eps_fn, None, jnp.asarray(X), schedule=sch, ts=ts,
                        solver=jadeis.DPMSolverPP(order=2, variant="midpoint", threshold=thr))
    np.testing.assert_allclose(got, dpmpp2m_np(X.copy(), ac, k, x0_map), rtol=1e-10, atol=1e-12)


SCH = jadeis.VPLinear()
TS = jadeis.time_grid(SCH, 6)
THR = jadeis.DynamicThreshold(0.8, max_value=1.5)
SOLVERS = [
    jadeis.DPMSolverPP(order=2, threshold=THR),
    jadeis.DPMSolverPP(order=3, threshold=jadeis.ClipX0()),
    jadeis.SDEDPMSolverPP(order=2, threshold=THR),
    jadeis.UniPC(order=2, threshold=THR),
    jadeis.SinglestepDPMSolver(order=2, threshold=THR),
    jadeis.Rex(threshold=jadeis.ClipX0(-1.2, 1.2)),
    jadeis.SDERex(scheme="euler", threshold=THR),
]


def _gauss_eps(p, x, t, z):
    a, s = SCH.alpha(t), SCH.sigma(t)
    return s * (x - a * z * p) / (a**2 * 0.25 + s**2)


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__ + str(s.order))
def test_exact_strategies_differentiate_through_the_threshold(solver):
    """DiscreteAdjoint (and ReversibleAdjoint) == Backprop with respect to params, x_T and
    z, and the gradient differs from the unthresholded sampler's."""
    x_T = jnp.asarray(X)
    kw = {"key": jax.random.key(3)} if solver.stochastic else {}

    def loss(p, x, z, adjoint, solver=solver):
        x_0 = jadeis.sample(_gauss_eps, p, x, z, schedule=SCH, ts=TS, solver=solver,
                            adjoint=adjoint, **kw)
        return jnp.sum(jnp.sin(3.0 * x_0))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=(3, 4))
    ref = grad(1.0, x_T, 0.8, jadeis.Backprop(), solver)
    adjoints = [jadeis.DiscreteAdjoint()]
    if isinstance(solver, jadeis.AbstractReversibleSolver):
        adjoints.append(jadeis.ReversibleAdjoint())
    for adjoint in adjoints:
        got = grad(1.0, x_T, 0.8, adjoint, solver)
        for a, b in zip(got, ref):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9 * float(jnp.max(jnp.abs(b))))
    plain = grad(1.0, x_T, 0.8, jadeis.Backprop(), eqx_replace_threshold(solver))
    assert not np.allclose(plain[1], ref[1], rtol=1e-3)


def eqx_replace_threshold(solver):
    import equinox as eqx

    return eqx.tree_at(lambda s: s.threshold, solver, None, is_leaf=lambda v: v is None)


def test_adjoint_deis_solves_the_thresholded_ode():
    """AdjointDEIS differentiates the ODE whose model is the noise the thresholded x0
    implies: on a fine grid it agrees with Backprop of the thresholded sampler far better
    than that gradient agrees with the unthresholded one."""
    ts = jadeis.time_grid(SCH, 100)
    x_T = jax.random.normal(jax.random.key(0), (4, 6))

    def grads(solver, adjoint):
        def loss(p):
            x_0 = jadeis.sample(_gauss_eps, p, x_T, 0.8, schedule=SCH, ts=ts, solver=solver,
                                adjoint=adjoint)
            return jnp.sum(jnp.sin(3.0 * x_0))

        return float(jax.grad(loss)(1.0))

    for thr in (jadeis.ClipX0(), jadeis.DynamicThreshold(0.8, 1.3)):
        solver = jadeis.DPMSolverPP(order=2, threshold=thr)
        ref = grads(solver, jadeis.Backprop())
        deis = grads(solver, jadeis.AdjointDEIS(order=2))
        unthresholded = grads(jadeis.DPMSolverPP(order=2), jadeis.Backprop())
        assert abs(deis - ref) < 1e-3 * abs(ref), (deis, ref)
        assert abs(unthresholded - ref) > 1e-2 * abs(ref), (unthresholded, ref)


@pytest.mark.parametrize(
    "make,fix",
    [
        (lambda t: jadeis.DDIM(threshold=t), r"DPMSolverPP\(order=1, threshold=\.\.\.\)"),
        (lambda t: jadeis.DPMSolver(order=3, threshold=t), r"DPMSolverPP\(order=3"),
        (lambda t: jadeis.SDEDPMSolver(threshold=t), r"SDEDPMSolverPP\(order=1"),
        (lambda t: jadeis.SinglestepDPMSolver(prediction="noise", threshold=t),
         "prediction='data'"),
        (lambda t: jadeis.Rex(prediction="noise", threshold=t), "prediction='data'"),
    ],
    ids=["DDIM", "DPMSolver", "SDEDPMSolver", "Singlestep-noise", "Rex-noise"],
)
def test_noise_prediction_solvers_refuse_a_threshold(make, fix):
    with pytest.raises(ValueError, match="steps with the noise prediction") as err:
        make(jadeis.ClipX0())
    assert err.match(fix)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: jadeis.ClipX0(1.0, -1.0), "lo must be below hi"),
        (lambda: jadeis.ClipX0(-np.inf, 1.0), "finite"),
        (lambda: jadeis.DynamicThreshold(ratio=0.0), "ratio"),
        (lambda: jadeis.DynamicThreshold(ratio=1.5), "ratio"),
        (lambda: jadeis.DynamicThreshold(max_value=0.5), "max_value"),
        (lambda: jadeis.DPMSolverPP(threshold=1.0), "ClipX0"),
    ],
)
def test_bad_thresholds_are_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()
