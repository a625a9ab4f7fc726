"""Every solver of the registry, with each controller it supports, on a batch sharded over
4 host devices: the DiscreteAdjoint gradient (its forward pass included) is compiled into a
per-device program that holds the local batch only, with no all-gather of the state (the
adaptive controller's error norm is an all-reduce of a scalar), and it equals the one-device
gradient; the sample stays sharded.
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from partition import B, mlp, params, problems_in, x_T, z  # noqa: E402

import jadeis  # noqa: E402
from helpers import SOLVER_REGISTRY  # noqa: E402

jax.config.update("jax_enable_x64", True)
sch = jadeis.VPLinear()
mesh = jax.make_mesh((4,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
row = NamedSharding(mesh, P("batch"))
xs, zs = jax.device_put(x_T, row), jax.device_put(z, row)
pid = jadeis.PIDController(rtol=1e-3, atol=1e-3, max_steps=64)
key = jax.random.key(1)

for name, (fixed, adaptive) in SOLVER_REGISTRY.items():
    cases = [("fixed", fixed, jadeis.FixedGrid(), jadeis.time_grid(sch, 6))]
    if (
        isinstance(adaptive, jadeis.AbstractAdaptiveSolver)
        and adaptive.error_order
        and not (adaptive.stochastic)
    ):
        cases.append(("adaptive", adaptive, pid, jnp.asarray([sch.t_max, sch.t_min])))
    for label, solver, controller, ts in cases:
        extra = {"key": key} if solver.stochastic else {}

        def loss(x, zz, p, solver=solver, controller=controller, ts=ts, extra=extra):
            x0 = jadeis.sample(
                mlp, p, x, zz, schedule=sch, ts=ts, solver=solver, controller=controller, **extra
            )
            return jnp.sum(x0**2), x0

        f = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
        ref = jax.jit(f)(x_T, z, params)
        compiled = jax.jit(f).lower(xs, zs, params).compile()
        bad = problems_in(compiled.as_text(), callbacks_ok=True)
        assert not bad, (name, label, bad)
        got = compiled(xs, zs, params)
        for o, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            np.testing.assert_allclose(
                np.asarray(o), np.asarray(r), rtol=1e-9, atol=1e-11, err_msg=f"{name} {label}"
            )
        (gx, gz, _), x0 = got
        for o in (gx, gz, x0):
            assert o.shape[0] == B and o.sharding.is_equivalent_to(row, o.ndim), (
                name,
                label,
                o.sharding,
            )
        print("ok", name, label, flush=True)
print("ALL OK", flush=True)
