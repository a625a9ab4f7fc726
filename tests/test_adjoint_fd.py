"""Finite differences (float64, central, random directions) on a small nonlinear flax network.

DiscreteAdjoint and Backprop are the exact gradients of the sampler that was run, so they
match finite differences of ``sample`` tightly. AdjointDEIS approximates the gradient of the
continuous flow, so it matches the finite differences of the N-step sampler only up to its
discretisation error, which shrinks as N grows.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jadeis

SCH = jadeis.VPLinear()
FD_EPS = 1e-5
N_DIRECTIONS = 3


def quick_jit(fn=None, **kw):
    """jax.jit with XLA backend optimisation off: these tiny problems are compile-bound."""
    if fn is None:
        return functools.partial(quick_jit, **kw)
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0}, **kw)


class MLP(nn.Module):
    """eps(x, t, z) from concat(x, t-embedding, z) through two tanh layers."""

    hidden: int = 16

    @nn.compact
    def __call__(self, x, t, z):
        freqs = jnp.array([1.0, 4.0], x.dtype)
        temb = jnp.concatenate([jnp.sin(freqs * t), jnp.cos(freqs * t)])
        batch = x.shape[:-1]
        h = jnp.concatenate(
            [x, jnp.broadcast_to(temb, batch + temb.shape), jnp.broadcast_to(z, batch + z.shape)],
            axis=-1,
        )
        dense = functools.partial(nn.Dense, dtype=x.dtype, param_dtype=x.dtype)
        h = jnp.tanh(dense(self.hidden)(h))
        h = jnp.tanh(dense(self.hidden)(h))
        return dense(x.shape[-1])(h)


MODEL = MLP()


def eps_fn(params, x, t, z):
    return MODEL.apply(params, x, t, z)


X_T = jax.random.normal(jax.random.key(1), (4, 2), jnp.float64)
Z = jnp.array([0.3, -0.7, 0.5])
PARAMS = MODEL.init(jax.random.key(0), X_T, jnp.asarray(0.5), Z)
WEIGHT = jax.random.normal(jax.random.key(2), X_T.shape, jnp.float64)


def loss(x0):
    return jnp.sum(WEIGHT * x0) + 0.5 * jnp.sum(x0**2)


def _random_like(tree, rng):
    """A random direction shaped like ``tree`` (numpy RNG: no random-number kernels to
    compile inside the jitted test functions)."""
    return jax.tree.map(lambda v: jnp.asarray(rng.standard_normal(jnp.shape(v))), tree)


_RNG = np.random.default_rng(0)
DIRECTIONS = [
    [_random_like(primal, _RNG) for _ in range(N_DIRECTIONS)] for primal in (PARAMS, X_T, Z)
]


def _vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _axpy(a, x, y):
    return jax.tree.map(lambda u, v: u + a * v, y, x)


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


@quick_jit(static_argnums=(0, 1, 2))
def directional(n, solver, adjoints):
    """Directional derivatives <dL/dparams, d>, <dL/dx_T, d>, <dL/dz, d> in N_DIRECTIONS
    random directions d: central differences, shape (3, N_DIRECTIONS), and the gradient of
    each strategy in ``adjoints``, shape (len(adjoints), 3, N_DIRECTIONS). The 6 x
    N_DIRECTIONS shifted forward passes run as one vmap."""
    ts = jadeis.time_grid(SCH, n)
    primal = (PARAMS, X_T, Z)

    def f(adjoint, p, x, z):
        return loss(
            jadeis.sample(eps_fn, p, x, z, schedule=SCH, ts=ts, solver=solver, adjoint=adjoint)
        )

    dirs = DIRECTIONS
    shifted = []
    for which in range(3):
        for d in dirs[which]:
            for sign in (1.0, -1.0):
                args = list(primal)
                args[which] = _axpy(sign * FD_EPS, d, primal[which])
                shifted.append(tuple(args))
    values = jax.vmap(functools.partial(f, adjoints[0]))(*_stack(shifted))
    values = values.reshape(3, N_DIRECTIONS, 2)
    fd = (values[..., 0] - values[..., 1]) / (2 * FD_EPS)
    ad = []
    for adjoint in adjoints:
        g = jax.grad(functools.partial(f, adjoint), argnums=(0, 1, 2))(*primal)
        ad.append(
            jnp.stack([jnp.stack([_vdot(g[which], d) for d in dirs[which]]) for which in range(3)])
        )
    return fd, jnp.stack(ad)


EXACT = (jadeis.DiscreteAdjoint(), jadeis.Backprop())


@pytest.mark.parametrize(
    "solver", [jadeis.DPMSolverPP(order=3), jadeis.DPMSolver(order=2), jadeis.DDIM()], ids=repr
)
def test_exact_strategies_match_finite_differences(solver):
    """DiscreteAdjoint and Backprop: directional derivatives of dL/dparams, dL/dx_T and
    dL/dz equal central differences (eps 1e-5, float64) to rtol 1e-6 (10 steps; measured
    relative differences 6e-11 to 4e-8)."""
    fd, ad = directional(10, solver, EXACT)
    fd, ad = np.asarray(fd), np.asarray(ad)
    assert np.all(np.abs(fd) > 1e-3), fd  # meaningful directions
    for name, a in zip(("DiscreteAdjoint", "Backprop"), ad):
        np.testing.assert_allclose(a, fd, rtol=1e-6, err_msg=name)


DEIS = tuple(
    jadeis.AdjointDEIS(order=k, trajectory=mode)
    for k in (1, 2)
    for mode in ("cached", "reconstruct")
)


@pytest.mark.parametrize("mode", ["cached", "reconstruct"])
@pytest.mark.parametrize("k", [1, 2])
def test_adjoint_deis_approaches_finite_differences(k, mode):
    """AdjointDEIS-k against central differences of the N-step DPM-Solver++(2) sampler:
    loose at N = 20 (relative error below 25%; measured 3% to 16%), and the error shrinks
    with N at about order k: from N = 20 to 80 by more than 4^k / 1.6 (measured: k = 1
    4.2x to 4.9x, k = 2 14x to 31x)."""
    solver = jadeis.DPMSolverPP(order=2)
    which = DEIS.index(jadeis.AdjointDEIS(order=k, trajectory=mode))
    rel = []
    for n in (20, 80):
        fd, ad = directional(n, solver, DEIS)
        fd, ad = np.asarray(fd), np.asarray(ad[which])
        rel.append(np.max(np.abs(ad - fd), axis=1) / np.max(np.abs(fd), axis=1))
    rel = np.asarray(rel)  # (2 grids, 3 gradients)
    assert np.all(rel[0] < 0.25), rel
    assert np.all(rel[1] < rel[0] / (4.0**k / 1.6)), rel
