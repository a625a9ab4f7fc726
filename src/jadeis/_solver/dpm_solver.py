from __future__ import annotations

from typing import ClassVar

from .base import AbstractNoiseSolver


class DPMSolver(AbstractNoiseSolver):
    r"""Multistep DPM-Solver in noise prediction (DEIS-style), order 1, 2 or 3.

    The noise integral is integrated exactly against the Newton interpolant of the last
    ``order`` model outputs in lambda (phi-functions). Order 1 is DDIM. Lower-order warm-up
    for the first steps; with ``lower_order_final`` the last steps of grids shorter than
    15 steps drop to order 1 and 2 (as diffusers).

    **Example:**

    ```python
    >>> import jadeis
    >>> jadeis.DPMSolver(order=3).order
    3

    ```
    """

    order: int = 2
    lower_order_final: bool = True
    stochastic: ClassVar[bool] = False
