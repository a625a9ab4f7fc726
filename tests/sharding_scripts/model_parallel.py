"""Model-parallel parameters: a flax linen MLP whose weights are sharded
along the "model" axis of a 2 x 2 (batch x model) mesh samples and differentiates with
DiscreteAdjoint and AdjointDEIS; x_T is sharded along "batch". Checks: values equal the
single-device ones; x_0 is sharded along "batch"; the parameter gradient comes back with
the parameters' sharding; the compiled program holds only the local shards of the
parameters (no full (D, H) weight anywhere) and of the batch.

Run by tests/test_sharding_split.py with 4 host devices (XLA_FLAGS).
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jadeis

jax.config.update("jax_enable_x64", True)
assert jax.device_count() == 4, jax.devices()
B, D, H, N = 8, 6, 32, 5  # the local weight shards are (6, 16) and (16, 6)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, t):
        h = nn.Dense(H, name="inp")(x) + jnp.sin(t * jnp.arange(H, dtype=x.dtype))
        return nn.Dense(D, name="out")(jnp.tanh(h))


net = MLP()


def eps_fn(params, x, t, z):
    return net.apply({"params": params}, x, t.astype(x.dtype)) + 0.1 * z


sch = jadeis.VPLinear()
ts = jadeis.time_grid(sch, N)
k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
x_T = jax.random.normal(k1, (B, D))
z = 0.1 * jax.random.normal(k3, (B, D))
params = net.init(k2, x_T, jnp.asarray(1.0))["params"]

# An Auto-axis mesh: under an Explicit-axis mesh JAX itself requires the model to state the
# output sharding of a contraction over "model" (flax's nn.Dense does not), so the
# Megatron-style model below is a model for Auto meshes.
mesh = Mesh(np.asarray(jax.devices()).reshape(2, 2), ("batch", "model"))
# Megatron-style: the first layer's columns and the second layer's rows over "model"
param_specs = {
    "inp": {"kernel": P(None, "model"), "bias": P("model")},
    "out": {"kernel": P("model", None), "bias": P()},
}
param_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs,
                        is_leaf=lambda s: isinstance(s, P))
p_sh = jax.tree.map(jax.device_put, params, param_sh)
x_sh = jax.device_put(x_T, NamedSharding(mesh, P("batch", None)))
z_sh = jax.device_put(z, NamedSharding(mesh, P("batch", None)))
assert p_sh["inp"]["kernel"].addressable_shards[0].data.shape == (D, H // 2)


def loss(adjoint):
    def f(p, x, zz):
        x_0 = jadeis.sample(eps_fn, p, x, zz, schedule=sch, ts=ts, adjoint=adjoint)
        return jnp.sum((x_0 - 0.5) ** 2), x_0

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))


for adjoint in (jadeis.DiscreteAdjoint(), jadeis.AdjointDEIS(order=2)):
    name = type(adjoint).__name__
    (l1, x0_1), (gp1, gx1) = loss(adjoint)(params, x_T, z)
    f = loss(adjoint)
    (l4, x0_4), (gp4, gx4) = f(p_sh, x_sh, z_sh)
    np.testing.assert_allclose(float(l4), float(l1), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(x0_4), np.asarray(x0_1), rtol=1e-11, atol=1e-12)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         rtol=1e-10, atol=1e-12), gp4, gp1)
    np.testing.assert_allclose(np.asarray(gx4), np.asarray(gx1), rtol=1e-10, atol=1e-12)
    assert x0_4.sharding.is_equivalent_to(x_sh.sharding, 2), (name, x0_4.sharding)
    assert gx4.sharding.is_equivalent_to(x_sh.sharding, 2), (name, gx4.sharding)
    for path, g, p in zip(jax.tree_util.tree_leaves_with_path(gp4),
                          jax.tree.leaves(gp4), jax.tree.leaves(p_sh)):
        assert g.sharding.is_equivalent_to(p.sharding, g.ndim), (
            name, jax.tree_util.keystr(path[0]), g.sharding.spec, p.sharding.spec)
    hlo = f.lower(p_sh, x_sh, z_sh).compile().as_text()
    full_weights = re.findall(rf"\[{D},{H}\]|\[{H},{D}\]", hlo)
    assert not full_weights, (name, "a full weight matrix in the per-device program")
    assert f"[{D},{H // 2}]" in hlo and f"[{H // 2},{D}]" in hlo, name
    assert not re.search(rf"\[{B},{D}\]|,{B},{D}\]", hlo), (name, "the global batch")
    print("ok", name, {jax.tree_util.keystr(k): v.sharding.spec
                             for k, v in jax.tree_util.tree_leaves_with_path(gp4)},
          flush=True)
print("ALL OK", flush=True)
