"""PNG output: image grids upscaled with nearest-neighbour pixels, and loss plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def grid(rows, *, scale: int = 8, pad: int = 1) -> np.ndarray:
    """Tile ``rows`` (a list of lists of 8x8 images in [-1, 1]; ``None`` leaves a gap) into one
    grey-scale image in [0, 1], each pixel upscaled ``scale`` times."""
    rows = [list(r) for r in rows]
    ncol = max(len(r) for r in rows)
    h, w = 8 * scale, 8 * scale
    out = np.ones((len(rows) * (h + pad) + pad, ncol * (w + pad) + pad), np.float32)
    for i, r in enumerate(rows):
        for j, im in enumerate(r):
            if im is None:
                continue
            im = np.clip((np.asarray(im, np.float32).reshape(8, 8) + 1.0) / 2.0, 0.0, 1.0)
            big = np.kron(im, np.ones((scale, scale), np.float32))
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y : y + h, x : x + w] = 1.0 - big  # dark ink on white paper
    return out


def save_png(path, image: np.ndarray) -> Path:
    """Write a grey-scale image in [0, 1] as PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.image

    path = Path(path)
    matplotlib.image.imsave(path, np.asarray(image), cmap="gray", vmin=0.0, vmax=1.0)
    return path


def save_loss_plot(path, curves: dict, *, title: str = "training loss") -> Path:
    """Plot each named loss curve (smoothed, log scale) into a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.2), squeeze=False)
    for ax, (name, y) in zip(axes[0], curves.items()):
        y = np.asarray(y, np.float64)
        k = max(1, len(y) // 100)
        smooth = np.convolve(y, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(len(y)), y, alpha=0.25, lw=0.5)
        ax.plot(np.arange(len(smooth)) + k // 2, smooth, lw=1.5)
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
