"""Sampling with x_T sharded over devices: same numbers as on one device, and the
output stays sharded along the batch axis.

Runs in a subprocess so that XLA can be given 4 host (CPU) devices without affecting the
rest of the test session. Gradients under sharding are tested in test_adjoint_sharding.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    jax.config.update("jax_enable_x64", True)
    import jadeis

    assert jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((4,), ("batch",))
    batch_sharding = NamedSharding(mesh, P("batch"))

    sch = jadeis.VPLinear()
    ts = jadeis.time_grid(sch, 12)

    def oracle_eps(s2, x, t, mu):  # Gaussian data N(mu, s2): exact eps, elementwise
        a = sch.alpha(t).astype(x.dtype)
        s = sch.sigma(t).astype(x.dtype)
        return s * (x - a * mu) / (a**2 * s2 + s**2)

    def mlp_eps(params, x, t, z):  # a small network: mixes the features of each row
        w1, b1, w2 = params
        h = jnp.tanh(x @ w1 + b1 + t * z)
        return h @ w2

    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    x_T = jax.random.normal(k1, (8, 3))
    params = (
        jax.random.normal(k2, (3, 16)) / 3,
        jax.random.normal(k3, (16,)) / 4,
        jax.random.normal(k4, (16, 3)) / 4,
    )
    x_sharded = jax.device_put(x_T, batch_sharding)
    assert len(x_sharded.sharding.device_set) == 4

    def check_sharded(out, name):
        assert out.shape == x_T.shape, (name, out.shape)
        assert len(out.sharding.device_set) == 4, (name, out.sharding)
        assert out.sharding.is_equivalent_to(batch_sharding, out.ndim), (name, out.sharding)
        shard_shapes = {s.data.shape for s in out.addressable_shards}
        assert shard_shapes == {(2, 3)}, (name, shard_shapes)

    cases = [
        ("oracle-dpmpp2", oracle_eps, jnp.asarray(0.09), jnp.asarray(0.7),
         jadeis.DPMSolverPP(order=2), {}),
        ("mlp-dpm3", mlp_eps, params, jnp.asarray(0.3), jadeis.DPMSolver(order=3), {}),
        ("mlp-ddim", mlp_eps, params, jnp.asarray(0.3), jadeis.DDIM(), {}),
        ("oracle-sde", oracle_eps, jnp.asarray(0.09), jnp.asarray(0.7),
         jadeis.SDEDPMSolverPP(order=2), {"key": jax.random.key(5)}),
    ]
    for name, eps_fn, p, z, solver, kw in cases:
        one = jadeis.sample(eps_fn, p, x_T, z, schedule=sch, ts=ts, solver=solver, **kw)
        assert len(one.sharding.device_set) == 1
        out = jadeis.sample(eps_fn, p, x_sharded, z, schedule=sch, ts=ts, solver=solver, **kw)
        check_sharded(out, name)
        np.testing.assert_allclose(np.asarray(out), np.asarray(one), rtol=1e-12, atol=1e-13)
        assert not np.allclose(np.asarray(out), np.asarray(x_T)), name
        print("ok", name, flush=True)

    # the trajectory too: (N + 1, batch, dim), equal to the single-device one
    traj = jadeis.sample_trajectory(mlp_eps, params, x_sharded, jnp.asarray(0.3),
                                    schedule=sch, ts=ts)
    out = traj[-1]
    traj_one = jadeis.sample_trajectory(mlp_eps, params, x_T, jnp.asarray(0.3), schedule=sch,
                                        ts=ts)
    check_sharded(out, "trajectory x_0")
    assert traj.shape == (13, 8, 3)
    np.testing.assert_allclose(np.asarray(traj), np.asarray(traj_one), rtol=1e-12, atol=1e-13)

    # under an outer jit with an explicit output sharding
    f = jax.jit(
        lambda x: jadeis.sample(mlp_eps, params, x, jnp.asarray(0.3), schedule=sch, ts=ts),
        out_shardings=batch_sharding,
    )
    out = f(x_sharded)
    check_sharded(out, "outer jit")
    np.testing.assert_allclose(np.asarray(out), np.asarray(traj_one[-1]), rtol=1e-12)
    print("ALL OK", flush=True)
    """
)


def test_sampling_with_x_T_sharded_over_four_cpu_devices():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ALL OK" in proc.stdout, proc.stdout + proc.stderr
    for name in ("oracle-dpmpp2", "mlp-dpm3", "mlp-ddim", "oracle-sde"):
        assert f"ok {name}" in proc.stdout
