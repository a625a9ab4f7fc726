"""The morphing attack of the AdjointDEIS paper, in the digits setting.

Identities: an identity is a digit class. A verifier accepts a pair of images as the same
identity when the cosine similarity of their embeddings exceeds its threshold, set at 0.1%
false-match rate (FMR) on the validation split's impostor pairs (pairs of different digits).

A morph of two source images ``a`` and ``b`` of *different* digits succeeds against a verifier
when it is accepted both with ``a`` and with ``b``; MMPMR (mated morph presentation match
rate) is the share of morphs that succeed. Source pairs are look-alikes, as a morph attacker
would pick: for each of the 45 pairs of digits, the two test-split images (one of each digit)
closest in pixel space among those every verifier rejects as a pair. ``k`` of these 45 pairs
are used, spread from the closest to the farthest (:func:`select_pairs`), so that MMPMR covers
the difficulty range rather than only near-identical look-alikes.
"""

from __future__ import annotations

import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jadeis import (
    DDIM,
    AdjointDEIS,
    DiscreteAdjoint,
    IterationBar,
    ReversibleAdjoint,
    Rex,
    RexLatent,
    SDEDPMSolver,
    Truncated,
    encode_ode,
    encode_sde,
    greedy_sample,
    guide,
    sample,
    solve,
    time_grid,
)

from ._data import load_split
from ._nets import NUM_CLASSES


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    sampler: str
    gradient: str


METHODS = (
    Method("pixel", "Pixel average", "-", "-"),
    Method("latent", "Latent interpolation (no optimisation)", "DDIM", "-"),
    Method("greedy", "Greedy-DiM*", "DDIM", "greedy: noise, 50 x Adam, L*_ID"),
    Method("adjointdeis1_ode", "AdjointDEIS-1 (ODE)", "DDIM", "AdjointDEIS(order=1)"),
    Method("adjointdeis2_ode", "AdjointDEIS-2 (ODE)", "DDIM", "AdjointDEIS(order=2)"),
    Method("adjointdeis1_sde", "AdjointDEIS-1 (SDE)", "SDE-DPM-Solver-1", "AdjointDEIS(order=1)"),
    Method("discrete", "DiscreteAdjoint", "DDIM", "DiscreteAdjoint()"),
    Method(
        "hybrid",
        "DiscreteAdjoint + Greedy-DiM* final sample",
        "DDIM",
        "DiscreteAdjoint(), then greedy (hinge)",
    ),
    Method("truncated", "Truncated (K = N/2)", "DDIM", "Truncated(N/2, x_T_gradient='linear')"),
    Method("rex", "Rex (exact inversion)", "Rex (midpoint)", "ReversibleAdjoint()"),
)
#: the Rex row's solver: the default (midpoint base scheme, coupling 0.999)
REX = Rex()
METHOD_KEYS = tuple(m.key for m in METHODS)


@dataclass(frozen=True)
class GreedySettings:
    """A greedy sample's settings: ``inner`` Adam steps (``lr``, ``b1``, ``b2``) on the noise
    prediction at each of the N DDIM steps, the iterate of least loss kept per morph."""

    inner: int
    lr: float
    b1: float = 0.5
    b2: float = 0.9
    #: the hinge's margin above the guiding verifier's threshold (the hybrid's loss)
    margin: float = 0.0

    def optimizer(self):
        return optax.adam(self.lr, b1=self.b1, b2=self.b2)


#: Greedy-DiM*'s published settings (Blasingame & Liu, IJCB 2024), with its loss L*_ID
GREEDY = GreedySettings(inner=50, lr=0.01)
#: the hybrid's final greedy sample: a hinge just above verifier a's threshold, so morphs that
#: already pass with the margin keep the model's predictions (bitwise)
HYBRID = GreedySettings(inner=50, lr=0.025, margin=0.04)
#: how many of the DiscreteAdjoint row's iterations the hybrid takes (at most --iters)
HYBRID_ITERS = 20


def ranked_pairs(verifiers: Sequence = ()) -> list[tuple[float, int, int]]:
    """``(pixel distance, a, b)`` of the 45 look-alike pairs (indices into the test split),
    closest (hardest to tell apart) first: for each pair of digits, the two test images (one
    of each digit) closest in pixel space among the pairs that every verifier in
    ``verifiers`` rejects (the attack needs two identities that the systems tell apart)."""
    images, labels = load_split("test")
    flat = images.reshape(len(images), -1).astype(np.float64)
    d = ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(-1)
    x = jnp.asarray(images, jnp.float32)
    for v in verifiers:
        d[np.asarray(v.accepts(x[:, None], x[None, :]))] = np.inf
    out = []
    for c1 in range(NUM_CLASSES):
        for c2 in range(c1 + 1, NUM_CLASSES):
            i1, i2 = np.flatnonzero(labels == c1), np.flatnonzero(labels == c2)
            sub = d[np.ix_(i1, i2)]
            r, c = np.unravel_index(np.argmin(sub), sub.shape)
            out.append((float(sub[r, c]), int(i1[r]), int(i2[c])))
    out.sort()
    return out


def candidate_pairs(verifiers: Sequence = ()) -> list[tuple[int, int]]:
    """The 45 look-alike pairs of :func:`ranked_pairs`, closest first, without distances."""
    return [(a, b) for _, a, b in ranked_pairs(verifiers)]


NUM_PAIRS = NUM_CLASSES * (NUM_CLASSES - 1) // 2


def spread_ranks(k: int, n: int = NUM_PAIRS) -> list[int]:
    """``k`` ranks out of ``n`` spread evenly from the closest (0) to the farthest (n - 1)."""
    if not 1 <= k <= n:
        raise ValueError(f"the number of pairs must be between 1 and {n}, got {k}.")
    return [int(r) for r in np.round(np.linspace(0, n - 1, k)).astype(int)] if k > 1 else [0]


def select_pairs(k: int, verifiers: Sequence = ()) -> list[tuple[int, int]]:
    """``k`` of the 45 look-alike pairs of different digits (1 <= k <= 45), spread over the
    difficulty range: ranks :func:`spread_ranks` of the pairs sorted closest first (so ``k = 2``
    gives the closest and the farthest pair, not two near-identical look-alikes)."""
    ranked = candidate_pairs(verifiers)
    return [ranked[r] for r in spread_ranks(k, len(ranked))]


def slerp(a, b, w: float = 0.5):
    """Spherical interpolation of ``a`` and ``b`` per example (over all but the leading axis)."""
    axes = tuple(range(1, a.ndim))
    na = jnp.sqrt(jnp.sum(a * a, axis=axes, keepdims=True))
    nb = jnp.sqrt(jnp.sum(b * b, axis=axes, keepdims=True))
    cos = jnp.clip(jnp.sum(a * b, axis=axes, keepdims=True) / (na * nb), -1.0, 1.0)
    theta = jnp.arccos(cos)
    s = jnp.sin(theta)
    safe = s > 1e-6
    s = jnp.where(safe, s, 1.0)
    wa = jnp.where(safe, jnp.sin((1 - w) * theta) / s, 1 - w)
    wb = jnp.where(safe, jnp.sin(w * theta) / s, w)
    return wa * a + wb * b


def shard_batch(tree, mesh: Mesh | None = None, axis: int = 0):
    """Place every array of ``tree`` on all devices, split along ``axis`` (the batch).

    The batch size must be a multiple of the device count (see :func:`run_morphs`, which pads).
    """
    mesh = mesh or Mesh(np.array(jax.devices()), ("batch",))
    spec = P(*([None] * axis + ["batch"]))
    return jax.device_put(tree, NamedSharding(mesh, spec))


@dataclass
class MethodResult:
    method: Method
    morphs: np.ndarray  # (B, 8, 8)
    accepted: np.ndarray  # (num_verifiers, B) bool: accepted with both sources
    steps: int
    nfe: int
    seconds: float
    losses: np.ndarray | None = None  # (iters + 1, B)
    loss_evals: int = 0  # the loss network's evaluations per morph
    loss_vjps: int = 0  # ... and its vector-Jacobian products
    iters: int = 0  # guidance iterations (0: none)
    progress: np.ndarray | None = None  # (iters, B, 8, 8)
    devices: int = 1  # how many devices the batch of morphs was computed on

    @property
    def mmpmr(self) -> np.ndarray:
        return self.accepted.mean(axis=1)


@dataclass
class MorphReport:
    pairs: list
    sources_a: np.ndarray
    sources_b: np.ndarray
    labels_a: np.ndarray
    labels_b: np.ndarray
    verifier_names: list
    results: list = field(default_factory=list)
    #: per verifier, the pairs whose embedding bisector clears its threshold (see ceilings())
    ceilings: np.ndarray | None = None

    def table(self) -> str:
        """The results as a Markdown table: MMPMR in % per verifier (the first one guides),
        with the number of morphs accepted; the first row is each verifier's ceiling."""
        names = [
            f"MMPMR {n}{' (guide)' if i == 0 else ''}" for i, n in enumerate(self.verifier_names)
        ]
        head = ["method", "sampler", "gradient", "N", "NFE", "loss net", *names, "final loss"]
        rows = []
        n_pairs = len(self.pairs)
        if self.ceilings is not None:
            rows.append(
                ["Ceiling (bisector clears the threshold)", "-", "-", "-", "-", "-"]
                + [f"{100 * c / n_pairs:.1f}% ({c})" for c in self.ceilings]
                + ["-"]
            )
        for r in self.results:
            loss = "-" if r.losses is None else f"{float(np.mean(r.losses[-1])):.3f}"
            counts = r.accepted.sum(axis=1)
            rows.append(
                [
                    r.method.label,
                    r.method.sampler,
                    r.method.gradient,
                    str(r.steps) if r.steps else "-",
                    str(r.nfe),
                    f"{r.loss_evals} + {r.loss_vjps}",
                    *[f"{100 * v:.1f}% ({c})" for v, c in zip(r.mmpmr, counts)],
                    loss,
                ]
            )
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
        fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
        lines = [fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        return "\n".join(lines + [fmt(row) for row in rows])

    def as_dict(self) -> dict:
        return {
            "pairs": [list(p) for p in self.pairs],
            "labels": [[int(a), int(b)] for a, b in zip(self.labels_a, self.labels_b)],
            "verifiers": list(self.verifier_names),
            "ceilings": None
            if self.ceilings is None
            else {n: int(c) for n, c in zip(self.verifier_names, self.ceilings)},
            "results": [
                {
                    "method": r.method.label,
                    "key": r.method.key,
                    "sampler": r.method.sampler,
                    "gradient": r.method.gradient,
                    "steps": r.steps,
                    "iterations": r.iters,
                    "nfe": r.nfe,
                    "loss_net_evals": r.loss_evals,
                    "loss_net_vjps": r.loss_vjps,
                    "mmpmr": {n: float(v) for n, v in zip(self.verifier_names, r.mmpmr)},
                    "accepted": {
                        n: int(c) for n, c in zip(self.verifier_names, r.accepted.sum(axis=1))
                    },
                    "seconds": round(r.seconds, 2),
                    "final_loss": None if r.losses is None else float(np.mean(r.losses[-1])),
                }
                for r in self.results
            ],
        }


def identity_loss(embed, x_0, e_a, e_b):
    """(1 - cos(e(x_0), e(a))) + (1 - cos(e(x_0), e(b))) per example (unit embeddings)."""
    e = embed(jnp.clip(x_0, -1.0, 1.0))
    return (1.0 - jnp.sum(e * e_a, axis=-1)) + (1.0 - jnp.sum(e * e_b, axis=-1))


def _cosines(embed, x_0, e_a, e_b):
    e = embed(jnp.clip(x_0, -1.0, 1.0))
    return jnp.sum(e * e_a, axis=-1), jnp.sum(e * e_b, axis=-1)


def identity_loss_star(embed, x_0, e_a, e_b):
    """Greedy-DiM*'s L*_ID = (1 - c_a) + (1 - c_b) + |c_a - c_b| = 2 (1 - min(c_a, c_b)) per
    example (c: the cosine of the morph's embedding to each source's)."""
    c_a, c_b = _cosines(embed, x_0, e_a, e_b)
    return (1.0 - c_a) + (1.0 - c_b) + jnp.abs(c_a - c_b)


def hinge_loss(embed, level, x_0, e_a, e_b):
    """relu(level - c_a) + relu(level - c_b) per example: zero once the morph's cosine to both
    sources exceeds ``level`` (the verifier's threshold plus a margin)."""
    c_a, c_b = _cosines(embed, x_0, e_a, e_b)
    return jax.nn.relu(level - c_a) + jax.nn.relu(level - c_b)


def ceilings(verifiers, a, b) -> np.ndarray:
    """Per verifier, how many pairs ``(a[i], b[i])`` a morph could pass at all: those whose
    bisector of the two sources' unit embeddings clears the threshold,
    ``sqrt((1 + cos(e(a), e(b))) / 2) > threshold``. That is the largest min(cos to a, cos to
    b) of any unit vector, so no image, however found, passes a pair outside it."""
    out = []
    for v in verifiers:
        c = np.asarray(jnp.sum(v.embed(a) * v.embed(b), axis=-1), np.float64)
        out.append(int(np.sum(np.sqrt((1.0 + c) / 2.0) > v.threshold)))
    return np.array(out)


def _accepted(verifiers, morphs, a, b):
    morphs = jnp.clip(jnp.asarray(morphs), -1.0, 1.0)
    return np.stack([np.asarray(v.accepts(morphs, a) & v.accepts(morphs, b)) for v in verifiers])


def run_morphs(
    denoiser,
    verifiers: Sequence,
    pairs: Sequence[tuple[int, int]],
    *,
    steps: int = 20,
    iters: int = 30,
    lr: float = 0.05,
    methods: Sequence[str] = METHOD_KEYS,
    seed: int = 0,
    progress: bool = True,
    shard: bool = True,
    keep_progress: bool = True,
) -> MorphReport:
    """Morph each pair of test-split images with each method and judge with every verifier.

    The optimised methods start from the spherical interpolation of the two encoded
    ``x_T`` (DDIM inversion; for the SDE, Cycle-SDE encoding and the interpolation of the
    two noise sequences too; for ``"rex"``, exact Rex encoding, a :class:`jadeis.RexLatent`
    whose two states are interpolated separately) and the mean of the two conditionings
    ``z``, and minimise the identity loss of ``verifiers[0]`` over ``(x_T, z)`` with Adam
    (``lr``) for ``iters`` iterations through ``steps`` sampling steps. The other rows:

    - ``"greedy"``: Greedy-DiM* with its published settings (:data:`GREEDY`): one DDIM sample
      from the same start whose noise prediction is optimised at every step for L*_ID
      (:func:`identity_loss_star`) by :func:`jadeis.greedy_sample`;
    - ``"hybrid"``: the DiscreteAdjoint row's ``(x_T, z)`` after ``min(HYBRID_ITERS, iters)``
      iterations (the same run, no extra iterations when that row runs too), then the final
      sample taken greedily (:data:`HYBRID`: a hinge just above verifier a's threshold);
    - ``"truncated"``: ``Truncated(N // 2, x_T_gradient="linear")``, with as many iterations
      as the exact rows' model evaluations buy (``iters * 2N // (N + N // 2)``).

    NFE counts the diffusion model's evaluations per morph (a vector-Jacobian product counts
    one), from the :class:`jadeis.Stats` of the row's sampler and strategy: encoding (two
    inversions, as many evaluations as a sampling pass each), per iteration the forward pass
    plus the gradient's evaluations and VJPs, and the final sample. The loss network's
    evaluations and VJPs are counted apart: one of each per iteration, and a greedy sample's
    own (:class:`jadeis.GreedySolution`).

    With ``shard=True`` and several devices the batch of morphs is split over all of them
    (``jax.sharding``), padded to a multiple of the device count; the results do not depend on
    the device count.
    """
    unknown = [m for m in methods if m not in METHOD_KEYS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {METHOD_KEYS}.")
    images, labels = load_split("test")
    ia = np.array([p[0] for p in pairs])
    ib = np.array([p[1] for p in pairs])
    nb = len(pairs)
    ndev = len(jax.devices()) if shard else 1
    padded = -(-nb // ndev) * ndev
    pad = lambda v: np.concatenate([v, np.repeat(v[-1:], padded - nb, axis=0)], axis=0)
    a = jnp.asarray(pad(images[ia]), jnp.float32)
    b = jnp.asarray(pad(images[ib]), jnp.float32)
    z_a = jnp.asarray(denoiser.z_for(pad(labels[ia])), jnp.float32)
    z_b = jnp.asarray(denoiser.z_for(pad(labels[ib])), jnp.float32)
    if ndev > 1:  # on one device a mesh adds nothing (and made guide compile its step twice)
        a, b, z_a, z_b = shard_batch((a, b, z_a, z_b))
    report = MorphReport(
        list(pairs), images[ia], images[ib], labels[ia], labels[ib], [v.name for v in verifiers]
    )
    report.ceilings = ceilings(verifiers, a[:nb], b[:nb])
    guide_v = verifiers[0]
    embed = guide_v.embed
    e_a, e_b = embed(a), embed(b)
    sch, eps_fn, params = denoiser.schedule, denoiser.eps_fn, denoiser.params
    ts = time_grid(sch, steps)
    z_mid = 0.5 * (z_a + z_b)
    cache = {}
    unpad = lambda v: None if v is None else np.asarray(v)[..., :nb, :, :]

    def latent_ode():
        if "ode" not in cache:
            enc = lambda x, z: encode_ode(eps_fn, params, x, z, schedule=sch, ts=ts)
            cache["ode"] = slerp(enc(a, z_a), enc(b, z_b))
        return cache["ode"]

    def latent_rex():
        # exact encoding: each source's RexLatent maps back to the source (up to rounding);
        # the start of the optimisation interpolates both coupled states
        enc = lambda x, z: encode_ode(eps_fn, params, x, z, schedule=sch, ts=ts, solver=REX)
        la, lb = enc(a, z_a), enc(b, z_b)
        return RexLatent(slerp(la.x, lb.x), slerp(la.xh, lb.xh), la.num_steps, la.solver)

    def cost(solver, adjoint, **kw):
        """``(forward evaluations, evaluations + VJPs of a gradient)`` of one sampling run,
        from its Stats (one example: the counts do not depend on the batch)."""
        key = (solver, adjoint)
        if key not in cache:
            x1 = jnp.zeros((1,) + a.shape[1:], jnp.float32)
            sol = solve(
                eps_fn,
                params,
                x1,
                z_mid[:1],
                schedule=sch,
                ts=ts,
                solver=solver,
                adjoint=adjoint,
                **kw,
            )
            st = sol.stats
            cache[key] = (int(st.model_evals), int(st.grad_model_evals) + int(st.grad_vjps))
        return cache[key]

    def nfe_of(solver, adjoint, n_iters, **kw):
        fwd, grad = cost(solver, adjoint, **kw)
        return 2 * fwd + n_iters * (fwd + grad) + fwd  # encode both, iterate, final sample

    loss_fn = lambda x0, ea, eb: identity_loss(embed, x0, ea, eb)
    greedy_loss = lambda x0, ea, eb: identity_loss_star(embed, x0, ea, eb)
    level = guide_v.threshold + HYBRID.margin
    hinge = lambda x0, ea, eb: hinge_loss(embed, level, x0, ea, eb)
    hybrid_iters = min(HYBRID_ITERS, iters)
    captured = {}

    def capture(i, state):
        if i + 1 == hybrid_iters:  # the values after hybrid_iters updates
            captured["x_T"], captured["z"] = state.inputs["x_T"], state.inputs["z"]
        return False

    def run_guide(label, x_T, n_iters, solver, adjoint, callback=None, **kw):
        bar = IterationBar(n_iters, label, disable=not progress)

        def cb(i, state):
            if callback is not None:
                callback(i, state)
            return bar.callback(i, state)

        try:
            return guide(
                loss_fn,
                eps_fn,
                params,
                x_T,
                z_mid,
                schedule=sch,
                ts=ts,
                optimizer=optax.adam(lr),
                num_iters=n_iters,
                wrt=("x_T", "z"),
                solver=solver,
                adjoint=adjoint,
                loss_args=(e_a, e_b),
                progress=False,
                callback=cb,
                keep_x0=keep_progress,
                **kw,
            )
        finally:
            bar.close()

    def greedy(loss, settings, x_T, z):
        return greedy_sample(
            loss,
            eps_fn,
            params,
            x_T,
            z,
            schedule=sch,
            ts=ts,
            optimizer=settings.optimizer(),
            inner_steps=settings.inner,
            solver=DDIM(),
            loss_args=(e_a, e_b),
        )

    for key in methods:
        m = next(mm for mm in METHODS if mm.key == key)
        t0 = time.perf_counter()
        losses = hist = None
        n_used, nfe, n_iters, loss_evals, loss_vjps = steps, 0, 0, 0, 0
        if key == "pixel":
            morphs, n_used = 0.5 * (a + b), 0
        elif key == "latent":
            morphs = sample(eps_fn, params, latent_ode(), z_mid, schedule=sch, ts=ts, solver=DDIM())
            nfe = nfe_of(DDIM(), DiscreteAdjoint(), 0)
        elif key == "greedy":
            sol = greedy(greedy_loss, GREEDY, latent_ode(), z_mid)
            morphs = sol.x_0
            fwd = int(sol.stats.model_evals)
            nfe = 2 * fwd + fwd  # encode both sources, then the greedy sample
            loss_evals, loss_vjps = int(sol.loss_evals), int(sol.loss_vjps)
        elif key == "hybrid":
            if hybrid_iters == 0:
                captured["x_T"], captured["z"] = latent_ode(), z_mid
            elif "x_T" not in captured:  # the DiscreteAdjoint row did not run
                run_guide(m.label, latent_ode(), hybrid_iters, DDIM(), DiscreteAdjoint(), capture)
            sol = greedy(hinge, HYBRID, captured["x_T"], captured["z"])
            morphs, n_iters = sol.x_0, hybrid_iters
            nfe = nfe_of(DDIM(), DiscreteAdjoint(), n_iters)
            loss_evals = n_iters + int(sol.loss_evals)
            loss_vjps = n_iters + int(sol.loss_vjps)
        else:
            kw = {}
            callback = None
            n_iters = iters
            if key == "adjointdeis1_sde":
                solver, adjoint = SDEDPMSolver(), AdjointDEIS(order=1)
                k_a, k_b = jax.random.split(jax.random.key(seed))
                (xa, na), (xb, nb_) = (
                    encode_sde(eps_fn, params, x, z, schedule=sch, ts=ts, solver=solver, key=k)
                    for x, z, k in ((a, z_a, k_a), (b, z_b, k_b))
                )
                x_T = slerp(xa, xb)
                kw["noise"] = jax.vmap(slerp)(na, nb_)
            elif key == "rex":
                solver, adjoint = REX, ReversibleAdjoint()
                x_T = latent_rex()
            elif key == "truncated":
                k = max(1, steps // 2)
                solver, adjoint = DDIM(), Truncated(k, x_T_gradient="linear")
                n_iters = iters * 2 * steps // (steps + k)
                x_T = latent_ode()
            else:
                solver = DDIM()
                adjoint = {
                    "adjointdeis1_ode": AdjointDEIS(order=1),
                    "adjointdeis2_ode": AdjointDEIS(order=2),
                    "discrete": DiscreteAdjoint(),
                }[key]
                x_T = latent_ode()
                if key == "discrete":
                    callback = capture
            res = run_guide(m.label, x_T, n_iters, solver, adjoint, callback, **kw)
            morphs, losses, hist = res.x_0, res.losses[:, :nb], res.x0_history
            cost_kw = {"noise": kw["noise"][:, :1]} if "noise" in kw else {}
            nfe = nfe_of(solver, adjoint, n_iters, **cost_kw)
            loss_evals = loss_vjps = n_iters
        morphs = jnp.asarray(morphs)
        n_dev = len(morphs.sharding.device_set)
        accepted = _accepted(verifiers, morphs, a, b)[:, :nb]
        report.results.append(
            MethodResult(
                m,
                unpad(morphs),
                accepted,
                n_used,
                nfe,
                time.perf_counter() - t0,
                losses,
                progress=unpad(hist),
                devices=n_dev,
                loss_evals=loss_evals,
                loss_vjps=loss_vjps,
                iters=n_iters,
            )
        )
    return report


def verdicts(accepted) -> str:
    """Each verifier's verdict on one morph, e.g. ``"a✓ b✗ c✓"`` (✓: accepted with both
    sources)."""
    return " ".join(f"{'abcdefgh'[k]}{'✓' if ok else '✗'}" for k, ok in enumerate(accepted))


def save_figure(report: MorphReport, path, *, max_rows: int = 6, snapshots: int = 6):
    """PNG: per pair, the two sources, every method's morph (accepting verifiers marked), and
    the optimisation progress of the first optimised method."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = min(max_rows, len(report.pairs))
    opt = [r for r in report.results if r.progress is not None]
    prog = opt[0] if opt else None
    n_snap = 0
    if prog is not None:
        n_iter = prog.progress.shape[0]
        snap_idx = np.unique(np.linspace(0, n_iter - 1, min(snapshots, n_iter)).round().astype(int))
        n_snap = len(snap_idx)
    cols = 2 + len(report.results) + n_snap
    fig, axes = plt.subplots(rows, cols, figsize=(1.15 * cols, 1.45 * rows + 0.8), squeeze=False)

    def short(label):
        label = label.replace(" (no optimisation)", "").replace("interpolation", "interp.")
        label = label.replace("Greedy-DiM* final sample", "greedy final")
        return textwrap.fill(label, 16)

    for i in range(rows):
        cells = [
            (report.sources_a[i], f"a: digit {report.labels_a[i]}", ""),
            (report.sources_b[i], f"b: digit {report.labels_b[i]}", ""),
        ]
        for r in report.results:
            cells.append((r.morphs[i], short(r.method.label), verdicts(r.accepted[:, i])))
        if prog is not None:
            for j in snap_idx:
                loss = float(prog.losses[j, i])
                cells.append((prog.progress[j, i], f"iter {j}", f"loss {loss:.2f}"))
        for j, (im, title, xlabel) in enumerate(cells):
            ax = axes[i, j]
            ax.imshow(
                np.clip(np.asarray(im), -1, 1),
                cmap="gray_r",
                vmin=-1,
                vmax=1,
                interpolation="nearest",
            )
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(xlabel, fontsize=6)
            if i == 0 or j < 2:
                ax.set_title(title, fontsize=6)
    suptitle = "digit morphs; a✓ / a✗: verifier a accepts / rejects the morph as both sources"
    if prog is not None:
        suptitle += f"; progress: {prog.method.label}"
    fig.suptitle(suptitle, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_quality_plot(report: MorphReport, path):
    """PNG: every row's MMPMR on each verifier against its NFE (log scale; the legend gives
    each row's NFE and the loss network's evaluations + VJPs), each verifier's ceiling as a
    dashed line."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n_v = len(report.verifier_names)
    n_pairs = len(report.pairs)
    fig, axes = plt.subplots(1, n_v, figsize=(4.2 * n_v, 4.4), sharey=True, squeeze=False)
    markers = "osD^v<>ph*XP"
    # rows at the same NFE are drawn side by side (a small spread on the log axis)
    same = {}
    for j, r in enumerate(report.results):
        same.setdefault(max(r.nfe, 1), []).append(j)
    spread = {}
    for x, js in same.items():
        for rank, j in enumerate(js):
            spread[j] = x * 1.07 ** (rank - (len(js) - 1) / 2)
    for k, ax in enumerate(axes[0]):
        if report.ceilings is not None:
            c = 100 * report.ceilings[k] / n_pairs
            ax.axhline(c, color="0.4", ls="--", lw=1)
            ax.text(1.05, c + 1.2, f"ceiling {c:.1f}%", fontsize=7, color="0.3")
        for j, r in enumerate(report.results):
            y = 100 * r.mmpmr[k]
            label = f"{r.method.label}: NFE {r.nfe}, loss net {r.loss_evals} + {r.loss_vjps}"
            ax.scatter(spread[j], y, marker=markers[j % len(markers)], s=42, label=label, zorder=3)
        ax.set_xscale("log")
        ax.set_xlim(0.8, 4 * max(max(r.nfe for r in report.results), 10))
        ax.set_ylim(0, 105)
        ax.grid(True, which="both", alpha=0.3)
        guide = " (guides)" if k == 0 else ""
        ax.set_title(f"{report.verifier_names[k]}{guide}", fontsize=9)
        ax.set_xlabel("NFE per morph (log; the pixel average at 1)", fontsize=8)
        if k == 0:
            ax.set_ylabel(f"MMPMR (%), {n_pairs} pairs")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="lower center", ncol=min(2, len(labels)), fontsize=7, frameon=False
    )
    rows = -(-len(labels) // 2)
    fig.suptitle("morph quality per NFE: every method of jadeis demo", fontsize=10)
    fig.tight_layout(rect=(0, 0.035 * rows + 0.02, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
