"""Turn a network that predicts x0, v or flow velocity into a noise predictor."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ._ei import model_time_dtype
from ._schedule import AbstractSchedule

_PREDICTIONS = ("eps", "x0", "v", "flow")
# diffusers' prediction_type names
_ALIASES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def as_eps_fn(model_fn: Callable, schedule: AbstractSchedule, prediction: str) -> Callable:
    r"""Wrap ``model_fn(params, x, t, z)`` so that it returns the noise prediction eps
    (docs/math/parameterisations.md).

    **Arguments:**

    - `model_fn`: the network, same signature as an ``eps_fn``.
    - `schedule`: the noise schedule the network was trained with.
    - `prediction`: what the network outputs: ``"eps"`` (returned unchanged), ``"x0"``
      (data), ``"v"`` ($v = \alpha\epsilon - \sigma x_0$) or ``"flow"``
      ($u = \dot\alpha_t x_0 + \dot\sigma_t\epsilon$, the flow-matching velocity dx/dt).
      diffusers' ``prediction_type`` names are accepted as aliases: ``"epsilon"`` (= "eps"),
      ``"v_prediction"`` (= "v"), ``"sample"`` (= "x0").

    With $x = \alpha x_0 + \sigma\epsilon$: from x0, $\epsilon = (x - \alpha x_0)/\sigma$; from
    v, $\epsilon = (\sigma x + \alpha v)/(\alpha^2 + \sigma^2)$; from u,
    $\epsilon = (\alpha u - \dot\alpha x)/(\alpha\dot\sigma - \dot\alpha\sigma)$
    (for rectified flow, $\epsilon = x + (1 - t) u$).

    **Example:**

    ```python
    >>> import jax.numpy as jnp
    >>> import jadeis
    >>> sch = jadeis.RectifiedFlow()
    >>> velocity = lambda params, x, t, z: jnp.zeros_like(x)
    >>> eps_fn = jadeis.as_eps_fn(velocity, sch, "flow")
    >>> eps_fn(None, jnp.ones((1, 2)), 0.5, None).tolist()
    [[1.0, 1.0]]

    ```
    """
    prediction = _ALIASES.get(prediction, prediction)
    if prediction not in _PREDICTIONS:
        raise ValueError(
            f"as_eps_fn: prediction must be one of {_PREDICTIONS} (or diffusers' "
            f"{tuple(_ALIASES)}), got {prediction!r}."
        )
    if prediction == "eps":
        return model_fn

    def eps_fn(params, x, t, z):
        out = model_fn(params, x, t, z)
        # t in x's dtype, but at least float32 (never rounded to a bfloat16 x)
        t = jnp.asarray(t)
        t_dtype = model_time_dtype(x.dtype)
        if jnp.issubdtype(t.dtype, jnp.floating):
            t_dtype = jnp.promote_types(t.dtype, t_dtype)
        t = t.astype(t_dtype)
        # one dtype for the conversion (also under strict dtype promotion): a bfloat16 output
        # for a float32 x is converted in float32
        dt = jnp.promote_types(jnp.promote_types(x.dtype, jnp.asarray(out).dtype), t_dtype)
        x = x.astype(dt)
        out = jnp.asarray(out).astype(dt)
        alpha = schedule.alpha(t).astype(dt)
        sigma = schedule.sigma(t).astype(dt)
        if prediction == "x0":
            return (x - alpha * out) / sigma
        if prediction == "v":
            return (sigma * x + alpha * out) / (alpha**2 + sigma**2)
        _, d_alpha = jax.jvp(schedule.alpha, (t,), (jnp.ones_like(t),))
        _, d_sigma = jax.jvp(schedule.sigma, (t,), (jnp.ones_like(t),))
        return (alpha * out - d_alpha * x) / (alpha * d_sigma - d_alpha * sigma)

    return eps_fn
