"""jadeis.PerExamplePIDController: the PID controller with the error norm taken per example.

- its norm is the largest per-example RMS (pytree states pooled per example), and a batch of
  one example takes exactly the steps of PIDController;
- one hard example in an easy batch decides the steps (more steps than the batch RMS);
- the gradient of an adaptive solve under it equals Backprop on the same accepted steps;
- states whose leaves do not share the leading (batch) axis are refused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jadeis

SCH = jadeis.VPLinear()
ENDS = jnp.asarray([1.0, 1e-3], jnp.float64)


def eps_gauss(s2, x, t, mu):
    a, s = SCH.alpha(t), SCH.sigma(t)
    return s * (x - a * mu) / (a**2 * s2 + s**2)


def eps_scaled(s2, x, t, w):
    # example b has data variance s2 * w_b: small w_b is stiff near t = 0
    a, s = SCH.alpha(t), SCH.sigma(t)
    v = a**2 * s2 * w[:, None] + s**2
    return s * x / v


def test_norm_is_the_worst_example():
    ctrl = jadeis.PerExamplePIDController(rtol=0.0, atol=1.0)
    err = jnp.asarray([[3.0, 4.0], [0.0, 0.0], [1.0, 1.0]])
    x = jnp.zeros((3, 2))
    assert float(ctrl.error_norm(err, x, x)) == pytest.approx(np.sqrt(12.5))
    # a pytree state: each example's RMS pools its leaves
    tree = {"a": err, "b": jnp.zeros((3, 6))}
    xs = {"a": x, "b": jnp.zeros((3, 6))}
    assert float(ctrl.error_norm(tree, xs, xs)) == pytest.approx(np.sqrt(25.0 / 8))
    # NaN is a failed step
    assert float(ctrl.error_norm(err.at[1, 0].set(jnp.nan), x, x)) == np.inf


def test_mismatched_batch_axes_refused():
    ctrl = jadeis.PerExamplePIDController()
    tree = {"a": jnp.ones((3, 2)), "b": jnp.ones((4, 2))}
    with pytest.raises(ValueError, match="leading axis"):
        ctrl.error_norm(tree, tree, tree)


def test_one_example_equals_pid():
    x_T = jax.random.normal(jax.random.key(0), (1, 6), jnp.float64)
    mu = jnp.linspace(-1.0, 1.0, 6)
    solver = jadeis.SinglestepDPMSolver(3)
    runs = [
        jadeis.solve(eps_gauss, 0.09, x_T, mu, schedule=SCH, ts=ENDS, solver=solver,
                     controller=c(rtol=1e-5, atol=1e-5))
        for c in (jadeis.PIDController, jadeis.PerExamplePIDController)
    ]
    assert int(runs[0].stats.num_attempts) == int(runs[1].stats.num_attempts)
    np.testing.assert_allclose(runs[0].ts, runs[1].ts, rtol=1e-6)
    np.testing.assert_allclose(runs[0].x_0, runs[1].x_0, rtol=1e-6)


def test_hard_example_decides():
    # 15 easy examples and one stiff one: the batch RMS dilutes the stiff example's error
    w = jnp.ones((16,)).at[3].set(1e-3)
    x_T = jax.random.normal(jax.random.key(1), (16, 4), jnp.float64)
    solver = jadeis.SinglestepDPMSolver(3)

    def run(c):
        return jadeis.solve(eps_scaled, 0.25, x_T, w, schedule=SCH, ts=ENDS, solver=solver,
                            controller=c(rtol=1e-4, atol=1e-4))

    rms, worst = run(jadeis.PIDController), run(jadeis.PerExamplePIDController)
    assert int(worst.stats.num_steps) > int(rms.stats.num_steps)


@pytest.mark.parametrize("solver", [jadeis.SinglestepDPMSolver(3), jadeis.DPMSolverPP(3)])
def test_gradient_equals_backprop(solver):
    x_T = jax.random.normal(jax.random.key(2), (3, 6), jnp.float64)
    mu = jnp.linspace(-1.0, 1.0, 6)
    ctrl = jadeis.PerExamplePIDController(rtol=1e-4, atol=1e-4, max_steps=128)

    def loss(x, z, s2, adjoint):
        x0 = jadeis.sample(eps_gauss, s2, x, z, schedule=SCH, ts=ENDS, solver=solver,
                           controller=ctrl, adjoint=adjoint)
        return jnp.sum(jnp.sin(x0))

    g = jax.grad(loss, argnums=(0, 1, 2))(x_T, mu, 0.09, jadeis.DiscreteAdjoint())
    ref = jax.grad(loss, argnums=(0, 1, 2))(x_T, mu, 0.09, jadeis.Backprop())
    for a, b in zip(g, ref):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
