from __future__ import annotations

from typing import ClassVar

import equinox as eqx

from .base import AbstractDataSolver, as_int, resolve_warmup

_VARIANTS = ("exact", "midpoint")


class DPMSolverPP(AbstractDataSolver):
    r"""Multistep DPM-Solver++ in data prediction, order 1, 2 or 3 (2M and 3M).

    $x_t = \frac{\sigma_t}{\sigma_s} x_s + \alpha_t \int_{\lambda_s}^{\lambda_t}
    e^{l - \lambda_t} \hat x_0(l)\,dl$ with the data prediction interpolated through the
    last ``order`` steps (docs/math/samplers.md). Order 1 is the same map as DDIM.
    Lower-order warm-up and lower-order final steps as in :class:`DPMSolver`.

    **Arguments:**

    - `order`: 1, 2 or 3.
    - `lower_order_final`: drop to order 1 (and 2) at the end of grids of < 15 steps.
    - `warmup`: ``"auto"`` (default: ``"corrected"`` for order 3, ``"lower_order"``
      otherwise), ``"corrected"`` or ``"lower_order"``. The first step has no history and
      is first order; ``"corrected"`` lets the second step correct it with the second model
      output (no extra evaluation), so 3M is third order on real models
      (docs/math/samplers.md, "corrected warm-up").
    - `variant`: ``"exact"`` (default) integrates the linear interpolant exactly
      (weight ``h^2 phi_2`` on the first divided difference); ``"midpoint"`` is the form
      diffusers and k-diffusion use by default (their ``solver_type="midpoint"``, weight
      ``h (e^h - 1) / 2``), so their 2M samples are reproduced to round-off. Both are
      second order; the variant only changes order-2 steps.

    **Example:**

    ```python
    >>> import jadeis
    >>> jadeis.DPMSolverPP().order
    2
    >>> jadeis.DPMSolverPP(order=2, variant="midpoint").variant
    'midpoint'

    ```
    """

    order: int = eqx.field(default=2, converter=as_int)
    lower_order_final: bool = True
    warmup: str = "auto"
    variant: str = "exact"
    kappa: ClassVar[float] = 1.0
    stochastic: ClassVar[bool] = False

    def __check_init__(self):
        if self.variant not in _VARIANTS:
            raise ValueError(
                f"DPMSolverPP: variant must be 'exact' or 'midpoint', got variant={self.variant!r}."
            )
        resolve_warmup("DPMSolverPP", self.warmup, self.order)

    def _corrected_warmup(self) -> bool:
        return resolve_warmup("DPMSolverPP", self.warmup, self.order)

    def _midpoint(self) -> bool:
        return self.variant == "midpoint"
