from __future__ import annotations

from typing import ClassVar

from .base import AbstractNoiseSolver


class DDIM(AbstractNoiseSolver):
    r"""Deterministic DDIM, i.e. DPM-Solver-1 (first order, noise prediction):

    $x_t = \frac{\alpha_t}{\alpha_s} x_s - \sigma_t\,\mathrm{expm1}(h)\,\epsilon_\theta(x_s, s)$.

    **Example:**

    ```python
    >>> import jadeis
    >>> jadeis.DDIM().order
    1

    ```
    """

    order: int = 1
    lower_order_final: bool = True
    stochastic: ClassVar[bool] = False
    max_order: ClassVar[int] = 1
