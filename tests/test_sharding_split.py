"""Sharding that really splits the work.

Each test runs a script in a subprocess with host (CPU) devices forced by XLA_FLAGS, so the
rest of the session keeps its single device:

- tests/sharding_scripts/partition.py: every entry point and strategy with a batch-sharded
  x_T (and z) on meshes from ``Mesh(jax.devices(), ...)``, ``jax.make_mesh`` (Auto axes)
  and an Explicit-axis mesh: the compiled per-device program holds the local batch only,
  has no all-gather/all-to-all/collective-permute and no host callback on the state, XLA
  prints no "Involuntary full rematerialization", the outputs are sharded like the inputs
  and equal the single-device values. A canary (the pre-fix bug) proves the checks fire.
- tests/sharding_scripts/registry.py: every solver of the registry with each controller it
  supports (sharded DiscreteAdjoint gradient, no gather, equal to one device).
- tests/sharding_scripts/model_parallel.py: a flax MLP with weights sharded along "model"
  of a (batch x model) mesh; parameter gradients keep the parameters' sharding.
- examples/distributed_guidance.py with jax.distributed: 2 processes x 2 host devices give
  the same guidance result as 1 process x 4 devices.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "tests" / "sharding_scripts"
REMAT = "Involuntary full rematerialization"


def _env(devices: int, **extra) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["TF_CPP_MIN_LOG_LEVEL"] = "0"  # keep XLA's warnings on stderr
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env.update(extra)
    return env


def _run(args, devices=4, timeout=300):
    proc = subprocess.run(
        [sys.executable, *map(str, args)], env=_env(devices), capture_output=True, text=True,
        timeout=timeout, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    assert "ALL OK" in proc.stdout, proc.stdout + proc.stderr[-4000:]
    return proc


def test_every_entry_point_splits_the_batch_on_every_kind_of_mesh():
    proc = _run([SCRIPTS / "partition.py", "Mesh", "explicit", "make_mesh:short"])
    for kind in ("ok Mesh", "ok explicit", "ok make_mesh (short)"):
        assert kind in proc.stdout, proc.stdout
    before, marker, after = proc.stderr.partition("CANARY")
    assert marker, proc.stderr[-4000:]
    assert REMAT not in before, before[-6000:]
    # the canary (a check attached to the state) is caught by the same warning check
    assert REMAT in after, after[-4000:]


def test_every_solver_and_controller_splits_the_batch():
    """The solver registry (tests/helpers.py), each solver with each controller it supports:
    a DiscreteAdjoint gradient on a batch sharded over 4 devices holds the local batch only,
    gathers nothing (the adaptive error norm is a scalar all-reduce), and equals one device."""
    proc = _run([SCRIPTS / "registry.py"])
    from .helpers import SOLVER_REGISTRY

    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ok ")]
    assert {ln.split()[1] for ln in lines} == set(SOLVER_REGISTRY), proc.stdout
    assert sum(ln.endswith("adaptive") for ln in lines) >= 4, proc.stdout


def test_model_parallel_parameters_keep_their_sharding():
    proc = _run([SCRIPTS / "model_parallel.py"])
    assert "ok DiscreteAdjoint" in proc.stdout and "ok AdjointDEIS" in proc.stdout
    assert REMAT not in proc.stderr, proc.stderr[-4000:]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_result_of_one(tmp_path):
    """jax.distributed on localhost with CPU (gloo) collectives: examples/distributed_guidance.py
    optimises x_T of a batch of 8 for 10 Adam steps; 2 processes x 2 devices == 1 x 4."""
    example = ROOT / "examples" / "distributed_guidance.py"
    opts = ["--x64", "--batch", "8", "--iters", "10", "--steps", "8", "--dim", "6"]
    port = _free_port()
    procs = []
    for pid in range(2):
        env = _env(2, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(pid), JAX_INIT_TIMEOUT="60")
        procs.append(subprocess.Popen(
            [sys.executable, str(example), *opts, "--out", str(tmp_path / "two.npz")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        ))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=120))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("the two jax.distributed processes did not finish within 120 s")
    logs = "\n".join(o + e for o, e in outs)
    if any(p.returncode for p in procs):
        low = logs.lower()
        if "gloo" in low and any(w in low for w in ("not available", "unavailable",
                                                    "not supported", "unimplemented",
                                                    "unknown")):
            pytest.skip("CPU collectives (gloo) are unavailable in this jaxlib")
        pytest.fail(logs[-6000:])
    assert "2 process(es), 4 devices" in logs, logs[-3000:]
    _run_single = subprocess.run(
        [sys.executable, str(example), *opts, "--out", str(tmp_path / "one.npz")],
        env=_env(4), capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert _run_single.returncode == 0, _run_single.stderr[-4000:]
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert one["losses"].shape == (11, 8)
    assert np.all(one["losses"][-1] < one["losses"][0])
    for k in ("x_T", "x_0", "losses"):
        np.testing.assert_allclose(two[k], one[k], rtol=1e-12, atol=1e-12, err_msg=k)
