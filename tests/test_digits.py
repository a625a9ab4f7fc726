"""The bundled digits models, their weights files, and the morphing pipeline."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jadeis import digits
from jadeis.digits import (
    WeightsError,
    candidate_pairs,
    load_denoiser,
    load_split,
    load_verifiers,
    run_morphs,
    slerp,
)
from jadeis.digits._train import pair_scores

from ._shared import run_on_cpu_devices

WEIGHTS = digits.default_weights_dir()


def test_bundled_weights_are_small_msgpack_files_with_a_manifest():
    manifest = json.loads((WEIGHTS / "manifest.json").read_text())
    files = ["denoiser.msgpack", "verifier_a.msgpack", "verifier_b.msgpack", "verifier_c.msgpack"]
    assert sorted(manifest["sha256"]) == files
    total = sum((WEIGHTS / f).stat().st_size for f in files)
    assert total < 5_000_000
    import flax.serialization

    for f in files:  # plain msgpack maps (never pickle)
        rec = flax.serialization.msgpack_restore((WEIGHTS / f).read_bytes())
        assert rec["format"] == "jadeis-digits" and rec["kind"] in ("denoiser", "verifier")


def test_weights_load_in_under_a_second():
    """In a fresh interpreter (after importing jax), loading all four models takes < 1 s of
    CPU time (process time, so that other jobs on a shared machine do not make it flaky)."""
    code = textwrap.dedent(
        """
        import time, jax
        from jadeis.digits import load_denoiser, load_verifiers
        t = time.process_time()
        load_denoiser(); load_verifiers()
        print(time.process_time() - t)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout.strip().splitlines()[-1]) < 1.0, out.stdout


def _copy_weights(tmp_path):
    d = tmp_path / "w"
    shutil.copytree(WEIGHTS, d)
    return d


def _rehash(d):
    """Rewrite the manifest of folder ``d`` with the SHA-256 of its files as they are now."""
    import hashlib

    path = d / "manifest.json"
    manifest = json.loads(path.read_text()) if path.is_file() else {"format": "jadeis-digits"}
    manifest["sha256"] = {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.glob("*.msgpack"))
    }
    path.write_text(json.dumps(manifest))


def test_bundled_digits_are_scikit_learns_bit_for_bit():
    """digits.npz holds scikit-learn's copy of the digits and the split it gave: the images,
    labels and every split equal what scikit-learn computes (so the demo's numbers are the
    ones it gave when it loaded the data from scikit-learn)."""
    pytest.importorskip("sklearn", reason="scikit-learn (the test extra) is the reference")
    from jadeis.digits import _data

    pixels, labels, splits = _data.from_scikit_learn()
    images_all, labels_all = load_split("all")
    assert images_all.dtype == np.float32 and labels_all.dtype == np.int32
    assert images_all.tobytes() == _data._scale(pixels).tobytes()
    assert np.array_equal(labels_all, labels)
    for name, idx in splits.items():
        images, lab = load_split(name)
        assert images.tobytes() == _data._scale(pixels[idx]).tobytes(), name
        assert np.array_equal(lab, labels[idx]), name
    assert [len(splits[s]) for s in ("train", "val", "test")] == [1197, 300, 300]


def test_digits_load_without_scikit_learn():
    """The demo's data come from the package: loading them imports no scikit-learn or scipy."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["sklearn"] = None  # importing it would fail
        from jadeis.digits import load_split
        images, labels = load_split("test")
        assert images.shape == (300, 8, 8) and labels.shape == (300,)
        loaded = [m for m, mod in sys.modules.items() if mod is not None]
        print(sorted(m for m in loaded if m.split(".")[0] in ("sklearn", "scipy")))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_missing_corrupt_and_mismatched_files_are_clear_errors(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_denoiser(tmp_path)
    d = _copy_weights(tmp_path)
    # flipped bytes: the manifest's SHA-256 catches it
    data = bytearray((d / "denoiser.msgpack").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / "denoiser.msgpack").write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="corrupt"):
        load_denoiser(d)
    # a truncated file whose manifest entry was updated does not decode
    (d / "denoiser.msgpack").write_bytes(data[:1000])
    _rehash(d)
    with pytest.raises(WeightsError, match="corrupt"):
        load_denoiser(d)
    # a verifier file where the denoiser is expected
    shutil.copy(d / "verifier_a.msgpack", d / "denoiser.msgpack")
    _rehash(d)
    with pytest.raises(WeightsError, match="expected 'denoiser'"):
        load_denoiser(d)
    # without a manifest nothing can be verified: refused
    (d / "manifest.json").unlink()
    with pytest.raises(WeightsError, match="no manifest.json"):
        load_denoiser(d)
    # same kind, wrong architecture: verifier_b's weights under verifier_a's config
    import flax.serialization

    rec_a = flax.serialization.msgpack_restore((WEIGHTS / "verifier_a.msgpack").read_bytes())
    rec_b = flax.serialization.msgpack_restore((WEIGHTS / "verifier_b.msgpack").read_bytes())
    rec_a["params"] = rec_b["params"]
    (d / "verifier_a.msgpack").write_bytes(flax.serialization.msgpack_serialize(rec_a))
    _rehash(d)
    with pytest.raises(WeightsError, match="does not match the EmbedMLP architecture"):
        load_verifiers(d)


def test_samples_are_accepted_by_a_held_out_classifier():
    """10 samples of every digit (DDIM, 20 steps) are classified as the digit they were
    conditioned on by a logistic regression trained on images the model never saw."""
    from sklearn.linear_model import LogisticRegression

    x, y = load_split("val")
    clf = LogisticRegression(max_iter=2000).fit(x.reshape(len(x), -1), y)
    xt, yt = load_split("test")
    assert clf.score(xt.reshape(len(xt), -1), yt) > 0.9  # a competent judge
    model = load_denoiser()
    labels = np.repeat(np.arange(10), 10)
    samples = np.asarray(model.generate(labels, jax.random.key(42), steps=20))
    assert samples.shape == (100, 8, 8) and np.all(np.isfinite(samples))
    acc = clf.score(np.clip(samples, -1, 1).reshape(100, -1), labels)
    assert acc >= 0.8, acc


def test_verifier_thresholds_are_at_one_per_mille_fmr():
    verifiers = load_verifiers()
    assert len({type(v.net).__name__ + str(v.net) for v in verifiers}) == 3  # 3 architectures
    for v in verifiers:
        gen, imp = pair_scores(v.net, v.params, "val")
        assert np.mean(imp > v.threshold) <= 1e-3  # the calibration split: FMR <= 0.1%
        assert np.sum(np.abs(imp - v.threshold) < 5e-6) == 0  # no pair on the boundary
        assert np.mean(imp >= np.quantile(imp, 0.99)) > 1e-3  # ... and not trivially so
        gen_t, imp_t = pair_scores(v.net, v.params, "test")
        assert np.mean(imp_t > v.threshold) < 5e-3  # generalises to the test split
        assert np.mean(gen_t > v.threshold) > 0.7  # most genuine pairs accepted
    # the verifiers disagree on individual scores (independently trained)
    x = jnp.asarray(load_split("test")[0][:50])
    s = [np.asarray(v.score(x[:, None], x[None])) for v in verifiers]
    assert not np.allclose(s[0], s[1], atol=0.05) and not np.allclose(s[0], s[2], atol=0.05)


def test_morph_pairs_are_different_digits_rejected_by_every_verifier():
    verifiers = load_verifiers()
    pairs = candidate_pairs(verifiers)
    images, labels = load_split("test")
    assert len(pairs) == 45
    assert {frozenset((labels[a], labels[b])) for a, b in pairs} == {
        frozenset((i, j)) for i in range(10) for j in range(i + 1, 10)
    }
    a = jnp.asarray(images[[p[0] for p in pairs]])
    b = jnp.asarray(images[[p[1] for p in pairs]])
    for v in verifiers:
        assert not np.any(np.asarray(v.accepts(a, b)))


def test_iteration_bar_eta_excludes_the_first_iteration():
    """The first iteration (compilation) is timed on its own and the bar's clock restarts
    after it: the rate and ETA are those of the later iterations."""
    import io
    import time
    import types

    from jadeis.digits._morph import IterationBar

    out = io.StringIO()
    bar = IterationBar(10, "method", file=out, mininterval=0)
    state = types.SimpleNamespace(loss=np.array([0.5, 0.25]))
    assert "compiling" in out.getvalue()
    time.sleep(0.5)  # "compiling"
    bar.callback(0, state)
    for i in range(1, 4):
        time.sleep(0.02)
        bar.callback(i, state)
    info = bar.bar.format_dict
    bar.close()
    assert bar.first_seconds >= 0.5
    assert info["n"] == 4 and info["elapsed"] < 0.4
    # with the compile counted the rate would be below 4 / 0.56 = 7 it/s
    assert info["rate"] is not None and info["rate"] > 15, info
    text = out.getvalue()
    assert "first iteration (compiling) 0.5 s" in text and "loss=0.3750" in text, text


def test_demo_iterations_after_the_first_do_not_compile(monkeypatch):
    """Only the first optimisation iteration compiles: on one device the demo does not put
    its batch on a mesh, which made guide's step compile a second time (a 4 s pause at
    iteration 2 that the progress bar's ETA then extrapolated)."""
    import time

    from jadeis.digits import _morph

    stamps = []
    callback = _morph.IterationBar.callback

    def timed(self, i, state):
        stamps.append(time.perf_counter())
        return callback(self, i, state)

    monkeypatch.setattr(_morph.IterationBar, "callback", timed)
    model, verifiers = load_denoiser(), load_verifiers()
    pairs = candidate_pairs(verifiers)[:2]
    start = time.perf_counter()
    run_morphs(model, verifiers, pairs, steps=4, iters=4, methods=["discrete"], progress=False)
    first, *rest = np.diff([start, *stamps])
    assert len(rest) == 3 and max(rest) < 0.1 * first, (first, rest)


def test_slerp():
    a = jnp.array([[1.0, 0.0]], jnp.float32)
    b = jnp.array([[0.0, 2.0]], jnp.float32)
    m = slerp(a, b)
    np.testing.assert_allclose(m, [[np.sqrt(0.5) * 1.0, np.sqrt(0.5) * 2.0]], rtol=1e-6)
    np.testing.assert_allclose(slerp(a, a), a, rtol=1e-6)


def test_morphing_pipeline_small():
    """Few steps and iterations (fast): the optimised morph lowers the identity loss, and
    the report has the MMPMR of every verifier."""
    model, verifiers = load_denoiser(), load_verifiers()
    pairs = candidate_pairs(verifiers)[:3]
    rep = run_morphs(
        model,
        verifiers,
        pairs,
        steps=8,
        iters=6,
        lr=0.05,
        methods=("pixel", "latent", "discrete"),
        progress=False,
    )
    assert [r.method.key for r in rep.results] == ["pixel", "latent", "discrete"]
    for r in rep.results:
        assert r.morphs.shape == (3, 8, 8) and r.accepted.shape == (3, 3)
        assert np.all((0 <= r.mmpmr) & (r.mmpmr <= 1))
    opt = rep.results[-1]
    assert opt.losses.shape == (7, 3) and opt.progress.shape == (6, 3, 8, 8)
    assert np.mean(opt.losses[-1]) < np.mean(opt.losses[0])
    assert opt.nfe == 2 * 8 + 6 * 2 * 8 + 8
    table = rep.table()
    assert "MMPMR verifier_a (guide)" in table and "DiscreteAdjoint" in table


def test_morphing_rex_row_small():
    """The Rex row: exact Rex encoding of both sources, ReversibleAdjoint; it lowers the
    identity loss, and its NFE (from the run's Stats) counts 4 evaluations per Rex step
    (midpoint): encoding 2 x 4N, per iteration 4N forward and 4N + 4N backward (the algebraic
    inverse and the VJP of each step), the final sample 4N."""
    model, verifiers = load_denoiser(), load_verifiers()
    pairs = candidate_pairs(verifiers)[:2]
    rep = run_morphs(
        model, verifiers, pairs, steps=4, iters=3, lr=0.05, methods=("rex",), progress=False
    )
    (r,) = rep.results
    assert r.method.gradient == "ReversibleAdjoint()" and r.morphs.shape == (2, 8, 8)
    assert np.mean(r.losses[-1]) < np.mean(r.losses[0])
    assert r.nfe == 4 * (2 * 4 + 3 * 3 * 4 + 4)


def test_greedy_hybrid_and_truncated_rows_small():
    """The dial's rows: NFE from the runs' Stats, counted as for the other rows; the loss
    network's evaluations and VJPs apart; the verifiers' ceilings bound every row; the hybrid
    continues the DiscreteAdjoint row (the same as running its iterations on its own)."""
    from jadeis.digits._morph import GREEDY, HYBRID

    model, verifiers = load_denoiser(), load_verifiers()
    pairs = candidate_pairs(verifiers)[:2]
    n, iters = 4, 3
    kw = dict(steps=n, iters=iters, lr=0.05, progress=False, keep_progress=False)
    rep = run_morphs(
        model, verifiers, pairs, methods=("greedy", "discrete", "hybrid", "truncated"), **kw
    )
    greedy, discrete, hybrid, truncated = rep.results
    assert greedy.nfe == 3 * n and greedy.iters == 0
    assert (greedy.loss_evals, greedy.loss_vjps) == (n * (GREEDY.inner + 1), n * GREEDY.inner)
    assert discrete.nfe == 2 * n + iters * 2 * n + n
    assert hybrid.nfe == discrete.nfe and hybrid.iters == iters
    assert hybrid.loss_evals == iters + n * (HYBRID.inner + 1)
    assert hybrid.loss_vjps == iters + n * HYBRID.inner
    # the truncated row: k = N/2 = 2, as many iterations as the exact rows' NFE buys
    assert truncated.iters == iters * 2 * n // (n + 2) and truncated.nfe == discrete.nfe
    assert np.mean(truncated.losses[-1]) < np.mean(truncated.losses[0])
    for r in rep.results:
        assert np.all(r.accepted.sum(axis=1) <= rep.ceilings)
    alone = run_morphs(model, verifiers, pairs, methods=("hybrid",), **kw).results[0]
    np.testing.assert_allclose(alone.morphs, hybrid.morphs, atol=1e-5)
    assert "Ceiling" in rep.table() and f"{hybrid.loss_evals} + {hybrid.loss_vjps}" in rep.table()


SHARD_SCRIPT = """
import json, sys
import jax, numpy as np
from jadeis.digits import load_denoiser, load_verifiers
from jadeis.digits import candidate_pairs, run_morphs, shard_batch
assert len(jax.devices()) == 4, jax.devices()
x = shard_batch(np.zeros((8, 8, 8), np.float32))
assert len(x.sharding.device_set) == 4
model, verifiers = load_denoiser(), load_verifiers()
pairs = candidate_pairs(verifiers)[:6]  # 6 morphs: padded to 8 over 4 devices
out = {}
for shard in (True, False):
    rep = run_morphs(model, verifiers, pairs, steps=6, iters=3,
                     methods=("adjointdeis1_sde",), progress=False,
                     shard=shard)
    out[str(shard)] = [[r.morphs.tolist(), r.accepted.tolist(), r.losses.tolist(), r.devices]
                       for r in rep.results]
print(json.dumps(out))
"""


def test_sharded_morphs_match_one_device():
    """A batch of morphs split over 4 (emulated CPU) devices gives the single-device result."""
    out = run_on_cpu_devices(SHARD_SCRIPT, n=4, timeout=600, cwd=Path(__file__).parent)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    for (m4, acc4, l4, dev4), (m1, acc1, l1, dev1) in zip(res["True"], res["False"]):
        assert dev4 == 4 and dev1 == 1
        np.testing.assert_allclose(m4, m1, atol=2e-5)
        np.testing.assert_allclose(l4, l1, atol=2e-5)
        assert acc4 == acc1
