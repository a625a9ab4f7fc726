from __future__ import annotations

import math
from typing import ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from .._ei import grid_values, model_time_dtype, phis, shifted
from .base import AbstractSolver, as_int, check_bool, check_choice

_VARIANTS = ("bh2", "bh1")


class UniPCInputs(NamedTuple):
    """Row i of UniPC's per-step inputs (docs/math/samplers.md#unipc).

    The model is evaluated at ``t`` (= ``ts[i]``); ``alpha``, ``sigma`` convert its noise
    prediction to data. The corrector of step i - 1 (``keep``, ``ca``, ``cb``) gives the
    corrected sample at ``ts[i]``; the predictor of step i (``a``, ``b``) the next one.
    """

    t: Array
    alpha: Array
    sigma: Array
    a: Array  # predictor: coefficient of the corrected x_i
    b: Array  # (order,) predictor: weights of m_i, m_{i-1}, ...
    keep: Array  # 1 on row 0 (no corrector before the first step), else 0
    ca: Array  # corrector: coefficient of the corrected x_{i-1}
    cb: Array  # (order + 1,) corrector: weights of m_i (new point), m_{i-1}, ..., m_{i-order}


def _lagrange_rhos(nodes, b):
    """rho with sum_k rho_k nodes_k^(n-1) = b_n (n = 1..len(nodes)): a Vandermonde solve
    in closed form, rho_j = sum_n [x^(n-1)] L_j(x) b_n with L_j the Lagrange basis."""
    out = []
    for j, rj in enumerate(nodes):
        others = [r for a, r in enumerate(nodes) if a != j]
        if not others:
            out.append(b[0])
        elif len(others) == 1:
            (ra,) = others
            out.append((b[1] - ra * b[0]) / (rj - ra))
        else:
            ra, rb = others
            num = b[2] - (ra + rb) * b[1] + ra * rb * b[0]
            out.append(num / ((rj - ra) * (rj - rb)))
    return out


def unipc_orders(order: int, n: int, lower_order_final: bool, first_index=0):
    """UniPC's order at each of ``n`` steps, as diffusers' ``UniPCMultistepScheduler``:
    warm-up ``min(order, i + 1)`` and, with ``lower_order_final``, at most ``n - i`` on
    *every* grid (not only below 15 steps as in the DPM-Solver schedulers). Step ``i`` of
    the grid is step ``first_index + i`` of the run (warm-up); a traced ``first_index`` (a
    step of an adaptive grid) gives traced orders."""
    if isinstance(first_index, int):
        xp, i = np, np.arange(n)
    else:
        xp, i = jnp, jnp.arange(n, dtype=jnp.asarray(first_index).dtype)
    # (within the grid given, a step has only the points before it as history)
    orders = xp.clip(xp.minimum(xp.minimum(order, first_index + i + 1), i + 1), 1, None)
    if lower_order_final:
        orders = xp.minimum(orders, n - i)
    return orders


class UniPC(AbstractSolver):
    r"""UniPC-p, the unified predictor-corrector of Zhao et al. (2023), bh2, data prediction.

    The same map as diffusers' ``UniPCMultistepScheduler(predict_x0=True,
    solver_type="bh2")`` (docs/math/samplers.md#unipc). Step i runs, with
    $m_j = \hat x_0(\tilde x_j, t_j)$ the data prediction (one model evaluation per step):

    - the corrector UniC-$p$ (3.30): redo step $i-1$ from the corrected $x_{i-1}$ with the
      new point $m_i$ added, giving the corrected $x_i$ (none before the first step);
    - the predictor UniP-$p$ (3.28): $\tilde x_{i+1} = \frac{\sigma_{t}}{\sigma_{s}}x_i -
      \alpha_t\,\mathrm{expm1}(-h)\,m_i - \alpha_t B(h)\sum_k\rho_kD1_k$ with the last $p$
      model outputs, the $\rho$ solving $R\rho = b$ (3.27), (3.29).

    The model output at the *uncorrected* $\tilde x_i$ is what the history keeps; there is
    no corrector after the last step, so the sample returned is the last prediction.
    Warm-up and lower-order final steps as diffusers: step i has order
    $\min(p, i + 1, N - i)$ (the last bound with ``lower_order_final``, on every grid).
    With the corrector UniPC-p converges with order p + 1 (``convergence_order``).

    All coefficients ($\rho$ from the small Vandermonde systems in closed form, $B(h)$, the
    phi-functions) are computed in ``inputs``, once per grid and differentiably, so
    gradients reach ``ts`` and the schedule. The state is ``(x_pred, (x_prev,), history)``:
    the uncorrected sample at ``ts[i]``, the corrected sample at ``ts[i-1]`` (absent without
    corrector) and the model outputs ``m_{i-1}, ..., m_{i-K}`` (K = order with the
    corrector, order - 1 without).

    **Arguments:**

    - `order`: p = 1, 2 or 3 (default 2, as diffusers).
    - `corrector`: apply UniC (default True); False gives UniP-p alone (order p).
    - `lower_order_final`: order at most N - i at step i (default True, as diffusers).
    - `variant`: ``"bh2"`` (default, $B(h) = \mathrm{expm1}(-h)$) or ``"bh1"``
      ($B(h) = -h$).

    **Example:**

    ```python
    >>> import jax.numpy as jnp
    >>> import jadeis
    >>> sch = jadeis.VPLinear()
    >>> solver = jadeis.UniPC(order=2)
    >>> solver.convergence_order
    3
    >>> eps_fn = lambda p, x, t, z: x * sch.sigma(t) / (sch.alpha(t) ** 2 * p + sch.sigma(t) ** 2)
    >>> x0 = jadeis.sample(eps_fn, 0.25, jnp.ones((2,)), schedule=sch,
    ...                    ts=jadeis.time_grid(sch, 10), solver=solver)
    >>> x0.shape
    (2,)

    ```
    """

    order: int = eqx.field(default=2, converter=as_int)
    corrector: bool = True
    lower_order_final: bool = True
    variant: str = "bh2"
    stochastic: ClassVar[bool] = False

    def __check_init__(self):
        for name in ("corrector", "lower_order_final"):
            check_bool("UniPC", name, getattr(self, name))
        check_choice("UniPC", "variant", self.variant, _VARIANTS)

    @property
    def forms_data_prediction(self) -> bool:
        return True

    @property
    def convergence_order(self) -> int:
        """Global order of accuracy: p + 1 with the corrector, p without."""
        return self.order + 1 if self.corrector else self.order

    def _history_len(self) -> int:
        return self.order if self.corrector else self.order - 1

    @property
    def num_history(self) -> int:
        return self.order

    def inputs(self, schedule, ts, dtype, *, first_index=0, to_end=True, with_error=False):
        p = self.order
        n = ts.shape[0] - 1
        orders = jnp.asarray(
            unipc_orders(p, n, self.lower_order_final and to_end, first_index)
        )
        values = grid_values(schedule, ts)
        lam, log_alpha, log_sigma = values.lam, values.log_alpha, values.log_sigma
        lam_s, lam_t = lam[:-1], lam[1:]
        h = lam_t - lam_s
        hh = -h
        alpha_t = jnp.exp(log_alpha[1:])
        a = jnp.exp(log_sigma[1:] - log_sigma[:-1])
        e = jnp.expm1(hh)  # h phi_1 in diffusers' notation
        ph = phis(p + 1, hh)  # phi_1 .. phi_{p+1} of hh, one evaluation
        phi1 = ph[0]
        # b_n = n! hh phi_{n+1}(hh) / B(h)  (3.27); bh2: B = expm1(hh) = hh phi_1(hh)
        big_b = e if self.variant == "bh2" else hh
        scale = phi1 if self.variant == "bh2" else jnp.ones_like(hh)
        b = [math.factorial(k) * ph[k] / scale for k in range(1, p + 1)]
        # history nodes r_k = (lambda_{i-k} - lambda_i) / h, k = 1..p-1; a safe stand-in
        # where step i does not use point k (warm-up), so no division by zero anywhere
        rs, use = [], []
        for k in range(1, p):
            lam_k = shifted(lam_s, k)
            u = orders > k
            rs.append(jnp.where(u, (lam_k - lam_s) / h, -float(k)))
            use.append(u)
        zero = jnp.zeros_like(h)

        # predictor UniP-p_i: rho on the p_i - 1 history points; p_i = 2 uses rho = 1/2
        rho_p = [zero for _ in range(p - 1)]
        if p >= 2:
            rho_p[0] = jnp.where(orders == 2, 0.5, rho_p[0])
        if p >= 3:
            r3 = _lagrange_rhos(rs[:2], b[:2])
            rho_p = [jnp.where(orders == 3, r3[k], rho_p[k]) for k in range(2)]
        wp = [-alpha_t * e]
        for k in range(p - 1):
            w = jnp.where(use[k], alpha_t * big_b * rho_p[k] / rs[k], zero)
            wp[0] = wp[0] + w
            wp.append(-w)
        bp = jnp.stack(wp, axis=-1)

        # corrector UniC-p_i of step i: the p_i - 1 history points and r = 1 (the new point);
        # p_i = 1 uses rho = 1/2
        one = jnp.ones_like(h)
        rho_new = jnp.where(orders == 1, 0.5, zero)
        rho_c = [zero for _ in range(p - 1)]
        for q in range(2, p + 1):
            r = _lagrange_rhos(rs[: q - 1] + [one], b[:q])
            rho_new = jnp.where(orders == q, r[-1], rho_new)
            rho_c = [
                jnp.where(orders == q, r[k], rho_c[k]) if k < q - 1 else rho_c[k]
                for k in range(p - 1)
            ]
        wc_new = -alpha_t * big_b * rho_new
        wc = [-alpha_t * e + alpha_t * big_b * rho_new]
        for k in range(p - 1):
            w = jnp.where(use[k], alpha_t * big_b * rho_c[k] / rs[k], zero)
            wc[0] = wc[0] + w
            wc.append(-w)
        bc = jnp.stack([wc_new] + wc, axis=-1)

        # row i holds the corrector of step i - 1; none before step 0, none after step N - 1
        def shift(v):
            return jnp.concatenate([jnp.zeros_like(v[:1]), v[:-1]], axis=0)

        if isinstance(first_index, int):
            keep = jnp.zeros((n,), h.dtype).at[0].set(1.0 if first_index == 0 else 0.0)
        else:
            keep = (first_index + jnp.arange(n) == 0).astype(h.dtype)

        def cast(v):
            return jnp.asarray(v).astype(dtype)

        t_s = ts[:-1]
        return UniPCInputs(
            t=jnp.asarray(t_s).astype(model_time_dtype(dtype)),
            alpha=cast(jnp.exp(log_alpha[:-1])),
            sigma=cast(jnp.exp(log_sigma[:-1])),
            a=cast(a),
            b=cast(bp),
            keep=cast(keep),
            ca=cast(shift(a)),
            cb=cast(shift(bc)),
        )

    def init(self, x_T):
        zeros = lambda: jax.tree.map(jnp.zeros_like, x_T)  # noqa: E731
        prev = (zeros(),) if self.corrector else ()
        return (x_T, prev, tuple(zeros() for _ in range(self._history_len())))

    def step(self, model, inp, state, xi):
        x_pred, prev, hist = state
        eps = model(x_pred, inp.t)
        tm = jax.tree.map
        m = self.data_prediction(x_pred, eps, inp.alpha, inp.sigma)
        if self.corrector:
            x = tm(lambda x_pred, p, m: inp.keep * x_pred + inp.ca * p + inp.cb[0] * m,
                   x_pred, prev[0], m)
            for j, hj in enumerate(hist):
                x = tm(lambda x, hj, j=j: x + inp.cb[j + 1] * hj, x, hj)
            prev = (x,)
        else:
            x = x_pred
        x_next = tm(lambda x, m: inp.a * x + inp.b[0] * m, x, m)
        for j in range(self.order - 1):
            x_next = tm(lambda v, h, j=j: v + inp.b[j + 1] * h, x_next, hist[j])
        return (x_next, prev, ((m,) + hist)[: self._history_len()]), None
