"""Sampling time grids."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
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
    if spacing == "karras":
        c_rho = _concrete(rho)
        if c_rho is not None and not (math.isfinite(c_rho) and c_rho > 0):
            raise ValueError(
                f"time_grid: rho must be a finite number > 0 for spacing='karras', got rho={rho} "
                f"(EDM uses rho=7)."
            )
    dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"time_grid: dtype must be a floating dtype (e.g. jnp.float32), got {dtype}; "
            f"times are not integers (for a discrete table's timesteps, build the grid in "
            f"float and map it)."
        )
    out_dtype = dtype
    # compute in at least float32, then round to the requested dtype (checked below)
    if jnp.finfo(dtype).bits < 32:
        dtype = jnp.dtype(jnp.float32)
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
    ts = ts.at[0].set(t_start).at[-1].set(t_end).astype(out_dtype)
    if not isinstance(ts, jax.core.Tracer):
        check = np.asarray(ts, np.float64)
        if not np.all(np.isfinite(check)):
            raise ValueError(
                f"time_grid: the {spacing!r} grid of {type(schedule).__name__} is not finite "
                f"(t_start={t_start}, t_end={t_end}); check the schedule's parameters."
            )
        if not np.all(np.diff(check) < 0):
            repeats = int(np.sum(np.diff(check) >= 0))
            raise ValueError(
                f"time_grid: {n} steps in {out_dtype} give {repeats} repeated time(s): "
                f"{out_dtype} cannot resolve the grid between t_start={float(check[0]):g} and "
                f"t_end={float(check[-1]):g}. Use dtype=jnp.float32 (the solver's state may "
                f"still be low precision) or fewer steps."
            )
    return ts


def _concrete(v):
    """``v`` as a Python float when it is a concrete scalar (Python, NumPy or JAX), else None."""
    if isinstance(v, jax.core.Tracer) or jnp.ndim(v) != 0:
        return None
    return float(v)
