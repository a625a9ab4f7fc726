"""Guidance recipes: losses of the inputs, noise priors, weighted sums, callbacks and early
stopping, fresh/frozen SDE noise, projections, the init/step pair, one compile per
configuration, and clear errors for bad losses."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadeis

from .helpers import count_compilations

SCH = jadeis.VPLinear()
TS = jadeis.time_grid(SCH, 8)
X_T = jax.random.normal(jax.random.key(0), (3, 4))
TARGET = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
OPT = optax.adam(0.05)


def eps_fn(p, x, t, z):
    return p * x + 0.1 * jnp.sin(x)


def fit(x0, target):
    return jnp.sum((x0 - target) ** 2, axis=-1)


def run(loss=fit, **kw):
    kw.setdefault("num_iters", 5)
    kw.setdefault("optimizer", OPT)
    kw.setdefault("loss_args", (TARGET,))
    kw.setdefault("wrt", ("x_T",))
    return jadeis.guide(
        loss, eps_fn, 0.5, kw.pop("x_T", X_T), None, schedule=SCH, ts=TS, progress=False, **kw
    )


def test_compiled_once_across_calls():
    """The same configuration and shapes: a second guide call (new values, same shapes)
    compiles nothing; init/step/loss share the first call's compilation."""
    with count_compilations() as first:
        a = run(num_iters=3)
    x_T, target = X_T + 0.1, TARGET * 2
    with count_compilations() as second:
        b = run(num_iters=4, x_T=x_T, loss_args=(target,))
    assert len(first) >= 1
    assert len(second) == 0, len(second)
    assert a.losses.shape == (4, 3) and b.losses.shape == (5, 3)


def test_init_step_pair_is_what_guide_runs():
    g = jadeis.Guidance(fit, eps_fn, schedule=SCH, ts=TS, optimizer=OPT, wrt=("x_T",))
    state = g.init(0.5, X_T, loss_args=(TARGET,))
    losses = []
    for _ in range(5):
        state = g.step(state, (TARGET,))
        losses.append(state.loss)
    res = run()
    np.testing.assert_allclose(res.x_T, state.opt_vars["x_T"], rtol=1e-12)
    np.testing.assert_allclose(res.losses[:-1], np.stack(losses), rtol=1e-12)
    assert int(state.iteration) == 5
    assert set(state.inputs) == {"x_T", "z", "params"}
    # the current values as properties: optimised (x_T) or as given (z, params)
    assert state.x_T is state.opt_vars["x_T"] and state.z is None and state.params == 0.5


def test_priors_match_the_chi_distribution():
    scipy_stats = pytest.importorskip("scipy.stats")
    x = jax.random.normal(jax.random.key(1), (2, 5, 3))
    d = 15
    r = np.sqrt(np.sum(np.asarray(x).reshape(2, -1) ** 2, axis=1))
    nll = np.asarray(jadeis.ChiPrior()(None, {"x_T": x}))
    np.testing.assert_allclose(nll, -scipy_stats.chi(d).logpdf(r), rtol=1e-10)
    norm = np.asarray(jadeis.NormPrior()(None, {"x_T": x}))
    np.testing.assert_allclose(norm, (r - scipy_stats.chi(d).mean()) ** 2, rtol=1e-10)
    whole = jadeis.NormPrior(per_example=False)(None, {"x_T": x})
    assert whole.shape == ()


def test_loss_of_inputs_and_weighted_sum():
    """A Loss(uses_inputs=True) sees the current inputs; weights scale; a prior keeps the
    optimised noise's norm typical while the fit pulls it away."""
    seen = {}

    def reg(x0, inputs, target):
        seen["keys"] = set(inputs)
        return jnp.sum(inputs["x_T"] ** 2, axis=-1)

    total = jadeis.Loss(fit) + 0.5 * jadeis.Loss(reg, uses_inputs=True)
    res = run(total, num_iters=2)
    assert seen["keys"] == {"x_T", "z", "params"}
    x0 = jadeis.sample(eps_fn, 0.5, res.x_T, None, schedule=SCH, ts=TS)
    expect = fit(x0, TARGET) + 0.5 * jnp.sum(res.x_T**2, axis=-1)
    np.testing.assert_allclose(res.losses[-1], expect, rtol=1e-10)
    # a scalar term with per-example terms: everything summed to a scalar
    mixed = jadeis.Loss(lambda x0, t: jnp.sum(fit(x0, t))) + jadeis.ChiPrior()
    assert run(mixed, num_iters=1).losses.shape == (2,)
    # a far target: without a prior the noise norm grows; with a strong prior it stays typical
    far = (TARGET * 6,)
    free = run(num_iters=30, loss_args=far, optimizer=optax.adam(0.2))
    held = run(
        fit + 30.0 * jadeis.NormPrior(), num_iters=30, loss_args=far, optimizer=optax.adam(0.2)
    )
    norm = lambda x: np.sqrt(np.sum(np.asarray(x) ** 2, axis=-1))  # noqa: E731
    mu = math.sqrt(2) * math.gamma(2.5) / math.gamma(2.0)  # mean norm of 4-d Gaussian noise
    dev_held, dev_free = np.abs(norm(held.x_T) - mu), np.abs(norm(free.x_T) - mu)
    assert np.all(dev_held < 0.5) and np.all(dev_held < dev_free), (dev_held, dev_free)


def test_callback_and_tol_stop_early():
    calls = []

    def cb(i, state):
        calls.append((i, float(np.mean(state.loss))))
        return i == 2

    res = run(num_iters=10, callback=cb)
    assert [c[0] for c in calls] == [0, 1, 2]
    assert res.losses.shape == (4, 3)
    res = run(num_iters=200, tol=1e-2, optimizer=optax.sgd(1e-4))  # ~0.5% per step
    assert res.losses.shape[0] == 3  # stopped at the 2nd update, + the final loss


def test_fresh_or_frozen_sde_noise():
    """With a zero step size the inputs stay put: frozen noise gives the same sample every
    iteration, fresh noise a new one (fold_in(key, k))."""
    kw = dict(
        solver=jadeis.SDEDPMSolverPP(),
        key=jax.random.key(4),
        optimizer=optax.sgd(0.0),
        num_iters=3,
        keep_x0=True,
    )
    frozen = run(**kw)
    fresh = run(sde_noise="fresh", **kw)
    h = frozen.x0_history
    np.testing.assert_array_equal(h[0], h[1])
    h = fresh.x0_history
    assert not np.allclose(h[0], h[1]) and not np.allclose(h[1], h[2])
    with pytest.raises(ValueError, match="sde_noise='fresh'"):
        run(sde_noise="fresh")
    with pytest.raises(ValueError, match="sde_noise"):
        run(sde_noise="new")


def test_projection_onto_the_sphere():
    res = run(projection={"x_T": jadeis.sphere_projection}, optimizer=optax.adam(0.3))
    np.testing.assert_allclose(np.sum(np.asarray(res.x_T) ** 2, axis=-1), 4.0, rtol=1e-10)
    res2 = run(projection=lambda v: {"x_T": jnp.clip(v["x_T"], -0.5, 0.5)})
    assert float(jnp.max(jnp.abs(res2.x_T))) <= 0.5
    with pytest.raises(ValueError, match="projection"):
        run(projection={"z": jadeis.sphere_projection})


def test_non_finite_loss_stops_with_a_clear_error():
    with pytest.raises(FloatingPointError, match="iteration 0"):
        run(lambda x0, t: fit(x0, t) * jnp.nan)
    # an optimiser that diverges: the loss becomes inf/NaN after some updates
    with pytest.raises(FloatingPointError, match="not finite"):
        run(lambda x0, t: jnp.sum(x0**4, axis=-1), optimizer=optax.sgd(1e30), num_iters=20)


@pytest.mark.parametrize(
    "loss,match",
    [
        (lambda x0, t: (fit(x0, t), x0), "one real array"),
        (lambda x0, t: fit(x0, t).astype(jnp.complex128) * 1j, "complex|real"),
        (lambda x0, t: jnp.ones(3, jnp.int32), "floating"),
        ("mse", "callable"),
        # one loss per example and coordinate, (B, 4): a forgotten reduction
        (lambda x0, t: (x0 - t) ** 2, r"shape \(B,\) = \(3,\).*returned shape \(3, 4\)"),
        # per-example losses must be one per example
        (lambda x0, t: jnp.sum((x0 - t) ** 2, axis=0), r"shape \(B,\).*returned shape \(4,\)"),
    ],
    ids=["tuple", "complex", "int", "string", "B-by-2", "not-per-example"],
)
def test_bad_loss_is_a_clear_error(loss, match):
    with pytest.raises(ValueError, match=match):
        run(loss)


def test_pattern_loss_weights_are_traced():
    """Changing a weight does not recompile."""
    loss = jadeis.Loss(fit) + 0.1 * jadeis.ChiPrior()
    run(loss, num_iters=1)
    other = jadeis.WeightedSum(loss.weights[:1] + (jnp.asarray(0.7),), loss.terms)
    with count_compilations() as again:
        run(other, num_iters=1)
    assert len(again) == 0
    assert math.isclose(float((2.0 * loss).weights[1]), 0.2)


def test_a_plain_function_adds_to_a_prior():
    """``fit + 0.1 * ChiPrior()`` with ``fit`` a plain function: it is wrapped as
    ``Loss(fit)`` (called ``fit(x_0, *loss_args)``), in either order; a plain function is
    scaled once wrapped (``0.5 * fit`` is Python's TypeError)."""
    x0 = jax.random.normal(jax.random.key(3), (3, 4))
    inputs = {"x_T": X_T, "z": None, "params": 0.5}
    expect = fit(x0, TARGET) + 0.1 * jadeis.ChiPrior()(x0, inputs)
    for total in (fit + 0.1 * jadeis.ChiPrior(), 0.1 * jadeis.ChiPrior() + fit):
        assert isinstance(total, jadeis.WeightedSum)
        np.testing.assert_allclose(total(x0, inputs, TARGET), expect, rtol=1e-12)
    with pytest.raises(TypeError):
        0.5 * fit  # noqa: B018
    np.testing.assert_allclose(
        (0.5 * jadeis.Loss(fit))(x0, inputs, TARGET), 0.5 * fit(x0, TARGET), rtol=1e-12
    )
    assert run(fit + 0.1 * jadeis.ChiPrior(), num_iters=2).losses.shape == (3, 3)


def test_progress_bar_shows_the_compile_apart(capsys):
    """guide's progress bar reports the first iteration (the compilation) on its own; the
    rate and ETA count the compiled iterations only."""
    jadeis.guide(fit, eps_fn, 0.75, X_T, None, schedule=SCH, ts=TS, optimizer=OPT,
                 wrt=("x_T",), loss_args=(TARGET,), num_iters=3)
    err = capsys.readouterr().err
    assert "compiling" in err and "first iteration (compiling)" in err and "3/3" in err


def test_state_of_another_guidance_is_refused():
    """A GuideState made for other variables: its stale variables kept being optimised."""
    g_x = jadeis.Guidance(fit, eps_fn, schedule=SCH, ts=TS, optimizer=OPT, wrt=("x_T",))
    g_xz = jadeis.Guidance(fit, eps_fn, schedule=SCH, ts=TS, optimizer=OPT, wrt=("x_T", "z"))
    state = g_xz.init(0.5, X_T, jnp.zeros((3, 4)), loss_args=(TARGET,))
    with pytest.raises(ValueError, match=r"wrt=\('x_T',\); got one that optimises \['x_T', 'z'\]"):
        g_x.step(state, (TARGET,))
    with pytest.raises(ValueError, match="state must be a GuideState"):
        g_x.loss({"x_T": X_T}, (TARGET,))


def test_sphere_projection_of_a_zero_example_is_on_the_sphere():
    """The zero vector has no direction: it returned NaN; now the constant vector of norm
    sqrt(d) (documented), and the gradient through the projection is finite."""
    x = jnp.stack([jnp.zeros(4), 3.0 * jnp.ones(4)])
    out = jadeis.sphere_projection(x)
    np.testing.assert_allclose(out, jnp.ones((2, 4)))
    tree = {"a": jnp.zeros((2, 3)), "b": jnp.zeros((2, 1))}
    out = jadeis.sphere_projection(tree)
    assert all(bool(jnp.all(v == 1.0)) for v in jax.tree.leaves(out))
    whole = jadeis.sphere_projection(jnp.zeros((2, 2)), per_example=False)
    np.testing.assert_allclose(whole, jnp.ones((2, 2)))
    g = jax.grad(lambda x: jnp.sum(jadeis.sphere_projection(x) ** 2))(x)
    assert bool(jnp.all(jnp.isfinite(g)))
