"""Adaptive step sizes controlled on every example of a batch (the worst one decides)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .pid import PIDController


class PerExamplePIDController(PIDController):
    r"""A :class:`jadeis.PIDController` whose error norm is taken per example: the RMS of
    ``error / (atol + rtol * max(|x_s|, |x_t|))`` over each example (the leading axis of the
    state; of every leaf of a pytree state, which must share it), and a step is accepted when
    the largest of them is below 1. The PID formula, its arguments and defaults are those of
    :class:`jadeis.PIDController`; every solver, gradient strategy and entry point that takes
    one takes this one (docs/compatibility.md).

    Why: the examples of a batch are independent trajectories on one shared grid, and the
    gradient of each example's loss (``dL/dx_T`` of that example, and its share of ``dL/dz``
    and ``dL/dparams``) is set by that example's trajectory error. An RMS over the batch lets
    one example carry an error up to ``sqrt(batch)`` times the tolerance where the others
    are easy; the examples with the largest gradients (near a boundary between modes of the
    data, where the flow is most sensitive) are often those. Measured on the benchmark's stiff
    mixture (DPM-Solver-23, batch 16): about 25% fewer steps for a gradient error of 1e-3
    than with the batch RMS; on a smooth problem (the benchmark's MLP) it only acts like a
    tighter tolerance (benchmarks/results/summary.md).

    A state with no leading axis (a scalar) is one example.

    **Example:**

    ```python
    >>> import jax.numpy as jnp
    >>> import jadeis
    >>> sch = jadeis.VPLinear()
    >>> sol = jadeis.solve(lambda p, x, t, z: p * x, 0.5, jnp.ones((4, 3)), schedule=sch,
    ...                    ts=jnp.array([1.0, 1e-3]), solver=jadeis.SinglestepDPMSolver(3),
    ...                    controller=jadeis.PerExamplePIDController(rtol=1e-4, atol=1e-4))
    >>> sol.x_0.shape, int(sol.stats.num_steps) > 1
    ((4, 3), True)

    ```
    """

    def error_norm(self, error, x, x_next):
        """The largest over the examples of each example's RMS of ``error / (atol + rtol *
        max(|x|, |x_next|))`` (in at least float32); NaN counts as infinite."""
        total = None
        count = 0
        batch = None
        for e, a, b in zip(jax.tree.leaves(error), jax.tree.leaves(x), jax.tree.leaves(x_next)):
            dt = e.dtype if jnp.dtype(e.dtype).itemsize >= 4 else jnp.dtype(jnp.float32)
            e, a, b = e.astype(dt), a.astype(dt), b.astype(dt)
            b = jnp.where(jnp.isfinite(b), b, a)
            scale = self.atol + self.rtol * jnp.maximum(jnp.abs(a), jnp.abs(b))
            r = jnp.square(e / scale).astype(jnp.float32)
            lead = r.shape[0] if r.ndim else 1
            if batch is not None and lead != batch:
                raise ValueError(
                    f"PerExamplePIDController: every leaf of the state must have the batch "
                    f"as its leading axis; got leading sizes {batch} and {lead}."
                )
            batch = lead
            part = jnp.sum(r.reshape(lead, -1), axis=1)
            total = part if total is None else total + part
            count += r.size // lead
        E = jnp.max(jnp.sqrt(total / max(count, 1)))
        return jnp.where(jnp.isnan(E), jnp.inf, E).astype(jnp.float32)
