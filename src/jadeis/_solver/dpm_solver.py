from __future__ import annotations

from typing import ClassVar

import equinox as eqx

from .base import AbstractNoiseSolver, as_int, resolve_warmup


class DPMSolver(AbstractNoiseSolver):
    r"""Multistep DPM-Solver in noise prediction (DEIS-style), order 1, 2 or 3.

    The noise integral is integrated exactly against the Newton interpolant of the last
    ``order`` model outputs in lambda (phi-functions). Order 1 is DDIM. Lower-order warm-up
    for the first steps; with ``lower_order_final`` the last steps of grids shorter than
    15 steps drop to order 1 and 2 (as diffusers).
    ``warmup`` (``"auto"``, ``"corrected"`` or ``"lower_order"``) as in
    :class:`DPMSolverPP`: by default order 3 corrects its first-order first step in the
    second step (no extra model evaluation; docs/math/samplers.md).

    **Example:**

    ```python
    >>> import jadeis
    >>> jadeis.DPMSolver(order=3).order
    3

    ```
    """

    order: int = eqx.field(default=2, converter=as_int)
    lower_order_final: bool = True
    warmup: str = "auto"
    stochastic: ClassVar[bool] = False

    def __check_init__(self):
        resolve_warmup("DPMSolver", self.warmup, self.order)

    def _corrected_warmup(self) -> bool:
        return resolve_warmup("DPMSolver", self.warmup, self.order)

    def _data_form(self) -> str:
        return f"DPMSolverPP(order={self.order}, threshold=...), its data-prediction form"
