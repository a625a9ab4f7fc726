"""Truncated gradients (jadeis.Truncated): the last k steps only.

- k >= N is the inner strategy itself (to 1e-10);
- k < N equals the gradient of the last k steps with the state before them held fixed: for
  DDIM (no history) against an explicit two-part sample; for multistep solvers every inner
  strategy agrees with Backprop under the same truncation (wrt z, params, ts, a schedule
  parameter, per-step z and the noise array);
- the gradient with respect to x_T is refused; x_0 and the trajectory are those of sampling;
- with x_T_gradient="linear" it is alpha(t_s)/alpha(t_0) times the gradient with respect to
  the sample the tape starts from (an explicit two-part sample), exact for a model whose
  prediction does not depend on x, the same for every inner strategy; the sample unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jadeis

from .helpers import RandomMLP

SCH = jadeis.VPLinear()
MLP = RandomMLP(dim=3, hidden=8, seed=5)
X_T = jax.random.normal(jax.random.key(0), (2, 3), jnp.float64)
Z = 0.1 * jnp.arange(8, dtype=jnp.float64)
N = 8
TS = jadeis.time_grid(SCH, N)


def _grad(adjoint, solver=jadeis.DPMSolverPP(order=3), z=Z, argnums=(0, 1, 2, 3), **kw):
    def loss(z, params, ts, beta_max):
        x = jadeis.sample(
            MLP.eps_fn,
            params,
            X_T,
            z,
            schedule=jadeis.VPLinear(beta_max=beta_max),
            ts=ts,
            solver=solver,
            adjoint=adjoint,
            **kw,
        )
        return jnp.sum(jnp.sin(x) * x)

    return jax.grad(loss, argnums)(z, MLP.params, TS, 20.0)


def _close(a, b, tol=1e-10):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        scale = max(float(jnp.max(jnp.abs(v))), 1e-300)
        assert float(jnp.max(jnp.abs(u - v))) / scale < tol


@pytest.mark.parametrize("k", [N, N + 3])
def test_k_at_least_n_is_the_inner_strategy(k):
    _close(_grad(jadeis.Truncated(k)), _grad(jadeis.DiscreteAdjoint()))


@pytest.mark.parametrize("k", [1, 3])  # k = 1: the one-step gradient
def test_ddim_truncation_against_a_two_part_sample(k):
    start = N - k

    def loss(z, params):
        x_mid = jax.lax.stop_gradient(
            jadeis.sample(
                MLP.eps_fn, params, X_T, z, schedule=SCH, ts=TS[: start + 1], solver=jadeis.DDIM()
            )
        )
        x = jadeis.sample(
            MLP.eps_fn,
            params,
            x_mid,
            z,
            schedule=SCH,
            ts=TS[start:],
            solver=jadeis.DDIM(),
            adjoint=jadeis.Backprop(),
        )
        return jnp.sum(jnp.sin(x) * x)

    want = jax.grad(loss, (0, 1))(Z, MLP.params)
    got = _grad(jadeis.Truncated(k), solver=jadeis.DDIM(), argnums=(0, 1))
    _close(got, want)


@pytest.mark.parametrize(
    "k,solver,inner",
    [
        (1, jadeis.DPMSolverPP(order=3), jadeis.DiscreteAdjoint()),
        (3, jadeis.DPMSolverPP(order=3), jadeis.DiscreteAdjoint()),
        (3, jadeis.DPMSolverPP(order=3), jadeis.DiscreteAdjoint(fast=False)),
        (1, jadeis.UniPC(order=2), jadeis.DiscreteAdjoint()),
        (3, jadeis.Rex(), jadeis.ReversibleAdjoint()),
    ],
    ids=["dpmpp3-1", "dpmpp3-3", "dpmpp3-generic-3", "unipc2-1", "rex-reversible-3"],
)
def test_inner_strategies_agree_with_backprop(k, solver, inner):
    want = _grad(jadeis.Truncated(k, jadeis.Backprop()), solver=solver)
    got = _grad(jadeis.Truncated(k, inner), solver=solver)
    _close(got, want, 1e-8 if isinstance(inner, jadeis.ReversibleAdjoint) else 1e-10)
    # and differs from the exact gradient (the earlier steps are left out)
    exact = _grad(jadeis.DiscreteAdjoint(), solver=solver)
    assert float(jnp.max(jnp.abs(got[0] - exact[0]))) > 1e-6


def test_per_step_z_and_noise():
    z = jadeis.PerStep(jnp.tile(Z, (N, 1)) * jnp.linspace(1, 2, N)[:, None])
    noise = jax.random.normal(jax.random.key(2), (N,) + X_T.shape)
    solver = jadeis.SDEDPMSolverPP(order=2)

    def grads(adjoint):
        def loss(z, noise):
            x = jadeis.sample(
                MLP.eps_fn,
                MLP.params,
                X_T,
                z,
                schedule=SCH,
                ts=TS,
                solver=solver,
                adjoint=adjoint,
                noise=noise,
            )
            return jnp.sum(x**2)

        return jax.grad(loss, (0, 1))(z, noise)

    got = grads(jadeis.Truncated(3))
    want = grads(jadeis.Truncated(3, jadeis.Backprop()))
    _close(got, want)
    # the untaped steps' entries are zero by definition; the last three are not
    assert float(jnp.max(jnp.abs(got[1][: N - 3]))) == 0.0
    assert float(jnp.min(jnp.max(jnp.abs(got[1][N - 3 :]), axis=(1, 2)))) > 0
    assert float(jnp.max(jnp.abs(got[0].values[: N - 3]))) == 0.0


def test_x_T_gradient_is_refused_and_the_sample_is_unchanged():
    def loss(x_T):
        return jnp.sum(
            jadeis.sample(
                MLP.eps_fn, MLP.params, x_T, Z, schedule=SCH, ts=TS, adjoint=jadeis.Truncated(2)
            )
        )

    with pytest.raises(ValueError, match="no gradient with respect to x_T"):
        jax.grad(loss)(X_T)
    kw = dict(schedule=SCH, ts=TS, solver=jadeis.DPMSolverPP(order=3))
    x = jadeis.sample(MLP.eps_fn, MLP.params, X_T, Z, adjoint=jadeis.Truncated(2), **kw)
    np.testing.assert_allclose(x, jadeis.sample(MLP.eps_fn, MLP.params, X_T, Z, **kw), rtol=1e-13)
    traj = jadeis.sample_trajectory(
        MLP.eps_fn, MLP.params, X_T, Z, adjoint=jadeis.Truncated(2), **kw
    )
    np.testing.assert_allclose(
        traj, jadeis.sample_trajectory(MLP.eps_fn, MLP.params, X_T, Z, **kw), rtol=1e-13
    )
    sol = jadeis.solve(MLP.eps_fn, MLP.params, X_T, Z, adjoint=jadeis.Truncated(2), **kw)
    assert int(sol.stats.num_steps) == N and int(sol.stats.grad_vjps) == 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="k must be"):
        jadeis.Truncated(0)
    with pytest.raises(ValueError, match="not another Truncated"):
        jadeis.Truncated(2, jadeis.Truncated(1))
    with pytest.raises(ValueError, match="adaptive controller"):
        jadeis.sample(
            MLP.eps_fn,
            MLP.params,
            X_T,
            Z,
            schedule=SCH,
            ts=jnp.asarray([1.0, 1e-3]),
            solver=jadeis.SinglestepDPMSolver(3),
            controller=jadeis.PIDController(),
            adjoint=jadeis.Truncated(2),
        )


def _grad_x_T(adjoint, solver=jadeis.DDIM(), eps_fn=MLP.eps_fn, x_T=X_T):
    def loss(x_T, z):
        x = jadeis.sample(
            eps_fn, MLP.params, x_T, z, schedule=SCH, ts=TS, solver=solver, adjoint=adjoint
        )
        return jnp.sum(jnp.sin(x) * x)

    return jax.grad(loss, (0, 1))(x_T, Z)


@pytest.mark.parametrize("k", [1, 3])
def test_linear_x_T_gradient_against_a_two_part_sample(k):
    """dL/dx_T = alpha(t_s)/alpha(t_0) dL/dx_s, x_s the sample the tape starts from."""
    start = N - k
    x_mid = jadeis.sample(
        MLP.eps_fn, MLP.params, X_T, Z, schedule=SCH, ts=TS[: start + 1], solver=jadeis.DDIM()
    )

    def tail(x_mid, z):
        x = jadeis.sample(
            MLP.eps_fn,
            MLP.params,
            x_mid,
            z,
            schedule=SCH,
            ts=TS[start:],
            solver=jadeis.DDIM(),
            adjoint=jadeis.Backprop(),
        )
        return jnp.sum(jnp.sin(x) * x)

    g_mid, g_z = jax.grad(tail, (0, 1))(x_mid, Z)
    ratio = SCH.alpha(TS[start]) / SCH.alpha(TS[0])
    got = _grad_x_T(jadeis.Truncated(k, x_T_gradient="linear"))
    _close(got, (ratio * g_mid, g_z))


def test_linear_x_T_gradient_is_exact_for_a_prediction_independent_of_x():
    """DDIM with eps(x, t, z) = eps(t, z): the untaped steps are exactly the linear part."""
    eps_fn = lambda p, x, t, z: jnp.sin(3.0 * t + z[:3]) * jnp.ones_like(x)  # noqa: E731
    exact = _grad_x_T(jadeis.DiscreteAdjoint(), eps_fn=eps_fn)
    for k in (1, 3):
        got = _grad_x_T(jadeis.Truncated(k, x_T_gradient="linear"), eps_fn=eps_fn)
        _close(got[0], exact[0])


@pytest.mark.parametrize(
    "solver,inner",
    [
        (jadeis.DPMSolverPP(order=3), jadeis.DiscreteAdjoint()),
        (jadeis.UniPC(order=2), jadeis.DiscreteAdjoint()),
        (jadeis.DDIM(), jadeis.AdjointDEIS(order=2)),
        (jadeis.Rex(), jadeis.ReversibleAdjoint()),
    ],
    ids=["dpmpp3", "unipc2", "ddim-deis2", "rex-reversible"],
)
def test_linear_x_T_gradient_inner_strategies_agree_with_backprop(solver, inner):
    k = 3
    want = _grad_x_T(jadeis.Truncated(k, jadeis.Backprop(), "linear"), solver=solver)
    got = _grad_x_T(jadeis.Truncated(k, inner, "linear"), solver=solver)
    if isinstance(inner, jadeis.AdjointDEIS):  # the continuous adjoint of the last k steps
        rel = float(jnp.linalg.norm(got[0] - want[0]) / jnp.linalg.norm(want[0]))
        assert rel < 0.3, rel
    else:
        _close(got, want, 1e-8 if isinstance(inner, jadeis.ReversibleAdjoint) else 1e-10)
    # the sample is the sampler's
    kw = dict(schedule=SCH, ts=TS, solver=solver)
    np.testing.assert_allclose(
        jadeis.sample(
            MLP.eps_fn, MLP.params, X_T, Z, adjoint=jadeis.Truncated(k, inner, "linear"), **kw
        ),
        jadeis.sample(MLP.eps_fn, MLP.params, X_T, Z, **kw),
        rtol=1e-13,
    )


def test_bad_x_T_gradient():
    with pytest.raises(ValueError, match="x_T_gradient must be"):
        jadeis.Truncated(2, x_T_gradient="zero")


def test_linear_x_T_gradient_of_a_float32_state():
    """A float32 state on a float64 grid (strict promotion): the link is cast to the state."""
    x32 = X_T.astype(jnp.float32)
    g = jax.grad(
        lambda x: jnp.sum(
            jadeis.sample(
                MLP.eps_fn,
                MLP.params,
                x,
                Z,
                schedule=SCH,
                ts=TS,
                solver=jadeis.DDIM(),
                adjoint=jadeis.Truncated(3, x_T_gradient="linear"),
            )
        )
    )(x32)
    assert g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g)))
