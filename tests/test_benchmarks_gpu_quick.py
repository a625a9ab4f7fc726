"""``benchmarks/run.py --gpu-quick``: what it runs, where it writes, and that it runs (on a
CPU, one cheap problem and method, a few seconds of budget)."""

import json
import sys
from pathlib import Path

import jax
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

pytest.importorskip("diffrax")
run = pytest.importorskip("run")
methods = pytest.importorskip("methods")
sweep = pytest.importorskip("jobs.sweep")


def test_gpu_quick_plan():
    args = run.parse_args(["--gpu-quick"])
    assert run.chosen_jobs(args) == {"sweep", "report"}
    assert run.default_out(args).name == f"gpu-quick-{run.device_slug()}"
    assert run.default_out(run.parse_args(["--gpu-quick", "--out", "x"])) == Path("x")
    ms = methods.all_methods()
    headline = sweep.methods_for("mlp", ms, quick=False, gpu_quick=True)
    assert {m.family for m in headline} == {"jadeis", "diffrax", "scan", "gradsolve"}
    unet = sweep.methods_for("unet", ms, quick=False, gpu_quick=True)
    assert {m.name for m in unet} == {m.name for m in methods.select(ms, "unet")}
    heun = methods.by_tags("diffrax+heun+rho")
    # on a GPU the unet sweep goes far enough for diffrax to reach the 1e-3 cell
    assert max(sweep.settings_for(heun, False, "unet", gpu_quick=True)) >= 128
    assert max(sweep.settings_for(heun, True, "mlp", gpu_quick=True)) == 512


def test_device_slug_is_a_folder_name():
    slug = run.device_slug()
    assert slug and all(c.isalnum() or c == "-" for c in slug)


def test_gpu_quick_runs_on_cpu(tmp_path):
    with jax.numpy_dtype_promotion("standard"):
        run.main([
            "--gpu-quick", "--problems", "gaussian", "--methods", "scan+checkpoint",
            "--budget-s", "60", "--reps", "1", "--out", str(tmp_path), "--no-cache",
        ])
    info = json.loads((tmp_path / "machine.json").read_text())
    assert info["mode"] == "gpu-quick"
    assert info["budget_s"] == 60
    assert "budget_stops" in info
    summary = (tmp_path / "summary.md").read_text()
    assert "Wall-clock budget: 60 s" in summary
    rows = (tmp_path / "sweep.csv").read_text().splitlines()
    assert len(rows) >= 2 and "scan DPM++(2M) + checkpoint" in rows[1]


def test_budget_runs_methods_in_turn_and_stops_them():
    import time

    class Prob:
        name = "p"

    class Meth:
        def __init__(self, name):
            self.name = name

    def gen(name, n):
        for k in range(n):
            yield {"method": name, "setting": k}

    a, b = Meth("a"), Meth("b")
    rows = sweep._run(Prob, [(a, gen("a", 2)), (b, gen("b", 3))], None)
    assert [(r["method"], r["setting"]) for r in rows] == [
        ("a", 0), ("a", 1), ("b", 0), ("b", 1), ("b", 2)
    ]  # no budget: method after method, as before
    rows = sweep._run(Prob, [(a, gen("a", 2)), (b, gen("b", 3))], time.perf_counter() + 60)
    assert [(r["method"], r["setting"]) for r in rows] == [
        ("a", 0), ("b", 0), ("a", 1), ("b", 1), ("b", 2)
    ]  # a budget: one setting of each in turn
    sweep.BUDGET_STOPS.clear()
    assert sweep._run(Prob, [(a, gen("a", 2)), (b, gen("b", 3))], 0.0) == []
    assert sweep.BUDGET_STOPS == [("p", "a", None), ("p", "b", None)]
    sweep.BUDGET_STOPS.clear()
