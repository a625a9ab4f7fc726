"""Sampling time grids."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array

from ._schedule import AbstractSchedule

_SPACINGS = ("logsnr", "time", "quadratic", "karras")


def time_grid(
    schedule: AbstractSchedule,
    n: int,
    spacing: str = "logsnr",
    t_start=None,
    t_end=None,
    *,
    rho: float = 7.0,
    dtype=None,
) -> Array:
    """The ``n + 1`` descending times of an ``n``-step sampling grid.

    **Arguments:**

    - `schedule`: the noise schedule.
    - `n`: number of steps (a Python int >= 1).
    - `spacing`: ``"logsnr"`` (uniform in lambda, the DPM-Solver default), ``"time"``
      (uniform in t), ``"quadratic"`` (uniform in sqrt(t)), or ``"karras"`` (EDM's
      rho-spacing of sigma/alpha, with ``rho``).
    - `t_start`, `t_end`: first and last time; default the schedule's ``t_max`` and ``t_min``.
    - `dtype`: floating dtype of the result (default: JAX's default float).

    **Returns:** an array of shape ``(n + 1,)``, strictly decreasing from ``t_start`` to ``t_end``.

    **Example:**

    ```python
    >>> import jadeis
    >>> ts = jadeis.time_grid(jadeis.VPLinear(), 10)
    >>> ts.shape
    (11,)

    ```
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"time_grid: n must be a Python int >= 1, got {n!r}.")
    if spacing not in _SPACINGS:
        raise ValueError(f"time_grid: spacing must be one of {_SPACINGS}, got {spacing!r}.")
    t_start = schedule.t_max if t_start is None else t_start
    t_end = schedule.t_min if t_end is None else t_end
    c_start, c_end = _concrete(t_start), _concrete(t_end)
    lo, hi = _concrete(schedule.t_min), _concrete(schedule.t_max)
    for name, v in (("t_start", c_start), ("t_end", c_end)):
        if v is not None and lo is not None and hi is not None and not (lo <= v <= hi):
            raise ValueError(
                f"time_grid: {name}={v} is outside the schedule's range "
                f"[{schedule.t_min}, {schedule.t_max}]."
            )
    if c_start is not None and c_end is not None and c_end >= c_start:
        raise ValueError(
            f"time_grid: need t_end < t_start (sampling runs backwards in time), got "
            f"t_start={t_start}, t_end={t_end}."
        )
    dtype = jnp.result_type(float) if dtype is None else dtype
    t_start = jnp.asarray(t_start, dtype)
    t_end = jnp.asarray(t_end, dtype)
    u = jnp.linspace(0.0, 1.0, n + 1, dtype=dtype)
    if spacing == "time":
        ts = t_start + (t_end - t_start) * u
    elif spacing == "quadratic":
        ts = (jnp.sqrt(t_start) + (jnp.sqrt(t_end) - jnp.sqrt(t_start)) * u) ** 2
    elif spacing == "logsnr":
        l0 = schedule.log_snr(t_start)
        l1 = schedule.log_snr(t_end)
        ts = schedule.t_from_log_snr(l0 + (l1 - l0) * u)
    else:  # karras: rho-spacing of the noise-to-signal ratio exp(-lambda)
        s0 = jnp.exp(-schedule.log_snr(t_start) / rho)
        s1 = jnp.exp(-schedule.log_snr(t_end) / rho)
        ts = schedule.t_from_log_snr(-rho * jnp.log(s0 + (s1 - s0) * u))
    # pin the end points exactly (inverse maps round)
    return ts.at[0].set(t_start).at[-1].set(t_end)


def _concrete(v):
    """``v`` as a Python float when it is a concrete scalar (Python, NumPy or JAX), else None."""
    if isinstance(v, jax.core.Tracer) or jnp.ndim(v) != 0:
        return None
    return float(v)
