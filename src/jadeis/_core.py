"""The forward sampling loop shared by every gradient strategy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ._conditioning import z_at
from ._solver import AbstractSolver


class Static(NamedTuple):
    """Hashable, trace-time configuration of one sampling problem."""

    eps_fn: Callable
    solver: AbstractSolver
    adjoint: Any
    per_step_z: bool
    noise_mode: str  # "none" | "key" | "array"
    return_trajectory: bool


def cast(v, dtype):
    return jnp.asarray(v).astype(dtype)


def model_output(static: Static, params, x, t, z, alpha, sigma):
    """The model output in the solver's parameterisation (eps or data)."""
    eps = static.eps_fn(params, x, t, z)
    if static.solver.prediction == "data":
        return (x - sigma * eps) / alpha
    return eps


def draw_noise(static: Static, noise, i, x):
    """Gaussian noise of step ``i``: from the key (folded with i) or the supplied array."""
    if static.noise_mode == "key":
        key = jax.random.wrap_key_data(noise)
        return jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
    return noise[i].astype(x.dtype)


def step_inputs(static: Static, schedule, ts, dtype):
    """Per-step scan inputs: index, time, a, b, c, alpha_s, sigma_s (all in ``dtype``)."""
    co = static.solver.coefficients(schedule, ts)
    n = ts.shape[0] - 1
    t_s = ts[:-1]
    return (
        jnp.arange(n),
        cast(t_s, dtype),
        cast(co.a, dtype),
        cast(co.b, dtype),
        cast(co.c, dtype),
        cast(schedule.alpha(t_s), dtype),
        cast(schedule.sigma(t_s), dtype),
    )


def forward(
    static: Static, params, x_T, z, schedule, ts, noise, *, save: bool, append_final: bool = True
):
    """Run the sampler. Returns ``(x_0, states)``; ``states`` has the N + 1 states at every
    time of ``ts`` when ``save`` (else None). With ``append_final=False`` it has only the N
    states x_T, ..., x_{N-1} at the start of each step: the scan's own output buffer, with
    no (N + 1)-state copy made by appending x_0 (for gradient residuals)."""
    solver = static.solver
    k = solver.order

    def body(carry, inp):
        x, hist = carry
        i, t, a, b, c, alpha, sigma = inp
        m = model_output(static, params, x, t, z_at(z, i, static.per_step_z), alpha, sigma)
        x_next = a * x + b[0] * m
        for j, h in enumerate(hist):
            x_next = x_next + b[j + 1] * h
        if solver.stochastic:
            x_next = x_next + c * draw_noise(static, noise, i, x)
        hist = ((m,) + hist)[: k - 1]
        return (x_next, hist), (x if save else None)

    hist0 = tuple(jnp.zeros_like(x_T) for _ in range(k - 1))
    (x_0, _), states = lax.scan(body, (x_T, hist0), step_inputs(static, schedule, ts, x_T.dtype))
    if save and append_final:
        states = jnp.concatenate([states, x_0[None]], axis=0)
    return x_0, states
