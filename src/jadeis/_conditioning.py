"""Time-varying conditional information z (the paper's conditioning schedule)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp


class PerStep(eqx.Module):
    """Conditioning that changes per sampling step: every leaf of ``values`` has a leading
    axis of length N (the number of steps); step i (from ``ts[i]`` to ``ts[i+1]``) uses
    ``values[i]``. The gradient with respect to a ``PerStep`` is again a ``PerStep``, one
    gradient per step.

    **Example:**

    ```python
    >>> import jax.numpy as jnp
    >>> import jadeis
    >>> z = jadeis.PerStep(jnp.zeros((10, 4)))
    >>> z.num_steps
    10

    ```
    """

    values: Any

    @property
    def num_steps(self) -> int:
        leaves = jax.tree.leaves(self.values)
        if not leaves:
            raise ValueError("PerStep: values must hold at least one array.")
        return int(jnp.shape(leaves[0])[0])


class ConditioningFn(eqx.Module):
    """Conditioning given as a function of time with its own parameters:
    ``z(t) = fn(params, t)``. It is evaluated at the start of each sampling step; gradients
    flow to ``params``.

    **Example:**

    ```python
    >>> import jax.numpy as jnp
    >>> import jadeis
    >>> z = jadeis.ConditioningFn(lambda p, t: p * t, jnp.ones(3))
    >>> z.fn(z.params, 0.5).tolist()
    [0.5, 0.5, 0.5]

    ```
    """

    fn: Callable = eqx.field(static=True)
    params: Any

    def per_step(self, ts) -> PerStep:
        """Evaluate at the start of every step of the grid ``ts`` (length N + 1)."""
        return PerStep(jax.vmap(lambda t: self.fn(self.params, t))(ts[:-1]))


def z_at(z, i, per_step: bool):
    """The conditioning used at sampling step ``i``."""
    if per_step:
        return jax.tree.map(lambda v: v[i], z.values)
    return z
