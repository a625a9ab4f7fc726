"""The ``jadeis`` console script: help, the demo (small settings, for CI), and user errors.

The demo test runs with 2 pairs, N = 4 steps, 2 iterations and three of the six methods so
that it takes seconds (plus JIT compilation); the full demo is the same code with defaults.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jadeis._cli import main

JADEIS = [sys.executable, "-m", "jadeis._cli"]


def run(*args, **kw):
    return subprocess.run([*JADEIS, *args], capture_output=True, text=True, **kw)


def test_help(capsys):
    out = run("--help")
    assert out.returncode == 0 and "demo" in out.stdout and "train" in out.stdout
    for argv, words in (
        (["demo", "--help"], ("--out", "--pairs", "--steps", "--iters", "MMPMR")),
        (["train", "--help"], ("digits", "--seed", "--out")),
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert all(w in text for w in words), text


def test_console_script_is_declared():
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["jadeis"] == "jadeis._cli:main"
    exe = shutil.which("jadeis", path=str(Path(sys.executable).parent))
    if exe:  # installed: the script runs
        assert subprocess.run([exe, "--help"], capture_output=True).returncode == 0


def test_demo_writes_png_and_mmpmr_table(tmp_path):
    out_dir = tmp_path / "demo out"
    res = run(
        "demo",
        "--out",
        str(out_dir),
        "--pairs",
        "2",
        "--steps",
        "4",
        "--iters",
        "2",
        "--methods",
        "pixel",
        "latent",
        "adjointdeis1_ode",
        "--no-progress",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "MMPMR" in res.stdout
    rows = [line for line in res.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 5  # header, the verifiers' ceilings, 3 methods
    assert "Ceiling" in rows[1] and "Pixel average" in rows[2] and "AdjointDEIS-1 (ODE)" in rows[4]
    assert "loss net" in rows[0] and "| 2 + 2 " in rows[4]
    png = out_dir / "morphs.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.ndim == 3 and img.shape[0] > 150 and img.shape[1] > 400
    assert img[..., :3].std() > 0.1  # not blank
    quality = matplotlib.image.imread(out_dir / "quality.png")
    assert quality.shape[1] > 400 and quality[..., :3].std() > 0.05
    pairs_line = next(line for line in res.stdout.splitlines() if line.startswith("pairs: "))
    assert "rank" not in pairs_line and pairs_line.startswith("pairs: 2 of the 45"), pairs_line
    result = json.loads((out_dir / "results.json").read_text())
    assert len(result["pairs"]) == 2 and len(result["pair_ranks"]) == 2
    assert set(result["ceilings"]) == {"verifier_a", "verifier_b", "verifier_c"}
    deis = result["results"][2]
    # NFE from the run's Stats: encode 2N, 2 iterations of N + N VJPs, the final sample N
    assert deis["nfe"] == 2 * 4 + 2 * (4 + 4) + 4
    assert (deis["loss_net_evals"], deis["loss_net_vjps"]) == (2, 2)
    for r in result["results"]:
        assert set(r["mmpmr"]) == {"verifier_a", "verifier_b", "verifier_c"}
        assert all(0.0 <= v <= 1.0 for v in r["mmpmr"].values())


def _error(capsys, *argv):
    """Run main() in-process; return (exit status, stderr)."""
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_index_out_of_range(capsys, tmp_path):
    code, err = _error(capsys, "demo", "--out", str(tmp_path), "--images", "0", "300")
    assert code != 0 and "out of range" in err and "0-299" in err


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["demo", "--bogus"], "unrecognized arguments: --bogus"),
        (["demo", "--pairs", "46"], "--pairs must be between 1 and 45"),
        (["demo", "--steps", "x"], "--steps must be an integer"),
        (["demo", "--methods", "magic"], "invalid choice"),
        (["train", "cats"], "invalid choice"),
        ([], "required"),
    ],
)
def test_bad_options(capsys, argv, msg):
    code, err = _error(capsys, *argv)
    assert code == 2 and msg in err


def test_unwritable_out(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, err = _error(capsys, "demo", "--out", str(blocker / "sub"))
    assert code != 0 and "--out" in err and "cannot write to" in err and "not a folder" in err


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_out_that_cannot_be_created_fails_before_any_work(capsys, monkeypatch):
    """Permission bits say yes under /proc (and to root everywhere), yet nothing can be
    created there: the check tries, and fails before a model is loaded."""
    import jadeis.digits

    def no_work(*args, **kwargs):
        raise AssertionError("the demo started working before checking --out")

    monkeypatch.setattr(jadeis.digits, "load_denoiser", no_work)
    monkeypatch.setattr(jadeis.digits, "load_split", no_work)
    code, err = _error(capsys, "demo", "--out", "/proc/forbidden/x")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--out" in err and "cannot create the folder '/proc/forbidden'" in err
    code, err = _error(capsys, "train", "digits", "--out", "/proc/forbidden/x")
    assert code == 2 and "cannot create the folder '/proc/forbidden'" in err


def test_out_check_leaves_no_trace(capsys, tmp_path):
    """The check creates the missing folders and a file to be sure, then removes them: a run
    that stops at a later error leaves the file system as it was."""
    code, err = _error(
        capsys, "demo", "--out", str(tmp_path / "a" / "b" / "c"), "--images", "0", "300"
    )
    assert code == 2 and "out of range" in err
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    code, err = _error(capsys, "demo", "--out", str(tmp_path / "kept"), "--images", "5", "5")
    assert code == 2 and list((tmp_path / "kept").iterdir()) == []


_IMPORTS_OF_HELP = r"""
import json, sys
import jadeis
before = set(sys.modules)
from jadeis._cli import main
for argv in (["--help"], ["demo", "--help"], ["train", "--help"]):
    try:
        main(argv)
    except SystemExit:
        pass
print(json.dumps({"jax_before": "jax" in before, "new": sorted(set(sys.modules) - before)}))
"""


def test_help_imports_nothing_of_the_demo():
    """`jadeis --help` and `jadeis demo --help` import no NumPy, flax, matplotlib or
    jadeis.digits beyond what `import jadeis` itself imports."""
    res = subprocess.run([sys.executable, "-c", _IMPORTS_OF_HELP], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    new = json.loads(res.stdout.strip().splitlines()[-1])["new"]
    heavy = [m for m in new if m.split(".")[0] in ("numpy", "jax", "flax", "matplotlib", "optax")]
    assert not heavy and not [m for m in new if m.startswith("jadeis.digits")], new


def test_help_does_not_import_jax():
    code = (
        "import sys\n"
        "from jadeis._cli import main\n"
        "try:\n    main(['demo', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('jax' in sys.modules)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "False"


def test_demo_outputs_are_ignored_by_git():
    """The folders the demo and training write by default (and README's demo_out/) are in
    .gitignore, so a run in a checkout leaves `git status` clean."""
    from jadeis._cli import build_parser

    root = Path(__file__).parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    parser = build_parser()
    folders = [
        parser.parse_args(["demo"]).out,
        parser.parse_args(["train", "digits"]).out,
        "demo_out",
    ]
    paths = [f"{folder}/morphs.png" for folder in folders]
    res = subprocess.run(
        ["git", "check-ignore", "--no-index", *paths], cwd=root, capture_output=True, text=True
    )
    assert res.stdout.split() == paths, res.stdout + res.stderr


def test_demo_method_names_are_the_demos():
    from jadeis._cli import DEMO_METHODS
    from jadeis.digits import METHOD_KEYS

    assert DEMO_METHODS == METHOD_KEYS


def test_missing_weights(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, err = _error(
        capsys, "demo", "--out", str(tmp_path / "o"), "--weights", str(tmp_path / "empty")
    )
    assert code != 0 and "weights file not found" in err and "jadeis train digits" in err
    code, err = _error(
        capsys, "demo", "--out", str(tmp_path / "o"), "--weights", str(tmp_path / "nope")
    )
    assert code != 0 and "not a directory" in err


def test_error_in_a_subprocess_has_no_traceback(tmp_path):
    res = run("demo", "--out", str(tmp_path), "--images", "-1", "5")
    assert res.returncode != 0 and "out of range" in res.stderr
    assert "Traceback" not in res.stderr


def test_train_tiny(tmp_path):
    """`jadeis train digits` with very few steps writes loadable weights and the plots."""
    out = tmp_path / "w"
    res = run(
        "train",
        "digits",
        "--out",
        str(out),
        "--steps",
        "100",
        "--verifier-steps",
        "100",
        "--no-progress",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    for f in (
        "denoiser.msgpack",
        "verifier_a.msgpack",
        "verifier_b.msgpack",
        "verifier_c.msgpack",
        "manifest.json",
        "training_loss.png",
        "samples.png",
    ):
        assert (out / f).is_file(), f
    from jadeis.digits import load_denoiser, load_verifiers

    model = load_denoiser(out)
    assert model.class_embeddings.shape == (10, 16)
    assert all(np.isfinite(v.threshold) for v in load_verifiers(out))
