"""Clipping and dynamic thresholding of the data prediction x_0 (diffusers' ``clip_sample``
and ``thresholding``), an option of the solvers that form the data prediction.

A threshold is a small immutable object passed as ``solver=DPMSolverPP(...,
threshold=...)``; the solver applies it wherever it forms $\\hat x_0 = (x - \\sigma
\\hat\\epsilon)/\\alpha$, inside its step, so every gradient strategy differentiates through
it (docs/math/parameterisations.md, "clipping and thresholding x_0").
"""

from __future__ import annotations

import abc
import math

import equinox as eqx
import jax
import jax.numpy as jnp


def _finite_float(owner: str, name: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: {name} must be a number, got {name}={value!r}.") from None
    if not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be finite, got {name}={value!r}.")
    return value


class AbstractThreshold(eqx.Module):
    """Base class of the maps applied to the data prediction x_0 inside a solver's step
    (``solver=DPMSolverPP(threshold=...)``): :class:`ClipX0` and :class:`DynamicThreshold`.
    ``threshold(x0)`` maps an array, or a pytree of arrays leaf by leaf."""

    @abc.abstractmethod
    def apply(self, x0: jax.Array) -> jax.Array:
        """The map on one array."""

    def __call__(self, x0):
        return jax.tree.map(self.apply, x0)


class ClipX0(AbstractThreshold):
    r"""Clip the data prediction to ``[lo, hi]``: $\hat x_0 \leftarrow \mathrm{clip}(\hat x_0,
    lo, hi)$ (Imagen's *static thresholding*; diffusers' ``clip_sample=True`` with
    ``clip_sample_range=r`` is ``ClipX0(-r, r)``). The gradient is zero where the
    prediction is clipped.

    **Arguments:** `lo` (default -1), `hi` (default 1), with ``lo < hi``.

    **Example:**

    ```python
    >>> import jax.numpy as jnp
    >>> import jadeis
    >>> jadeis.ClipX0()(jnp.array([-3.0, 0.5, 2.0])).tolist()
    [-1.0, 0.5, 1.0]
    >>> solver = jadeis.DPMSolverPP(order=2, threshold=jadeis.ClipX0(-1.0, 1.0))

    ```
    """

    lo: float = -1.0
    hi: float = 1.0

    def __init__(self, lo: float = -1.0, hi: float = 1.0):
        self.lo = _finite_float("ClipX0", "lo", lo)
        self.hi = _finite_float("ClipX0", "hi", hi)
        if not self.lo < self.hi:
            raise ValueError(f"ClipX0: lo must be below hi, got lo={lo!r}, hi={hi!r}.")

    def apply(self, x0):
        return jnp.clip(x0, jnp.asarray(self.lo, x0.dtype), jnp.asarray(self.hi, x0.dtype))


class DynamicThreshold(AbstractThreshold):
    r"""Dynamic thresholding (Saharia et al. 2022, Imagen; diffusers' ``thresholding=True``):
    per example, $s = \min(\max(q_p(|\hat x_0|), 1), \text{max\_value})$ with $q_p$ the
    ``ratio`` quantile of the absolute values of the example's entries, then
    $\hat x_0 \leftarrow \mathrm{clip}(\hat x_0, -s, s) / s$. Pixels that saturate are pushed
    inwards instead of clipped, so a large guidance scale does not wash the sample out.
    Differentiable (through the quantile too, which is a linear interpolation of two sorted
    entries, as ``torch.quantile`` computes it).

    **Arguments:**

    - `ratio`: the quantile p in (0, 1] (diffusers' ``dynamic_thresholding_ratio``,
      default 0.995).
    - `max_value`: the largest s, >= 1 (diffusers' ``sample_max_value``, default 1.0 as in
      diffusers, where s is then always 1 and this is ``ClipX0(-1, 1)``; Imagen's
      pixel-space models use larger values).
    - `per_example`: the quantile is taken per example, over every axis but the leading
      (batch) axis, as diffusers does (default); ``False`` takes it over the whole array
      (e.g. for a ``jax.vmap``-ed single example). A 0-d or 1-d array is one example.

    **Example:**

    ```python
    >>> import jax.numpy as jnp
    >>> import jadeis
    >>> x0 = jnp.array([[0.5, -4.0, 2.0, 1.0]])    # one example
    >>> out = jadeis.DynamicThreshold(ratio=0.5, max_value=3.0)(x0)   # s = 1.5
    >>> bool(jnp.allclose(out, jnp.array([[1 / 3, -1.0, 1.0, 2 / 3]])))
    True
    >>> solver = jadeis.UniPC(threshold=jadeis.DynamicThreshold(0.995, max_value=2.0))

    ```
    """

    ratio: float = 0.995
    max_value: float = 1.0
    per_example: bool = True

    def __init__(self, ratio: float = 0.995, max_value: float = 1.0, per_example: bool = True):
        self.ratio = _finite_float("DynamicThreshold", "ratio", ratio)
        self.max_value = _finite_float("DynamicThreshold", "max_value", max_value)
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"DynamicThreshold: ratio must be in (0, 1], got ratio={ratio!r}.")
        if not self.max_value >= 1.0:
            raise ValueError(
                f"DynamicThreshold: max_value must be >= 1 (s is at least 1, so that values "
                f"inside [-1, 1] are never scaled up), got max_value={max_value!r}."
            )
        if not isinstance(per_example, bool):
            raise ValueError(
                f"DynamicThreshold: per_example must be True or False, got {per_example!r}."
            )
        self.per_example = per_example

    def apply(self, x0):
        batched = self.per_example and x0.ndim >= 2
        flat = x0.reshape((x0.shape[0], -1) if batched else (1, -1))
        # the quantile in at least float32 (diffusers upcasts half precision for it)
        work = x0.dtype if jnp.finfo(x0.dtype).bits >= 32 else jnp.float32
        s = jnp.quantile(jnp.abs(flat).astype(work), self.ratio, axis=1, keepdims=True)
        s = jnp.clip(s, 1.0, self.max_value).astype(x0.dtype)
        out = jnp.clip(flat, -s, s) / s
        return out.reshape(x0.shape)


__all__ = ["AbstractThreshold", "ClipX0", "DynamicThreshold"]
