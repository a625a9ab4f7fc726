"""Small pytree helpers shared by the gradient strategies.

Integer leaves (class labels in ``z``, integer buffers in ``params``) are not
differentiable: their cotangents are ``float0`` zeros (what ``jax.vjp`` returns for them),
which the helpers pass through unchanged instead of adding or scaling them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_FLOAT0 = jax.dtypes.float0


def is_float0(g) -> bool:
    return getattr(g, "dtype", None) == _FLOAT0


def scale(coef, tree):
    return jax.tree.map(lambda g: g if is_float0(g) else coef.astype(g.dtype) * g, tree)


def combine(ws, trees):
    """sum_k ws[k] * trees[k] over pytrees (the weights are scalars)."""
    out = scale(ws[0], trees[0])
    for w, t in zip(ws[1:], trees[1:]):
        out = jax.tree.map(
            lambda o, g, w=w: o if is_float0(o) else o + w.astype(g.dtype) * g, out, t
        )
    return out


def add(a, b):
    return jax.tree.map(lambda u, v: u if is_float0(u) else (v if is_float0(v) else u + v), a, b)


def _zeros(v):
    v = jnp.asarray(v) if not hasattr(v, "dtype") else v
    if jnp.issubdtype(v.dtype, jnp.inexact):
        return jnp.zeros_like(v)
    return np.zeros(np.shape(v), _FLOAT0)  # not differentiable: a float0 cotangent


def zeros_like(tree):
    """Zero cotangents of ``tree``: float0 zeros for integer/boolean leaves."""
    return jax.tree.map(_zeros, tree)


def vdot(a, b):
    """Real inner product of two arrays or pytrees of arrays, as a scalar in a's dtype."""
    if isinstance(a, jax.Array):
        return jnp.sum(a * b.astype(a.dtype))
    terms = jax.tree.leaves(jax.tree.map(lambda u, v: jnp.sum(u * v.astype(u.dtype)), a, b))
    return functools.reduce(jnp.add, terms)
