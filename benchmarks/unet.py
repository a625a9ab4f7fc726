"""A small convolutional U-Net noise model for the ``unet`` benchmark problem (flax.linen).

32x32x3 images (NHWC), channels (32, 64, 128) at resolutions 32, 16, 8; GroupNorm + SiLU
residual blocks (two 3x3 convolutions each, the time/conditioning embedding added in
between), one self-attention block at 8x8; a sinusoidal embedding of the noise level and a
continuous conditioning vector ``z`` (so that dL/dz is defined) go through a small MLP into
every residual block. The weights are random (``init`` with a fixed seed): the benchmark
measures gradient cost and accuracy through the sampler, not sample quality.

So that random weights still define a denoiser-like, non-trivial probability-flow ODE, the
network F is wrapped in EDM's preconditioning (Karras et al. 2022, data std ``SIGMA_DATA``):
with s = sigma/alpha and x' = x/alpha,

    x0_hat = c_skip(s) x' + c_out(s) F(c_in(s) x', c_noise(s), z),
    c_skip = sd^2/(s^2 + sd^2), c_out = s sd/sqrt(s^2 + sd^2), c_in = 1/sqrt(s^2 + sd^2),
    c_noise = log(s)/4,

and eps = (x - alpha x0_hat)/sigma. The network computes in float32 (the benchmark's
states and the sampler are float64), as a real model would.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

SIGMA_DATA = 0.5
CHANNELS = (16, 64, 128)
EMB = 128
GROUPS = 8
FREQ_SCALE = 10.0  # c_noise spans about [-1.3, 1.3]: the fastest feature turns ~4 times


def sinusoidal(c, dim):
    """[cos, sin] features of the scalar noise level ``c`` (shape (B,)) at dim/2 frequencies."""
    half = dim // 2
    freqs = jnp.exp(-math.log(1000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    a = c[:, None] * freqs[None, :] * FREQ_SCALE
    return jnp.concatenate([jnp.cos(a), jnp.sin(a)], axis=-1)


class ResBlock(nn.Module):
    out: int

    @nn.compact
    def __call__(self, x, emb):
        h = nn.silu(nn.GroupNorm(num_groups=GROUPS)(x))
        h = nn.Conv(self.out, (3, 3))(h)
        h = h + nn.Dense(self.out)(nn.silu(emb))[:, None, None, :]
        h = nn.silu(nn.GroupNorm(num_groups=GROUPS)(h))
        h = nn.Conv(self.out, (3, 3))(h)
        if x.shape[-1] != self.out:
            x = nn.Conv(self.out, (1, 1))(x)
        return (x + h) / math.sqrt(2.0)


class Attention(nn.Module):
    heads: int = 4

    @nn.compact
    def __call__(self, x):
        b, hh, ww, c = x.shape
        h = nn.GroupNorm(num_groups=GROUPS)(x).reshape(b, hh * ww, c)
        h = nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, h)
        return (x + h.reshape(b, hh, ww, c)) / math.sqrt(2.0)


class UNet(nn.Module):
    """F(x, c_noise, z): x (B, 32, 32, 3), c_noise (B,), z (B, Z) -> (B, 32, 32, 3)."""

    channels: tuple = CHANNELS

    @nn.compact
    def __call__(self, x, c_noise, z):
        emb = sinusoidal(c_noise, EMB)
        emb = emb + nn.Dense(EMB)(z)
        emb = nn.Dense(EMB)(nn.silu(nn.Dense(EMB)(emb)))
        h = nn.Conv(self.channels[0], (3, 3))(x)
        skips = [h]
        for i, ch in enumerate(self.channels):
            h = ResBlock(ch)(h, emb)
            skips.append(h)
            if i < len(self.channels) - 1:
                h = nn.Conv(ch, (3, 3), strides=(2, 2))(h)
                skips.append(h)
        h = ResBlock(self.channels[-1])(h, emb)
        h = Attention()(h)
        h = ResBlock(self.channels[-1])(h, emb)
        for i, ch in reversed(list(enumerate(self.channels))):
            h = ResBlock(ch)(jnp.concatenate([h, skips.pop()], axis=-1), emb)
            if i > 0:
                h = ResBlock(ch)(jnp.concatenate([h, skips.pop()], axis=-1), emb)
                b, hh, ww, c = h.shape
                h = jax.image.resize(h, (b, 2 * hh, 2 * ww, c), "nearest")
        h = ResBlock(self.channels[0])(jnp.concatenate([h, skips.pop()], axis=-1), emb)
        h = nn.silu(nn.GroupNorm(num_groups=GROUPS)(h))
        return nn.Conv(3, (3, 3))(h)


def init_params(seed: int = 0, z_dim: int = 16):
    """Random float32 weights (fixed seed) and the output scale that makes F's output of
    unit RMS on noise inputs (so the preconditioned model is far from its skip part)."""
    net = UNet()
    x = jnp.zeros((1, 32, 32, 3), jnp.float32)
    variables = jax.jit(net.init)(jax.random.key(seed), x, jnp.zeros((1,)), jnp.zeros((1, z_dim)))
    k1, k2 = jax.random.split(jax.random.key(seed + 1))
    xs = jax.random.normal(k1, (4, 32, 32, 3), jnp.float32)
    zs = jax.random.normal(k2, (4, z_dim), jnp.float32)
    out = jax.jit(net.apply)(variables, xs, jnp.linspace(-1.0, 1.0, 4), zs)
    scale = 1.0 / jnp.sqrt(jnp.mean(out**2))
    return {"net": variables["params"], "out_scale": scale}


def eps_fn_for(schedule):
    """eps(params, x, t, z) of the preconditioned U-Net; x (B, 32, 32, 3) and z (B, Z) of
    any float dtype, the network in float32, the output in x's dtype."""
    net = UNet()
    sd = SIGMA_DATA

    def eps_fn(params, x, t, z):
        dtype = x.dtype
        a = schedule.alpha(t).astype(dtype)
        sig = schedule.sigma(t).astype(dtype)
        s = sig / a
        xs = x / a
        norm = jnp.sqrt(s**2 + sd**2)
        c_skip, c_out, c_in = sd**2 / norm**2, s * sd / norm, 1.0 / norm
        c_noise = jnp.broadcast_to(jnp.log(s) / 4.0, x.shape[:1]).astype(jnp.float32)
        f = net.apply(
            {"params": params["net"]},
            (c_in * xs).astype(jnp.float32),
            c_noise,
            z.astype(jnp.float32),
        )
        f = (f * params["out_scale"]).astype(dtype)
        x0 = c_skip * xs + c_out * f
        return (x - a * x0) / sig

    return eps_fn
