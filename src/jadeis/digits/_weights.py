"""Bundled weights: flax msgpack files (never pickle), checked against their architecture.

A weights file is one msgpack map ``{"format", "version", "kind", "name", "arch", "config",
"params", "extra"}``. ``manifest.json`` in the same directory records the SHA-256 of every
file and how they were trained. Loading verifies every file: it must be listed in the manifest
with a matching SHA-256, hold the model its file name says, have finite parameters and (for a
verifier) a threshold strictly between -1 and 1; anything else is a :class:`WeightsError`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from importlib import resources
from pathlib import Path

import flax.serialization
import jax
import numpy as np

from ._nets import build

FORMAT = "jadeis-digits"
VERSION = 1
ENV_VAR = "JADEIS_DIGITS_WEIGHTS"
DENOISER_FILE = "denoiser.msgpack"
VERIFIER_FILES = ("verifier_a.msgpack", "verifier_b.msgpack", "verifier_c.msgpack")
MANIFEST = "manifest.json"


class WeightsError(ValueError):
    """A weights file is missing, corrupt, or does not match its architecture."""


def default_weights_dir() -> Path:
    """``$JADEIS_DIGITS_WEIGHTS`` if set, else the weights shipped inside the package."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    return Path(str(resources.files("jadeis.digits") / "weights"))


def _to_numpy(tree):
    return jax.tree.map(lambda v: np.asarray(v), tree)


def save_record(path, *, kind: str, name: str, arch: str, config: dict, params, extra: dict):
    """Write one weights file; returns its SHA-256."""
    record = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "name": name,
        "arch": arch,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "params": _to_numpy(params),
        "extra": _to_numpy(extra),
    }
    data = flax.serialization.msgpack_serialize(record)
    Path(path).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def write_manifest(directory, hashes: dict, info: dict):
    text = json.dumps({"format": FORMAT, "sha256": hashes, "training": info}, indent=2)
    (Path(directory) / MANIFEST).write_text(text + "\n")


def _abstract_params(arch, config, example_inputs):
    net = build(arch, config)
    shapes = jax.eval_shape(net.init, jax.random.key(0), *example_inputs)
    return net, shapes["params"]


def load_record(path, *, kind: str, example_inputs) -> tuple:
    """Read, validate and return ``(net, params, record)``; raises :class:`WeightsError`.

    ``example_inputs``: abstract inputs of the network (or a function of the record giving
    them), used to derive the expected parameter shapes."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(
            f"weights file not found: {path}. Reinstall jadeis, or recreate the weights with "
            f"`jadeis train digits --out {path.parent}` and point {ENV_VAR} (or --weights) at it."
        )
    data = path.read_bytes()
    _verify_hash(path, data)
    try:
        record = flax.serialization.msgpack_restore(data)
    except Exception as e:  # noqa: BLE001 - any decoding failure means a corrupt file
        raise WeightsError(
            f"weights file {path} is corrupt (not a valid msgpack file: {type(e).__name__})."
        ) from e
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise WeightsError(f"{path} is not a jadeis digits weights file.")
    if record.get("version") != VERSION:
        raise WeightsError(
            f"{path} has format version {record.get('version')}, this jadeis reads {VERSION}."
        )
    if record.get("kind") != kind:
        raise WeightsError(f"{path} holds a {record.get('kind')!r} model, expected {kind!r}.")
    try:
        if callable(example_inputs):
            example_inputs = example_inputs(record)
        net, shapes = _abstract_params(record["arch"], dict(record["config"]), example_inputs)
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"{path}: cannot build its architecture: {e}") from e
    params = record["params"]
    want = jax.tree.structure(shapes)
    try:
        got = jax.tree.structure(params)
    except Exception:  # noqa: BLE001
        got = None
    if got != want:
        raise WeightsError(
            f"weights file {path} does not match the {record['arch']} architecture: "
            f"the parameter names differ."
        )
    for (kp, s), v in zip(jax.tree.leaves_with_path(shapes), jax.tree.leaves(params)):
        if tuple(np.shape(v)) != tuple(s.shape) or np.asarray(v).dtype != s.dtype:
            raise WeightsError(
                f"weights file {path} does not match the {record['arch']} architecture: "
                f"parameter {jax.tree_util.keystr(kp)} has shape {np.shape(v)} "
                f"({np.asarray(v).dtype}), expected {tuple(s.shape)} ({s.dtype})."
            )
    _check_values(path, record)
    params = jax.device_put(params)
    return net, params, record


def _verify_hash(path: Path, data: bytes):
    """Every weights file must be listed in its folder's manifest with a matching SHA-256."""
    manifest = path.parent / MANIFEST
    retrain = (
        "Weights written by `jadeis train digits --out DIR` come with one; retrain, or "
        "reinstall jadeis for the bundled weights."
    )
    if not manifest.is_file():
        raise WeightsError(
            f"cannot verify {path}: there is no {MANIFEST} in {path.parent} to check it "
            f"against (every weights file is checked against its SHA-256). {retrain}"
        )
    try:
        expected = json.loads(manifest.read_text())["sha256"].get(path.name)
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        raise WeightsError(f"{manifest} is not a valid jadeis manifest: {e}") from e
    if expected is None:
        raise WeightsError(
            f"cannot verify {path}: {manifest} has no SHA-256 entry for {path.name}. {retrain}"
        )
    if hashlib.sha256(data).hexdigest() != expected:
        raise WeightsError(
            f"weights file {path} is corrupt: its SHA-256 does not match {manifest}. "
            f"Reinstall jadeis or retrain with `jadeis train digits`."
        )


def _check_values(path: Path, record: dict):
    """Finite parameters, the name the file is stored under, a plausible threshold."""
    if record.get("name") != path.stem:
        raise WeightsError(
            f"weights file {path} holds the model {record.get('name')!r}, not {path.stem!r} "
            f"(a file copied over another?). Retrain with `jadeis train digits`."
        )
    for kp, v in jax.tree.leaves_with_path({"params": record["params"], "extra": record["extra"]}):
        a = np.asarray(v)
        if np.issubdtype(a.dtype, np.number) and not np.all(np.isfinite(a)):
            raise WeightsError(
                f"weights file {path} has non-finite values in {jax.tree_util.keystr(kp)}. "
                f"Retrain with `jadeis train digits`."
            )
    if record["kind"] == "verifier":
        thr = record["extra"].get("threshold") if isinstance(record["extra"], dict) else None
        try:
            thr = float(thr)
        except (TypeError, ValueError):
            thr = math.nan
        if not -1.0 < thr < 1.0:
            raise WeightsError(
                f"weights file {path} has an implausible threshold {thr} (a cosine-similarity "
                f"threshold must lie strictly between -1 and 1). Retrain with "
                f"`jadeis train digits`."
            )
