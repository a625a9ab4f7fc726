"""Gradients through sample under jit and vmap, in float32 and float64, and with x_T
sharded over several (virtual CPU) devices."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jadeis

SCH = jadeis.VPLinear()
N = 8
TS = jadeis.time_grid(SCH, N)
HIDDEN = 6

STRATEGIES = [
    jadeis.DiscreteAdjoint(),
    jadeis.AdjointDEIS(order=2),
    jadeis.AdjointDEIS(order=3, trajectory="reconstruct"),
    jadeis.Backprop(),
]


def quick_jit(fn=None, **kw):
    """jax.jit with XLA backend optimisation off: these tiny problems are compile-bound."""
    if fn is None:
        return functools.partial(quick_jit, **kw)
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0}, **kw)


def eps_fn(params, x, t, z):
    """Row-wise nonlinear model: each row of x is one example."""
    h = jnp.tanh(x @ params["w1"] + t * params["b"] + z)
    return h @ params["w2"]


def make_params(dtype):
    rng = np.random.default_rng(0)
    return {
        "w1": jnp.asarray(0.8 * rng.standard_normal((2, HIDDEN)), dtype),
        "b": jnp.asarray(rng.standard_normal(HIDDEN), dtype),
        "w2": jnp.asarray(0.6 * rng.standard_normal((HIDDEN, 2)), dtype),
    }


PARAMS = make_params(jnp.float64)
Z = jnp.linspace(-0.3, 0.3, HIDDEN)
X_BATCH = jnp.asarray(np.random.default_rng(1).standard_normal((5, 2)))
W_BATCH = jnp.asarray(np.random.default_rng(2).standard_normal((5, 2)))


def loss_fn(adjoint, solver=jadeis.DPMSolverPP(order=2), ts=TS, **kw):
    def loss(params, x_T, z, w):
        x0 = jadeis.sample(
            eps_fn, params, x_T, z, schedule=SCH, ts=ts, solver=solver, adjoint=adjoint, **kw
        )
        return jnp.sum(w * x0) + 0.5 * jnp.sum(jnp.tanh(x0) ** 2)

    return loss


def assert_trees_close(a, b, rtol, msg=""):
    assert jax.tree.structure(a) == jax.tree.structure(b), msg
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        scale = float(np.max(np.abs(y)))
        assert float(np.max(np.abs(x - y))) <= rtol * scale + 1e-14, (msg, x, y)


@pytest.mark.parametrize("adjoint", STRATEGIES, ids=repr)
def test_jit_and_vmap(adjoint):
    """jit(grad) equals grad; vmap over a batch of x_T (one example per call) equals the
    per-example gradients, and equals the gradient of the summed loss on the whole batch."""
    grad = jax.grad(loss_fn(adjoint), argnums=(0, 1, 2))
    eager = grad(PARAMS, X_BATCH, Z, W_BATCH)
    jitted = quick_jit(grad)(PARAMS, X_BATCH, Z, W_BATCH)
    assert_trees_close(jitted, eager, 1e-12, "jit")

    one = lambda x, w: grad(PARAMS, x[None], Z, w[None])
    batched = quick_jit(jax.vmap(one))(X_BATCH, W_BATCH)
    loop = [one(X_BATCH[i], W_BATCH[i]) for i in range(X_BATCH.shape[0])]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *loop)
    assert_trees_close(batched, stacked, 1e-12, "vmap")
    # rows are independent: the per-example x_T gradients are the batch gradient's rows,
    # and the per-example params/z gradients sum to the batch gradient
    assert_trees_close(batched[1][:, 0], eager[1], 1e-12, "x_T rows")
    summed = jax.tree.map(lambda v: jnp.sum(v, axis=0), (batched[0], batched[2]))
    assert_trees_close(summed, (eager[0], eager[2]), 1e-12, "params, z sums")


def test_vmap_sde_keys():
    """vmap over per-example keys with an SDE sampler: equals the per-example loop, and
    DiscreteAdjoint == Backprop."""
    keys = jax.random.split(jax.random.key(0), X_BATCH.shape[0])
    solver = jadeis.SDEDPMSolverPP(order=2)

    def one(adjoint, k, x, w):
        loss = loss_fn(adjoint, solver, key=k)
        return jax.grad(loss, argnums=1)(PARAMS, x[None], Z, w[None])[0]

    @quick_jit
    def run():
        disc = jax.vmap(functools.partial(one, jadeis.DiscreteAdjoint()))(keys, X_BATCH, W_BATCH)
        ref = jax.vmap(functools.partial(one, jadeis.Backprop()))(keys, X_BATCH, W_BATCH)
        loop = jnp.stack(
            [one(jadeis.DiscreteAdjoint(), keys[i], X_BATCH[i], W_BATCH[i]) for i in range(5)]
        )
        same_key = jax.vmap(functools.partial(one, jadeis.DiscreteAdjoint(), keys[0]))(
            X_BATCH, W_BATCH
        )
        return disc, ref, loop, same_key

    disc, ref, loop, same_key = run()
    assert disc.shape == X_BATCH.shape
    assert_trees_close(disc, ref, 1e-12)
    assert_trees_close(disc, loop, 1e-12)
    assert float(jnp.max(jnp.abs(disc[1:] - same_key[1:]))) > 1e-6  # the keys matter


@pytest.mark.parametrize("adjoint", STRATEGIES[:3], ids=repr)
def test_float32_close_to_float64(adjoint):
    """The same problem in float32 (x_T, params, z float32; ts float64) gives float32
    gradients within 1e-4 (relative to the largest entry) of the float64 gradients
    (measured 1.5e-6 DiscreteAdjoint, 6e-6 and 9e-6 AdjointDEIS)."""
    grad = jax.grad(loss_fn(adjoint), argnums=(0, 1, 2))
    g64 = grad(PARAMS, X_BATCH, Z, W_BATCH)
    to32 = lambda t: jax.tree.map(lambda v: v.astype(jnp.float32), t)
    g32 = grad(to32(PARAMS), to32(X_BATCH), to32(Z), to32(W_BATCH))
    for leaf in jax.tree.leaves(g32):
        assert leaf.dtype == jnp.float32
    assert_trees_close(g32, g64, 1e-4)
    # and it is float32 arithmetic, not float64 in disguise
    diffs = [
        float(jnp.max(jnp.abs(a.astype(jnp.float64) - b)))
        for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g64))
    ]
    assert max(diffs) > 1e-12


_SHARDING_SCRIPT = textwrap.dedent(
    """
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jadeis

    assert jax.device_count() == 4, jax.devices()
    sch = jadeis.VPLinear()
    ts = jadeis.time_grid(sch, 8)
    rng = np.random.default_rng(0)
    params = {
        "w1": jnp.asarray(0.8 * rng.standard_normal((2, 6))),
        "b": jnp.asarray(rng.standard_normal(6)),
        "w2": jnp.asarray(0.6 * rng.standard_normal((6, 2))),
    }
    z = jnp.linspace(-0.3, 0.3, 6)
    x_T = jnp.asarray(rng.standard_normal((8, 2)))
    w = jnp.asarray(rng.standard_normal((8, 2)))

    def eps_fn(p, x, t, zz):
        return jnp.tanh(x @ p["w1"] + t * p["b"] + zz) @ p["w2"]

    mesh = Mesh(np.array(jax.devices()), ("batch",))
    shard = NamedSharding(mesh, P("batch"))
    x_s = jax.device_put(x_T, shard)
    w_s = jax.device_put(w, shard)
    assert len(x_s.sharding.device_set) == 4
    for adjoint in (
        jadeis.DiscreteAdjoint(),
        jadeis.AdjointDEIS(order=2),
        jadeis.AdjointDEIS(order=2, trajectory="reconstruct"),
    ):
        def loss(p, x, ww):
            x0 = jadeis.sample(
                eps_fn, p, x, z, schedule=sch, ts=ts, solver=jadeis.DPMSolverPP(order=2),
                adjoint=adjoint,
            )
            return jnp.sum(ww * x0) + 0.5 * jnp.sum(jnp.tanh(x0) ** 2)

        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        one_dev = jax.device_put((params, x_T, w), jax.devices()[0])
        g_p1, g_x1 = grad(*one_dev)
        g_p, g_x = grad(params, x_s, w_s)
        np.testing.assert_allclose(np.asarray(g_x), np.asarray(g_x1), rtol=1e-12, atol=1e-14)
        for a, b in zip(jax.tree.leaves(g_p), jax.tree.leaves(g_p1)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-11, atol=1e-13)
        assert g_x.sharding.is_equivalent_to(x_s.sharding, g_x.ndim), (adjoint, g_x.sharding)
        assert len(g_x.addressable_shards) == 4
        assert all(s.data.shape == (2, 2) for s in g_x.addressable_shards)
        # eager grad (no outer jit) keeps the sharding too
        g_x_eager = jax.grad(loss, argnums=1)(params, x_s, w_s)
        assert g_x_eager.sharding.is_equivalent_to(x_s.sharding, 2), g_x_eager.sharding
        print("ok", type(adjoint).__name__)
    """
)


def test_sharded_batch_gradient():
    """A batch of 8 sharded over 4 CPU devices (NamedSharding, subprocess with
    --xla_force_host_platform_device_count=4): dL/dx_T and dL/dparams equal the
    single-device gradients, and dL/dx_T stays sharded like x_T, for DiscreteAdjoint and
    AdjointDEIS (cached and reconstruct)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, "-c", _SHARDING_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.count("ok") == 3, out.stdout
