"""Test helpers used by several test files (a companion of ``helpers.py``).

- :func:`run_on_cpu_devices`: run a script in a fresh interpreter with XLA given several
  host (CPU) devices, without affecting the rest of the test session;
- ``np_*``: the VPLinear schedule (beta 0.1 .. 20) and the Gaussian-data model written out
  in numpy, independently of the library (docs/math sections 2 and 6), for hand-written
  reference steps.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

# ---------------------------------------------------------------------------------------
# several emulated CPU devices in a subprocess


def cpu_devices_env(n: int = 4) -> dict:
    """``os.environ`` plus ``--xla_force_host_platform_device_count=n`` (appended to any
    ``XLA_FLAGS``) and ``JAX_PLATFORMS=cpu``."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
    env["XLA_FLAGS"] = flags.strip()
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run_on_cpu_devices(script: str, n: int = 4, timeout: float = 300, cwd=None):
    """Run ``python -c script`` with ``n`` emulated CPU devices; the CompletedProcess
    (text output captured, not checked)."""
    return subprocess.run(
        [sys.executable, "-c", script],
        env=cpu_devices_env(n),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


# ---------------------------------------------------------------------------------------
# VPLinear and Gaussian data N(mu, s2) in numpy

B0, B1 = 0.1, 20.0  # VPLinear's beta_min, beta_max


def np_log_alpha(t):
    return -(B1 - B0) * t**2 / 4 - B0 * t / 2


def np_alpha(t):
    return np.exp(np_log_alpha(t))


def np_sigma(t):
    return np.sqrt(-np.expm1(2 * np_log_alpha(t)))


def np_lambda(t):
    return np_log_alpha(t) - np.log(np_sigma(t))


def np_gaussian_eps(x, t, mu, s2):
    """Exact eps of data N(mu, s2 I) under VPLinear."""
    a, s = np_alpha(t), np_sigma(t)
    return s * (x - a * mu) / (a * a * s2 + s * s)


def np_gaussian_data(x, t, mu, s2):
    """Exact data prediction D = (x - sigma eps) / alpha of data N(mu, s2 I)."""
    return (x - np_sigma(t) * np_gaussian_eps(x, t, mu, s2)) / np_alpha(t)
