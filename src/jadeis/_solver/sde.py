from __future__ import annotations

from typing import ClassVar

import equinox as eqx

from .base import AbstractDataSolver, AbstractNoiseSolver, as_int


class SDEDPMSolver(AbstractNoiseSolver):
    r"""SDE-DPM-Solver-1 for the diffusion SDE (noise prediction, first order):

    $x_t = \frac{\alpha_t}{\alpha_s}x_s - 2\sigma_t\,\mathrm{expm1}(h)\,\epsilon_s
    + \sigma_t\sqrt{\mathrm{expm1}(2h)}\,\xi$.

    Needs a PRNG ``key`` or a ``noise`` array in :func:`jadeis.sample`.

    **Example:**

    ```python
    >>> import jadeis
    >>> jadeis.SDEDPMSolver().stochastic
    True

    ```
    """

    order: int = eqx.field(default=1, converter=as_int)
    lower_order_final: bool = True
    stochastic: ClassVar[bool] = True
    drift_factor: ClassVar[float] = 2.0
    max_order: ClassVar[int] = 1

    def _data_form(self) -> str:
        return "SDEDPMSolverPP(order=1, threshold=...), its data-prediction form"


class SDEDPMSolverPP(AbstractDataSolver):
    r"""SDE-DPM-Solver++ (data prediction), order 1 or 2 (2M):

    $x_t = \frac{\sigma_t}{\sigma_s}e^{-h}x_s + 2\alpha_t\int_{\lambda_s}^{\lambda_t}
    e^{2(l-\lambda_t)}\hat x_0(l)\,dl + \sigma_t\sqrt{-\mathrm{expm1}(-2h)}\,\xi$.

    Needs a PRNG ``key`` or a ``noise`` array in :func:`jadeis.sample`.

    **Example:**

    ```python
    >>> import jadeis
    >>> jadeis.SDEDPMSolverPP(order=2).order
    2

    ```
    """

    order: int = eqx.field(default=1, converter=as_int)
    lower_order_final: bool = True
    kappa: ClassVar[float] = 2.0
    stochastic: ClassVar[bool] = True
    max_order: ClassVar[int] = 2
