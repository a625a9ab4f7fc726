"""Shared test utilities: the Gaussian-data oracle (SPEC section 6) and tree comparisons."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jadeis


def tree_allclose(a, b, rtol=1e-7, atol=1e-9):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(
        np.allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol) for x, y in zip(la, lb)
    )


def fitted_order(ns, errors):
    """Slope of -log(error) against log(n): the measured convergence order."""
    return float(
        -np.polyfit(np.log(np.asarray(ns, float)), np.log(np.asarray(errors, float)), 1)[0]
    )


class GaussianOracle:
    """Data N(mu, s^2 I): exact eps, and the exact probability-flow ODE flow map.

    eps*(x, t) = sigma_t (x - alpha_t mu) / (alpha_t^2 s^2 + sigma_t^2). Along the
    probability-flow ODE, (x_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2) is constant.
    Here ``params`` is s^2 and the conditioning ``z`` is mu, so dL/dparams and dL/dz of
    the exact flow map are available by autodiff of the closed form.
    """

    def __init__(self, schedule):
        self.schedule = schedule

    def eps_fn(self, s2, x, t, mu):
        sch = self.schedule
        a = sch.alpha(t).astype(x.dtype)
        s = sch.sigma(t).astype(x.dtype)
        return s * (x - a * mu) / (a**2 * s2 + s**2)

    def std(self, t, s2):
        sch = self.schedule
        return jnp.sqrt(sch.alpha(t) ** 2 * s2 + sch.sigma(t) ** 2)

    def flow(self, x_T, mu, s2, t_start, t_end):
        """Exact probability-flow ODE solution from t_start to t_end."""
        sch = self.schedule
        ratio = self.std(t_end, s2) / self.std(t_start, s2)
        return sch.alpha(t_end) * mu + (x_T - sch.alpha(t_start) * mu) * ratio


ODE_SOLVERS = [
    jadeis.DDIM(),
    jadeis.DPMSolver(order=1),
    jadeis.DPMSolver(order=2),
    jadeis.DPMSolver(order=3),
    jadeis.DPMSolverPP(order=1),
    jadeis.DPMSolverPP(order=2),
    jadeis.DPMSolverPP(order=3),
]
SDE_SOLVERS = [
    jadeis.SDEDPMSolver(),
    jadeis.SDEDPMSolverPP(order=1),
    jadeis.SDEDPMSolverPP(order=2),
]
