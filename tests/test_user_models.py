"""Users' models as they are: an Equinox module (functions, integer and boolean leaves
beside the weights) or a flax nnx model (RNG and BatchNorm state beside the parameters) as
``params``, under every gradient strategy and in ``guide``."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadeis

SCH = jadeis.VPLinear()
TS = jadeis.time_grid(SCH, 4)
X_T = jax.random.normal(jax.random.key(0), (3, 2, 4, 4))  # (batch, channels, h, w)


class Denoiser(eqx.Module):
    """A conv + MLP denoiser with leaves of every kind: weights, an activation function, an
    integer buffer, a boolean flag, a string and a Python float."""

    conv: eqx.nn.Conv2d
    mlp: eqx.nn.MLP
    taps: jax.Array  # int
    use_mlp: jax.Array  # bool
    name: str = "denoiser"
    gain: float = 0.5

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(3, 2, 3, padding=1, key=k1)
        self.mlp = eqx.nn.MLP(2 * 16, 2 * 16, 16, 1, activation=jax.nn.silu, key=k2)
        self.taps = jnp.arange(3)
        self.use_mlp = jnp.array(True)

    def __call__(self, x, t):
        tt = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[1:])[None]
        h = self.conv(jnp.concatenate([x, tt], axis=0))
        mixed = self.mlp(h.reshape(-1)).reshape(h.shape)
        h = jnp.where(self.use_mlp, h + 0.1 * mixed, h)
        return self.gain * h * self.taps.shape[0] / 3


MODEL = Denoiser(jax.random.key(1))


def eps_fn(model, x, t, z):
    return jax.vmap(model, in_axes=(0, None))(x, t)


CASES = {
    "discrete": (jadeis.DPMSolverPP(order=2), jadeis.DiscreteAdjoint()),
    "discrete-generic": (jadeis.UniPC(), jadeis.DiscreteAdjoint()),
    "deis-cached": (jadeis.DPMSolverPP(order=2), jadeis.AdjointDEIS(order=2)),
    "deis-reconstruct": (
        jadeis.DPMSolverPP(order=2),
        jadeis.AdjointDEIS(order=2, trajectory="reconstruct"),
    ),
    "reversible": (jadeis.Rex(), jadeis.ReversibleAdjoint()),
    "backprop": (jadeis.DPMSolverPP(order=2), jadeis.Backprop()),
}


def _loss(model, x_T, solver, adjoint):
    x_0 = jadeis.sample(eps_fn, model, x_T, schedule=SCH, ts=TS, solver=solver, adjoint=adjoint)
    return jnp.sum(jnp.sin(x_0))


def _grads(solver, adjoint):
    return eqx.filter_grad(_loss)(MODEL, X_T, solver, adjoint)


@pytest.mark.parametrize("case", list(CASES))
def test_equinox_module_as_params_under_every_strategy(case):
    solver, adjoint = CASES[case]
    g = _grads(solver, adjoint)
    # gradients for the floating-point arrays, nothing for the rest
    assert g.taps is None and g.use_mlp is None and g.name == "denoiser"
    assert g.conv.weight.shape == MODEL.conv.weight.shape
    assert all(v.shape == w.shape for v, w in zip(jax.tree.leaves(g.mlp), jax.tree.leaves(
        eqx.filter(MODEL.mlp, eqx.is_inexact_array))))
    assert float(jnp.max(jnp.abs(g.conv.weight))) > 0
    # exact strategies equal Backprop (through the same sampler)
    if isinstance(adjoint, (jadeis.DiscreteAdjoint, jadeis.ReversibleAdjoint)):
        ref = _grads(solver, jadeis.Backprop())
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7 * float(jnp.max(jnp.abs(b))))


def test_equinox_module_gradient_with_respect_to_x_T_only_and_jvp():
    g = jax.grad(lambda x: _loss(MODEL, x, jadeis.DPMSolverPP(), jadeis.DiscreteAdjoint()))(X_T)
    ref = jax.grad(lambda x: _loss(MODEL, x, jadeis.DPMSolverPP(), jadeis.Backprop()))(X_T)
    np.testing.assert_allclose(g, ref, rtol=1e-8, atol=1e-10)


def test_guide_optimises_the_floating_leaves_of_an_equinox_module():
    res = jadeis.guide(
        lambda x0: jnp.sum((x0 - 0.5) ** 2),
        eps_fn,
        MODEL,
        X_T,
        schedule=SCH,
        ts=TS,
        optimizer=optax.adam(1e-2),
        wrt=("params",),
        num_iters=4,
        progress=False,
    )
    assert res.losses[-1] < res.losses[0]
    model = res.params
    assert isinstance(model, Denoiser) and model.mlp.activation is jax.nn.silu
    np.testing.assert_array_equal(model.taps, MODEL.taps)
    assert bool(model.use_mlp) and model.name == "denoiser" and model.gain == 0.5
    assert not np.allclose(model.conv.weight, MODEL.conv.weight)
    # the optax-style pair: the current values as properties
    g = jadeis.Guidance(lambda x0: jnp.sum(x0**2), eps_fn, schedule=SCH, ts=TS,
                        optimizer=optax.sgd(1e-3), wrt=("params",))
    state = g.step(g.init(MODEL, X_T))
    assert isinstance(state.params, Denoiser) and state.params.mlp.activation is jax.nn.silu
    assert state.x_T is X_T and state.z is None
    # only the floating leaves are handed to the optimizer
    assert state.opt_vars["params"].taps is None


def test_guide_refuses_params_without_floating_leaves():
    with pytest.raises(ValueError, match="no floating-point array leaves"):
        jadeis.guide(lambda x0: jnp.sum(x0), lambda p, x, t, z: x, {"n": jnp.arange(3)}, X_T,
                     schedule=SCH, ts=TS, optimizer=optax.adam(1e-2), wrt="params",
                     progress=False)


# --- an explicit-axis mesh --------------------------------------------------------------

_EXPLICIT_MESH_SCRIPT = r'''
import jax, jax.numpy as jnp, numpy as np
import flax.linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P, AxisType
import jadeis

assert jax.device_count() == 4

class UNet(nn.Module):
    """Conv, strided conv, upsampling and a skip connection; z a batched embedding."""

    @nn.compact
    def __call__(self, x, t, z):
        temb = jnp.zeros_like(z[:, :1]) + jnp.asarray(t, z.dtype)
        emb = nn.Dense(8)(jnp.concatenate([temb, z], -1))[:, None, None, :]
        h1 = nn.silu(nn.Conv(8, (3, 3))(x) + emb)
        h2 = nn.silu(nn.Conv(16, (3, 3), strides=(2, 2))(h1))
        u = jax.image.resize(h2, h1.shape[:3] + (16,), "nearest")
        h3 = nn.silu(nn.Conv(8, (3, 3))(jnp.concatenate([u, h1], -1)))
        return x + 0.1 * jnp.tanh(nn.Conv(x.shape[-1], (3, 3))(h3))

net = UNet()
B = 8
x_T = jax.random.normal(jax.random.key(0), (B, 8, 8, 2))
z = jax.random.normal(jax.random.key(1), (B, 4))
variables = net.init(jax.random.key(2), x_T[:1], 0.5, z[:1])
eps_fn = lambda v, x, t, z: net.apply(v, x, t, z)
sch = jadeis.VPLinear(); ts = jadeis.time_grid(sch, 4)

def grad_xT(x_T, z, adjoint):
    def loss(x_T):
        x0 = jadeis.sample(eps_fn, variables, x_T, z, schedule=sch, ts=ts, adjoint=adjoint)
        return jnp.sum(x0 ** 2)
    return jax.grad(loss)(x_T)

adjoints = {"discrete": jadeis.DiscreteAdjoint(), "deis": jadeis.AdjointDEIS(order=2),
            "deis-reconstruct": jadeis.AdjointDEIS(trajectory="reconstruct")}
ref = {k: np.asarray(grad_xT(x_T, z, a)) for k, a in adjoints.items()}
mesh = jax.make_mesh((4,), ("batch",), axis_types=(AxisType.Explicit,))
with jax.set_mesh(mesh):
    xs = jax.device_put(x_T, NamedSharding(mesh, P("batch")))
    zs = jax.device_put(z, NamedSharding(mesh, P("batch")))
    for k, a in adjoints.items():
        g = grad_xT(xs, zs, a)
        assert g.sharding.spec[0] == "batch", g.sharding
        atol = 1e-5 * np.abs(ref[k]).max()
        np.testing.assert_allclose(np.asarray(g), ref[k], rtol=1e-3, atol=atol)
        print("ok", k, flush=True)
'''


def test_conv_unet_on_an_explicit_mesh_differentiating_only_x_T():
    """A small conv U-Net (flax linen) with the batch sharded over an Explicit-axis mesh
    (jax.make_mesh + jax.set_mesh), gradient with respect to x_T only: the strategies take
    the model's VJP with respect to what is differentiated only, so no VJP with respect to
    the kernels is built (JAX's conv kernel VJP raises ShardingTypeError, "specify the
    output sharding via out_sharding of conv_general_dilated", under an Explicit mesh). The
    gradients equal the single-device ones and stay sharded."""
    pytest.importorskip("flax.linen")
    from ._shared import run_on_cpu_devices

    proc = run_on_cpu_devices(_EXPLICIT_MESH_SCRIPT, n=4)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.split() == ["ok", "discrete", "ok", "deis", "ok", "deis-reconstruct"]


# --- flax nnx -----------------------------------------------------------------------------

nnx = pytest.importorskip("flax.nnx")


class NnxDenoiser(nnx.Module):
    """Dropout, BatchNorm and an RNG stream: the state nnx.split puts beside the Params."""

    def __init__(self, rngs):
        self.inp = nnx.Linear(3, 16, rngs=rngs)
        self.bn = nnx.BatchNorm(16, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.out = nnx.Linear(16, 2, rngs=rngs)

    def __call__(self, x, t):
        tt = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])[:, None]
        h = nnx.silu(self.bn(self.inp(jnp.concatenate([x, tt], axis=-1))))
        return self.out(self.drop(h))


def test_nnx_model_with_rng_and_batchnorm_state():
    model = NnxDenoiser(nnx.Rngs(0))
    model.eval()  # sampling: BatchNorm's running statistics, no dropout
    x_T = jax.random.normal(jax.random.key(2), (4, 2), jnp.float32)  # the model's dtype
    # the whole State (nnx.split(model)) cannot be differentiated: guide names the fix
    graphdef, state = nnx.split(model)
    with pytest.raises(ValueError, match=r"nnx.split\(model, nnx.Param, \.\.\.\)") as err:
        jadeis.guide(lambda x0: jnp.sum(x0**2), lambda s, x, t, z: nnx.merge(graphdef, s)(x, t),
                     state, x_T, schedule=SCH, ts=TS, optimizer=optax.adam(1e-2),
                     wrt=("params",), progress=False)
    assert "RngKey" in str(err.value) and "BatchStat" in str(err.value)
    # the recipe: split out the Params, close over the rest
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def nnx_eps(params, x, t, z):
        return nnx.merge(graphdef, params, rest)(x, t)

    def loss(params, adjoint):
        x_0 = jadeis.sample(nnx_eps, params, x_T, schedule=SCH, ts=TS, adjoint=adjoint)
        return jnp.sum(x_0**2)

    g = jax.grad(loss)(params, jadeis.DiscreteAdjoint())
    ref = jax.grad(loss)(params, jadeis.Backprop())
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))))
    res = jadeis.guide(lambda x0: jnp.sum(x0**2), nnx_eps, params, x_T, schedule=SCH, ts=TS,
                       optimizer=optax.adam(1e-2), wrt=("params",), num_iters=3,
                       progress=False)
    assert res.losses[-1] < res.losses[0]
    assert jax.tree.structure(res.params) == jax.tree.structure(params)
