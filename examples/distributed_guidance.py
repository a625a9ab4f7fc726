"""Sharded guidance on many devices and many processes (hosts) with jax.distributed.

Optimises the initial noises x_T of a batch so that the samples x_0 of a (small, random)
noise-prediction MLP approach a target, with ``jadeis.guide`` (Adam, gradients by the
exact discrete adjoint). The batch is sharded over every device of every process along a
"batch" mesh axis: each device samples and differentiates only its own rows.

Run it unchanged:

- one machine, one or more GPUs/TPUs (or host CPUs):  ``python distributed_guidance.py``
- a cluster JAX detects by itself (SLURM, Open MPI / mpirun, Cloud TPU pods, Kubernetes
  with JobSet): start one process per host (``srun python distributed_guidance.py``,
  ``mpirun -n 4 python distributed_guidance.py``); ``jax.distributed.initialize()``
  finds the coordinator, the number of processes and this process's id;
- anywhere else: set, in each process, ``JAX_COORDINATOR_ADDRESS=host0:1234``,
  ``JAX_NUM_PROCESSES=2`` and ``JAX_PROCESS_ID=0`` (``1`` on the second process), e.g.
  on one machine with host-CPU devices::

      export XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu
      JAX_COORDINATOR_ADDRESS=localhost:12355 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 \\
          python distributed_guidance.py &
      JAX_COORDINATOR_ADDRESS=localhost:12355 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 \\
          python distributed_guidance.py

The batch (``--batch``, default 2 x the number of devices) must divide by the total
number of devices. Every process builds the same model parameters and the same
global x_T from fixed seeds, but materialises only the rows of its own devices. The result
does not depend on how many processes share the devices (tests/test_sharding_split.py
checks 2 processes x 2 devices against 1 process x 4 devices). On CPU, multi-process
collectives use gloo.

Options: ``--batch B --dim D --steps N --iters K --lr LR --x64 --out result.npz`` (the
final x_T, x_0 and loss history, written by process 0).
"""

from __future__ import annotations

import argparse
import os
import time


def init_distributed():
    """Start jax.distributed: from JAX_* environment variables, from a cluster JAX
    detects, or not at all (a single process)."""
    import jax

    if "JAX_NUM_PROCESSES" in os.environ:
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
            initialization_timeout=int(os.environ.get("JAX_INIT_TIMEOUT", "300")),
        )
        return
    try:
        jax.distributed.initialize()  # SLURM, Open MPI, Cloud TPU, Kubernetes, ...
    except (ValueError, RuntimeError) as e:  # not in a cluster JAX knows: one process
        print(f"jax.distributed not started ({e}); running as a single process")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=None, help="default: 2 x device count")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="sampling steps")
    p.add_argument("--iters", type=int, default=10, help="Adam updates")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--x64", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import jax

    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    init_distributed()
    jax.config.update("jax_enable_x64", args.x64)

    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import jadeis

    n_dev = jax.device_count()
    batch = args.batch or 2 * n_dev
    if batch % n_dev:
        raise SystemExit(f"--batch {batch} must divide by the {n_dev} devices")
    mesh = Mesh(np.asarray(jax.devices()), ("batch",))
    rows = NamedSharding(mesh, P("batch"))
    d, h = args.dim, args.hidden

    # the model: the same parameters on every process (replicated); load yours here
    kp = jax.random.split(jax.random.key(0), 3)
    params = (
        np.asarray(jax.random.normal(kp[0], (d, h))) / np.sqrt(d),
        np.asarray(jax.random.normal(kp[1], (h,))) / 4,
        np.asarray(jax.random.normal(kp[2], (h, d))) / np.sqrt(h),
    )

    def eps_fn(params, x, t, z):
        w1, b1, w2 = params
        # near eps = x (data around 0) plus a learned-looking correction
        return 0.9 * x + 0.1 * jnp.tanh(x @ w1 + b1 + t.astype(x.dtype)) @ w2

    # the global batch: every process knows the seed, builds only its own rows
    full_x = np.asarray(jax.random.normal(jax.random.key(1), (batch, d)))
    x_T = jax.make_array_from_callback((batch, d), rows, lambda idx: full_x[idx])
    target = jax.make_array_from_callback(
        (batch, d), rows, lambda idx: np.full((batch, d), 0.5, full_x.dtype)[idx]
    )

    sch = jadeis.VPLinear()
    ts = jadeis.time_grid(sch, args.steps)
    t0 = time.perf_counter()
    res = jadeis.guide(
        lambda x0, tgt: jnp.sum((x0 - tgt) ** 2, axis=-1),  # one loss per example
        eps_fn, params, x_T, None, schedule=sch, ts=ts, optimizer=optax.adam(args.lr),
        num_iters=args.iters, wrt=("x_T",), loss_args=(target,), progress=False,
    )
    secs = time.perf_counter() - t0
    # each process holds its own rows; gather them to write them out
    x_T_all = multihost_utils.process_allgather(res.x_T, tiled=True)
    x_0_all = multihost_utils.process_allgather(res.x_0, tiled=True)
    if jax.process_index() == 0:
        print(
            f"{jax.process_count()} process(es), {n_dev} devices, batch {batch}: mean loss "
            f"{res.losses[0].mean():.5f} -> {res.losses[-1].mean():.5f} in {secs:.1f} s; "
            f"x_T sharding {res.x_T.sharding.spec}"
        )
        if args.out:
            np.savez(args.out, x_T=x_T_all, x_0=x_0_all, losses=res.losses)
    return res


if __name__ == "__main__":
    main()
