"""Validation and normalisation of a sampling problem, once, for every entry point.

Static misuse (shapes, dtypes, types, a concrete bad ``ts``) raises ``ValueError`` naming
the argument and the fix, before anything is compiled. Values that are only known under
``jit`` (a traced ``ts``) are checked with ``equinox.error_if`` attached to ``ts`` itself,
a small array, never to the sampler's state (so a sharded batch is never gathered); a
``ts`` checked eagerly is not checked again, so the compiled program has no host callback.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import logging
import threading

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._conditioning import ConditioningFn, PerStep
from ._schedule import AbstractSchedule
from ._solver import AbstractSolver, RexLatent
from ._solver.base import AbstractReversibleSolver
from ._solver.rex import grid_fingerprint


def is_concrete(v) -> bool:
    return not isinstance(v, jax.core.Tracer)


def check_schedule(schedule, where: str):
    if not isinstance(schedule, AbstractSchedule):
        hint = ""
        if isinstance(schedule, type) and issubclass(schedule, AbstractSchedule):
            hint = f" (the class itself: pass an instance, {schedule.__name__}())"
        raise ValueError(
            f"{where}: schedule must be a jadeis schedule such as jadeis.VPLinear(), got "
            f"{schedule!r}{hint}."
        )


def check_solver(solver, where: str):
    if not isinstance(solver, AbstractSolver):
        hint = ""
        if isinstance(solver, type) and issubclass(solver, AbstractSolver):
            hint = f" (the class itself: pass an instance, {solver.__name__}())"
        raise ValueError(
            f"{where}: solver must be a jadeis sampler such as jadeis.DPMSolverPP(order=2), "
            f"got {solver!r}{hint}."
        )


def check_adjoint(adjoint, where: str):
    from ._adjoint import AbstractAdjoint

    if not isinstance(adjoint, AbstractAdjoint):
        hint = ""
        if isinstance(adjoint, type) and issubclass(adjoint, AbstractAdjoint):
            hint = f" (the class itself: pass an instance, {adjoint.__name__}())"
        raise ValueError(
            f"{where}: adjoint must be a gradient strategy such as jadeis.DiscreteAdjoint(), "
            f"jadeis.AdjointDEIS(...) or jadeis.Backprop(), got {adjoint!r}{hint}."
        )


#: the last concrete (ts, schedule) pairs that passed :func:`check_ts`, by identity: a JAX
#: array and a schedule of JAX arrays and Python numbers are immutable, so a repeated call
#: with the same objects (a sampling loop, guidance) skips the host-side checks, which cost
#: ~1 ms of eager dispatch per call
_CHECKED: collections.OrderedDict = collections.OrderedDict()
_CHECKED_SIZE = 16
_CHECKED_LOCK = threading.Lock()


def _immutable(ts, schedule) -> bool:
    # a NumPy array (as ts or inside the schedule) could change in place
    return isinstance(ts, jax.Array) and all(
        isinstance(v, (jax.Array, bool, int, float)) for v in jax.tree.leaves(schedule)
    )


def check_ts(ts, schedule: AbstractSchedule, where: str):
    """Shape and dtype of ``ts``; its values too when they are concrete: finite, strictly
    decreasing, inside the schedule's range compared in ``ts``'s own dtype (a float32 grid
    from :func:`jadeis.time_grid` is accepted whichever way its end points round), and a
    finite log-SNR at the end points (a final time of exactly 0 is the clean data,
    ``final="zero"``)."""
    key = (id(ts), id(schedule), bool(jax.config.jax_enable_x64))
    with _CHECKED_LOCK:
        hit = _CHECKED.get(key)
        if hit is not None and hit[0] is ts and hit[1] is schedule:
            _CHECKED.move_to_end(key)
            return hit[2]
    given = ts
    check_schedule(schedule, where)
    ts = jnp.asarray(ts)
    if ts.ndim != 1 or ts.shape[0] < 2:
        raise ValueError(
            f"{where}: ts must be a 1-D array of at least 2 times (N + 1 for N steps), got "
            f"shape {ts.shape}. Build one with jadeis.time_grid(schedule, n)."
        )
    if not jnp.issubdtype(ts.dtype, jnp.floating):
        ts = ts.astype(jnp.result_type(float))
    if _concrete(ts, schedule):
        v = np.asarray(ts, dtype=np.float64)
        if not np.all(np.isfinite(v)):
            raise ValueError(f"{where}: ts has non-finite values (NaN or inf): {v.tolist()}.")
        if np.any(v[1:] >= v[:-1]):
            raise ValueError(
                f"{where}: ts must be strictly decreasing (sampling runs from t_max down to "
                f"t_min); build it with jadeis.time_grid(schedule, n)."
            )
        lo, hi = schedule_range(schedule, ts.dtype)
        # a last time of exactly 0 is the clean data (sigma = 0): time_grid(..., final="zero")
        if np.min(v[:-1]) < lo or (v[-1] < lo and v[-1] != 0.0) or v[0] > hi:
            raise ValueError(
                f"{where}: ts has times outside the schedule's range [t_min, t_max] = "
                f"[{schedule.t_min}, {schedule.t_max}] (in ts's dtype {ts.dtype}: [{lo!r}, "
                f"{hi!r}]; got {v[-1]!r} .. {v[0]!r}); clip ts or build the schedule with a "
                f"wider range."
            )
        check_log_snr_finite(schedule, ts, where)
        if _immutable(given, schedule):
            with _CHECKED_LOCK:
                _CHECKED[key] = (given, schedule, ts)
                while len(_CHECKED) > _CHECKED_SIZE:
                    _CHECKED.popitem(last=False)
    return ts


def schedule_range(schedule: AbstractSchedule, dtype) -> tuple[float, float]:
    """The schedule's ``[t_min, t_max]`` rounded to ``dtype`` (the grid's), as floats: a grid
    of that dtype built from the schedule's own end points (``time_grid``) lies inside it,
    whichever way the end points round."""
    dtype = jnp.dtype(dtype) if jnp.issubdtype(dtype, jnp.floating) else jnp.result_type(float)
    with jax.ensure_compile_time_eval():
        lo = float(jnp.asarray(schedule.t_min, dtype))
        hi = float(jnp.asarray(schedule.t_max, dtype))
    return lo, hi


def check_log_snr_finite(schedule: AbstractSchedule, ts, where: str):
    """The schedule's log-SNR must be finite at the first and at the last nonzero time of a
    concrete ``ts`` (a time rounded onto a schedule's singular end, e.g. RectifiedFlow's
    t_max = 0.999 in bfloat16 is 1.0, where alpha = 0)."""
    v = np.asarray(ts, np.float64)
    ends = [0, v.shape[0] - (2 if v[-1] == 0.0 else 1)]
    with jax.ensure_compile_time_eval():
        lam = np.asarray(schedule.log_snr(jnp.asarray(ts)[jnp.asarray(ends)]), np.float64)
    if not np.all(np.isfinite(lam)):
        raise ValueError(
            f"{where}: the schedule's log-SNR is not finite at ts = {v[ends].tolist()} (in ts's "
            f"dtype {jnp.asarray(ts).dtype}): alpha or sigma vanishes there. Build ts in a "
            f"wider dtype (jadeis.time_grid(..., dtype=jnp.float32)) or keep it inside the "
            f"schedule's range."
        )
    return ts


_TS_PRECHECKED = contextvars.ContextVar("jadeis_ts_prechecked", default=False)


@contextlib.contextmanager
def ts_prechecked():
    """Within this block (at trace time), a traced ``ts`` counts as already checked: for
    library functions that validated ``ts`` eagerly and then trace ``sample`` with it (so
    their compiled programs hold no host callback)."""
    token = _TS_PRECHECKED.set(True)
    try:
        yield
    finally:
        _TS_PRECHECKED.reset(token)


def checked_eagerly(ts, schedule: AbstractSchedule) -> bool:
    """Whether :func:`check_ts` could check the values of ``ts`` on the host (``ts`` and the
    schedule are concrete); then the jit-compiled functions skip :func:`check_ts_traced`,
    so that they contain no host callback at all."""
    return _TS_PRECHECKED.get() or _concrete(ts, schedule)


def _concrete(ts, schedule) -> bool:
    return is_concrete(ts) and all(is_concrete(v) for v in jax.tree.leaves(schedule))


def _raise_if(flags, messages):
    flags = np.asarray(flags)
    for j, message in enumerate(messages):
        if np.any(flags[..., j]):
            # JAX wraps an exception raised in a host callback in a JaxRuntimeError and logs
            # "jax.debug.callback failed" with a stack first: log the sentence before that,
            # so that it is the first thing a terminal shows (logging's last-resort handler
            # prints it to stderr unless the application configures logging)
            logging.getLogger("jadeis").error("%s", message)
            raise ValueError(message)


def report(x, flags: dict, messages: dict):
    """After a compiled run that returned ``flags`` (name -> bool array, or None): raise
    ``ValueError(messages[name])`` for the first true flag, in the order of ``messages``,
    right away when the flags are concrete (an eager call, also under ``jax.grad``: a plain
    Python exception and traceback); under ``jit``/``vmap`` (traced flags) attach them to
    ``x`` as run-time checks (:func:`runtime_check`). Returns ``x``."""
    items = [(flags[k], m) for k, m in messages.items() if flags.get(k) is not None]
    if not items:
        return x
    values = [concrete_value(f) for f, _ in items]
    if all(v is not None for v in values):
        for v, (_, message) in zip(values, items):
            if bool(np.any(v)):
                raise ValueError(message)
        return x
    return runtime_check(x, items)


def concrete_value(x):
    """``x`` as a NumPy value where it is known now: a concrete array, or a tracer of
    differentiation (``jax.grad``/``jvp`` outside ``jit``: the outputs of a ``custom_vjp``
    are such tracers, with concrete primals); ``None`` under ``jit``/``vmap``."""
    if not isinstance(x, jax.core.Tracer):
        return np.asarray(x)
    try:  # no public API reads a differentiation tracer's primal; None if this moves
        from jax._src import core as jax_core

        value = jax_core.to_concrete_value(x)
    except Exception:  # noqa: BLE001 - any failure means "not known now"
        return None
    return None if value is None else np.asarray(value)


def runtime_check(x, conditions):
    """Raise ``ValueError(message)`` at run time for the first true ``(predicate, message)``
    of ``conditions``; returns ``x``.

    Unlike ``equinox.error_if`` under a user's ``jax.jit`` (a ~20-line "INTERNAL:
    CpuCallback error" with a traceback), the error text ends in one line
    ``ValueError: <message>``. The host callback runs only when a predicate is true
    (``lax.cond``); under ``vmap`` the flags are checked on the host.
    """
    preds = jnp.stack([jnp.asarray(p) for p, _ in conditions], axis=-1)
    return _check_flags(x, preds, tuple(m for _, m in conditions))


def _check_flags(x, preds, messages):
    """:func:`runtime_check` with the predicates stacked on the last axis of ``preds``."""

    def fire(preds):
        jax.debug.callback(_raise_if, preds, messages)

    any_true = preds[..., 0]
    for j in range(1, preds.shape[-1]):  # an elementwise "or", not a reduction
        any_true = any_true | preds[..., j]
    jax.lax.cond(jnp.any(any_true), fire, lambda preds: None, preds)
    return x


def check_final_zero(ts, solver, where: str):
    """A concrete ``ts`` ending at t = 0 for a solver that cannot step there."""
    if solver.steps_to_zero or not is_concrete(ts) or float(np.asarray(ts)[-1]) != 0.0:
        return
    raise ValueError(zero_end_message(solver, where))


def zero_end_message(solver, where: str) -> str:
    return (
        f"{where}: ts ends at t = 0 (time_grid(..., final='zero')), where "
        f"{type(solver).__name__} cannot step: {solver.zero_end_reason}. End the grid at the "
        f"schedule's t_min (final=None), or use another solver such as "
        f"jadeis.DPMSolverPP() for a grid ending at 0."
    )


def check_ts_traced(ts, schedule: AbstractSchedule, where: str, solver=None):
    """Checks of a traced ``ts`` under ``jit``, attached to ``ts`` (a small array); a final
    0 is refused for a ``solver`` that cannot step to it."""
    if is_concrete(ts):
        return ts
    lo = jnp.asarray(schedule.t_min, ts.dtype)
    hi = jnp.asarray(schedule.t_max, ts.dtype)
    n = ts.shape[0]
    last = jax.lax.broadcasted_iota(jnp.int32, (n,), 0) == n - 1
    zero_ok = solver is None or solver.steps_to_zero
    below = (ts < lo) & ~(last & (ts == 0) & zero_ok)  # a final 0 is allowed
    # entry i compares ts[i] with ts[i - 1] (with +inf before ts[0]); a non-finite ts[0]
    # is reported as non-finite, the first message
    prev = jnp.concatenate([jnp.full((1,), jnp.inf, ts.dtype), ts[:-1]])
    # the three flags in one reduction (a smaller compiled program than three)
    flags = jnp.any(jnp.stack([~jnp.isfinite(ts), ts >= prev, below | (ts > hi)]), axis=1)
    return _check_flags(
        ts,
        flags,
        (
            f"{where}: ts has non-finite values (NaN or inf).",
            f"{where}: ts must be strictly decreasing (sampling runs from t_max down to "
            f"t_min); use jadeis.time_grid(schedule, n).",
            f"{where}: ts has times outside the schedule's range [t_min, t_max]"
            + (
                "; clip ts or build the schedule with a wider range."
                if zero_ok
                else f", or ends at 0: {zero_end_message(solver, where)}"
            ),
        ),
    )


def is_pytree_state(x) -> bool:
    """Whether ``x`` is a pytree of arrays (a dict, a tuple of arrays, a custom node...)
    rather than one array-like (an array, a scalar, a nested list of numbers)."""
    if isinstance(x, (jax.Array, np.ndarray, np.generic, int, float, complex, bool)):
        return False
    if type(x) in (list, tuple):
        return (
            not all(
                np.ndim(v) == 0 and not isinstance(v, (jax.Array, np.ndarray))
                for v in jax.tree.leaves(x)
            )
            and len(jax.tree.leaves(x)) > 0
        )
    return True


def check_state(x, name: str, where: str):
    """A floating-point array, or a pytree of arrays sharing one floating dtype."""
    if is_pytree_state(x):
        leaves, treedef = jax.tree.flatten(x)
        if not leaves:
            raise ValueError(f"{where}: {name} is a pytree without any array leaves.")
        leaves = [jnp.asarray(v) for v in leaves]
        dtypes = [v.dtype for v in leaves]
        if not all(jnp.issubdtype(d, jnp.floating) for d in dtypes) or len(set(dtypes)) > 1:
            paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(x)]
            got = ", ".join(f"{p or '.'}: {d}" for p, d in zip(paths, dtypes))
            raise ValueError(
                f"{where}: {name} is a pytree state, whose leaves must all share one floating "
                f"dtype (the solver's arithmetic runs in it); got {got}. Cast the leaves, e.g. "
                f"jax.tree.map(lambda v: v.astype(jnp.float32), {name})."
            )
        return jax.tree.unflatten(treedef, leaves)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{where}: {name} must be a floating-point array, got dtype {x.dtype}.")
    return x


def shapes_of(x):
    """``x.shape``, or the pytree of leaf shapes of a pytree state (for messages)."""
    if isinstance(x, jax.Array):
        return x.shape
    return jax.tree.map(lambda v: v.shape, x)


def check_x_T(x_T, solver, n: int, where: str, adaptive: bool = False, ts=None):
    """``x_T``: a floating-point array, or a :class:`RexLatent` for the solver and grid
    that made it (its length; its times too where both grids are concrete)."""
    if isinstance(x_T, RexLatent):
        if adaptive:
            raise ValueError(
                f"{where}: a RexLatent cannot be decoded with adaptive steps: it is the exact "
                f"latent of the grid it was encoded on, and an adaptive controller would choose "
                f"another; decode it on that fixed grid with solver={x_T.solver!r}."
            )
        if not isinstance(solver, AbstractReversibleSolver) or solver != x_T.solver:
            raise ValueError(
                f"{where}: x_T is a RexLatent made by {x_T.solver!r}; decode it with that "
                f"solver (solver={x_T.solver!r}), not {solver!r}."
            )
        if x_T.num_steps != n:
            raise ValueError(
                f"{where}: x_T is a RexLatent encoded on a grid of {x_T.num_steps} steps, but "
                f"ts has {n} steps; decode it on the grid it was encoded on."
            )
        fingerprint = None if ts is None else grid_fingerprint(ts)
        if x_T.grid is not None and fingerprint is not None and fingerprint != x_T.grid:
            raise ValueError(
                f"{where}: x_T is a RexLatent encoded on another grid ({x_T.grid}) than ts "
                f"({fingerprint}); it decodes to its image only on the grid it was encoded on "
                f"(same times, same dtype): pass that ts."
            )
        x = check_state(x_T.x, "x_T.x", where)
        xh = check_state(x_T.xh, "x_T.xh", where)
        if x.shape != xh.shape or x.dtype != xh.dtype:
            raise ValueError(
                f"{where}: the RexLatent's x and xh differ in shape or dtype: "
                f"{x.shape} {x.dtype} vs {xh.shape} {xh.dtype}."
            )
        return RexLatent(x, xh, x_T.num_steps, x_T.solver, x_T.grid)
    x_T = check_state(x_T, "x_T", where)
    check_pytree_solver(x_T, solver, "x_T", where)
    return x_T


def check_pytree_solver(x, solver, name: str, where: str):
    if not isinstance(x, jax.Array) and isinstance(solver, AbstractReversibleSolver):
        raise ValueError(
            f"{where}: pytree states are not supported by {type(solver).__name__} (Rex) yet; "
            f"pass {name} as one array (e.g. concatenate the flattened leaves), or use another "
            f"solver such as jadeis.DPMSolverPP()."
        )


def check_model(eps_fn, params, x, t, z, where: str):
    if not isinstance(x, jax.Array):
        return _check_model_tree(eps_fn, params, x, t, z, where)
    try:
        out = eqx.filter_eval_shape(eps_fn, params, x, t, z)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise ValueError(
            f"{where}: calling eps_fn(params, x, t, z) failed for x of shape {x.shape} and "
            f"dtype {x.dtype}: {type(e).__name__}: {e}"
        ) from e
    # mixed precision: any floating dtype is accepted (cast to the state's dtype by
    # _core.bind_model), so a bfloat16 model may drive a float32 state
    if (
        not hasattr(out, "shape")
        or out.shape != x.shape
        or not jnp.issubdtype(out.dtype, jnp.floating)
    ):
        got = _describe_output(out)
        raise ValueError(
            f"{where}: eps_fn must return a floating-point array of the shape of x "
            f"({x.shape}; any floating dtype, cast to x's {x.dtype}); it returned {got}. "
            f"Reshape the model output or cast it to a floating dtype."
        )


def _describe_output(out) -> str:
    """What a model returned, for a message: an array's shape and dtype, else its kind."""
    if hasattr(out, "shape") and hasattr(out, "dtype"):
        return f"shape {out.shape}, dtype {out.dtype}"
    if out is None:
        return "None (no return statement?)"
    if isinstance(out, (tuple, list, dict)):
        kind = type(out).__name__
        return (
            f"a {kind} of {len(out)} entries (return only the noise prediction, e.g. "
            f"out[0], or one array)"
        )
    return f"a {type(out).__name__}"


def _check_model_tree(eps_fn, params, x, t, z, where: str):
    want = shapes_of(x)
    try:
        out = eqx.filter_eval_shape(eps_fn, params, x, t, z)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise ValueError(
            f"{where}: calling eps_fn(params, x, t, z) failed for the pytree state x with leaf "
            f"shapes {want}: {type(e).__name__}: {e}"
        ) from e
    ok = jax.tree.structure(out) == jax.tree.structure(x) and all(
        hasattr(o, "shape") and o.shape == v.shape and jnp.issubdtype(o.dtype, jnp.floating)
        for o, v in zip(jax.tree.leaves(out), jax.tree.leaves(x))
    )
    if not ok:
        got = jax.tree.map(lambda o: (getattr(o, "shape", None), str(getattr(o, "dtype", ""))), out)
        raise ValueError(
            f"{where}: for a pytree state, eps_fn must return a pytree of the same structure "
            f"with floating-point leaves of the shapes of x's ({want}); it returned {got}."
        )


def prepare_z(z, ts, where: str, adaptive: bool = False):
    """Normalise z: a ConditioningFn becomes a PerStep; check PerStep lengths. Returns
    ``(z, per_step, z at the first step)``."""
    n = ts.shape[0] - 1
    if adaptive and isinstance(z, (ConditioningFn, PerStep)):
        raise ValueError(
            f"{where}: per-step conditioning ({type(z).__name__}) has one value per step of a "
            f"fixed grid; an adaptive controller chooses its steps as it goes, so pass constant "
            f"conditioning z (or a fixed grid)."
        )
    if isinstance(z, ConditioningFn):
        z = z.per_step(ts)
    if isinstance(z, PerStep):
        leaves = jax.tree.leaves(z.values)
        bad = [jnp.shape(v) for v in leaves if jnp.ndim(v) == 0 or jnp.shape(v)[0] != n]
        if not leaves or bad:
            raise ValueError(
                f"{where}: z is a PerStep conditioning, which needs a leading axis of length "
                f"N = {n} (one entry per step of ts) on every leaf; got leaf shapes "
                f"{[jnp.shape(v) for v in leaves]}."
            )
        return z, True, jax.tree.map(lambda v: v[0], z.values)
    return z, False, z


def prepare_noise(solver: AbstractSolver, key, noise, n: int, x, where: str):
    """``(noise_mode, noise argument)`` for the solver: a key's raw data, a noise array or
    nothing (ODE solvers, which refuse randomness they would ignore)."""
    if not solver.stochastic:
        if key is not None or noise is not None:
            given = "key" if key is not None else "noise"
            raise ValueError(
                f"{where}: {given}= was given, but {type(solver).__name__} is an ODE sampler and "
                f"uses no randomness; drop {given}= or use an SDE sampler such as "
                f"jadeis.SDEDPMSolverPP()."
            )
        return "none", None
    if key is None and noise is None:
        raise ValueError(
            f"{where}: the SDE sampler {type(solver).__name__} needs randomness: pass "
            f"key=jax.random.key(seed), or noise= an array of shape "
            f"{_noise_shapes(solver, n, x)}."
        )
    if key is not None and noise is not None:
        raise ValueError(f"{where}: pass either key or noise, not both.")
    if noise is not None and not isinstance(x, jax.Array):
        return "array", _check_noise_tree(solver, noise, n, x, where)
    if noise is not None:
        noise = jnp.asarray(noise)
        want = (n,) + solver.noise_shape(x.shape)
        if noise.shape != want:
            what = "(N,) + x_T.shape" if want == (n,) + x.shape else "(N,) + noise_shape"
            raise ValueError(
                f"{where}: noise must have shape {what} = {want} for "
                f"{type(solver).__name__}, got {noise.shape}."
            )
        return "array", noise
    if isinstance(key, (int, np.integer)):
        raise ValueError(
            f"{where}: key must be a JAX PRNG key such as jax.random.key({key}), got the int {key}."
        )
    key = jnp.asarray(key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(
                f"{where}: key must be a single PRNG key, got a batch of shape {key.shape}; "
                f"vmap over sample to use one key per sample."
            )
        key = jax.random.key_data(key)
    elif key.shape != (2,) or key.dtype != jnp.uint32:
        raise ValueError(
            f"{where}: key must be a single JAX PRNG key (jax.random.key(seed)), got an array "
            f"of shape {key.shape} and dtype {key.dtype}."
        )
    return "key", key


def check_problem_model(problem, args, where: str, x=None, t_index: int = 0):
    """``check_model`` on a prepared problem, meant to run at trace time inside the jitted
    entry point (once per compilation, not on every call)."""
    from ._ei import model_time_dtype

    x = problem.solver.output(problem.init(args.x_T)) if x is None else x
    z = args.z
    if problem.per_step_z:
        z = jax.tree.map(lambda v: v[0], z.values)
    from ._core import state_dtype

    t = args.ts[t_index].astype(model_time_dtype(state_dtype(x)))
    check_model(problem.eps_fn, problem.params(args.params), x, t, z, where)


def _noise_shapes(solver, n: int, x):
    if isinstance(x, jax.Array):
        return (n,) + solver.noise_shape(x.shape)
    return jax.tree.map(lambda v: (n,) + solver.noise_shape(v.shape), x)


def _check_noise_tree(solver, noise, n: int, x, where: str):
    """The ``noise`` pytree of a pytree state: x's structure, leaf ``(N,) + leaf shape``."""
    want = _noise_shapes(solver, n, x)
    try:
        noise = jax.tree.map(lambda _, v: jnp.asarray(v), x, noise)
    except (ValueError, TypeError):
        raise ValueError(
            f"{where}: noise must be a pytree of the structure of x_T with leaves of shape "
            f"(N,) + leaf shape, i.e. {want}; got {jax.tree.structure(noise)} for x_T's "
            f"{jax.tree.structure(x)}."
        ) from None
    if any(
        v.shape != (n,) + solver.noise_shape(u.shape)
        for v, u in zip(jax.tree.leaves(noise), jax.tree.leaves(x))
    ):
        got = jax.tree.map(lambda v: v.shape, noise)
        raise ValueError(
            f"{where}: noise must be a pytree of the structure of x_T with leaves of shape "
            f"(N,) + leaf shape = {want} for {type(solver).__name__}, got {got}."
        )
    if not all(jnp.issubdtype(v.dtype, jnp.floating) for v in jax.tree.leaves(noise)):
        raise ValueError(f"{where}: the leaves of noise must be floating-point arrays.")
    return noise
