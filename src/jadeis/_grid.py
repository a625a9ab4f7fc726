"""Sampling time grids."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from ._schedule import AbstractSchedule

_SPACINGS = ("logsnr", "time", "quadratic", "karras")
_DIFFUSERS_SPACINGS = ("leading", "trailing", "linspace")
_CONVENTIONS = ("ddim", "dpmsolver")
_FINALS = (None, "zero")


def time_grid(
    schedule: AbstractSchedule,
    n: int,
    spacing: str = "logsnr",
    t_start=None,
    t_end=None,
    *,
    rho: float = 7.0,
    dtype=None,
    final: str | None = None,
    steps_offset: int = 0,
    convention: str = "ddim",
) -> Array:
    """The ``n + 1`` descending times of an ``n``-step sampling grid.

    **Arguments:**

    - `schedule`: the noise schedule.
    - `n`: number of steps (a Python int >= 1).
    - `spacing`: ``"logsnr"`` (uniform in lambda, the DPM-Solver default), ``"time"``
      (uniform in t), ``"quadratic"`` (uniform in sqrt(t)), or ``"karras"`` (EDM's
      rho-spacing of sigma/alpha, with ``rho``).
    - `t_start`, `t_end`: first and last time; default the schedule's ``t_max`` and ``t_min``.
      diffusers' spacings of a :class:`~jadeis.DiscreteVP` table: ``"leading"``,
      ``"trailing"`` or ``"linspace"`` (their ``timestep_spacing``; Lin et al. 2024, Table 2):
      the n times are those of diffusers' integer timesteps k (t = (k + 1) / N), followed by
      the final time (see `final`); ``t_start``/``t_end`` do not apply.
    - `dtype`: floating dtype of the result (default: JAX's default float).
    - `final`: ``None`` (default): the grid ends at ``t_end`` (for the diffusers spacings:
      at diffusers' timestep 0, t = 1/N, as ``set_alpha_to_one=False`` /
      ``final_sigmas_type="sigma_min"``). ``"zero"``: the last step goes to t = 0, where
      sigma = 0 and the sample is the model's clean-data prediction (as diffusers'
      ``set_alpha_to_one=True`` / ``final_sigmas_type="zero"``); the other n - 1 steps follow
      `spacing` from ``t_start`` to ``t_end``. The step to sigma = 0 is taken in its
      first-order limit (x_0 = the data prediction), whatever the sampler's order.
    - `steps_offset`: diffusers' ``steps_offset``, added to the ``"leading"`` timesteps.
    - `convention`: whose ``set_timesteps`` the diffusers spacings follow: ``"ddim"``
      (``DDIMScheduler``, also DDPM, PNDM, Euler) or ``"dpmsolver"``
      (``DPMSolverMultistepScheduler``, also UniPC, DEIS), which differ for ``"leading"``
      and ``"linspace"``.

    **Returns:** an array of shape ``(n + 1,)``, strictly decreasing from ``t_start`` to ``t_end``
    (or to 0 with ``final="zero"``).

    **Example:**

    ```python
    >>> import jadeis
    >>> ts = jadeis.time_grid(jadeis.VPLinear(), 10)
    >>> ts.shape
    (11,)

    ```
    """
    from ._validate import check_schedule

    check_schedule(schedule, "time_grid")
    if isinstance(n, np.integer) and not isinstance(n, np.bool_):
        n = int(n)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"time_grid: n must be a Python int >= 1, got {n!r}.")
    if spacing not in _SPACINGS + _DIFFUSERS_SPACINGS:
        raise ValueError(
            f"time_grid: spacing must be one of {_SPACINGS + _DIFFUSERS_SPACINGS}, got "
            f"{spacing!r}."
        )
    if final not in _FINALS:
        raise ValueError(f"time_grid: final must be None or 'zero', got final={final!r}.")
    _check_convention(convention, "time_grid")
    steps_offset = _check_steps_offset(steps_offset, "time_grid")
    if spacing not in _DIFFUSERS_SPACINGS and (steps_offset != 0 or convention != "ddim"):
        given = f"steps_offset={steps_offset}" if steps_offset != 0 else \
            f"convention={convention!r}"
        raise ValueError(
            f"time_grid: {given} applies to diffusers' spacings {_DIFFUSERS_SPACINGS} of a "
            f"DiscreteVP table only; spacing={spacing!r} would ignore it. Drop it, or use "
            f"spacing='leading' (steps_offset) / a diffusers spacing (convention)."
        )
    if spacing in _DIFFUSERS_SPACINGS:
        return _diffusers_grid(schedule, n, spacing, t_start, t_end, dtype, final,
                               steps_offset, convention)
    if final == "zero":
        # n - 1 steps of the spacing, then one to t = 0
        head = time_grid(schedule, n - 1, spacing, t_start, t_end, rho=rho, dtype=dtype) \
            if n > 1 else jnp.asarray([schedule.t_max if t_start is None else t_start],
                                      jnp.result_type(float) if dtype is None else dtype)
        return jnp.concatenate([head, jnp.zeros((1,), head.dtype)])
    t_start = schedule.t_max if t_start is None else t_start
    t_end = schedule.t_min if t_end is None else t_end
    c_start, c_end = _concrete(t_start), _concrete(t_end)
    lo, hi = _concrete(schedule.t_min), _concrete(schedule.t_max)
    for name, raw, v in (("t_start", t_start, c_start), ("t_end", t_end, c_end)):
        if v is None or lo is None or hi is None:
            continue
        # compared as rounded to the grid's dtype and to the value's own (a float32 end
        # time read off a float32 grid is inside the range it was built from)
        dts = {jnp.result_type(float) if dtype is None else jnp.dtype(dtype)}
        if hasattr(raw, "dtype") and jnp.issubdtype(raw.dtype, jnp.floating):
            dts.add(jnp.dtype(raw.dtype))
        lo_r = min([lo] + [float(np.asarray(lo).astype(d)) for d in dts])
        hi_r = max([hi] + [float(np.asarray(hi).astype(d)) for d in dts])
        if not (lo_r <= v <= hi_r):
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
        if not _concrete_schedule(schedule):
            return ts
        with jax.ensure_compile_time_eval():
            lam = np.asarray(schedule.log_snr(ts[jnp.asarray([0, -1])]), np.float64)
        if not np.all(np.isfinite(lam)):
            raise ValueError(
                f"time_grid: in {out_dtype} the grid's end points round to "
                f"{[float(check[0]), float(check[-1])]}, where {type(schedule).__name__}'s "
                f"log-SNR is not finite (alpha or sigma vanishes); use dtype=jnp.float32 (the "
                f"solver's state may still be low precision)."
            )
    return ts


def _concrete_schedule(schedule) -> bool:
    return not any(isinstance(v, jax.core.Tracer) for v in jax.tree.leaves(schedule))


def _concrete(v):
    """``v`` as a Python float when it is a concrete scalar (Python, NumPy or JAX), else None."""
    if isinstance(v, jax.core.Tracer) or jnp.ndim(v) != 0:
        return None
    return float(v)


def diffusers_timesteps(
    num_train_timesteps: int,
    n: int,
    spacing: str,
    *,
    steps_offset: int = 0,
    convention: str = "ddim",
) -> np.ndarray:
    """diffusers' integer timesteps (descending, length n) of ``set_timesteps(n)`` for
    ``timestep_spacing=spacing`` (``"leading"``, ``"trailing"`` or ``"linspace"``):
    ``convention="ddim"`` as ``DDIMScheduler`` (and DDPM, PNDM, Euler), ``"dpmsolver"`` as
    ``DPMSolverMultistepScheduler`` (and UniPC, DEIS). ``steps_offset`` (an int >= 0) is
    added to the ``"leading"`` timesteps and, as in diffusers, ignored by the others.

    **Example:**

    ```python
    >>> import jadeis
    >>> jadeis.diffusers_timesteps(1000, 4, "trailing").tolist()
    [999, 749, 499, 249]

    ```
    """
    where = "diffusers_timesteps"
    big_n = _check_count(num_train_timesteps, "num_train_timesteps", where, 2)
    n = _check_count(n, "n", where, 1)
    if spacing not in _DIFFUSERS_SPACINGS:
        raise ValueError(
            f"{where}: spacing must be one of diffusers' timestep spacings "
            f"{_DIFFUSERS_SPACINGS}, got spacing={spacing!r}."
        )
    _check_convention(convention, where)
    steps_offset = _check_steps_offset(steps_offset, where)
    if spacing == "trailing":
        k = np.round(np.arange(big_n, 0, -big_n / n)) - 1
    elif convention == "ddim":
        if spacing == "linspace":
            k = np.linspace(0, big_n - 1, n).round()[::-1]
        else:
            k = (np.arange(0, n) * (big_n // n)).round()[::-1] + steps_offset
    elif spacing == "linspace":
        k = np.linspace(0, big_n - 1, n + 1).round()[::-1][:-1]
    else:
        k = (np.arange(0, n + 1) * (big_n // (n + 1))).round()[::-1][:-1] + steps_offset
    k = k.astype(np.int64)
    if k.shape != (n,) or np.any(np.diff(k) >= 0) or k[-1] < 0 or k[0] > big_n - 1:
        raise ValueError(
            f"time_grid: diffusers' {spacing!r} spacing ({convention}) gives no valid n = {n} "
            f"distinct timesteps in [0, {big_n - 1}] (got {k.tolist()}); use fewer steps or "
            f"another spacing."
        )
    return k


def _check_convention(convention, where: str):
    if not isinstance(convention, str) or convention not in _CONVENTIONS:
        raise ValueError(
            f"{where}: convention must be one of {_CONVENTIONS} (whose set_timesteps the "
            f"diffusers spacings follow), got convention={convention!r}."
        )


def _check_steps_offset(steps_offset, where: str) -> int:
    if isinstance(steps_offset, np.integer) and not isinstance(steps_offset, np.bool_):
        steps_offset = int(steps_offset)
    if isinstance(steps_offset, bool) or not isinstance(steps_offset, int) or steps_offset < 0:
        raise ValueError(
            f"{where}: steps_offset must be an int >= 0 (diffusers' steps_offset, added to the "
            f"integer timesteps), got steps_offset={steps_offset!r}."
        )
    return steps_offset


def _check_count(value, name: str, where: str, lo: int) -> int:
    if isinstance(value, np.integer) and not isinstance(value, np.bool_):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{where}: {name} must be an int >= {lo}, got {name}={value!r}.")
    return value


def _diffusers_grid(schedule, n, spacing, t_start, t_end, dtype, final, steps_offset,
                    convention):
    from ._schedule import DiscreteVP

    if not isinstance(schedule, DiscreteVP):
        raise ValueError(
            f"time_grid: spacing={spacing!r} gives diffusers' integer timesteps of a discrete "
            f"table and needs a jadeis.DiscreteVP schedule, got {type(schedule).__name__}."
        )
    if t_start is not None or t_end is not None:
        raise ValueError(
            f"time_grid: t_start/t_end do not apply to spacing={spacing!r} (diffusers' "
            f"timesteps); use final='zero' to end at t = 0."
        )
    dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"time_grid: dtype must be a floating dtype, got {dtype}.")
    big_n = schedule.num_train_timesteps
    k = diffusers_timesteps(big_n, n, spacing, steps_offset=steps_offset, convention=convention)
    if final == "zero":
        t_last = 0.0
    else:
        if k[-1] == 0:
            raise ValueError(
                f"time_grid: diffusers' {spacing!r} timesteps ({convention}) end at timestep 0 "
                f"(t = 1/N), where the default final time already is; use final='zero' (a last "
                f"step to sigma = 0, as set_alpha_to_one=True), or steps_offset=1."
            )
        t_last = 1.0 / big_n
    ts = np.concatenate([(k + 1.0) / big_n, [t_last]])
    out = jnp.asarray(ts, dtype)
    if not np.all(np.diff(np.asarray(out, np.float64)) < 0):
        raise ValueError(
            f"time_grid: {dtype} cannot resolve diffusers' timesteps {k.tolist()}; use "
            f"dtype=jnp.float32 (the state may still be low precision)."
        )
    return out
