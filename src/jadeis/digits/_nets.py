"""The flax networks: a conditional noise-prediction MLP and three verifier embedding nets.

Every network computes in float32 whatever the input dtype, and returns the input's dtype,
so it works unchanged with ``jax_enable_x64`` and strict dtype promotion.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

IMAGE_SHAPE = (8, 8)
NUM_PIXELS = 64
NUM_CLASSES = 10


def _time_features(t, dim: int):
    """Sinusoidal features of ``1000 t`` (``t`` of any shape) -> ``t.shape + (dim,)``."""
    half = dim // 2
    freqs = jnp.asarray(np.exp(-np.log(1000.0) * np.arange(half) / half), jnp.float32)
    arg = (1000.0 * t.astype(jnp.float32))[..., None] * freqs
    return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=-1)


class DenoiserMLP(nn.Module):
    """eps_theta(x_t, t, z) for 8x8 images: a residual MLP with time and conditioning added
    to every block. ``x``: ``(..., 8, 8)``; ``t``: scalar or ``(...)``; ``z``: ``(..., z_dim)``."""

    hidden: int = 256
    depth: int = 3
    time_dim: int = 64

    @nn.compact
    def __call__(self, x, t, z):
        dtype = x.dtype
        batch = x.shape[: x.ndim - 2]
        h = x.reshape(batch + (NUM_PIXELS,)).astype(jnp.float32)
        t = jnp.broadcast_to(jnp.asarray(t), batch)
        z = jnp.broadcast_to(jnp.asarray(z).astype(jnp.float32), batch + (jnp.shape(z)[-1],))
        emb = nn.Dense(self.hidden)(_time_features(t, self.time_dim))
        emb = nn.Dense(self.hidden)(nn.silu(emb)) + nn.Dense(self.hidden)(z)
        h = nn.Dense(self.hidden)(h)
        for _ in range(self.depth):
            r = nn.LayerNorm()(h)
            r = nn.Dense(self.hidden)(nn.silu(r + emb))
            r = nn.Dense(self.hidden)(nn.silu(r))
            h = h + r
        out = nn.Dense(NUM_PIXELS, kernel_init=nn.initializers.zeros)(nn.silu(nn.LayerNorm()(h)))
        return out.reshape(batch + IMAGE_SHAPE).astype(dtype)


class EmbedMLP(nn.Module):
    """Verifier embedding: MLP on the 64 pixels -> L2-normalised ``dim`` vector."""

    widths: tuple[int, ...] = (256, 256)
    dim: int = 32

    @nn.compact
    def __call__(self, x):
        batch = x.shape[: x.ndim - 2]
        h = x.reshape(batch + (NUM_PIXELS,)).astype(jnp.float32)
        for w in self.widths:
            h = nn.gelu(nn.Dense(w)(h))
        return _normalise(nn.Dense(self.dim)(h)).astype(x.dtype)


class EmbedConv(nn.Module):
    """Verifier embedding: a tiny conv net (two 3x3 convolutions, the second with stride 2,
    written as dense layers over image patches: fast on CPU) -> L2-normalised ``dim`` vector."""

    channels: tuple[int, ...] = (32, 64)
    dim: int = 32

    @nn.compact
    def __call__(self, x):
        batch = x.shape[: x.ndim - 2]
        h = x.reshape((-1,) + IMAGE_SHAPE + (1,)).astype(jnp.float32)
        h = nn.gelu(nn.Dense(self.channels[0])(_patches3x3(h, 1)))
        h = nn.gelu(nn.Dense(self.channels[1])(_patches3x3(h, 2)))
        h = h.reshape((h.shape[0], -1))
        h = nn.gelu(nn.Dense(128)(h))
        e = _normalise(nn.Dense(self.dim)(h))
        return e.reshape(batch + (self.dim,)).astype(x.dtype)


def _patches3x3(h, stride: int):
    """``(B, H, W, C)`` -> ``(B, H/stride, W/stride, 9 C)``: the zero-padded 3x3 neighbourhoods."""
    _, hh, ww, _ = h.shape
    p = jnp.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
    views = [p[:, i : i + hh : stride, j : j + ww : stride, :] for i in range(3) for j in range(3)]
    return jnp.concatenate(views, axis=-1)


def _normalise(e):
    return e / jnp.sqrt(jnp.sum(e * e, axis=-1, keepdims=True) + 1e-12)


def build(arch: str, config: dict) -> nn.Module:
    """The network named ``arch`` with keyword ``config`` (as stored in a weights file)."""
    kinds = {"DenoiserMLP": DenoiserMLP, "EmbedMLP": EmbedMLP, "EmbedConv": EmbedConv}
    if arch not in kinds:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(kinds)}.")
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    return kinds[arch](**cfg)
