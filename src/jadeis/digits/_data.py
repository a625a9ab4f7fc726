"""The handwritten digits (1797 8x8 images), scaled to [-1, 1], and fixed splits.

The images are the UCI "Optical Recognition of Handwritten Digits" test set (E. Alpaydin and
C. Kaynak, 1998; CC BY 4.0), the copy that scikit-learn ships as ``load_digits``. They ship
inside this package as ``digits.npz`` (49 KB): the integer pixels 0..16, the labels and the
index of every image in each split, so loading them needs neither scikit-learn nor the
network. ``build_data_file`` wrote that file once from scikit-learn; the tests check that it
still equals scikit-learn's copy and split, bit for bit.

Splits (stratified by digit, fixed seed, the same on every machine):

- ``"train"`` (1197 images): trains the diffusion model and the three verifiers;
- ``"val"`` (300): sets each verifier's threshold at 0.1% false-match rate;
- ``"test"`` (300): the morphing sources and the held-out classifier of the tests.
"""

from __future__ import annotations

import functools
from importlib import resources

import numpy as np

SPLITS = ("train", "val", "test", "heldout", "all")
SPLIT_SEED = 0
DATA_FILE = "digits.npz"


def _scale(pixels: np.ndarray) -> np.ndarray:
    """Integer pixels 0..16 -> float32 in [-1, 1]."""
    return (pixels.astype(np.float32) / 8.0 - 1.0).astype(np.float32)


@functools.lru_cache(maxsize=1)
def _load():
    with resources.files(__package__).joinpath(DATA_FILE).open("rb") as f, np.load(f) as data:
        images = _scale(data["pixels"])
        labels = data["labels"].astype(np.int32)
        idx = {name: data[name].astype(np.int64) for name in ("train", "val", "test")}
    return images, labels, idx


def from_scikit_learn():
    """``(pixels, labels, splits)`` computed from scikit-learn's copy of the digits: pixels
    ``(1797, 8, 8)`` uint8 in 0..16, labels ``(1797,)`` uint8, and the index arrays of the
    ``"train"``, ``"val"`` and ``"test"`` splits. Needs scikit-learn (the tests have it)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    pixels = data.images.astype(np.uint8)
    if not np.array_equal(pixels, data.images):
        raise ValueError("scikit-learn's digits are not integers in 0..16")
    labels = data.target.astype(np.uint8)
    idx = np.arange(len(labels))
    train, rest = train_test_split(
        idx, test_size=600, stratify=labels, random_state=SPLIT_SEED, shuffle=True
    )
    val, test = train_test_split(
        rest, test_size=300, stratify=labels[rest], random_state=SPLIT_SEED, shuffle=True
    )
    return pixels, labels, {"train": train, "val": val, "test": test}


def build_data_file(path) -> None:
    """Write ``digits.npz`` (the file shipped in this package) from scikit-learn's copy."""
    pixels, labels, splits = from_scikit_learn()
    np.savez_compressed(
        path,
        pixels=pixels,
        labels=labels,
        **{name: s.astype(np.uint16) for name, s in splits.items()},
    )


def load_split(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Images ``(n, 8, 8)`` float32 in [-1, 1] and labels ``(n,)`` int32 of one split.

    ``split`` is ``"train"``, ``"val"``, ``"test"``, ``"heldout"`` (val and test) or ``"all"``.
    """
    if split not in SPLITS:
        raise ValueError(f"load_split: split must be one of {SPLITS}, got {split!r}.")
    images, labels, idx = _load()
    if split == "all":
        sel = np.arange(len(labels))
    elif split == "heldout":
        sel = np.concatenate([idx["val"], idx["test"]])
    else:
        sel = idx[split]
    return images[sel], labels[sel]
