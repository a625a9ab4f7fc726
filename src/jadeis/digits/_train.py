"""Training the bundled digits models with optax (``jadeis train digits``).

Everything is seeded: the same ``seed`` and step counts give the same weights on the same
JAX version and platform.
"""

from __future__ import annotations

import functools
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from tqdm.auto import tqdm

from jadeis import VPLinear

from ._data import load_split
from ._files import (
    OutputDirError,
    check_writable,
    is_package_weights_dir,
    replace_dir,
    staging_dir,
)
from ._models import Denoiser, Verifier
from ._nets import IMAGE_SHAPE, NUM_CLASSES, build
from ._weights import DENOISER_FILE, VERIFIER_FILES, save_record, write_manifest

CHUNK = 100  # optimiser steps per jit call (one progress-bar update)
FMR = 1e-3

VERIFIER_SPECS = (
    {"name": "verifier_a", "arch": "EmbedMLP", "config": {"widths": (256, 256), "dim": 32}},
    {"name": "verifier_b", "arch": "EmbedMLP", "config": {"widths": (128, 128, 128), "dim": 32}},
    {"name": "verifier_c", "arch": "EmbedConv", "config": {"channels": (16, 32), "dim": 32}},
)


def _run(step, state, key, steps, desc, progress):
    """Run exactly ``steps`` optimiser steps in jit-compiled chunks of ``CHUNK`` (the last one
    shorter if ``CHUNK`` does not divide ``steps``); returns (state, losses)."""

    @functools.partial(jax.jit, static_argnums=2)
    def chunk(state, key, n):
        return lax.scan(step, state, jax.random.split(key, n))

    losses = []
    n_chunks = -(-steps // CHUNK)
    bar = tqdm(total=steps, desc=desc, disable=not progress, unit="step")
    for c in range(n_chunks):
        n = min(CHUNK, steps - c * CHUNK)
        state, loss = chunk(state, jax.random.fold_in(key, c), n)
        loss = np.asarray(loss)
        if not np.all(np.isfinite(loss)):
            bar.close()
            raise FloatingPointError(
                f"{desc}: the training loss became non-finite at step "
                f"{c * CHUNK + int(np.argmin(np.isfinite(loss)))}; nothing was written."
            )
        losses.append(loss)
        bar.update(n)
        bar.set_postfix(loss=f"{loss.mean():.4f}")
    bar.close()
    return state, np.concatenate(losses)


def _schedule(steps, lr):
    return optax.warmup_cosine_decay_schedule(0.0, lr, min(200, steps // 10 + 1), steps, lr * 0.05)


def train_denoiser(
    *,
    seed: int = 0,
    steps: int = 6000,
    batch: int = 256,
    lr: float = 2e-3,
    hidden: int = 256,
    depth: int = 3,
    z_dim: int = 16,
    ema: float = 0.999,
    progress: bool = True,
):
    """Train the conditional noise-prediction model on the train split.

    Loss: E ||eps_theta(alpha_t x_0 + sigma_t eps, t, z_y) - eps||^2 with t ~ U(t_min, 1) of
    ``VPLinear()``, z_y the learned embedding of the digit y. Returns (Denoiser with the EMA
    weights, per-step losses)."""
    images, labels = load_split("train")
    images, labels = jnp.asarray(images), jnp.asarray(labels)
    sch = VPLinear()
    config = {"hidden": hidden, "depth": depth}
    net = build("DenoiserMLP", config)
    k_init, k_emb, k_train = jax.random.split(jax.random.key(seed), 3)
    x = jnp.zeros((1,) + IMAGE_SHAPE, jnp.float32)
    params = {
        "net": net.init(k_init, x, jnp.float32(0.5), jnp.zeros((1, z_dim), jnp.float32))["params"],
        "emb": jax.random.normal(k_emb, (NUM_CLASSES, z_dim), jnp.float32),
    }
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(_schedule(steps, lr), 1e-4))

    def loss_fn(p, key):
        ki, kt, ke = jax.random.split(key, 3)
        idx = jax.random.randint(ki, (batch,), 0, images.shape[0])
        x0, y = images[idx], labels[idx]
        t = jax.random.uniform(kt, (batch,), jnp.float32, sch.t_min, sch.t_max)
        eps = jax.random.normal(ke, x0.shape, jnp.float32)
        a = sch.alpha(t).astype(jnp.float32)[:, None, None]
        s = sch.sigma(t).astype(jnp.float32)[:, None, None]
        pred = net.apply({"params": p["net"]}, a * x0 + s * eps, t, p["emb"][y])
        return jnp.mean((pred - eps) ** 2)

    def step(state, key):
        p, avg, o = state
        loss, g = jax.value_and_grad(loss_fn)(p, key)
        upd, o = opt.update(g, o, p)
        p = optax.apply_updates(p, upd)
        avg = optax.incremental_update(p, avg, 1.0 - ema)
        return (p, avg, o), loss

    state = (params, params, opt.init(params))
    (_, avg, _), losses = _run(step, state, k_train, steps, "denoiser", progress)
    model = Denoiser(net, avg["net"], avg["emb"], {"arch": "DenoiserMLP", "config": config})
    return model, losses


def _augment(key, x):
    """Random 1-pixel shifts and Gaussian noise (robustness to generated images)."""
    ks, kn, kl = jax.random.split(key, 3)
    shifts = jax.random.randint(ks, (x.shape[0], 2), 0, 3)
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1)), constant_values=-1.0)
    x = jax.vmap(lambda im, s: lax.dynamic_slice(im, (s[0], s[1]), IMAGE_SHAPE))(padded, shifts)
    level = jax.random.uniform(kl, (x.shape[0], 1, 1), jnp.float32, 0.0, 0.3)
    return x + level * jax.random.normal(kn, x.shape, jnp.float32)


def train_verifier(
    spec: dict,
    *,
    seed: int = 1,
    steps: int = 2000,
    batch: int = 256,
    lr: float = 2e-3,
    scale: float = 16.0,
    margin: float = 0.2,
    progress: bool = True,
):
    """Train one embedding network with a CosFace metric loss (normalised-softmax over
    learned unit class proxies with an additive cosine margin) on the train split, then set
    its threshold at 0.1% FMR on the validation split. Returns (Verifier, losses, stats)."""
    images, labels = load_split("train")
    images, labels = jnp.asarray(images), jnp.asarray(labels)
    net = build(spec["arch"], spec["config"])
    k_init, k_proxy, k_train = jax.random.split(jax.random.key(seed), 3)
    x = jnp.zeros((1,) + IMAGE_SHAPE, jnp.float32)
    dim = spec["config"]["dim"]
    params = {
        "net": net.init(k_init, x)["params"],
        "proxies": jax.random.normal(k_proxy, (NUM_CLASSES, dim), jnp.float32),
    }
    opt = optax.adamw(_schedule(steps, lr), 1e-4)

    def loss_fn(p, key):
        ki, ka = jax.random.split(key)
        idx = jax.random.randint(ki, (batch,), 0, images.shape[0])
        e = net.apply({"params": p["net"]}, _augment(ka, images[idx]))
        w = p["proxies"] / jnp.linalg.norm(p["proxies"], axis=-1, keepdims=True)
        onehot = jax.nn.one_hot(labels[idx], NUM_CLASSES, dtype=jnp.float32)
        logits = scale * (e @ w.T - margin * onehot)
        return optax.softmax_cross_entropy(logits, onehot).mean()

    def step(state, key):
        p, o = state
        loss, g = jax.value_and_grad(loss_fn)(p, key)
        upd, o = opt.update(g, o, p)
        return (optax.apply_updates(p, upd), o), loss

    (p, _), losses = _run(step, (params, opt.init(params)), k_train, steps, spec["name"], progress)
    threshold, stats = calibrate(net, p["net"], FMR)
    v = Verifier(spec["name"], net, p["net"], threshold, {"arch": spec["arch"]})
    return v, losses, stats


def pair_scores(net, params, split):
    """Cosine scores of all genuine (same digit) and impostor (different digit) pairs."""
    images, labels = load_split(split)
    e = np.asarray(jax.jit(net.apply)({"params": params}, jnp.asarray(images)), np.float64)
    s = e @ e.T
    iu = np.triu_indices(len(labels), 1)
    same = (labels[:, None] == labels[None, :])[iu]
    return s[iu][same], s[iu][~same]


def calibrate(net, params, fmr: float = FMR):
    """Threshold with at most ``fmr`` of the validation impostor pairs scoring above it;
    returns (threshold, error rates on the validation and test splits)."""
    gen, imp = pair_scores(net, params, "val")
    # accept when score > threshold; the margin keeps the pair at the quantile itself out
    # even after float32 rounding differences (e.g. jit vs eager, another CPU)
    threshold = float(np.quantile(imp, 1.0 - fmr, method="higher")) + 1e-5
    stats = {"fmr_target": fmr}
    for split in ("val", "test"):
        g, i = (gen, imp) if split == "val" else pair_scores(net, params, split)
        stats[f"{split}_fmr"] = float(np.mean(i > threshold))
        stats[f"{split}_fnmr"] = float(np.mean(g <= threshold))
        stats[f"{split}_pairs"] = [int(g.size), int(i.size)]
    return threshold, stats


OUTPUT_FILES = (
    DENOISER_FILE,
    *VERIFIER_FILES,
    "manifest.json",
    "training_loss.png",
    "samples.png",
)


def check_train_out(out_dir, *, force: bool = False) -> Path:
    """Raise :class:`OutputDirError` when training into ``out_dir`` could lose files: the
    package's own weights folder (unless ``force``), a file, or a folder holding files other
    than a previous training run's outputs, or a location it cannot write to (it writes into a
    new folder next to ``out_dir``, then renames). Leaves the file system as it was."""
    out = check_writable(out_dir)
    check_writable(out.absolute().parent)
    if is_package_weights_dir(out) and not force:
        raise OutputDirError(
            f"{str(out)!r} is the weights folder bundled with the installed jadeis; training "
            f"into it would replace the bundled weights. Choose another folder and use it with "
            f"`jadeis demo --weights DIR`, or pass --force (force=True) to replace them."
        )
    if out.is_dir():
        other = sorted(p.name for p in out.iterdir() if p.name not in OUTPUT_FILES)
        if other:
            raise OutputDirError(
                f"{str(out)!r} holds files that `jadeis train digits` does not write "
                f"({', '.join(other[:5])}{', ...' if len(other) > 5 else ''}); it replaces the "
                f"whole folder, so choose a new or empty folder."
            )
    return out


def train_all(
    out_dir,
    *,
    seed: int = 0,
    steps: int = 6000,
    verifier_steps: int = 2000,
    progress: bool = True,
    force: bool = False,
    log=print,
) -> dict:
    """Train the denoiser and the three verifiers; write the weights, ``manifest.json``,
    ``training_loss.png`` and ``samples.png`` into ``out_dir``. Returns a report dict.

    Everything is written into a temporary folder next to ``out_dir`` which replaces
    ``out_dir`` only when complete: an interrupted run leaves an existing ``out_dir`` as it
    was. Refuses the package's own weights folder unless ``force`` (see
    :func:`check_train_out`)."""
    out = check_train_out(out_dir, force=force)
    work = staging_dir(out)
    try:
        report = _train_into(
            work, seed=seed, steps=steps, verifier_steps=verifier_steps, progress=progress, log=log
        )
        report["replaced"] = replace_dir(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _train_into(out: Path, *, seed, steps, verifier_steps, progress, log) -> dict:
    from ._plot import grid, save_loss_plot, save_png

    t0 = time.perf_counter()
    model, d_losses = train_denoiser(seed=seed, steps=steps, progress=progress)
    hashes = {}
    hashes[DENOISER_FILE] = save_record(
        out / DENOISER_FILE,
        kind="denoiser",
        name="denoiser",
        arch="DenoiserMLP",
        config=model.meta["config"],
        params=model.params,
        extra={"class_embeddings": model.class_embeddings, "seed": seed, "steps": steps},
    )
    curves = {"denoiser (eps MSE)": d_losses}
    report = {"seed": seed, "steps": steps, "verifier_steps": verifier_steps, "verifiers": {}}
    report["steps_run"] = {"denoiser": int(len(d_losses))}
    for k, (spec, fname) in enumerate(zip(VERIFIER_SPECS, VERIFIER_FILES)):
        v, losses, stats = train_verifier(
            spec, seed=seed + 1 + k, steps=verifier_steps, progress=progress
        )
        hashes[fname] = save_record(
            out / fname,
            kind="verifier",
            name=spec["name"],
            arch=spec["arch"],
            config=spec["config"],
            params=v.params,
            extra={"threshold": v.threshold, "seed": seed + 1 + k, **_flat(stats)},
        )
        curves[f"{spec['name']} (CosFace)"] = losses
        report["steps_run"][spec["name"]] = int(len(losses))
        report["verifiers"][spec["name"]] = {"threshold": v.threshold, **stats}
        log(
            f"{spec['name']}: threshold {v.threshold:.4f} at FMR {FMR:.1%} (val); test FMR "
            f"{stats['test_fmr']:.2%}, FNMR {stats['test_fnmr']:.2%}"
        )
    report["train_seconds"] = round(time.perf_counter() - t0, 1)
    write_manifest(out, hashes, report)
    save_loss_plot(out / "training_loss.png", curves)
    labels = np.repeat(np.arange(NUM_CLASSES), 10).reshape(NUM_CLASSES, 10)
    samples = np.asarray(model.generate(labels, jax.random.key(seed + 100), steps=50))
    save_png(out / "samples.png", grid(samples, scale=4))
    report["files"] = sorted([*hashes, "manifest.json", "training_loss.png", "samples.png"])
    return report


def _flat(stats):
    return {k: (np.asarray(v) if isinstance(v, list) else v) for k, v in stats.items()}
