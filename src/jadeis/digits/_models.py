"""The bundled digits models: :class:`Denoiser` (the diffusion model) and :class:`Verifier`."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jadeis import DDIM, VPLinear, sample, time_grid

from ._nets import IMAGE_SHAPE, NUM_CLASSES
from ._weights import DENOISER_FILE, VERIFIER_FILES, default_weights_dir, load_record


class Denoiser:
    """The conditional noise-prediction model of the 8x8 digits (schedule ``VPLinear()``).

    - ``eps_fn(params, x, t, z)``: the model in jadeis' signature; ``x``: ``(..., 8, 8)``,
      ``z``: ``(..., z_dim)`` (broadcast over the batch).
    - ``params``: the network parameters.
    - ``class_embeddings``: ``(10, z_dim)``, the learned conditioning of each digit; the
      conditioning of an image is the embedding of its digit, ``z_for(labels)``.
    """

    def __init__(self, net, params, class_embeddings, meta=None):
        self.net = net
        self.params = params
        self.class_embeddings = class_embeddings
        self.schedule = VPLinear()
        self.meta = meta or {}
        apply = net.apply

        def eps_fn(params, x, t, z):
            return apply({"params": params}, x, t, z)

        self.eps_fn = eps_fn

    @property
    def z_dim(self) -> int:
        return int(self.class_embeddings.shape[-1])

    def z_for(self, labels):
        """The conditioning of digits ``labels`` (int array) -> ``labels.shape + (z_dim,)``."""
        labels = np.asarray(labels)
        if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
            raise ValueError(f"z_for: labels must be digits 0..9, got {labels}.")
        return self.class_embeddings[labels]

    def generate(self, labels, key, *, steps: int = 20, solver=DDIM(), dtype=jnp.float32):
        """Sample one image per label with ``steps`` steps of ``solver`` (x_T from ``key``)."""
        labels = np.asarray(labels)
        x_T = jax.random.normal(key, labels.shape + IMAGE_SHAPE, dtype)
        ts = time_grid(self.schedule, steps)
        z = self.z_for(labels).astype(dtype)
        return sample(
            self.eps_fn, self.params, x_T, z, schedule=self.schedule, ts=ts, solver=solver
        )


class Verifier:
    """A digit 'recognition' network standing in for face recognition.

    ``embed(x)``: L2-normalised embeddings of images ``(..., 8, 8)``; ``score(a, b)``: cosine
    similarity; ``threshold``: accept a pair as the same identity (digit) when
    ``score > threshold``, set at 0.1% false-match rate on the validation split.
    """

    def __init__(self, name, net, params, threshold, meta=None):
        self.name = name
        self.net = net
        self.params = params
        self.threshold = float(threshold)
        self.meta = meta or {}
        apply = net.apply
        self._embed = jax.jit(lambda p, x: apply({"params": p}, x))

    def embed(self, x, params=None):
        """Unit-norm embeddings; differentiable (pass ``params`` to differentiate them)."""
        return self.net.apply({"params": self.params if params is None else params}, x)

    def score(self, a, b):
        """Cosine similarity of the embeddings of ``a`` and ``b`` (broadcast)."""
        ea, eb = self._embed(self.params, a), self._embed(self.params, b)
        return jnp.sum(ea * eb, axis=-1)

    def accepts(self, a, b):
        """Whether the verifier matches ``a`` with ``b`` (same identity) at its threshold."""
        return self.score(a, b) > self.threshold

    def __repr__(self):
        return f"Verifier({self.name!r}, {type(self.net).__name__}, threshold={self.threshold:.4f})"


_X = jax.ShapeDtypeStruct((1,) + IMAGE_SHAPE, jnp.float32)
_T = jax.ShapeDtypeStruct((), jnp.float32)


def load_denoiser(weights_dir=None) -> Denoiser:
    """Load the diffusion model (default: the bundled weights; see ``$JADEIS_DIGITS_WEIGHTS``).

    Raises :class:`jadeis.digits.WeightsError` on a missing, corrupt or mismatched file.
    """
    path = Path(weights_dir or default_weights_dir()) / DENOISER_FILE

    def inputs(record):
        z_dim = int(np.shape(record["extra"]["class_embeddings"])[-1])
        return (_X, _T, jax.ShapeDtypeStruct((1, z_dim), jnp.float32))

    net, params, record = load_record(path, kind="denoiser", example_inputs=inputs)
    return Denoiser(net, params, jnp.asarray(record["extra"]["class_embeddings"]), record)


def load_verifiers(weights_dir=None) -> tuple[Verifier, ...]:
    """Load the three verifiers (the first guides the morphs, all three judge them)."""
    d = Path(weights_dir or default_weights_dir())
    out = []
    for fname in VERIFIER_FILES:
        net, params, record = load_record(d / fname, kind="verifier", example_inputs=(_X,))
        out.append(Verifier(record["name"], net, params, record["extra"]["threshold"], record))
    return tuple(out)
