"""A progress bar for an optimisation whose first iteration includes JIT compilation."""

from __future__ import annotations

import time

import numpy as np
from tqdm.auto import tqdm


class IterationBar:
    """A tqdm bar whose rate and ETA count only compiled iterations.

    Until the first iteration ends the bar says "compiling"; then it shows how long that
    took and restarts its clock, so that the rate and the ETA are those of the compiled
    iterations only (the first one, with the compilation, may take minutes with a U-Net).
    :func:`jadeis.guide` shows one; pass :meth:`callback` as ``guide(..., callback=...)``
    to drive one from a loop of your own.

    **Arguments:** `total` (iterations), `desc` (the bar's label), `disable` (no output),
    further keyword arguments go to `tqdm.tqdm`.

    **Example:**

    ```python
    >>> import jadeis
    >>> bar = jadeis.IterationBar(3, "my loop", disable=True)
    >>> for loss in (1.0, 0.5, 0.25):
    ...     bar.update(loss)
    >>> bar.close()
    >>> bar.first_seconds is not None
    True

    ```
    """

    def __init__(self, total: int, desc: str, *, disable: bool = False, **tqdm_kwargs):
        self.total = int(total)
        self.first_seconds: float | None = None
        self._start = time.perf_counter()
        self.bar = tqdm(total=self.total, desc=desc, disable=disable, unit="it", **tqdm_kwargs)
        self.bar.set_postfix_str("compiling", refresh=True)

    def update(self, loss) -> None:
        """One iteration done, with this loss (its mean is shown)."""
        text = f"loss={float(np.mean(np.asarray(loss))):.4f}"
        if self.first_seconds is None:
            self.first_seconds = time.perf_counter() - self._start
            self.bar.reset(total=self.total)  # the clock restarts: the ETA excludes compiling
            self.bar.initial = self.bar.n = self.bar.last_print_n = 1
        else:
            self.bar.update(1)
        self.bar.set_postfix_str(f"first iteration (compiling) {self.first_seconds:.1f} s, {text}")

    def callback(self, i: int, state) -> bool:
        """``guide``'s callback: :meth:`update` with ``state.loss``; never stops."""
        self.update(state.loss)
        return False

    def close(self) -> None:
        self.bar.close()
