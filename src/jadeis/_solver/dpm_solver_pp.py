from __future__ import annotations

from typing import ClassVar

from .base import AbstractDataSolver


class DPMSolverPP(AbstractDataSolver):
    r"""Multistep DPM-Solver++ in data prediction, order 1, 2 or 3 (2M and 3M).

    $x_t = \frac{\sigma_t}{\sigma_s} x_s + \alpha_t \int_{\lambda_s}^{\lambda_t}
    e^{l - \lambda_t} \hat x_0(l)\,dl$ with the data prediction interpolated through the
    last ``order`` steps. Order 1 is the same map as DDIM. Lower-order warm-up and
    lower-order final steps as in :class:`DPMSolver`.

    **Example:**

    ```python
    >>> import jadeis
    >>> jadeis.DPMSolverPP().order
    2

    ```
    """

    order: int = 2
    lower_order_final: bool = True
    kappa: ClassVar[float] = 1.0
    stochastic: ClassVar[bool] = False
