"""The benchmark's learned-grid files, method tags and headline cells (no sampling)."""

import json
import math
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

# plain imports: a benchmark module that no longer imports is a failure, not a skip
import grids  # noqa: E402
import methods  # noqa: E402
from jobs import report  # noqa: E402


def test_grid_files_round_trip(tmp_path, monkeypatch):
    monkeypatch.setattr(grids, "GRIDS", tmp_path)
    assert grids.load_grid("toy", "unipc3", 4) is None
    assert grids.available("toy", "unipc3") == []
    ts = [1.0, 0.5, 0.2, 0.05, 1e-3]
    grids.write_atomic(grids.path_for("toy"), {"grids": {"unipc3": {"4": {"ts": ts}}}})
    assert [p.name for p in tmp_path.iterdir()] == ["toy.json"]  # no temporary file left
    assert grids.available("toy", "unipc3") == [4]
    assert grids.available("toy", "dpmpp3") == []
    assert list(grids.load_grid("toy", "unipc3", 4)) == ts
    assert grids.load_grid("toy", "unipc3", 8) is None


def test_committed_grid_files_are_valid():
    for path in sorted((BENCH / "grids").glob("*.json")):
        data = json.loads(path.read_text())
        assert data["problem"] == path.stem
        assert "settings" in data
        for key, by_n in data["grids"].items():
            assert key.removesuffix(grids.GRAD_SUFFIX) in grids.SAMPLERS
            for n, entry in by_n.items():
                ts = entry["ts"]
                assert len(ts) == int(n) + 1
                assert all(a > b for a, b in zip(ts, ts[1:])), (path.name, key, n)


def test_unipc_and_learned_methods():
    ms = methods.all_methods()
    by_name = {m.name: m for m in ms}
    for k in (2, 3):
        m = by_name[f"DiscreteAdjoint UniPC({k})"]
        assert "redundant" not in m.tags
        assert m.counts(10) == (20, 10)
    learned = methods.select(ms, "learned")
    assert {m.grid_key for m in learned} == {"dpmpp3", "unipc3", "dpmpp3-grad", "unipc3-grad"}
    assert all(m.spacing == "learned" for m in learned)
    grad = methods.select(ms, "grad-learned")
    assert {m.grid_key for m in grad} == {"dpmpp3-grad", "unipc3-grad"}
    # their forward timing is their own, not the x_0-learned grid's
    assert not {m.forward_key for m in grad} & {m.forward_key for m in learned if m not in grad}
    assert methods.select(ms, "quick+unipc3")
    # the unet sweep has a jadeis, a diffrax and a scan method
    fams = {m.family for m in methods.select(ms, "unet")}
    assert fams == {"jadeis", "diffrax", "scan"}


def test_headline_shows_nfe_and_floor():
    def row(method, family, n, err, t, ratio=float("nan")):
        return {
            "problem": "p",
            "method": method,
            "family": family,
            "variable": "N",
            "setting": n,
            "steps": n,
            "err_grad": err,
            "t_grad_s": t,
            "grad_over_fwd": ratio,
            "evals": 2 * n,
            "vjps": n,
        }

    rows = [
        row("J", "jadeis", 16, 3e-2, 0.01),
        row("J", "jadeis", 32, 5e-3, 0.02, 2.5),
        row("J", "jadeis", 64, 5e-4, 0.04),
        row("D", "diffrax", 32, 5e-3, 0.05),
        row("D", "diffrax", 64, 5e-4, 0.1),
    ]
    text, verdicts = report.headline(rows, ["p"])
    assert "NFE 96 = 64+32" in text
    assert "2.50 (floor 2.0)" in text  # the winning row's own ratio
    assert "2.50 med. (floor 2.0)" in text  # N = 64: no forward timing, the median
    assert all(not math.isnan(r) for _, _, r, _ in verdicts)


def test_learned_table_pairs_with_the_logsnr_method():
    def row(method, n, err):
        return {"problem": "p", "method": method, "setting": n, "err_grad": err}

    rows = [
        row("DiscreteAdjoint UniPC(3)", 16, 4e-2),
        row("DiscreteAdjoint UniPC(3) learned grid", 16, 1e-2),
        row("DiscreteAdjoint UniPC(3) learned grid", 32, 1e-3),
    ]
    text = report.learned_table(rows)
    assert "| p | DiscreteAdjoint UniPC(3) | 16 | 4.00e-02 | 1.00e-02 | 4.00 |" in text
    assert "| 32 | not run | 1.00e-03 |" in text
    assert report.learned_table(rows[:1]) == ""
