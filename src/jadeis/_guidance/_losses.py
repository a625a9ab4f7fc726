"""Losses for :func:`jadeis.guide`: plain callables, losses of the optimised inputs,
built-in noise priors and weighted sums.

A plain callable is always called ``loss_fn(x_0, *loss_args)`` (the original signature).
A loss that also needs the inputs is wrapped explicitly, ``jadeis.Loss(fn,
uses_inputs=True)``, and is called ``fn(x_0, inputs, *loss_args)`` where ``inputs`` is the
dict ``{"x_T": ..., "z": ..., "params": ...}`` of the current values (optimised or not),
so there is no guessing from a signature.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp

_ON = ("x_T", "z", "params")


class AbstractLoss(eqx.Module):
    """Base class of guidance losses: ``loss(x_0, inputs, *loss_args) -> array``.

    Losses add (``a + b``) and scale (``0.1 * prior``) into a :class:`WeightedSum`.
    """

    def __call__(self, x_0, inputs, *loss_args):
        raise NotImplementedError

    def __add__(self, other):
        return WeightedSum.of(self, other)

    def __radd__(self, other):
        return WeightedSum.of(other, self)

    def __mul__(self, weight):
        return WeightedSum((weight,), (self,))

    __rmul__ = __mul__


class Loss(AbstractLoss):
    """Wrap a callable as a guidance loss.

    - ``Loss(fn)``: ``fn(x_0, *loss_args)`` (what a plain callable passed to ``guide`` is);
    - ``Loss(fn, uses_inputs=True)``: ``fn(x_0, inputs, *loss_args)``, where ``inputs`` is
      the dict ``{"x_T", "z", "params"}`` of the current values, e.g. for a prior on x_T.

    **Example:**

    ```python
    >>> import jax.numpy as jnp
    >>> import jadeis
    >>> fit = jadeis.Loss(lambda x0, target: jnp.sum((x0 - target) ** 2, axis=-1))
    >>> reg = jadeis.Loss(lambda x0, v, target: 1e-3 * jnp.sum(v["x_T"] ** 2, axis=-1),
    ...                   uses_inputs=True)
    >>> total = fit + 0.5 * reg + jadeis.ChiPrior()
    >>> type(total).__name__
    'WeightedSum'

    ```
    """

    fn: Callable
    uses_inputs: bool = False

    def __check_init__(self):
        if not callable(self.fn):
            raise ValueError(f"Loss: fn must be callable, got {self.fn!r:.80}.")

    def __call__(self, x_0, inputs, *loss_args):
        if self.uses_inputs:
            return self.fn(x_0, inputs, *loss_args)
        return self.fn(x_0, *loss_args)


def as_loss(loss, where: str = "guide") -> AbstractLoss:
    """A plain callable becomes ``Loss(fn)`` (called ``fn(x_0, *loss_args)``)."""
    if isinstance(loss, AbstractLoss):
        return loss
    if callable(loss):
        return Loss(loss)
    raise ValueError(
        f"{where}: loss_fn must be a callable loss_fn(x_0, *loss_args) or a jadeis.Loss, got "
        f"{loss!r:.80}."
    )


class WeightedSum(AbstractLoss):
    """``sum_k weights[k] * terms[k](x_0, inputs, *loss_args)``.

    Weights are traced (changing them does not recompile). Terms of the same shape add
    elementwise (e.g. per-example losses ``(B,)``); if any term is a scalar, every term is
    first summed to a scalar, so the objective is always the sum of all terms.
    """

    weights: tuple
    terms: tuple

    def __init__(self, weights, terms):
        weights, terms = tuple(weights), tuple(as_loss(t, "WeightedSum") for t in terms)
        if len(weights) != len(terms) or not terms:
            raise ValueError("WeightedSum: give one weight per term (at least one term).")
        self.weights = tuple(jnp.asarray(w) for w in weights)
        self.terms = terms

    @staticmethod
    def of(a, b) -> WeightedSum:
        ws, ts = [], []
        for t in (a, b):
            if isinstance(t, WeightedSum):
                ws += list(t.weights)
                ts += list(t.terms)
            else:
                ws.append(1.0)
                ts.append(as_loss(t, "WeightedSum"))
        return WeightedSum(ws, ts)

    def __mul__(self, weight):
        return WeightedSum(tuple(weight * w for w in self.weights), self.terms)

    __rmul__ = __mul__

    def __call__(self, x_0, inputs, *loss_args):
        values = [jnp.asarray(t(x_0, inputs, *loss_args)) for t in self.terms]
        shapes = {v.shape for v in values}
        if len(shapes) > 1:
            if () not in shapes:
                raise ValueError(
                    f"WeightedSum: the terms return arrays of different shapes {sorted(shapes)}; "
                    f"return per-example losses of one shape (B,), or scalars."
                )
            values = [jnp.sum(v) for v in values]
        out = None
        for w, v in zip(self.weights, values):
            term = w.astype(v.dtype) * v
            out = term if out is None else out + term
        return out


def _per_example_sq_norm(tree, per_example: bool):
    leaves = jax.tree.leaves(tree)
    if per_example:
        bad = [jnp.shape(v) for v in leaves if jnp.ndim(v) < 1]
        if bad:
            raise ValueError(
                "noise prior: per_example=True needs a leading batch axis on every leaf of the "
                f"prior's input, got shapes {[jnp.shape(v) for v in leaves]}; pass "
                "per_example=False for one unbatched sample."
            )
        sq = sum(jnp.sum(jnp.square(v).reshape(v.shape[0], -1), axis=1) for v in leaves)
        d = sum(math.prod(v.shape[1:]) for v in leaves)
    else:
        sq = sum(jnp.sum(jnp.square(v)) for v in leaves)
        d = sum(math.prod(v.shape) for v in leaves)
    return sq, d


def _check_on(owner, on):
    if on not in _ON:
        raise ValueError(f"{owner}: on must be one of {_ON}, got {on!r}.")


class NormPrior(AbstractLoss):
    r"""Keep the norm of the optimised noise typical (as DNO / ReNO do): the penalty
    $(\lVert x_T \rVert - \mu_d)^2$, where $\mu_d = \sqrt2\,\Gamma(\frac{d+1}2)/\Gamma(\frac d2)
    \approx \sqrt{d}$ is the expected norm of d-dimensional standard Gaussian noise
    (the mean of the chi distribution). Per example (leading axis) by default.

    **Example:**

    ```python
    >>> import jax.numpy as jnp
    >>> import jadeis
    >>> p = jadeis.NormPrior()
    >>> p(None, {"x_T": jnp.zeros((2, 4))}).shape   # one penalty per example
    (2,)

    ```
    """

    on: str = "x_T"
    per_example: bool = True

    def __check_init__(self):
        _check_on("NormPrior", self.on)

    def __call__(self, x_0, inputs, *loss_args):
        sq, d = _per_example_sq_norm(inputs[self.on], self.per_example)
        mu = math.sqrt(2.0) * math.exp(math.lgamma((d + 1) / 2) - math.lgamma(d / 2))
        return jnp.square(jnp.sqrt(sq) - mu)


class ChiPrior(AbstractLoss):
    r"""Negative log-likelihood of the noise's norm $r = \lVert x_T\rVert$ under the chi
    distribution with d degrees of freedom (ReNO's prior, a chi-square prior on $r^2$):
    $-(d-1)\log r + r^2/2 + (d/2 - 1)\log 2 + \log\Gamma(d/2)$, smallest at
    $r = \sqrt{d-1}$. Per example (leading axis) by default.

    **Example:**

    ```python
    >>> import jax.numpy as jnp
    >>> import jadeis
    >>> p = jadeis.ChiPrior(per_example=False)
    >>> bool(p(None, {"x_T": jnp.full(4, 3 ** 0.5 / 2)}) < p(None, {"x_T": jnp.ones(4)}))
    True

    ```
    """

    on: str = "x_T"
    per_example: bool = True

    def __check_init__(self):
        _check_on("ChiPrior", self.on)

    def __call__(self, x_0, inputs, *loss_args):
        sq, d = _per_example_sq_norm(inputs[self.on], self.per_example)
        const = (d / 2 - 1) * math.log(2.0) + math.lgamma(d / 2)
        return -(d - 1) * 0.5 * jnp.log(sq) + 0.5 * sq + const


def sphere_projection(tree, per_example: bool = True):
    r"""Project noise onto the sphere of radius $\sqrt d$ (per example), where standard
    Gaussian noise concentrates (DOODL); use as ``guide(..., projection={"x_T":
    jadeis.sphere_projection})``.

    A zero example has no direction: it is mapped to the constant vector with every element
    1 (norm $\sqrt d$), so the result is always finite and on the sphere.

    **Example:**

    ```python
    >>> import jax.numpy as jnp
    >>> import jadeis
    >>> x = jadeis.sphere_projection(jnp.ones((2, 4)) * 5.0)
    >>> jnp.allclose(jnp.sum(x ** 2, axis=1), 4.0).item()
    True

    ```
    """
    sq, d = _per_example_sq_norm(tree, per_example)
    zero = sq == 0
    scale = jnp.sqrt(d / jnp.where(zero, jnp.ones_like(sq), sq))

    def f(v):
        s = scale.astype(v.dtype)
        z = zero
        if per_example:
            s = s.reshape((-1,) + (1,) * (v.ndim - 1))
            z = z.reshape(s.shape)
        return jnp.where(z, jnp.ones_like(v), v * s)

    return jax.tree.map(f, tree)
