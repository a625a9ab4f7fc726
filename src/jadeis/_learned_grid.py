"""Learned time grids: optimise the N + 1 sampling times for a model, a schedule and a solver.

The grid is parameterised so that every iterate is a valid grid: the end points are those of
the initial grid, and the N log-SNR increments are a softmax of N free logits times the total
log-SNR span, so the times are strictly decreasing by construction. The logits are fitted
with optax so that the N-step sample matches a many-step reference sample (mean squared
error, or a loss of your own), differentiating through the sampler with respect to the
times; or (``target="gradient"``) so that the N-step *gradient* of a loss of the sample
matches the many-step reference gradient (a second-order derivative through the sampler).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array
from tqdm.auto import tqdm

from ._adjoint import AbstractAdjoint, DiscreteAdjoint
from ._grid import time_grid
from ._sample import sample
from ._schedule import AbstractSchedule
from ._solver import AbstractSolver, DPMSolverPP

_SPACINGS = ("logsnr", "time", "quadratic", "karras")
_TARGETS = ("x0", "gradient")
_WRT = ("x_T", "z", "params")
_WHERE = "learn_time_grid"


class LearnedGrid(NamedTuple):
    """What :func:`learn_time_grid` returns.

    - `ts`: the learned grid, ``(N + 1,)`` strictly decreasing times with the end points of
      `initial_ts` (pass it as ``sample(..., ts=result.ts)``).
    - `initial_ts`: the grid the optimisation started from.
    - `losses`: loss history, shape ``(num_iters + 1,)``: entry ``k`` is the training loss
      before update ``k``; the last entry is the loss of the returned `ts`.
    - `logits`: the ``(N,)`` free parameters of `ts` (log-SNR increments are
      ``softmax(logits) * (lambda(ts[-1]) - lambda(ts[0]))``); ``grid_from_logits`` maps them
      back to times, e.g. to continue an optimisation.
    - `reference`: the reference sample the grid was fitted to (shape of ``x_T``); with
      ``target="gradient"``, the dict of reference gradients (one entry per name of `wrt`).
    """

    ts: Array
    initial_ts: Array
    losses: np.ndarray
    logits: Array
    reference: Array


def grid_from_logits(schedule: AbstractSchedule, logits, t_start, t_end) -> Array:
    """The ``N + 1`` strictly decreasing times from ``t_start`` to ``t_end`` whose log-SNR
    increments are ``softmax(logits) * (lambda(t_end) - lambda(t_start))``.

    The parameterisation of :func:`learn_time_grid`; differentiable in ``logits`` (and in the
    schedule). The end points are pinned exactly.
    """
    logits = jnp.asarray(logits)
    dtype = logits.dtype
    t_start = jnp.asarray(t_start, dtype)
    t_end = jnp.asarray(t_end, dtype)
    lam0 = schedule.log_snr(t_start).astype(dtype)
    lam1 = schedule.log_snr(t_end).astype(dtype)
    w = jax.nn.softmax(logits)
    lam = lam0 + (lam1 - lam0) * jnp.concatenate([jnp.zeros((1,), dtype), jnp.cumsum(w)])
    ts = schedule.t_from_log_snr(lam).astype(dtype)
    return ts.at[0].set(t_start).at[-1].set(t_end)


def logits_from_grid(schedule: AbstractSchedule, ts) -> Array:
    """The logits whose :func:`grid_from_logits` is ``ts`` (up to rounding): the logarithms
    of the grid's log-SNR increments as shares of its log-SNR span."""
    ts = jnp.asarray(ts)
    lam = schedule.log_snr(ts).astype(ts.dtype)
    d = jnp.diff(lam)
    return jnp.log(d / jnp.sum(d))


def learn_time_grid(
    eps_fn: Callable,
    params: Any,
    x_T,
    z: Any = None,
    *,
    schedule: AbstractSchedule,
    n: int | None = None,
    init="logsnr",
    solver: AbstractSolver = DPMSolverPP(order=2),
    reference=None,
    reference_solver: AbstractSolver = DPMSolverPP(order=3),
    reference_steps: int = 500,
    optimizer: optax.GradientTransformation | None = None,
    num_iters: int = 100,
    loss_fn: Callable | None = None,
    adjoint: AbstractAdjoint = DiscreteAdjoint(),
    t_start=None,
    t_end=None,
    progress: bool = False,
    target: str = "x0",
    sample_loss: Callable | None = None,
    wrt=("x_T",),
) -> LearnedGrid:
    r"""Optimise an ``n``-step time grid so that ``solver`` on it reproduces a many-step
    reference sample of the model, on the batch of initial noises ``x_T``.

    The end points stay those of the initial grid. The interior is parameterised by ``n``
    logits: the log-SNR increments are ``softmax(logits)`` times the log-SNR span, so every
    iterate is strictly decreasing. Each iteration is one jit-compiled step (compiled once
    per input shape): an ``n``-step sample, its loss against the reference, the gradient
    with respect to the logits through the sampler (strategy ``adjoint``), one update of
    ``optimizer``. Evaluate the learned grid on held-out ``x_T`` (and ``z``): it is fitted to
    the batch it was trained on.

    **Arguments:**

    - `eps_fn`, `params`, `x_T`, `z`, `schedule`, `solver`: as in :func:`jadeis.sample`;
      ``x_T`` is the training batch (floating point, leading batch axis). The solver must be
      an ODE sampler (deterministic).
    - `n`: number of steps (int >= 1); may be omitted when `init` is a grid.
    - `init`: the initial grid: a spacing of :func:`jadeis.time_grid` (``"logsnr"``, the
      default, ``"time"``, ``"quadratic"``, ``"karras"``), or an array of ``n + 1``
      strictly decreasing times.
    - `reference`: the target ``x_0`` for each ``x_T`` (shape of ``x_T``). Default:
      ``reference_solver`` with ``reference_steps`` log-SNR-uniform steps between the same
      end points (``DPMSolverPP(order=3)``, 500 steps).
    - `optimizer`: any ``optax.GradientTransformation`` of the logits. Default: Adam with
      learning rate 0.05, cosine-decayed to 0.005 over ``num_iters``.
    - `num_iters`: number of updates (int >= 0).
    - `loss_fn`: ``loss_fn(x_0, reference) -> scalar``; default the mean squared error.
    - `adjoint`: the gradient strategy of the sampler. It must give gradients with respect
      to the times (default ``jadeis.DiscreteAdjoint()``, exact, memory N |x|); a
      strategy whose gradient is zero while the loss is not raises an error rather than
      returning the initial grid.
    - `t_start`, `t_end`: end points of a spacing `init` (default the schedule's
      ``t_max``, ``t_min``).
    - `progress`: show a tqdm progress bar.
    - `target`: what the grid is fitted to. ``"x0"`` (the default): the sample, as above.
      ``"gradient"``: the gradient of ``sample_loss(x_0)`` with respect to the inputs named
      in `wrt`; the loss is the sum over `wrt` of the relative squared errors
      ``||g - g_ref||^2 / ||g_ref||^2`` (each over all leaves of its pytree) of the ``n``-step
      gradient against the reference gradient. That is a derivative of a gradient: each
      iteration differentiates the sampler's gradient (strategy `adjoint`, which must then
      be twice differentiable: ``DiscreteAdjoint()`` and ``Backprop()`` are) with respect
      to the times, so an iteration costs several ``"x0"`` iterations. Use it when what
      you need accurate is the gradient (guidance, inversion, training through the
      sampler): a grid that lowers the error of x_0 need not lower that of the gradient.
      The gradient error of a batch is dominated by its few hardest trajectories, so the
      grid overfits a small batch more easily than with ``"x0"``: train on a larger one
      (the mixture benchmark: 256 rather than 64) and check on held-out inputs.
    - `sample_loss`: ``sample_loss(x_0) -> scalar`` (required with ``target="gradient"``):
      the loss whose gradient is fitted; its ``x_0`` is the training batch's sample.
    - `wrt`: with ``target="gradient"``, the names of the inputs whose gradient is fitted,
      a tuple of ``"x_T"``, ``"z"`` and ``"params"`` (default ``("x_T",)``). With
      ``target="gradient"``, `reference` is a dict of reference gradients keyed by these
      names (default: ``reference_solver`` on ``reference_steps`` steps, differentiated by
      ``DiscreteAdjoint()``) and `loss_fn`, if given, is ``loss_fn(grads, reference) ->
      scalar`` with both dicts.

    **Returns:** a :class:`LearnedGrid` (``ts``, ``initial_ts``, ``losses``, ``logits``,
    ``reference``).

    **Example:**

    ```python
    >>> import jax, jax.numpy as jnp, optax
    >>> import jadeis
    >>> from jadeis._learned_grid import learn_time_grid
    >>> sch = jadeis.VPLinear()
    >>> def eps_fn(params, x, t, z):   # exact for data N(z, params I), as in the README
    ...     a, s = sch.alpha(t), sch.sigma(t)
    ...     return s * (x - a * z) / (a**2 * params + s**2)
    >>> x_T = jax.random.normal(jax.random.key(0), (16, 2))
    >>> res = learn_time_grid(eps_fn, 0.25, x_T, jnp.ones(2), schedule=sch, n=4,
    ...                       solver=jadeis.DDIM(), num_iters=20)
    >>> res.ts.shape, bool(jnp.all(jnp.diff(res.ts) < 0))
    ((5,), True)
    >>> bool(res.ts[0] == res.initial_ts[0]) and bool(res.ts[-1] == res.initial_ts[-1])
    True
    >>> bool(res.losses[-1] < res.losses[0])
    True

    ```

    Fitting the gradient instead: that of a guidance loss with respect to ``x_T`` and the
    conditioning ``z``, here with a 4-step DDIM grid:

    ```python
    >>> goal = jnp.zeros(2)
    >>> res = learn_time_grid(eps_fn, 0.25, x_T, jnp.ones(2), schedule=sch, n=4,
    ...                       solver=jadeis.DDIM(), num_iters=20, target="gradient",
    ...                       sample_loss=lambda x0: jnp.sum((x0 - goal) ** 2),
    ...                       wrt=("x_T", "z"))
    >>> sorted(res.reference), res.reference["x_T"].shape
    (['x_T', 'z'], (16, 2))
    >>> bool(res.losses[-1] < res.losses[0])
    True

    ```
    """
    where = _WHERE
    if not isinstance(schedule, AbstractSchedule):
        raise ValueError(f"{where}: schedule must be a jadeis schedule, got {schedule!r}.")
    for name, s in (("solver", solver), ("reference_solver", reference_solver)):
        if not isinstance(s, AbstractSolver):
            raise ValueError(
                f"{where}: {name} must be a jadeis sampler such as jadeis.DPMSolverPP(order=2), "
                f"got {s!r}."
            )
        if s.stochastic:
            raise ValueError(
                f"{where}: {name} must be an ODE (deterministic) sampler; the SDE sampler "
                f"{type(s).__name__} has no deterministic reference to fit a grid to."
            )
    if not isinstance(adjoint, AbstractAdjoint):
        raise ValueError(
            f"{where}: adjoint must be a jadeis gradient strategy such as "
            f"jadeis.DiscreteAdjoint(), got {adjoint!r}."
        )
    if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 0:
        raise ValueError(f"{where}: num_iters must be an int >= 0, got {num_iters!r}.")
    if optimizer is None:
        decay = optax.cosine_decay_schedule(5e-2, max(num_iters, 1), alpha=0.1)
        optimizer = optax.adam(decay)
    elif not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise ValueError(
            f"{where}: optimizer must be an optax.GradientTransformation such as "
            f"optax.adam(1e-2), got {optimizer!r}."
        )
    if not isinstance(target, str) or target not in _TARGETS:
        raise ValueError(f"{where}: target must be one of {_TARGETS}, got {target!r}.")
    gradient = target == "gradient"
    if loss_fn is not None and not callable(loss_fn):
        call = "loss_fn(grads, reference)" if gradient else "loss_fn(x_0, reference)"
        raise ValueError(f"{where}: loss_fn must be callable as {call}, got {loss_fn!r}.")
    if gradient:
        if sample_loss is None or not callable(sample_loss):
            raise ValueError(
                f"{where}: sample_loss must be a callable sample_loss(x_0) -> scalar with "
                f"target='gradient' (the loss whose gradient the grid is fitted to), got "
                f"{sample_loss!r}."
            )
        given = wrt
        if isinstance(wrt, str):
            wrt = (wrt,)
        try:
            wrt = tuple(wrt)
        except TypeError:
            wrt = ()
        if not wrt or any(w not in _WRT for w in wrt) or len(set(wrt)) != len(wrt):
            raise ValueError(
                f"{where}: wrt must be a non-empty tuple of distinct names of {_WRT}, got "
                f"{given!r}."
            )
        if "z" in wrt and z is None:
            raise ValueError(f"{where}: wrt contains 'z' but z is None.")
    elif sample_loss is not None:
        raise ValueError(
            f"{where}: sample_loss applies to target='gradient' only; got target={target!r}."
        )

    x_T = jnp.asarray(x_T)
    if not jnp.issubdtype(x_T.dtype, jnp.floating):
        raise ValueError(f"{where}: x_T must be a floating-point array, got dtype {x_T.dtype}.")
    if x_T.ndim < 1 or x_T.size == 0:
        raise ValueError(
            f"{where}: x_T must be a non-empty batch of initial noises (leading batch axis), "
            f"got shape {x_T.shape}."
        )
    dtype = x_T.dtype

    initial_ts = _initial_grid(schedule, n, init, t_start, t_end, dtype)
    n = initial_ts.shape[0] - 1

    if gradient:
        argnums = tuple(_WRT.index(w) for w in wrt)

        def loss_grads(ts, params, x_T, z, solver, adjoint):
            def total(x_T, z, params):
                x_0 = sample(
                    eps_fn,
                    params,
                    x_T,
                    z,
                    schedule=schedule,
                    ts=ts,
                    solver=solver,
                    adjoint=adjoint,
                )
                value = jnp.asarray(sample_loss(x_0))
                if value.shape != ():
                    raise ValueError(
                        f"{where}: sample_loss must return a scalar, got an array of shape "
                        f"{value.shape}."
                    )
                return value

            gs = jax.grad(total, argnums=argnums)(x_T, z, params)
            return dict(zip(wrt, gs, strict=True))

        if reference is None:
            _check_count("reference_steps", reference_steps)
            ref_ts = time_grid(
                schedule, reference_steps, "logsnr", initial_ts[0], initial_ts[-1], dtype=dtype
            )
            reference = jax.jit(
                lambda ts, params, x_T, z: loss_grads(
                    ts, params, x_T, z, reference_solver, DiscreteAdjoint()
                )
            )(ref_ts, params, x_T, z)
        else:
            if not isinstance(reference, dict) or set(reference) != set(wrt):
                raise ValueError(
                    f"{where}: with target='gradient', reference must be a dict of reference "
                    f"gradients with the keys of wrt = {wrt}, got "
                    f"{sorted(reference) if isinstance(reference, dict) else type(reference)}."
                )
            reference = {w: jax.tree.map(jnp.asarray, reference[w]) for w in wrt}
    elif reference is None:
        _check_count("reference_steps", reference_steps)
        ref_ts = time_grid(
            schedule, reference_steps, "logsnr", initial_ts[0], initial_ts[-1], dtype=dtype
        )
        reference = sample(
            eps_fn, params, x_T, z, schedule=schedule, ts=ref_ts, solver=reference_solver
        )
    else:
        reference = jnp.asarray(reference)
        if reference.shape != x_T.shape:
            raise ValueError(
                f"{where}: reference must be the target x_0 of each x_T, of shape x_T.shape = "
                f"{x_T.shape}; got shape {reference.shape}."
            )
        if not jnp.issubdtype(reference.dtype, jnp.floating):
            raise ValueError(
                f"{where}: reference must be floating point, got dtype {reference.dtype}."
            )
        reference = reference.astype(dtype)

    t0, t1 = initial_ts[0], initial_ts[-1]
    logits = logits_from_grid(schedule, initial_ts)
    if not bool(jnp.all(jnp.isfinite(logits))):
        raise ValueError(
            f"{where}: the initial grid has log-SNR steps that round to zero in {dtype}; "
            f"use fewer steps or float64."
        )

    def objective(logits, params, x_T, z, reference):
        ts = grid_from_logits(schedule, logits, t0, t1)
        if gradient:
            grads = loss_grads(ts, params, x_T, z, solver, adjoint)
            if loss_fn is None:
                loss = sum(_rel_sq(grads[w], reference[w]) for w in wrt)
            else:
                loss = loss_fn(grads, reference)
            loss = jnp.asarray(loss)
            if loss.shape != ():
                raise ValueError(
                    f"{where}: loss_fn must return a scalar, got an array of shape {loss.shape}."
                )
            return loss
        x_0 = sample(
            eps_fn, params, x_T, z, schedule=schedule, ts=ts, solver=solver, adjoint=adjoint
        )
        if loss_fn is None:
            loss = jnp.mean((x_0 - reference) ** 2)
        else:
            loss = loss_fn(x_0, reference)
        loss = jnp.asarray(loss)
        if loss.shape != ():
            raise ValueError(
                f"{where}: loss_fn must return a scalar, got an array of shape {loss.shape}."
            )
        return loss

    @jax.jit
    def step(logits, opt_state, params, x_T, z, reference):
        loss, grad = jax.value_and_grad(objective)(logits, params, x_T, z, reference)
        # optax mixes Python floats with int32 step counts: run it with standard promotion
        # even where the user set "strict"
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grad, opt_state, logits)
            new_logits = optax.apply_updates(logits, updates).astype(logits.dtype)
        return new_logits, opt_state, loss, grad

    with jax.numpy_dtype_promotion("standard"):
        opt_state = optimizer.init(logits)
    losses = []
    bar = tqdm(total=num_iters, desc=where, disable=not progress, unit="it")
    for k in range(num_iters):
        new_logits, opt_state, loss, grad = step(logits, opt_state, params, x_T, z, reference)
        loss_value = float(loss)
        if not np.isfinite(loss_value):
            bar.close()
            raise FloatingPointError(
                f"{where}: the loss became {loss_value} at iteration {k}; lower the learning "
                f"rate of the optimizer."
            )
        if k == 0 and loss_value > 0 and not bool(jnp.any(grad != 0)):
            bar.close()
            raise ValueError(
                f"{where}: the gradient with respect to the time grid is exactly zero with "
                f"adjoint={adjoint!r} although the loss is {loss_value:.3g}: this strategy "
                f"(or loss_fn) does not differentiate the times. Use "
                f"adjoint=jadeis.DiscreteAdjoint() or jadeis.Backprop()."
            )
        logits = new_logits
        losses.append(loss_value)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3e}")
    bar.close()
    # the loss of the returned grid: one more step, its update discarded (no new compile)
    _, _, loss, _ = step(logits, opt_state, params, x_T, z, reference)
    losses.append(float(loss))
    ts = grid_from_logits(schedule, logits, t0, t1)
    return LearnedGrid(
        ts=ts,
        initial_ts=initial_ts,
        losses=np.asarray(losses),
        logits=logits,
        reference=reference,
    )


def _rel_sq(g, ref):
    """||g - ref||^2 / ||ref||^2 over all leaves of two pytrees of the same structure."""
    gs, rs = jax.tree.leaves(g), jax.tree.leaves(ref)
    num = sum(jnp.sum((a - b.astype(a.dtype)) ** 2) for a, b in zip(gs, rs, strict=True))
    den = sum(jnp.sum(b**2) for b in rs)
    return num / jnp.maximum(den, jnp.finfo(jnp.result_type(den)).tiny)


def _check_count(name, v, minimum=1):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ValueError(f"{_WHERE}: {name} must be an int >= {minimum}, got {v!r}.")


def _initial_grid(schedule, n, init, t_start, t_end, dtype):
    where = _WHERE
    if n is not None:
        _check_count("n", n)
        n = int(n)
    if isinstance(init, str):
        if init not in _SPACINGS:
            raise ValueError(
                f"{where}: init must be one of {_SPACINGS} or an array of N + 1 times, "
                f"got {init!r}."
            )
        if n is None:
            raise ValueError(f"{where}: give n (the number of steps) with init={init!r}.")
        try:
            return time_grid(schedule, n, init, t_start, t_end, dtype=dtype)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
    if t_start is not None or t_end is not None:
        raise ValueError(
            f"{where}: t_start/t_end apply to a spacing init; an init grid has its own end points."
        )
    ts = np.asarray(init)
    if ts.ndim != 1 or ts.shape[0] < 2 or not np.issubdtype(ts.dtype, np.floating):
        raise ValueError(
            f"{where}: init must be a spacing name or a 1-D floating array of N + 1 >= 2 "
            f"times, got {getattr(init, 'shape', init)!r}."
        )
    if n is not None and ts.shape[0] != n + 1:
        raise ValueError(f"{where}: init has {ts.shape[0]} times, which is not n + 1 = {n + 1}.")
    if not np.all(np.diff(ts) < 0):
        raise ValueError(f"{where}: init must be strictly decreasing, got {ts}.")
    from ._validate import schedule_range

    lo, hi = schedule_range(schedule, ts.dtype)
    if ts.min() < lo or ts.max() > hi:
        raise ValueError(
            f"{where}: init has times outside the schedule's range [t_min, t_max] = [{lo}, {hi}]."
        )
    return jnp.asarray(ts, dtype)
