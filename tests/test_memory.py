"""Memory of the gradient strategies, read from the compiled executable.

``jax.jit(grad_fn).lower(...).compile().memory_analysis().temp_size_in_bytes`` is the
scratch memory XLA allocates for the whole forward + backward computation (arguments and
outputs excluded). The network has large hidden activations (two tanh layers of width 512
on a batch of 64, i.e. 64 x 512 x 8 bytes = 256 KiB per layer per step, against |x| =
64 x 32 x 8 bytes = 16 KiB), so storing activations is unmistakable:

- AdjointDEIS(trajectory="reconstruct"): flat in N (nothing is stored per step);
- AdjointDEIS(trajectory="cached") and DiscreteAdjoint: grow by the N states only, about
  |x| per step (measured 1.0 |x| per step); with ``steps=M`` flat in N;
- AdjointDEIS-k's baseline does not depend on k (no params-sized multistep history);
- Backprop: grows with the activations (measured 65 |x| per step: the two hidden layers'
  activations and their derivatives, and the state).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jadeis

SCH = jadeis.VPLinear()
B, D, H = 64, 32, 512
_RNG = np.random.default_rng(0)
PARAMS = {
    "w1": jnp.asarray(_RNG.standard_normal((D, H)) / 4),
    "w2": jnp.asarray(_RNG.standard_normal((H, H)) / 20),
    "w3": jnp.asarray(_RNG.standard_normal((H, D)) / 20),
}
X_T = jnp.asarray(_RNG.standard_normal((B, D)))
Z = jnp.asarray(0.1)
X_BYTES = X_T.size * X_T.dtype.itemsize
N_SMALL, N_LARGE = 32, 512


def eps_fn(p, x, t, z):
    h = jnp.tanh(x @ p["w1"] + t)
    h = jnp.tanh(h @ p["w2"])
    return h @ p["w3"] + z


def temp_bytes(adjoint, n, solver=jadeis.DPMSolverPP(order=2), **kw):
    ts = jadeis.time_grid(SCH, n)

    def loss(p, x, z):
        x0 = jadeis.sample(
            eps_fn, p, x, z, schedule=SCH, ts=ts, solver=solver, adjoint=adjoint, **kw
        )
        return jnp.sum(x0**2)

    grad_fn = jax.grad(loss, argnums=(0, 1, 2))
    analysis = jax.jit(grad_fn).lower(PARAMS, X_T, Z).compile().memory_analysis()
    assert analysis is not None, "this backend gives no memory analysis"
    return analysis.temp_size_in_bytes


def growth_per_step(adjoint, **kw):
    """(temp bytes at N_SMALL, at N_LARGE, growth per step in units of |x|)."""
    small, large = temp_bytes(adjoint, N_SMALL, **kw), temp_bytes(adjoint, N_LARGE, **kw)
    return small, large, (large - small) / (N_LARGE - N_SMALL) / X_BYTES


@pytest.mark.parametrize("order", [1, 3])
def test_reconstruct_is_flat_in_n(order):
    """AdjointDEIS(trajectory="reconstruct"): N = 32 vs 512 within 1.5x (measured: equal)."""
    small, large, _ = growth_per_step(jadeis.AdjointDEIS(order=order, trajectory="reconstruct"))
    assert large <= 1.5 * small, (small, large)


@pytest.mark.parametrize(
    ("adjoint", "kw"),
    [
        (jadeis.AdjointDEIS(order=2), {}),
        (jadeis.AdjointDEIS(order=3), {"solver": jadeis.DPMSolver(order=3)}),
        (jadeis.DiscreteAdjoint(), {}),
        (jadeis.DiscreteAdjoint(), {"solver": jadeis.SDEDPMSolverPP(order=2), "key": 0}),
        (jadeis.AdjointDEIS(order=1), {"solver": jadeis.SDEDPMSolver(), "key": 0}),
    ],
    ids=["deis2", "deis3", "discrete", "discrete-sde", "deis1-sde"],
)
def test_states_only_grow_by_x_per_step(adjoint, kw):
    """Cached AdjointDEIS and DiscreteAdjoint (ODE and SDE samplers) keep the N states and
    nothing else per step: growth between 0.5 |x| and 1.5 |x| bytes per step (measured
    1.0). The upper bound catches a second copy of the states (2 |x| per step, as the
    cached AdjointDEIS had while its residual was the concatenation [states, x_0] and the
    backward pass read a reversed copy of it)."""
    kw = dict(kw)
    if "key" in kw:
        kw["key"] = jax.random.key(kw["key"])
    _, _, per_step = growth_per_step(adjoint, **kw)
    assert 0.5 <= per_step <= 1.5, per_step


def test_fixed_adjoint_grid_is_flat_in_n():
    """AdjointDEIS(steps=M), cached: the states are re-solved on the M-step adjoint grid in
    the backward pass, so the memory depends on M, not on the sampling grid's N."""
    small, large, _ = growth_per_step(jadeis.AdjointDEIS(order=2, steps=100))
    assert large <= 1.1 * small, (small, large)


def test_adjoint_deis_memory_does_not_grow_with_order():
    """The multistep AdjointDEIS-k keeps no params-sized history: its scratch memory at
    order 3 is within 10% of order 1 (before the z/params VJPs were weighted as they were
    computed, order 3 held four extra params-sized buffers)."""
    first = temp_bytes(jadeis.AdjointDEIS(order=1, trajectory="reconstruct"), N_SMALL)
    third = temp_bytes(jadeis.AdjointDEIS(order=3, trajectory="reconstruct"), N_SMALL)
    params_bytes = sum(v.size * v.dtype.itemsize for v in jax.tree.leaves(PARAMS))
    assert third <= 1.1 * first, (first, third, params_bytes)


def test_backprop_grows_with_activations():
    """Backprop stores the activations of every step: more than 16 |x| per step (one hidden
    layer's activations alone are 16 |x|; measured 65 |x|), over 20 times the cached
    strategies' growth."""
    _, _, backprop = growth_per_step(jadeis.Backprop())
    _, _, cached = growth_per_step(jadeis.DiscreteAdjoint())
    assert backprop > 16.0, backprop
    assert backprop > 20.0 * cached, (backprop, cached)
