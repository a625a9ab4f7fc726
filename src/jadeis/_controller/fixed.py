"""The fixed grid: take the steps of ``ts``."""

from __future__ import annotations

from .base import AbstractGridController


class FixedGrid(AbstractGridController):
    """Take exactly the steps of ``ts`` (N + 1 descending times), every one accepted: the
    default controller of every entry point.

    **Example:**

    ```python
    >>> import jax.numpy as jnp
    >>> import jadeis
    >>> sch = jadeis.VPLinear()
    >>> x0 = jadeis.sample(lambda p, x, t, z: p * x, 0.5, jnp.ones((2, 3)), schedule=sch,
    ...                    ts=jadeis.time_grid(sch, 10), controller=jadeis.FixedGrid())
    >>> x0.shape
    (2, 3)

    ```
    """

    def grid(self, schedule, ts):
        return ts
