"""Reliability: bad inputs give a clear error or a correct result, never a silent
NaN; the CLI loses no files, writes its outputs as a set, and stops cleanly on Ctrl-C; weights
are verified. Every schedule accepts a low-precision ``t``."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jadeis

# ---------------------------------------------------------------------------------------------
# schedules: values that cannot work are rejected (concrete values only)


@pytest.mark.parametrize(
    "make,words",
    [
        (lambda: jadeis.VPLinear(beta_max=math.inf), ("beta_max", "finite")),
        (lambda: jadeis.VPLinear(beta_min=math.nan), ("beta_min", "finite")),
        (lambda: jadeis.VPLinear(t_max=5.0), ("t_max", "underflows", "t_max <=")),
        (lambda: jadeis.VPLinear(t_max=100.0), ("t_max", "underflows")),
        (lambda: jadeis.VE(t_max=math.inf), ("t_max", "finite")),
        (lambda: jadeis.VE(t_max=1e39), ("t_max", "float32")),
        (lambda: jadeis.RectifiedFlow(t_max=1 - 1e-8), ("t_max", "float32", "1 - 1e-5")),
        (lambda: jadeis.RectifiedFlow(t_max=1 - 1e-9), ("t_max", "float32")),
        (lambda: jadeis.RectifiedFlow(t_max=1 - 1e-7), ("t_max", "float32")),
        (lambda: jadeis.VPCosine(t_max=1 - 1e-8), ("t_max", "float32")),
        (lambda: jadeis.VPCosine(s=math.inf), ("s", "finite")),
    ],
)
def test_schedules_reject_values_that_cannot_work(make, words):
    with pytest.raises(ValueError) as e:
        make()
    msg = str(e.value)
    assert all(w in msg for w in words), msg


def test_schedules_near_the_limits_still_work():
    for sch in (jadeis.VPLinear(t_max=2.0), jadeis.RectifiedFlow(t_max=1 - 1e-5)):
        ts = jadeis.time_grid(sch, 8, dtype=jnp.float32)
        assert np.all(np.isfinite(np.asarray(sch.alpha(ts))))
        assert np.all(np.asarray(sch.alpha(ts)) > 0)


def test_schedule_checks_skip_traced_fields():
    """Gradients and jit with respect to schedule parameters keep working."""
    f = lambda b: jadeis.VPLinear(beta_max=b).alpha(0.5)
    g = jax.grad(f)(20.0)
    fd = (f(20.0 + 1e-4) - f(20.0 - 1e-4)) / 2e-4
    assert np.isfinite(g) and g == pytest.approx(float(fd), rel=1e-4)
    assert jax.jit(f)(20.0) == pytest.approx(float(f(20.0)))
    tm = jax.vmap(lambda t: jadeis.RectifiedFlow(t_max=t).alpha(0.5))(jnp.array([0.9, 0.99]))
    assert tm.shape == (2,)


def _schedules():
    return [
        jadeis.VPLinear(),
        jadeis.VPCosine(),
        jadeis.DiscreteVP.ddpm_linear(),
        jadeis.RectifiedFlow(),
        jadeis.VE(),
    ]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("sch", _schedules(), ids=lambda s: type(s).__name__)
def test_every_schedule_accepts_low_precision_t(sch, dtype):
    t = jnp.asarray([0.25, 0.5] if not isinstance(sch, jadeis.VE) else [1.0, 5.0], dtype)
    t32 = t.astype(jnp.float32)
    for name in ("alpha", "sigma", "log_snr", "log_alpha", "log_sigma"):
        lo, ref = getattr(sch, name)(t), getattr(sch, name)(t32)
        assert lo.dtype == jnp.float32, (name, lo.dtype)  # computed in float32
        np.testing.assert_allclose(lo, ref, rtol=1e-6, err_msg=name)
    lam = jnp.asarray([0.5, -1.0], dtype)
    back = sch.t_from_log_snr(lam)
    assert back.dtype == jnp.float32
    np.testing.assert_allclose(back, sch.t_from_log_snr(lam.astype(jnp.float32)), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# time grids: no NaN, no repeated times


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"spacing": "karras", "rho": 0}, ("rho",)),
        ({"spacing": "karras", "rho": -1.0}, ("rho",)),
        ({"spacing": "karras", "rho": math.nan}, ("rho",)),
        ({"dtype": jnp.int32}, ("dtype", "floating")),
        ({"n": 5000, "dtype": jnp.float16}, ("float16", "repeated", "float32")),
    ],
)
def test_time_grid_rejects_what_would_be_nan_or_repeated(kwargs, words):
    kwargs = dict(kwargs)
    n = kwargs.pop("n", 10)
    with pytest.raises(ValueError) as e:
        jadeis.time_grid(jadeis.VPLinear(), n, **kwargs)
    assert all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_grid_is_strictly_decreasing(dtype):
    ts = jadeis.time_grid(jadeis.VPLinear(), 20, dtype=dtype)
    assert ts.dtype == dtype and np.all(np.diff(np.asarray(ts, np.float64)) < 0)


# ---------------------------------------------------------------------------------------------
# the CLI: options are validated before anything is created

from jadeis._cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT / "src"))


def _cli(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize(
    "argv,words",
    [
        (["demo", "--seed", str(2**70)], ("--seed", "2**32 - 1")),
        (["demo", "--seed", "-1"], ("--seed",)),
        (["train", "digits", "--seed", str(2**70)], ("--seed",)),
        (["demo", "--lr", "inf"], ("--lr", "finite")),
        (["demo", "--lr", "1e30"], ("--lr",)),
        (["demo", "--lr", "nan"], ("--lr",)),
        (["demo", "--lr", "0"], ("--lr",)),
        (["demo", "--lr", "-0.1"], ("--lr",)),
    ],
)
def test_bad_seed_and_lr_are_clear_cli_errors(capsys, argv, words):
    code, err = _cli(capsys, *argv)
    assert code == 2 and all(w in err for w in words), err


def test_bad_images_fail_before_creating_the_output_folder(capsys, tmp_path):
    out = tmp_path / "new" / "out"
    code, err = _cli(capsys, "demo", "--out", str(out), "--images", "0", "500")
    assert code == 2 and "out of range" in err
    assert not out.exists() and not out.parent.exists()


def test_demo_pairs_spread_over_the_difficulty_range_and_verdicts_per_verifier():
    from jadeis.digits import spread_ranks, verdicts

    assert spread_ranks(1) == [0] and spread_ranks(2) == [0, 44]
    assert spread_ranks(45) == list(range(45)) and len(set(spread_ranks(44))) == 44
    assert verdicts(np.array([True, False, True])) == "a✓ b✗ c✓"


# ---------------------------------------------------------------------------------------------
# files: nothing lost, nothing half-written


def test_train_refuses_the_package_weights_folder(capsys):
    from jadeis.digits import package_weights_dir

    d = package_weights_dir()
    before = {f.name: f.read_bytes() for f in d.iterdir() if f.is_file()}
    code, err = _cli(capsys, "train", "digits", "--out", str(d), "--steps", "100")
    assert code == 2 and "bundled" in err and "--force" in err
    assert {f.name: f.read_bytes() for f in d.iterdir() if f.is_file()} == before


def test_train_refuses_a_folder_with_other_files(capsys, tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    code, err = _cli(capsys, "train", "digits", "--out", str(tmp_path), "--steps", "100")
    assert code == 2 and "thesis.tex" in err
    assert (tmp_path / "thesis.tex").read_text() == "precious"


def test_interrupted_training_keeps_the_old_weights(tmp_path, monkeypatch):
    from jadeis.digits import _train
    from jadeis.digits._weights import DENOISER_FILE

    out = tmp_path / "weights"
    out.mkdir()
    (out / DENOISER_FILE).write_bytes(b"old good weights")

    def partial(work, **kw):
        (work / DENOISER_FILE).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(_train, "_train_into", partial)
    with pytest.raises(KeyboardInterrupt):
        _train.train_all(out, steps=100, verifier_steps=100, progress=False)
    assert (out / DENOISER_FILE).read_bytes() == b"old good weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights"]  # no temporary folder left

    def complete(work, **kw):
        (work / DENOISER_FILE).write_bytes(b"new")
        return {"files": [DENOISER_FILE]}

    monkeypatch.setattr(_train, "_train_into", complete)
    rep = _train.train_all(out, steps=100, verifier_steps=100, progress=False)
    assert rep["replaced"] and (out / DENOISER_FILE).read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights"]


def test_training_runs_exactly_the_requested_steps():
    from jadeis.digits._train import _run

    step = lambda state, key: (state + 1, jnp.float32(0.5))
    state, losses = _run(step, jnp.int32(0), jax.random.key(0), 150, "t", False)
    assert int(state) == 150 and losses.shape == (150,)


def test_demo_outputs_are_written_as_a_set(tmp_path):
    from jadeis.digits import write_files

    (tmp_path / "morphs.png").write_text("old png")
    (tmp_path / "results.json").write_text("old json")

    def interrupted(p):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_files(
            tmp_path, {"morphs.png": lambda p: p.write_text("new"), "results.json": interrupted}
        )
    assert (tmp_path / "morphs.png").read_text() == "old png"
    assert (tmp_path / "results.json").read_text() == "old json"
    replaced = write_files(
        tmp_path,
        {"morphs.png": lambda p: p.write_text("n1"), "results.json": lambda p: p.write_text("n2")},
    )
    assert sorted(p.name for p in replaced) == ["morphs.png", "results.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["morphs.png", "results.json"]


def _copy_weights(tmp_path):
    from jadeis.digits import package_weights_dir

    d = tmp_path / "w"
    shutil.copytree(package_weights_dir(), d)
    return d


def _rehash(d):
    import hashlib

    m = json.loads((d / "manifest.json").read_text())
    m["sha256"] = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in d.glob("*.msgpack")}
    (d / "manifest.json").write_text(json.dumps(m))


def _edit(path, fn):
    import flax.serialization

    rec = flax.serialization.msgpack_restore(path.read_bytes())
    fn(rec)
    path.write_bytes(flax.serialization.msgpack_serialize(rec))


def test_tampered_weights_are_refused(tmp_path):
    from jadeis.digits import WeightsError, load_denoiser, load_verifiers

    d = _copy_weights(tmp_path)
    # one verifier copied over another: the hash catches it ...
    shutil.copy(d / "verifier_b.msgpack", d / "verifier_a.msgpack")
    with pytest.raises(WeightsError, match="corrupt"):
        load_verifiers(d)
    # ... and so does the model's name, even with a matching manifest
    _rehash(d)
    with pytest.raises(WeightsError, match="verifier_b"):
        load_verifiers(d)
    d = _copy_weights(tmp_path / "2")

    def nan_param(rec):
        rec["params"] = jax.tree.map(lambda v: np.full_like(np.asarray(v), np.nan), rec["params"])

    _edit(d / "denoiser.msgpack", nan_param)
    with pytest.raises(WeightsError, match="corrupt"):
        load_denoiser(d)
    _rehash(d)
    with pytest.raises(WeightsError, match="non-finite"):
        load_denoiser(d)
    for thr in (-1.0, 1.0, float("nan")):
        _edit(d / "verifier_c.msgpack", lambda rec, t=thr: rec["extra"].__setitem__("threshold", t))
        _rehash(d)
        with pytest.raises(WeightsError, match="threshold"):
            load_verifiers(d)
    # a file without a manifest entry, and a folder without a manifest
    m = json.loads((d / "manifest.json").read_text())
    del m["sha256"]["verifier_c.msgpack"]
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(WeightsError, match="no SHA-256 entry for verifier_c.msgpack"):
        load_verifiers(d)
    (d / "manifest.json").unlink()
    with pytest.raises(WeightsError, match="no manifest.json"):
        load_denoiser(d)


# ---------------------------------------------------------------------------------------------
# subprocesses: Ctrl-C and a missing demo extra


def test_ctrl_c_during_demo_exits_130_with_one_line(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("old")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jadeis._cli", "demo", "--out", str(out), "--pairs", "1",
         "--steps", "4", "--iters", "10000", "--methods", "discrete", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path,
    )  # fmt: skip
    try:
        first = proc.stdout.readline()  # printed once the models are loaded
        assert first.startswith("jadeis demo:"), first + proc.stderr.read()
        head = [proc.stdout.readline(), proc.stdout.readline()]
        time.sleep(2.0)  # inside the optimisation (JAX threads busy)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert head[0].startswith("pairs: 1 of the 45") and "will be replaced" in head[1]
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]
    assert (out / "results.json").read_text() == "old"


def test_missing_demo_extra_is_a_clear_error(tmp_path):
    code = (
        "import sys; sys.modules['flax'] = None\n"
        "from jadeis._cli import main\n"
        f"sys.exit(main(['demo', '--out', {str(tmp_path / 'o')!r}]))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert res.returncode == 1, res.stderr
    assert "pip install '.[demo]'" in res.stderr and "flax" in res.stderr
    assert "Traceback" not in res.stderr


def test_runtime_dependencies_are_what_the_library_imports():
    """The library proper (not jadeis.digits or the CLI's demo) imports only its declared
    dependencies; the demo's packages live in the `demo` extra, which `test` includes."""
    import ast

    import tomllib

    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name = lambda req: req.split(">")[0].split("=")[0].split("[")[0].strip().lower()
    deps = {name(r) for r in py["dependencies"]}
    extras = py["optional-dependencies"]
    assert {"matplotlib", "flax"} <= {name(r) for r in extras["demo"]}
    assert not {"scikit-learn", "scipy"} & {name(r) for r in extras["demo"]}
    assert not {"matplotlib", "scikit-learn", "flax", "diffrax"} & deps
    assert any(e.startswith("jadeis[") and "demo" in e for e in extras["test"])
    stdlib = set(sys.stdlib_module_names)
    imported = set()
    for f in (ROOT / "src" / "jadeis").rglob("*.py"):
        if "digits" in f.parts:
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - stdlib - {"jadeis", "__future__"}
    assert third_party <= deps, third_party - deps
    readme = (ROOT / "README.md").read_text().splitlines()[:6]
    assert any('pip install ".[demo]"' in line and "jadeis demo" in line for line in readme)
    assert any('pip install -e ".[test]"' in line and "pytest" in line for line in readme)


def test_digits_and_cli_use_only_the_public_api():
    import re

    for f in [ROOT / "src/jadeis/_cli.py", *(ROOT / "src/jadeis/digits").glob("*.py")]:
        text = f.read_text()
        assert not re.search(r"from \.\.(_|\s)|from jadeis\._|import jadeis\._", text), f
        assert not re.search(r"from \.(_\w+|digits\._\w+) import", text) or "digits" in f.parts, f
