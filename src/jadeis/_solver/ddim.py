from __future__ import annotations

from typing import ClassVar

import equinox as eqx

from .base import AbstractNoiseSolver


class DDIM(AbstractNoiseSolver):
    r"""Deterministic DDIM, i.e. DPM-Solver-1 (first order, noise prediction):

    $x_t = \frac{\alpha_t}{\alpha_s} x_s - \sigma_t\,\mathrm{expm1}(h)\,\epsilon_\theta(x_s, s)$
    (docs/math/samplers.md). It has no options: its order is 1. (To clip x_0, as
    diffusers' ``clip_sample`` does, use ``DPMSolverPP(order=1, threshold=...)``, the same
    map in data-prediction form.)

    **Example:**

    ```python
    >>> import jadeis
    >>> jadeis.DDIM().order
    1

    ```
    """

    stochastic: ClassVar[bool] = False
    max_order: ClassVar[int] = 1

    order: int = eqx.field(default=1, init=False)
    lower_order_final: bool = eqx.field(default=False, init=False)

    def _data_form(self) -> str:
        return (
            "DPMSolverPP(order=1, threshold=...): the same map as DDIM, stepping with the "
            "data prediction (diffusers' DDIMScheduler with clip_sample or thresholding "
            "recomputes the noise from the clipped x_0, which is exactly that step)"
        )
