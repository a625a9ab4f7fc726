"""Small pytree helpers shared by the gradient strategies."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def scale(coef, tree):
    return jax.tree.map(lambda g: coef.astype(g.dtype) * g, tree)


def combine(ws, trees):
    """sum_k ws[k] * trees[k] over pytrees (the weights are scalars)."""
    out = scale(ws[0], trees[0])
    for w, t in zip(ws[1:], trees[1:]):
        out = jax.tree.map(lambda o, g, w=w: o + w.astype(g.dtype) * g, out, t)
    return out


def add(a, b):
    return jax.tree.map(jnp.add, a, b)


def zeros_like(tree):
    return jax.tree.map(jnp.zeros_like, tree)


def vdot(a, b):
    """Real inner product of two arrays, as a scalar in a's dtype."""
    return jnp.sum(a * b.astype(a.dtype))
