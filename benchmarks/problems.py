"""Benchmark problems: each has a model eps_fn(params, x, t, z), inputs, a loss on x_0, and a
float64 reference for x_0 and for the gradients dL/dx_T, dL/dz, dL/dparams.

1. ``gaussian``: data N(mu, s^2 I); the probability-flow ODE is solved in closed form.
2. ``mixture``: a 64-dimensional Gaussian mixture with small component variance (exact eps from
   the mixture posterior; stiff near t = 0). Reference: two very tight float64 solves
   (jadeis DPM-Solver++(3) with DiscreteAdjoint at very large N, and diffrax Tsit5 at
   rtol = atol = 1e-10 differentiated by RecursiveCheckpointAdjoint), checked against each other.
3. ``mlp``: a small conditional MLP noise model trained here on a mixture (cached on disk in
   ``benchmarks/.cache/``); reference as for the mixture.
4. ``digits``: the bundled digits model, when ``jadeis.digits`` provides one.
5. ``unet``: a convolutional U-Net (``unet.py``, flax, ~2.3 M parameters, random weights in
   EDM preconditioning, float32 inside) on 32x32x3 images with a continuous conditioning
   vector. Reference: UniPC(3) with DiscreteAdjoint at N = 256, checked against
   DPM-Solver++(3) at N = 256 (diffrax Tsit5 at 1e-7 is too slow on CPU for this model).

Each problem also has ``train_inputs(seed) -> (x_T, z)``: other inputs from the same
distribution as the benchmark's, on which ``grids.py`` learns time grids (the benchmark's own
x_T stay held out).

Everything runs in float64 (``jax_enable_x64`` is switched on by ``run.py``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import common as C
import jadeis

CACHE = Path(__file__).resolve().parent / ".cache"


@dataclasses.dataclass
class Problem:
    name: str
    description: str
    schedule: Any
    eps_fn: Callable
    params: Any
    z: Any
    x_T: Any
    loss_fn: Callable  # loss_fn(x_0) -> scalar
    stiff: bool = False
    reference: dict | None = None  # {"x0", "x_T", "z", "params"}
    reference_check: dict | None = None  # relative differences between two references
    info: dict = dataclasses.field(default_factory=dict)
    # train_inputs(seed) -> (x_T, z): inputs of the benchmark's distribution, other than its
    # own (grids.py learns time grids on them)
    train_inputs: Callable | None = None


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| over all leaves of two pytrees."""
    la = [np.ravel(np.asarray(v, np.float64)) for v in jax.tree.leaves(a)]
    lb = [np.ravel(np.asarray(v, np.float64)) for v in jax.tree.leaves(b)]
    da = np.concatenate(la) - np.concatenate(lb)
    nb = np.linalg.norm(np.concatenate(lb))
    return float(np.linalg.norm(da) / max(nb, 1e-300))


def guidance_loss(target):
    def loss_fn(x_0):
        return 0.5 * jnp.sum((x_0 - target) ** 2)

    return loss_fn


# ----------------------------------------------------------------------------------------
# 1. Gaussian data


def gaussian_problem(dim: int = 16, batch: int = 8, seed: int = 0) -> Problem:
    sch = jadeis.VPLinear()
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    mu = 0.5 * jax.random.normal(k1, (dim,), jnp.float64)
    s2 = jnp.asarray(0.09, jnp.float64)
    x_T = jax.random.normal(k2, (batch, dim), jnp.float64)
    target = jax.random.normal(k3, (batch, dim), jnp.float64)
    loss_fn = guidance_loss(target)

    def eps_fn(s2, x, t, mu):
        a = sch.alpha(t).astype(x.dtype)
        s = sch.sigma(t).astype(x.dtype)
        return s * (x - a * mu) / (a**2 * s2 + s**2)

    def flow(x_T, mu, s2):
        std = lambda t: jnp.sqrt(sch.alpha(t) ** 2 * s2 + sch.sigma(t) ** 2)
        t0, t1 = sch.t_max, sch.t_min
        return sch.alpha(t1) * mu + (x_T - sch.alpha(t0) * mu) * std(t1) / std(t0)

    def total(x_T, mu, s2):
        x0 = flow(x_T, mu, s2)
        return loss_fn(x0), x0

    (_, x0), (gx, gz, gp) = jax.value_and_grad(total, argnums=(0, 1, 2), has_aux=True)(x_T, mu, s2)
    ref = {"x0": x0, "x_T": gx, "z": gz, "params": gp}
    return Problem(
        name="gaussian",
        description=f"Gaussian data N(mu, 0.09 I), d={dim}, batch {batch}, exact flow map",
        schedule=sch,
        eps_fn=eps_fn,
        params=s2,
        z=mu,
        x_T=x_T,
        loss_fn=loss_fn,
        reference=ref,
        reference_check={"method": "closed form", "x0": 0.0, "grad": 0.0},
        info={"dim": dim, "batch": batch},
    )


# ----------------------------------------------------------------------------------------
# 2. Gaussian mixture with small component variance


def mixture_eps_fn(schedule):
    """eps of the mixture sum_k softmax(z)_k N(means_k, exp(log_s2) I), exactly."""

    def eps_fn(params, x, t, logits):
        means, log_s2 = params["means"], params["log_s2"]
        a = schedule.alpha(t).astype(x.dtype)
        s = schedule.sigma(t).astype(x.dtype)
        v = a**2 * jnp.exp(log_s2) + s**2
        d2 = (
            jnp.sum(x**2, -1, keepdims=True)
            - 2 * a * x @ means.T
            + a**2 * jnp.sum(means**2, -1)[None, :]
        )
        r = jax.nn.softmax(jax.nn.log_softmax(logits)[None, :] - d2 / (2 * v), axis=-1)
        return s * (x - a * r @ means) / v

    return eps_fn


def mixture_problem(
    dim: int = 64, components: int = 16, batch: int = 16, std: float = 0.02, seed: int = 1
) -> Problem:
    sch = jadeis.VPLinear()
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    means = jax.random.normal(k1, (components, dim), jnp.float64)
    logits = 0.3 * jax.random.normal(k2, (components,), jnp.float64)
    params = {"means": means, "log_s2": jnp.asarray(2 * np.log(std), jnp.float64)}
    target = jax.random.normal(k4, (batch, dim), jnp.float64)
    eps_fn = mixture_eps_fn(sch)
    # Screen out initial noises whose trajectory passes (almost) through a decision boundary
    # between two components: there x_0 jumps between modes and dL/dx_T is ~1000x larger than
    # for the other samples, so the batch's gradient error would measure that one bifurcation
    # (a solver needs N ~ 1000 to put it on the right side) rather than the solver.
    ts = jadeis.time_grid(sch, 400, dtype=jnp.float64)

    def loss_c(x):
        x0 = jadeis.sample(
            eps_fn, params, x, logits, schedule=sch, ts=ts, solver=jadeis.DPMSolverPP(order=3)
        )
        return jnp.sum(x0**2)

    def screened_noise(key, size):
        cand = jax.random.normal(key, (2 * size, dim), jnp.float64)
        gnorm = np.linalg.norm(np.asarray(jax.grad(loss_c)(cand)), axis=1)
        good = np.flatnonzero(gnorm < 10 * np.median(gnorm))
        screened = int(np.sum(gnorm[: good[size - 1] + 1] >= 10 * np.median(gnorm)))
        return cand[good[:size]], screened

    x_T, screened = screened_noise(k3, batch)

    def train_inputs(seed, size=batch):
        # the same screening, other noise (z: the mixture's logits, part of the model)
        return screened_noise(jax.random.key(10_000 + seed), size)[0], logits

    return Problem(
        name="mixture",
        description=(
            f"Gaussian mixture, d={dim}, {components} components of std {std}, batch {batch}; "
            f"exact eps (stiff near t=0); {screened} near-boundary x_T screened out"
        ),
        schedule=sch,
        eps_fn=eps_fn,
        params=params,
        z=logits,
        x_T=x_T,
        loss_fn=guidance_loss(target),
        stiff=True,
        info={
            "dim": dim,
            "batch": batch,
            "components": components,
            "std": std,
            "screened_out": screened,
        },
        train_inputs=train_inputs,
    )


# ----------------------------------------------------------------------------------------
# 3. A small trained network


MLP_FREQS = (1.0, 2.0, 3.0, 4.0)  # fixed: time features [lam/4, sin(k lam/4), cos(k lam/4)]


def mlp_eps_for(schedule):
    """eps(params, x, t, z) of the trained MLP (``common.mlp_eps_fn``): an MLP on
    [x, time features of log-SNR(t)/4, z] with SiLU, output of x's shape."""
    return C.mlp_eps_fn(
        time_map=lambda t: schedule.log_snr(t) / 4.0, freqs=MLP_FREQS, raw_time=True
    )


def train_mlp(
    dim=8, components=8, std=0.05, hidden=128, depth=3, steps=2500, batch=256, seed=0, log=print
):
    """Train the conditional eps-MLP on a mixture (float32, optax Adam). Cached on disk."""
    sch = jadeis.VPLinear()
    tag = f"mlp_d{dim}_k{components}_s{std}_h{hidden}x{depth}_n{steps}_b{batch}_seed{seed}"
    path = CACHE / f"{tag}.npz"
    key = jax.random.key(seed)
    means = np.asarray(1.5 * jax.random.normal(jax.random.fold_in(key, 99), (components, dim)))
    means = means.astype(np.float32)
    sizes = [dim + 9 + components] + [hidden] * depth + [dim]
    if path.exists():
        data = np.load(path)
        layers = [(data[f"w{i}"], data[f"b{i}"]) for i in range(len(sizes) - 1)]
        return (
            {"layers": layers},
            means,
            sch,
            {"train_seconds": float(data["seconds"]), "cached": True},
        )
    log(f"  training the benchmark MLP ({steps} Adam steps, cached at {path.name}) ...")
    params = C.init_mlp(jax.random.fold_in(key, 1), sizes)
    mlp = mlp_eps_for(sch)
    opt = optax.adam(optax.cosine_decay_schedule(2e-3, steps, alpha=0.05))
    state = opt.init(params)
    means_j = jnp.asarray(means)

    def loss(p, k):
        kc, kn, kt, ke = jax.random.split(k, 4)
        c = jax.random.randint(kc, (batch,), 0, components)
        x0 = means_j[c] + std * jax.random.normal(kn, (batch, dim))
        t = jax.random.uniform(kt, (batch,), minval=sch.t_min, maxval=sch.t_max)
        e = jax.random.normal(ke, (batch, dim))
        a = sch.alpha(t)[:, None].astype(jnp.float32)
        s = sch.sigma(t)[:, None].astype(jnp.float32)
        xt = a * x0 + s * e
        zc = jax.nn.one_hot(c, components, dtype=jnp.float32)
        pred = jax.vmap(lambda xx, tt, zz: mlp(p, xx[None], tt, zz[None])[0])(xt, t, zc)
        return jnp.mean((pred - e) ** 2)

    @jax.jit
    def step(p, s, k):
        lval, g = jax.value_and_grad(loss)(p, k)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, lval

    t0 = time.perf_counter()
    for i in range(steps):
        params, state, lval = step(params, state, jax.random.fold_in(key, 10_000 + i))
        if i % 500 == 0 or i == steps - 1:
            log(f"    step {i:5d}  loss {float(lval):.4f}")
    seconds = time.perf_counter() - t0
    CACHE.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for i, (w, b) in enumerate(params["layers"]):
        arrays[f"w{i}"] = np.asarray(w)
        arrays[f"b{i}"] = np.asarray(b)
    np.savez(path, seconds=seconds, **arrays)
    layers = [(np.asarray(w), np.asarray(b)) for w, b in params["layers"]]
    return {"layers": layers}, means, sch, {"train_seconds": seconds, "cached": False}


def mlp_problem(batch: int = 64, seed: int = 2, log=print) -> Problem:
    params32, means, sch, tinfo = train_mlp(log=log)
    dim = means.shape[1]
    components = means.shape[0]
    params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), params32)
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    x_T = jax.random.normal(k1, (batch, dim), jnp.float64)
    # soft class conditioning, one vector per sample (gradients w.r.t. it are dL/dz)
    z = jax.nn.one_hot(jnp.arange(batch) % components, components, dtype=jnp.float64)
    target = jax.random.normal(k3, (batch, dim), jnp.float64)

    eps_fn = mlp_eps_for(sch)
    n_params = sum(int(np.size(v)) for v in jax.tree.leaves(params))

    def train_inputs(seed, size=batch):
        ka, kb = jax.random.split(jax.random.key(10_000 + seed))
        classes = jax.random.randint(kb, (size,), 0, components)
        return (
            jax.random.normal(ka, (size, dim), jnp.float64),
            jax.nn.one_hot(classes, components, dtype=jnp.float64),
        )

    return Problem(
        name="mlp",
        description=(
            f"conditional MLP (3x128 SiLU, {n_params} params) trained on an {components}-component "
            f"mixture in d={dim} (std 0.05), batch {batch}"
        ),
        schedule=sch,
        eps_fn=eps_fn,
        params=params,
        z=z,
        x_T=x_T,
        loss_fn=guidance_loss(target),
        stiff=True,
        info={"dim": dim, "batch": batch, "n_params": n_params, **tinfo},
        train_inputs=train_inputs,
    )


# ----------------------------------------------------------------------------------------
# 4. The bundled digits model (only if it exists)


def digits_problem(batch: int = 4, seed: int = 3, log=print) -> Problem | None:
    """The bundled conditional digits model (8x8 images). Its network computes in float32
    internally, so the reference is only as accurate as float32 evaluations allow (~1e-6)."""
    try:
        from jadeis.digits import load_denoiser  # noqa: PLC0415

        model = load_denoiser()
    except Exception as e:  # noqa: BLE001 - optional: built by another issue
        log(f"  digits model not available ({type(e).__name__}: {e}); skipped")
        return None
    k1, k2 = jax.random.split(jax.random.key(seed))
    x_T = jax.random.normal(k1, (batch, 8, 8), jnp.float64)
    labels = np.arange(batch) % 10
    z = jnp.asarray(model.z_for(labels), jnp.float64)
    target = jax.random.normal(k2, x_T.shape, jnp.float64)
    n_params = sum(int(np.size(v)) for v in jax.tree.leaves(model.params))

    def train_inputs(seed, size=batch):
        ka, kb = jax.random.split(jax.random.key(10_000 + seed))
        labels = np.asarray(jax.random.randint(kb, (size,), 0, 10))
        return (
            jax.random.normal(ka, (size, 8, 8), jnp.float64),
            jnp.asarray(model.z_for(labels), jnp.float64),
        )

    return Problem(
        name="digits",
        description=f"bundled digits denoiser (residual MLP, {n_params} params, "
        f"float32 inside), batch {batch} of 8x8",
        schedule=model.schedule,
        eps_fn=model.eps_fn,
        params=model.params,
        z=z,
        x_T=x_T,
        loss_fn=guidance_loss(target),
        stiff=True,
        info={"batch": batch, "n_params": n_params, "float32_model": True},
        train_inputs=train_inputs,
    )


# ----------------------------------------------------------------------------------------
# 5. A convolutional U-Net


def unet_problem(batch: int = 2, z_dim: int = 16, seed: int = 4, log=print) -> Problem:
    """The U-Net of ``unet.py`` (random weights, EDM preconditioning, float32 inside) on
    ``batch`` 32x32x3 images with a continuous conditioning vector of ``z_dim`` per image."""
    import unet  # noqa: PLC0415 - flax only for this problem

    sch = jadeis.VPLinear()
    t0 = time.perf_counter()
    params = unet.init_params(seed=0, z_dim=z_dim)
    log(f"  U-Net initialised in {time.perf_counter() - t0:.1f}s")
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    x_T = jax.random.normal(k1, (batch, 32, 32, 3), jnp.float64)
    z = jax.random.normal(k2, (batch, z_dim), jnp.float64)
    target = unet.SIGMA_DATA * jax.random.normal(k3, x_T.shape, jnp.float64)
    n_params = sum(int(np.size(v)) for v in jax.tree.leaves(params["net"]))

    def train_inputs(seed, size=batch):
        ka, kb = jax.random.split(jax.random.key(10_000 + seed))
        return (
            jax.random.normal(ka, (size, 32, 32, 3), jnp.float64),
            jax.random.normal(kb, (size, z_dim), jnp.float64),
        )

    eps_fn = unet.eps_fn_for(sch)
    # the cost of one model call and of one VJP (its forward pass included), batch as above
    t_mid = jnp.asarray(0.5, jnp.float64)
    call = jax.jit(eps_fn)
    vjp = jax.jit(
        lambda p, x, zz, g: jax.vjp(lambda *a: eps_fn(a[0], a[1], t_mid, a[2]), p, x, zz)[1](g)
    )
    g = call(params, x_T, t_mid, z)
    ms_call = 1e3 * C.time_call(call, (params, x_T, t_mid, z), 5)
    ms_vjp = 1e3 * C.time_call(vjp, (params, x_T, z, g), 5)
    log(f"  U-Net: {ms_call:.1f} ms per model call, {ms_vjp:.1f} ms per VJP (batch {batch})")

    return Problem(
        name="unet",
        description=(
            f"conv U-Net (flax; channels {unet.CHANNELS} at 32/16/8, GroupNorm+SiLU residual "
            f"blocks, attention at 8x8, {n_params / 1e6:.2f} M params, random weights in EDM "
            f"preconditioning, float32 inside), batch {batch} of 32x32x3, z: {z_dim} floats"
        ),
        schedule=sch,
        eps_fn=eps_fn,
        params=params,
        z=z,
        x_T=x_T,
        loss_fn=guidance_loss(target),
        stiff=True,
        info={
            "batch": batch,
            "n_params": n_params,
            "float32_model": True,
            "z_dim": z_dim,
            "ref_steps": 256,
            "ref_second": "unipc3",
            "ms_per_call": round(ms_call, 2),
            "ms_per_vjp": round(ms_vjp, 2),
        },
        train_inputs=train_inputs,
    )


# ----------------------------------------------------------------------------------------
# References


def compute_reference(problem: Problem, *, quick: bool, log=print) -> None:
    """Two very tight float64 solves, checked against each other; the diffrax one is kept
    (it is the more accurate: Tsit5 at 1e-10 and 1e-12 agree to ~5e-8 on the mixture).
    ``quick`` does not loosen them."""
    del quick
    from methods import diffrax_tsit5_reference, jadeis_reference  # noqa: PLC0415

    t0 = time.perf_counter()
    # the unet: N = 256 (a gradient step costs ~0.6 s on 2 CPU cores; UniPC(3)'s x_0
    # converges like N^-4 from 4e-5 at N = 64; the two references are checked below)
    n_ref = problem.info.get("ref_steps", 4000)
    r1 = jadeis_reference(problem, n_ref)
    t1 = time.perf_counter()
    if problem.info.get("ref_second") == "unipc3":
        # the unet: diffrax Tsit5 at 1e-7 with its recursive checkpointing took > 10 minutes
        # on 2 loaded CPU cores; the reference kept is UniPC(3) (order 4), checked against
        # DPM-Solver++(3M) (order 3, another solver family) at the same N
        r1, r2 = jadeis_reference(problem, n_ref, jadeis.UniPC(order=3)), r1
        t2 = time.perf_counter()
        method = (
            f"jadeis UniPC(3)+DiscreteAdjoint N={n_ref} (kept) vs jadeis "
            f"DPMSolverPP(3)+DiscreteAdjoint N={n_ref}"
        )
        seconds = {"seconds_jadeis": t1 - t0, "seconds_second": t2 - t1}
        _set_reference(problem, r1, r2, method, seconds, log)
        return
    # a float32 model's evaluations are noisy at ~1e-7: a tighter tolerance only adds steps
    tol = 1e-7 if problem.info.get("float32_model") else 1e-10
    r2, steps = diffrax_tsit5_reference(problem, tol)
    t2 = time.perf_counter()
    method = (
        f"jadeis DPMSolverPP(3)+DiscreteAdjoint N={n_ref} vs diffrax Tsit5 "
        f"rtol=atol={tol} ({steps} steps) + RecursiveCheckpointAdjoint"
    )
    seconds = {"seconds_jadeis": t1 - t0, "seconds_diffrax": t2 - t1}
    _set_reference(problem, r2, r1, method, seconds, log)


def _set_reference(problem, kept, other, method, seconds, log):
    """Keep ``kept`` as the problem's reference; record and log its agreement with ``other``
    (relative differences, as ``rel_err(other, kept)``)."""
    check = {"method": method}
    for k in ("x0", "x_T", "z", "params"):
        check[k] = rel_err(other[k], kept[k])
    check.update(seconds)
    check["grad"] = max(check["x_T"], check["z"], check["params"])
    problem.reference = kept
    problem.reference_check = check
    took = " + ".join(f"{v:.1f}s" for v in seconds.values())
    log(
        f"  reference agreement: x0 {check['x0']:.2e}, dL/dx_T {check['x_T']:.2e}, "
        f"dL/dz {check['z']:.2e}, dL/dparams {check['params']:.2e} ({took})"
    )


def input_dtype(problem: Problem):
    """The floating dtype of the problem's inputs (``x_T``): the precision its methods run in."""
    return jnp.dtype(jax.tree.leaves(problem.x_T)[0].dtype)


def cast_inputs(problem: Problem, dtype) -> Problem:
    """The problem with ``x_T``, ``z`` and the parameters' floating leaves in ``dtype`` (the
    methods then sample and differentiate in that precision; the float64 reference, the
    loss's target and the schedule stay as they are)."""

    def cast(tree):
        return jax.tree.map(
            lambda v: v.astype(dtype) if jnp.issubdtype(jnp.asarray(v).dtype, jnp.floating) else v,
            tree,
        )

    return dataclasses.replace(
        problem,
        x_T=cast(problem.x_T),
        z=cast(problem.z),
        params=cast(problem.params),
        info={**problem.info, "dtype": jnp.dtype(dtype).name},
    )


def model_costs(problem: Problem, reps: int = 5, calls: int = 16) -> dict:
    """Process CPU time of one model call and of one VJP of it (with its own forward
    evaluation; with respect to x, z and the parameters) on the problem's inputs at t = 0.5,
    and their ratio: what a gradient's backward pass costs per model call on this machine.
    Each is timed as a compiled loop of ``calls`` dependent calls (no per-call dispatch, as
    inside a sampler). Recorded per problem (``info``) and used by the summary's "floor at
    the measured VJP cost"."""
    eps_fn, x, z, params = problem.eps_fn, problem.x_T, problem.z, problem.params
    dtype = input_dtype(problem)
    t = jnp.asarray(0.5, dtype)
    small = jnp.asarray(1e-6, dtype)

    def evals(p, x, z):
        def body(_, x):
            return x + small * eps_fn(p, x, t, z).astype(x.dtype)

        return jax.lax.fori_loop(0, calls, body, x)

    def vjps(p, x, z):
        def body(_, c):
            x, acc = c
            out, vjp = jax.vjp(lambda *a: eps_fn(a[0], a[1], t, a[2]), p, x, z)
            gp, gx, gz = vjp(out)
            leaves = jax.tree.leaves((gp, gz))
            tot = sum(jnp.sum(v).astype(dtype) for v in leaves)
            return x + small * gx.astype(x.dtype), acc + tot

        return jax.lax.fori_loop(0, calls, body, (x, jnp.zeros((), dtype)))

    e, v = jax.jit(evals), jax.jit(vjps)
    _, _, c_call = C.time_call(e, (params, x, z), reps, with_min=True, with_cpu=True)
    _, _, c_vjp = C.time_call(v, (params, x, z), reps, with_min=True, with_cpu=True)
    return {
        "cpu_us_per_call": round(1e6 * c_call / calls, 2),
        "cpu_us_per_vjp": round(1e6 * c_vjp / calls, 2),
        "vjp_over_eval": round(c_vjp / c_call, 3),
    }


def build_problems(names, *, quick: bool, log=print, reference: bool = True) -> list[Problem]:
    out = []
    for name in names:
        log(f"problem {name}:")
        if name == "gaussian":
            p = gaussian_problem()
        elif name == "mixture":
            p = mixture_problem()
        elif name == "mlp":
            p = mlp_problem(log=log)
        elif name == "digits":
            p = digits_problem(log=log)
            if p is None:
                log("  jadeis.digits model not available; skipped")
                continue
        elif name == "unet":
            p = unet_problem(log=log)
        else:
            raise ValueError(f"unknown problem {name!r}")
        if reference and p.reference is None:
            compute_reference(p, quick=quick, log=log)
        p.info.update(model_costs(p))
        log(
            f"  model call {p.info['cpu_us_per_call']:.1f} us, VJP {p.info['cpu_us_per_vjp']:.1f} "
            f"us of CPU time (ratio {p.info['vjp_over_eval']:.2f})"
        )
        out.append(p)
    return out
