"""A transcription of dpm-solver's own adaptive solver (``DPM_Solver.dpm_solver_adaptive``).

Written for this benchmark from a reading of LuChengTHU/dpm-solver (MIT licence; commit
52bc3fb, ``dpm_solver_jax.py`` lines 541-963 and ``dpm_solver_pytorch.py`` lines 594-1010),
to measure jadeis' ``Adaptive(SinglestepDPMSolver(3))`` against the reference algorithm. It
keeps the reference's structure and arithmetic: the VP linear schedule's formulas
(``NoiseScheduleVP('linear')``), the lower solution DPM-Solver-2 (``r1 = 1/3`` for the pair 23,
``solver_type="dpm_solver"`` by default) whose model outputs the higher DPM-Solver-3 reuses,
the error norm, the step-size rule, the first step ``h_init`` and the end handling.

The algorithm (order 3; ``m`` the model output in the chosen form: noise ``eps`` for
``"dpmsolver"``, data ``x0 = (x - sigma eps) / alpha`` for ``"dpmsolver++"``):

    h = h_init (0.05 in lambda), x_prev = x_T, s = t_T
    while |s - t_0| > t_err (1e-5):
        t = t(lambda_s + h)
        x_lo, (m_s, m_1) = DPM-Solver-2(x, s -> t, r1 = 1/3)       # 2 model evaluations
        x_hi = DPM-Solver-3(x, s -> t, r1 = 1/3, r2 = 2/3; m_s, m_1) # 1 more
        delta = max(atol, rtol * max(|x_prev|, |x_lo|))               # elementwise
        E = max over samples of RMS over the sample of (x_hi - x_lo) / delta
        if E <= 1: x, x_prev, s, lambda_s = x_hi, x_lo, t, lambda_s + h
        h = min(theta * h * E^(-1/order), lambda_0 - lambda_s)      # theta = 0.9, no clip
        nfe += order

The PyTorch version differs only in setting ``lambda_s = lambda(t)`` (recomputed from the
accepted time) instead of ``lambda_s + h``, and in rounding ``E^(-1/order)`` to float32
(``torch.float_power(...).float()``); ``pytorch_rounding=True`` reproduces both.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


class NoiseScheduleVPLinear:
    """``NoiseScheduleVP('linear', continuous_beta_0, continuous_beta_1)`` of the reference
    (the same process as ``jadeis.VPLinear(beta_min, beta_max)``)."""

    def __init__(self, beta_0=0.1, beta_1=20.0):
        self.beta_0, self.beta_1 = beta_0, beta_1

    def marginal_log_mean_coeff(self, t):
        return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def marginal_alpha(self, t):
        return jnp.exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t):
        return jnp.sqrt(1.0 - jnp.exp(2.0 * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t):
        log_mean_coeff = self.marginal_log_mean_coeff(t)
        log_std = 0.5 * jnp.log(1.0 - jnp.exp(2.0 * log_mean_coeff))
        return log_mean_coeff - log_std

    def inverse_lambda(self, lamb):
        tmp = 2.0 * (self.beta_1 - self.beta_0) * jnp.logaddexp(-2.0 * lamb, 0.0)
        delta = self.beta_0**2 + tmp
        return tmp / (jnp.sqrt(delta) + self.beta_0) / (self.beta_1 - self.beta_0)


class DPMSolver:
    """The singlestep updates and the adaptive loop of the reference, for a noise-prediction
    model ``noise_fn(x, t)``; ``predict_x0=True`` is DPM-Solver++ (the data form)."""

    def __init__(self, noise_fn, noise_schedule, predict_x0=False):
        self.noise_fn = noise_fn
        self.ns = noise_schedule
        self.predict_x0 = predict_x0

    def model_fn(self, x, t):
        eps = self.noise_fn(x, t)
        if not self.predict_x0:
            return eps
        alpha_t, sigma_t = self.ns.marginal_alpha(t), self.ns.marginal_std(t)
        return (x - sigma_t * eps) / alpha_t

    def first_update(self, x, s, t, model_s=None):
        ns = self.ns
        h = ns.marginal_lambda(t) - ns.marginal_lambda(s)
        log_alpha_s, log_alpha_t = ns.marginal_log_mean_coeff(s), ns.marginal_log_mean_coeff(t)
        sigma_s, sigma_t = ns.marginal_std(s), ns.marginal_std(t)
        if model_s is None:
            model_s = self.model_fn(x, s)
        if self.predict_x0:
            return sigma_t / sigma_s * x - jnp.exp(log_alpha_t) * jnp.expm1(-h) * model_s, {
                "model_s": model_s
            }
        return jnp.exp(log_alpha_t - log_alpha_s) * x - sigma_t * jnp.expm1(h) * model_s, {
            "model_s": model_s
        }

    def second_update(self, x, s, t, r1=0.5, model_s=None, solver_type="dpm_solver"):
        ns = self.ns
        lambda_s, lambda_t = ns.marginal_lambda(s), ns.marginal_lambda(t)
        h = lambda_t - lambda_s
        s1 = ns.inverse_lambda(lambda_s + r1 * h)
        log_alpha_s = ns.marginal_log_mean_coeff(s)
        log_alpha_s1 = ns.marginal_log_mean_coeff(s1)
        log_alpha_t = ns.marginal_log_mean_coeff(t)
        sigma_s, sigma_s1, sigma_t = ns.marginal_std(s), ns.marginal_std(s1), ns.marginal_std(t)
        alpha_s1, alpha_t = jnp.exp(log_alpha_s1), jnp.exp(log_alpha_t)
        if model_s is None:
            model_s = self.model_fn(x, s)
        if self.predict_x0:
            phi_11, phi_1 = jnp.expm1(-r1 * h), jnp.expm1(-h)
            x_s1 = (sigma_s1 / sigma_s) * x - (alpha_s1 * phi_11) * model_s
            model_s1 = self.model_fn(x_s1, s1)
            if solver_type == "dpm_solver":
                x_t = (
                    (sigma_t / sigma_s) * x
                    - (alpha_t * phi_1) * model_s
                    - (0.5 / r1) * (alpha_t * phi_1) * (model_s1 - model_s)
                )
            else:  # "taylor"
                x_t = (
                    (sigma_t / sigma_s) * x
                    - (alpha_t * phi_1) * model_s
                    + (1.0 / r1)
                    * (alpha_t * ((jnp.exp(-h) - 1.0) / h + 1.0))
                    * (model_s1 - model_s)
                )
        else:
            phi_11, phi_1 = jnp.expm1(r1 * h), jnp.expm1(h)
            x_s1 = jnp.exp(log_alpha_s1 - log_alpha_s) * x - (sigma_s1 * phi_11) * model_s
            model_s1 = self.model_fn(x_s1, s1)
            if solver_type == "dpm_solver":
                x_t = (
                    jnp.exp(log_alpha_t - log_alpha_s) * x
                    - (sigma_t * phi_1) * model_s
                    - (0.5 / r1) * (sigma_t * phi_1) * (model_s1 - model_s)
                )
            else:  # "taylor"
                x_t = (
                    jnp.exp(log_alpha_t - log_alpha_s) * x
                    - (sigma_t * phi_1) * model_s
                    - (1.0 / r1) * (sigma_t * ((jnp.exp(h) - 1.0) / h - 1.0)) * (model_s1 - model_s)
                )
        return x_t, {"model_s": model_s, "model_s1": model_s1}

    def third_update(
        self, x, s, t, r1=1 / 3, r2=2 / 3, model_s=None, model_s1=None, solver_type="dpm_solver"
    ):
        ns = self.ns
        lambda_s, lambda_t = ns.marginal_lambda(s), ns.marginal_lambda(t)
        h = lambda_t - lambda_s
        s1 = ns.inverse_lambda(lambda_s + r1 * h)
        s2 = ns.inverse_lambda(lambda_s + r2 * h)
        log_alpha_s = ns.marginal_log_mean_coeff(s)
        log_alpha_s1 = ns.marginal_log_mean_coeff(s1)
        log_alpha_s2 = ns.marginal_log_mean_coeff(s2)
        log_alpha_t = ns.marginal_log_mean_coeff(t)
        sigma_s, sigma_s1 = ns.marginal_std(s), ns.marginal_std(s1)
        sigma_s2, sigma_t = ns.marginal_std(s2), ns.marginal_std(t)
        alpha_s1, alpha_s2 = jnp.exp(log_alpha_s1), jnp.exp(log_alpha_s2)
        alpha_t = jnp.exp(log_alpha_t)
        if model_s is None:
            model_s = self.model_fn(x, s)
        if self.predict_x0:
            phi_11, phi_12, phi_1 = jnp.expm1(-r1 * h), jnp.expm1(-r2 * h), jnp.expm1(-h)
            phi_22 = jnp.expm1(-r2 * h) / (r2 * h) + 1.0
            phi_2 = phi_1 / h + 1.0
            phi_3 = phi_2 / h - 0.5
            if model_s1 is None:
                x_s1 = (sigma_s1 / sigma_s) * x - (alpha_s1 * phi_11) * model_s
                model_s1 = self.model_fn(x_s1, s1)
            x_s2 = (
                (sigma_s2 / sigma_s) * x
                - (alpha_s2 * phi_12) * model_s
                + r2 / r1 * (alpha_s2 * phi_22) * (model_s1 - model_s)
            )
            model_s2 = self.model_fn(x_s2, s2)
            if solver_type == "dpm_solver":
                x_t = (
                    (sigma_t / sigma_s) * x
                    - (alpha_t * phi_1) * model_s
                    + (1.0 / r2) * (alpha_t * phi_2) * (model_s2 - model_s)
                )
            else:  # "taylor"
                d1_0 = (1.0 / r1) * (model_s1 - model_s)
                d1_1 = (1.0 / r2) * (model_s2 - model_s)
                d1 = (r2 * d1_0 - r1 * d1_1) / (r2 - r1)
                d2 = 2.0 * (d1_1 - d1_0) / (r2 - r1)
                x_t = (
                    (sigma_t / sigma_s) * x
                    - (alpha_t * phi_1) * model_s
                    + (alpha_t * phi_2) * d1
                    - (alpha_t * phi_3) * d2
                )
        else:
            phi_11, phi_12, phi_1 = jnp.expm1(r1 * h), jnp.expm1(r2 * h), jnp.expm1(h)
            phi_22 = jnp.expm1(r2 * h) / (r2 * h) - 1.0
            phi_2 = phi_1 / h - 1.0
            phi_3 = phi_2 / h - 0.5
            if model_s1 is None:
                x_s1 = jnp.exp(log_alpha_s1 - log_alpha_s) * x - (sigma_s1 * phi_11) * model_s
                model_s1 = self.model_fn(x_s1, s1)
            x_s2 = (
                jnp.exp(log_alpha_s2 - log_alpha_s) * x
                - (sigma_s2 * phi_12) * model_s
                - r2 / r1 * (sigma_s2 * phi_22) * (model_s1 - model_s)
            )
            model_s2 = self.model_fn(x_s2, s2)
            if solver_type == "dpm_solver":
                x_t = (
                    jnp.exp(log_alpha_t - log_alpha_s) * x
                    - (sigma_t * phi_1) * model_s
                    - (1.0 / r2) * (sigma_t * phi_2) * (model_s2 - model_s)
                )
            else:  # "taylor"
                d1_0 = (1.0 / r1) * (model_s1 - model_s)
                d1_1 = (1.0 / r2) * (model_s2 - model_s)
                d1 = (r2 * d1_0 - r1 * d1_1) / (r2 - r1)
                d2 = 2.0 * (d1_1 - d1_0) / (r2 - r1)
                x_t = (
                    jnp.exp(log_alpha_t - log_alpha_s) * x
                    - (sigma_t * phi_1) * model_s
                    - (sigma_t * phi_2) * d1
                    - (sigma_t * phi_3) * d2
                )
        return x_t

    def adaptive(
        self,
        x,
        order,
        t_T,
        t_0,
        h_init=0.05,
        atol=0.0078,
        rtol=0.05,
        theta=0.9,
        t_err=1e-5,
        solver_type="dpm_solver",
        max_iters=100_000,
        pytorch_rounding=False,
    ):
        """``(x_0, nfe, accepted, attempts)`` of ``dpm_solver_adaptive`` (one
        ``lax.while_loop``; ``atol``/``rtol`` may be traced). ``max_iters`` only guards
        against an endless loop (the reference has none)."""
        ns = self.ns
        dtype = x.dtype
        s = jnp.asarray(t_T, dtype)
        lambda_s = ns.marginal_lambda(s)
        lambda_0 = ns.marginal_lambda(jnp.asarray(t_0, dtype))
        h = jnp.asarray(h_init, dtype)
        if order == 2:
            r1 = 0.5

            def lower_update(x, s, t):
                return self.first_update(x, s, t)

            def higher_update(x, s, t, model_s):
                return self.second_update(x, s, t, r1=r1, model_s=model_s, solver_type=solver_type)[
                    0
                ]
        elif order == 3:
            r1, r2 = 1.0 / 3.0, 2.0 / 3.0

            def lower_update(x, s, t):
                return self.second_update(x, s, t, r1=r1, solver_type=solver_type)

            def higher_update(x, s, t, model_s, model_s1):
                return self.third_update(
                    x,
                    s,
                    t,
                    r1=r1,
                    r2=r2,
                    model_s=model_s,
                    model_s1=model_s1,
                    solver_type=solver_type,
                )
        else:
            raise ValueError(f"order must be 2 or 3, got {order}")

        def body(c):
            x, x_prev, s, lambda_s, h, nfe, n_acc = c
            lambda_t = lambda_s + h
            t = ns.inverse_lambda(lambda_t)
            x_lower, kw = lower_update(x, s, t)
            x_higher = higher_update(x, s, t, **kw)
            delta = jnp.maximum(atol, rtol * jnp.maximum(jnp.abs(x_prev), jnp.abs(x_lower)))
            v = (x_higher - x_lower) / delta
            E = jnp.max(jnp.sqrt(jnp.mean(jnp.square(v.reshape((v.shape[0], -1))), axis=-1)))
            accept = E <= 1.0
            new_lambda = ns.marginal_lambda(t) if pytorch_rounding else lambda_t
            x = jnp.where(accept, x_higher, x)
            x_prev = jnp.where(accept, x_lower, x_prev)
            s = jnp.where(accept, t, s)
            lambda_s = jnp.where(accept, new_lambda, lambda_s)
            factor = jnp.power(E, -1.0 / order)
            if pytorch_rounding:
                factor = factor.astype(jnp.float32).astype(dtype)
            h = jnp.minimum(theta * h * factor, lambda_0 - lambda_s)
            return x, x_prev, s, lambda_s, h, nfe + order, n_acc + accept.astype(jnp.int32)

        def cond(c):
            return (jnp.abs(c[2] - t_0) > t_err) & (c[5] < order * max_iters)

        carry = (x, x, s, lambda_s, h, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
        x, _, _, _, _, nfe, n_acc = lax.while_loop(cond, body, carry)
        return x, nfe, n_acc, nfe // order


def reference_adaptive(
    noise_fn, x_T, *, prediction, tol, order=3, t_T=1.0, t_0=1e-3, beta_0=0.1, beta_1=20.0, **kw
):
    """``dpm_solver_adaptive`` with ``rtol = atol = tol`` on the VP linear schedule:
    ``(x_0, nfe, accepted, attempts)``. ``prediction``: ``"data"`` (DPM-Solver++) or
    ``"noise"``."""
    solver = DPMSolver(
        noise_fn, NoiseScheduleVPLinear(beta_0, beta_1), predict_x0=prediction == "data"
    )
    return solver.adaptive(x_T, order, t_T, t_0, atol=tol, rtol=tol, **kw)


__all__ = ["DPMSolver", "NoiseScheduleVPLinear", "reference_adaptive"]
