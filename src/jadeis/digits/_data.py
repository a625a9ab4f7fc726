"""The scikit-learn handwritten digits (1797 8x8 images), scaled to [-1, 1], and fixed splits.

Splits (stratified by digit, fixed seed, the same on every machine):

- ``"train"`` (1197 images): trains the diffusion model and the three verifiers;
- ``"val"`` (300): sets each verifier's threshold at 0.1% false-match rate;
- ``"test"`` (300): the morphing sources and the held-out classifier of the tests.
"""

from __future__ import annotations

import functools

import numpy as np

SPLITS = ("train", "val", "test", "heldout", "all")
SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def _load():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = (data.images.astype(np.float32) / 8.0 - 1.0).astype(np.float32)  # 0..16 -> [-1, 1]
    labels = data.target.astype(np.int32)
    idx = np.arange(len(labels))
    train, rest = train_test_split(
        idx, test_size=600, stratify=labels, random_state=SPLIT_SEED, shuffle=True
    )
    val, test = train_test_split(
        rest, test_size=300, stratify=labels[rest], random_state=SPLIT_SEED, shuffle=True
    )
    return images, labels, {"train": train, "val": val, "test": test}


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
