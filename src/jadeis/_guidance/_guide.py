"""Guided generation: optimise the inputs of sampling for a loss on the sample.

:class:`Guidance` is an optax-style ``init``/``step`` pair; :func:`guide` is a loop over
it. The step is one module-level ``equinox.filter_jit`` function whose static part is the
configuration (model, schedule, solver, strategy, optimizer, loss, projection: hashed by
identity or value), so it compiles once per configuration and shapes, across calls.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import _recompile as R, _validate as V
from .._adjoint import AbstractAdjoint, DiscreteAdjoint
from .._controller import AbstractController
from .._sample import resolve_solver, sample
from .._schedule import AbstractSchedule
from .._solver import AbstractSolver, DPMSolverPP
from ._losses import AbstractLoss, as_loss
from ._progress import IterationBar

_WRT = ("x_T", "z", "params")
_NOISE_MODES = ("frozen", "fresh")


class GuideResult(NamedTuple):
    """What :func:`guide` returns.

    - `x_T`, `z`, `params`: the optimised values (the inputs, where not optimised).
    - `x_0`: the sample from the optimised values.
    - `losses`: loss history, shape ``(iterations + 1,) + loss_shape``: entry ``k`` is the
      loss before update ``k``; the last entry is the loss of the returned values
      (``iterations`` is ``num_iters`` unless stopped early).
    - `x0_history`: with ``keep_x0=True``, the sample before every update,
      ``(iterations,) + x_0.shape``; else ``None``.
    """

    x_T: Any
    z: Any
    params: Any
    x_0: Any
    losses: np.ndarray
    x0_history: np.ndarray | None


class GuideState(NamedTuple):
    """The state of a :class:`Guidance` optimisation (a pytree).

    The current values: ``state.x_T``, ``state.z``, ``state.params`` (the optimised values
    after the last update, the inputs where not optimised); ``state.inputs`` is the dict of
    the three. Fields:

    - `opt_vars`: dict of what the optimizer updates (keys from ``wrt``): the
      floating-point array leaves of each optimised input (``None`` in place of its other
      leaves, as ``equinox.filter`` leaves them);
    - `opt_state`: the optimizer's state;
    - `fixed`: dict of the inputs that are not optimised;
    - `iteration`: number of updates done (int32 array);
    - `key`: the PRNG key of SDE samplers (or ``None``); `noise`: the noise array (or ``None``);
    - `loss`, `x_0`: the loss and sample of the values *before* the last update
      (``None`` after ``init``);
    - `rest`: dict of the leaves of each optimised input that are not optimised (an
      Equinox module's activation functions, integer buffers; ``None`` elsewhere), or
      ``None`` when there are none.
    """

    opt_vars: dict
    opt_state: Any
    fixed: dict
    iteration: Any
    key: Any
    noise: Any
    loss: Any = None
    x_0: Any = None
    rest: dict | None = None

    @property
    def inputs(self) -> dict:
        """The current ``{"x_T", "z", "params"}``."""
        return {**self.fixed, **combine_rest(self.opt_vars, self.rest)}

    @property
    def x_T(self):
        """The current initial noise (optimised, or the input)."""
        return self.inputs["x_T"]

    @property
    def z(self):
        """The current conditioning (optimised, or the input)."""
        return self.inputs["z"]

    @property
    def params(self):
        """The current model parameters (optimised, or the input)."""
        return self.inputs["params"]


def _is_optimisable(v) -> bool:
    """A leaf the optimizer updates: a floating-point array (or a Python/NumPy float)."""
    if isinstance(v, (float, np.floating)) and not isinstance(v, bool):
        return True
    return (eqx.is_array(v) or isinstance(v, np.ndarray)) and jnp.issubdtype(
        v.dtype, jnp.floating
    )


def split_optimisable(value):
    """``(floating leaves, the rest)``, each with ``None`` in place of the other's leaves
    (``equinox.partition``); the rest is ``None`` when every leaf is optimised."""
    opt, rest = eqx.partition(value, _is_optimisable)
    opt = jax.tree.map(lambda v: jnp.asarray(v) if isinstance(v, (float, np.floating)) else v, opt)
    if not jax.tree.leaves(rest):
        rest = None
    return opt, rest


def combine_rest(opt_vars: dict, rest: dict | None) -> dict:
    """The optimised inputs with the leaves that are not optimised put back."""
    if not rest:
        return dict(opt_vars)
    return {
        w: v if rest.get(w) is None else eqx.combine(v, rest[w]) for w, v in opt_vars.items()
    }


def _nnx_non_param_paths(value) -> list[str]:
    """The paths of the flax nnx variables in ``value`` that are not ``nnx.Param`` (RNG
    state, BatchNorm statistics: what ``nnx.split(model)`` puts beside the parameters)."""
    nnx = sys.modules.get("flax.nnx")
    if nnx is None:
        return []
    leaves = jax.tree_util.tree_flatten_with_path(
        value, is_leaf=lambda v: isinstance(v, nnx.Variable)
    )[0]
    return [
        f"{jax.tree_util.keystr(path)} ({type(v).__name__})"
        for path, v in leaves
        if isinstance(v, nnx.Variable) and not isinstance(v, nnx.Param)
    ]


def check_optimisable(value, name: str, where: str) -> None:
    """``value`` has floating-point leaves to optimise, and is not a whole nnx State."""
    bad = _nnx_non_param_paths(value)
    if bad:
        raise ValueError(
            f"{where}: cannot optimise {name!r}: it holds flax nnx state that is not a "
            f"parameter: {', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''}. Split the "
            f"parameters out and close over the rest: graphdef, params, rest = "
            f"nnx.split(model, nnx.Param, ...), and in eps_fn nnx.merge(graphdef, params, "
            f"rest) (docs/guides/flax-nnx.md)."
        )
    if not any(_is_optimisable(v) for v in jax.tree.leaves(value)):
        raise ValueError(
            f"{where}: cannot optimise {name!r}: it has no floating-point array leaves (the "
            f"optimizer updates those and keeps the others as they are), got {value!r:.80}."
        )


class Guidance(eqx.Module):
    r"""Optimise any subset of ``(x_T, z, params)`` so that the sample
    ``x_0 = sample(eps_fn, params, x_T, z, ...)`` minimises a loss, optax style:
    ``state = g.init(params, x_T, z)``, then ``state = g.step(state)`` (one jit-compiled
    forward pass, gradient and update). :func:`guide` is a loop over this pair.

    The step is compiled once per configuration and shapes, across calls and instances: keep
    the same ``eps_fn``, ``loss_fn``, ``optimizer`` and ``projection`` objects (a new lambda
    or a new ``optax.adam(...)`` per call is a new configuration and compiles again, which
    takes minutes with a U-Net; jadeis warns on the third such compile). To vary a learning
    rate, build the optimizer once with ``optax.inject_hyperparams(optax.adam)(
    learning_rate=...)`` and change ``state.opt_state.hyperparams["learning_rate"]``.
    Arrays (``ts``, ``loss_args``, a loss's weights) are traced.

    **Arguments:** as in :func:`guide`.

    **Example:**

    ```python
    >>> import jax.numpy as jnp, optax
    >>> import jadeis
    >>> sch = jadeis.VPLinear()
    >>> g = jadeis.Guidance(lambda x0: jnp.sum((x0 - 1.0) ** 2), lambda p, x, t, z: p * x,
    ...                     schedule=sch, ts=jadeis.time_grid(sch, 10),
    ...                     optimizer=optax.adam(0.1), wrt=("x_T",))
    >>> state = g.init(0.5, jnp.zeros((3, 2)))
    >>> for _ in range(20):
    ...     state = g.step(state)
    >>> bool(g.loss(state)[0] < state.loss)   # after the last update vs before it
    True

    ```
    """

    loss_fn: AbstractLoss
    eps_fn: Callable
    schedule: AbstractSchedule
    ts: Any
    optimizer: optax.GradientTransformation
    wrt: tuple = ("x_T", "z")
    solver: AbstractSolver = DPMSolverPP(order=2)
    adjoint: AbstractAdjoint = DiscreteAdjoint()
    sde_noise: str = "frozen"
    projection: Any = None
    controller: AbstractController | None = None

    def __init__(
        self,
        loss_fn,
        eps_fn: Callable,
        *,
        schedule: AbstractSchedule,
        ts,
        optimizer: optax.GradientTransformation,
        wrt: Sequence[str] = ("x_T", "z"),
        solver: AbstractSolver = DPMSolverPP(order=2),
        adjoint: AbstractAdjoint = DiscreteAdjoint(),
        sde_noise: str = "frozen",
        projection=None,
        controller: AbstractController | None = None,
    ):
        where = "guide"
        wrt = (wrt,) if isinstance(wrt, str) else tuple(wrt)
        if not wrt or any(w not in _WRT for w in wrt) or len(set(wrt)) != len(wrt):
            raise ValueError(
                f"{where}: wrt must be a non-empty subset of {_WRT} (no repeats), got {wrt!r}."
            )
        if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
            raise ValueError(
                f"{where}: optimizer must be an optax.GradientTransformation such as "
                f"optax.adam(1e-2), got {optimizer!r}."
            )
        if sde_noise not in _NOISE_MODES:
            raise ValueError(
                f"{where}: sde_noise must be 'frozen' (the same SDE noise at every iteration) "
                f"or 'fresh' (new noise per iteration, from the key), got {sde_noise!r}."
            )
        if projection is not None:
            if isinstance(projection, dict):
                bad = [k for k in projection if k not in wrt or not callable(projection[k])]
                if bad:
                    raise ValueError(
                        f"{where}: projection must map names in wrt={wrt} to functions, got "
                        f"keys {sorted(projection)}."
                    )
                projection = tuple(sorted(projection.items()))
            elif not callable(projection):
                raise ValueError(
                    f"{where}: projection must be a function of the dict of optimised inputs, "
                    f"or a dict such as {{'x_T': jadeis.sphere_projection}}, got "
                    f"{projection!r:.80}."
                )
        solver, controller = resolve_solver(solver, controller, where)
        V.check_adjoint(adjoint, where)
        self.loss_fn = as_loss(loss_fn, where)
        self.eps_fn = eps_fn
        self.schedule = schedule
        self.ts = V.check_ts(ts, schedule, where)
        self.optimizer = optimizer
        self.wrt = wrt
        self.solver = solver
        self.adjoint = adjoint
        self.sde_noise = sde_noise
        self.projection = projection
        self.controller = controller

    # -- optax-style pair ------------------------------------------------------------------

    def init(self, params, x_T, z=None, *, key=None, noise=None, loss_args: tuple = ()):
        """The initial :class:`GuideState`. Validates the inputs and the loss eagerly."""
        where = "guide"
        values = {"x_T": x_T, "z": z, "params": params}
        for w in self.wrt:
            check_optimisable(values[w], w, where)
        if self.sde_noise == "fresh":
            if not self.solver.stochastic or key is None:
                raise ValueError(
                    f"{where}: sde_noise='fresh' draws new noise per iteration from key=: it "
                    f"needs an SDE sampler and key=jax.random.key(seed) (got solver "
                    f"{type(self.solver).__name__}, key={key!r:.40})."
                )
        # the optimizer updates the floating-point leaves; any other leaf (an Equinox
        # module's functions, integer buffers) is kept as it is, as equinox.filter does
        split = {w: split_optimisable(values[w]) for w in self.wrt}
        opt_vars = {w: split[w][0] for w in self.wrt}
        rest = {w: split[w][1] for w in self.wrt}
        rest = rest if any(r is not None for r in rest.values()) else None
        fixed = {w: values[w] for w in _WRT if w not in self.wrt}
        if isinstance(key, (int, np.integer)):
            raise ValueError(
                f"{where}: key must be a JAX PRNG key such as jax.random.key({key}), got the "
                f"int {key}."
            )
        if key is not None and jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
            key = jax.random.key_data(key)
        # everything sample checks, and the loss's output type, once, before compiling
        check_loss_output(self, opt_vars, fixed, key, noise, tuple(loss_args), rest)
        with jax.numpy_dtype_promotion("standard"):
            opt_state = self.optimizer.init(opt_vars)
        return GuideState(
            opt_vars, opt_state, fixed, jnp.zeros((), jnp.int32), key, noise, rest=rest
        )

    def _run(self, state: GuideState, loss_args):
        if not isinstance(state, GuideState) or set(state.opt_vars) != set(self.wrt):
            made = sorted(state.opt_vars) if isinstance(state, GuideState) else type(state)
            raise ValueError(
                f"guide: state must be a GuideState from this Guidance's init, which optimises "
                f"wrt={self.wrt}; got one that optimises {made}. Call init(...) of this "
                f"Guidance for a state."
            )
        return _step(
            self,
            state.opt_vars,
            state.opt_state,
            state.fixed,
            state.iteration,
            state.key,
            state.noise,
            tuple(loss_args),
            True,
            rest=state.rest,
        )

    def step(self, state: GuideState, loss_args: tuple = ()) -> GuideState:
        """One update; the returned state's ``loss``/``x_0`` are those before the update."""
        opt_vars, opt_state, loss, x_0 = self._run(state, loss_args)
        return state._replace(
            opt_vars=opt_vars,
            opt_state=opt_state,
            iteration=state.iteration + 1,
            loss=loss,
            x_0=x_0,
        )

    def loss(self, state: GuideState, loss_args: tuple = ()):
        """``(loss, x_0)`` of the state's current values (no update; same compiled step)."""
        _, _, loss, x_0 = self._run(state, loss_args)
        return loss, x_0


def _key_of(g: Guidance, key, iteration):
    if key is None:
        return None
    key = jax.random.wrap_key_data(key)
    if g.sde_noise == "fresh":
        key = jax.random.fold_in(key, iteration)
    return key


def _loss_and_sample(g: Guidance, opt_vars, fixed, iteration, key, noise, loss_args, rest):
    """``(loss as the loss function returns it, x_0)`` for the current values."""
    v = {**fixed, **combine_rest(opt_vars, rest)}
    x_0 = sample(
        g.eps_fn,
        v["params"],
        v["x_T"],
        v["z"],
        schedule=g.schedule,
        ts=g.ts,
        solver=g.solver,
        controller=g.controller,
        adjoint=g.adjoint,
        key=_key_of(g, key, iteration),
        noise=noise,
    )
    return g.loss_fn(x_0, v, *loss_args), x_0


def _objective(g: Guidance, opt_vars, fixed, iteration, key, noise, loss_args, rest):
    loss, x_0 = _loss_and_sample(g, opt_vars, fixed, iteration, key, noise, loss_args, rest)
    return jnp.sum(loss), (loss, x_0)


def check_loss_output(g: Guidance, opt_vars, fixed, key, noise, loss_args, rest=None):
    """The loss must return one real floating-point array (not a tuple, not complex): a
    scalar, or one loss per example (shape ``(B,)``, B the leading axis of ``x_0``)."""

    def f(opt_vars, fixed, key, noise, loss_args, rest):
        return _loss_and_sample(g, opt_vars, fixed, 0, key, noise, loss_args, rest)

    with R.nested():  # (a trace for the check, not a compile of sample)
        out, x_0 = eqx.filter_eval_shape(f, opt_vars, fixed, key, noise, loss_args, rest)
    if not isinstance(out, jax.ShapeDtypeStruct):
        raise ValueError(
            f"guide: loss_fn must return one real array (a scalar, or one loss per example); "
            f"it returned {type(out).__name__} {jax.tree.structure(out)}. Return only the "
            f"loss (log other values from a callback)."
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(
            f"guide: loss_fn must return a real floating-point array, got dtype {out.dtype}"
            + (
                " (take jnp.abs(...) ** 2 or the real part)."
                if jnp.issubdtype(out.dtype, jnp.complexfloating)
                else "."
            )
        )
    batch = jax.tree.leaves(x_0)[0].shape[:1]
    if out.ndim > 1 or (out.ndim == 1 and out.shape != batch):
        raise ValueError(
            f"guide: loss_fn must return a scalar or one loss per example, shape (B,) = "
            f"{batch} (B the leading axis of x_0, shape {jax.tree.leaves(x_0)[0].shape}); it "
            f"returned shape {out.shape}. Reduce it over the other axes, e.g. "
            f"jnp.sum(..., axis=-1) (guide minimises the sum of the per-example losses)."
        )


def _to_host(v) -> np.ndarray:
    """A (possibly multi-process) array as a NumPy array on every process: a per-example
    loss sharded over the devices of several processes is gathered (every process runs
    the same loop, so every process takes part in the gather)."""
    if getattr(v, "is_fully_addressable", True):
        return np.asarray(v)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(v, tiled=True))


@eqx.filter_jit
def _step(
    g: Guidance, opt_vars, opt_state, fixed, iteration, key, noise, loss_args, update, rest=None
):
    R.note_trace(
        "guide",
        {
            "eps_fn": g.eps_fn,
            "loss_fn": g.loss_fn,
            "optimizer": g.optimizer,
            "projection": g.projection,
            "solver": g.solver,
            "controller": g.controller,
            "adjoint": g.adjoint,
            "flags": (g.wrt, g.sde_noise, update),
            "arrays": (g.schedule, g.ts, opt_vars, opt_state, fixed, iteration, key, noise),
            "loss_args": loss_args,
            "rest": rest,
        },
    )
    grad_fn = jax.value_and_grad(_objective, argnums=1, has_aux=True)
    # g.ts was checked eagerly in Guidance(): the compiled step needs no host callback;
    # the sample traced inside is this step's (guide warns about recompiles, not sample)
    with V.ts_prechecked(), R.nested():
        (_, (loss, x_0)), grads = grad_fn(
            g, opt_vars, fixed, iteration, key, noise, loss_args, rest
        )
    # optax mixes Python floats with int32 step counts (e.g. Adam's bias correction):
    # run the optimiser with standard promotion even where the user set "strict"
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = g.optimizer.update(grads, opt_state, opt_vars)
        opt_vars = optax.apply_updates(opt_vars, updates)
        if g.projection is not None:
            if isinstance(g.projection, tuple):
                opt_vars = {**opt_vars, **{k: f(opt_vars[k]) for k, f in g.projection}}
            else:
                opt_vars = g.projection(opt_vars)
    return opt_vars, opt_state, loss, x_0


def guide(
    loss_fn,
    eps_fn: Callable,
    params: Any,
    x_T,
    z: Any = None,
    *,
    schedule: AbstractSchedule,
    ts,
    optimizer: optax.GradientTransformation,
    num_iters: int = 20,
    wrt: Sequence[str] = ("x_T", "z"),
    solver: AbstractSolver = DPMSolverPP(order=2),
    controller: AbstractController | None = None,
    adjoint: AbstractAdjoint = DiscreteAdjoint(),
    key=None,
    noise=None,
    sde_noise: str = "frozen",
    loss_args: tuple = (),
    projection=None,
    callback: Callable | None = None,
    tol: float | None = None,
    progress: bool = True,
    keep_x0: bool = False,
    desc: str = "guide",
) -> GuideResult:
    r"""Optimise any subset of ``(x_T, z, params)`` so that the sample
    ``x_0 = sample(eps_fn, params, x_T, z, ...)`` minimises a loss.

    Each iteration is one jit-compiled step (:meth:`Guidance.step`): a forward sampling
    pass, the gradient with the strategy ``adjoint``, one update of ``optimizer`` and the
    ``projection``. Compiled once per configuration and shapes, across calls: keep the same
    ``eps_fn``, ``loss_fn`` and ``optimizer`` objects. A new lambda or a new
    ``optax.adam(...)`` per call compiles again (minutes with a U-Net; jadeis warns on the
    third such compile of one configuration); see :class:`Guidance` to vary a learning rate.
    The progress bar reports the first iteration (the compilation) on its own, and its rate
    and ETA count only the compiled iterations.

    The loss is a scalar or one value per example (shape ``(B,)``, B the leading axis of
    ``x_0``; any other shape, such as ``(B, 2)``, is a ``ValueError``: reduce it first). The
    objective is the sum of the per-example losses, so with an elementwise optimiser (Adam,
    SGD, ...) the B problems are optimised independently and the history keeps each.

    What is optimised: the floating-point array leaves of each input named in ``wrt``. Any
    other leaf (an Equinox module's activation functions, integer or boolean buffers) is
    kept as it is, as ``equinox.filter`` does, so an Equinox module is a valid ``params``.
    A flax nnx ``State`` that holds more than ``nnx.Param`` variables (RNG state, BatchNorm
    statistics) is refused: split out the parameters with ``nnx.split(model, nnx.Param,
    ...)`` (docs/guides/flax-nnx.md).

    **Arguments:**

    - `loss_fn`: a callable ``loss_fn(x_0, *loss_args) -> loss`` (scalar or per-example), or
      a :class:`jadeis.Loss`: ``Loss(fn, uses_inputs=True)`` is called
      ``fn(x_0, inputs, *loss_args)`` with ``inputs = {"x_T", "z", "params"}`` (current
      values), for priors on the noise; :class:`jadeis.NormPrior`, :class:`jadeis.ChiPrior`
      are built in; losses add and scale: ``fit + 0.1 * jadeis.ChiPrior()``, where ``fit``
      may be a plain function (it becomes ``jadeis.Loss(fit)``; to scale a plain function
      itself, wrap it first: ``0.5 * jadeis.Loss(fit)``). It must return one real
      floating-point array, a scalar or shape ``(B,)`` (a tuple, a complex value or another
      shape is a ``ValueError``).
    - `eps_fn`, `params`, `x_T`, `z`, `schedule`, `ts`, `solver`, `controller`, `adjoint`,
      `key`, `noise`: as in :func:`jadeis.sample` (an adaptive controller chooses the grid
      anew at every iteration; the gradient is that of the accepted steps).
    - `sde_noise`: for SDE samplers, ``"frozen"`` (default: the same ``key``/``noise`` at
      every iteration) or ``"fresh"`` (iteration k uses ``fold_in(key, k)``; needs ``key``).
    - `optimizer`: any ``optax.GradientTransformation``.
    - `num_iters`: the largest number of updates.
    - `wrt`: which of ``"x_T"``, ``"z"``, ``"params"`` to optimise (non-empty).
    - `loss_args`: extra (traced) arguments of the loss, e.g. per-example targets.
    - `projection`: applied after each update: a function of the dict of optimised inputs
      returning that dict, or a dict of functions per name, e.g.
      ``{"x_T": jadeis.sphere_projection}``.
    - `callback`: ``callback(i, state) -> bool | None`` after update ``i`` (a
      :class:`GuideState`; ``state.loss``/``state.x_0`` are those before the update);
      returning ``True`` stops.
    - `tol`: stop when no example's loss changed by more than ``tol * max(1, |loss|)``
      between successive iterations.
    - `progress`: show a tqdm progress bar with the current mean loss and the time of the
      first iteration (the compilation), apart from the rate and ETA of the others.
    - `keep_x0`: also return the sample of every iteration.

    Stops with a ``FloatingPointError`` at the first non-finite loss (NaN or inf), naming
    the iteration.

    **Returns:** a :class:`GuideResult`.

    **Example:**

    ```python
    >>> import jax.numpy as jnp, optax
    >>> import jadeis
    >>> sch = jadeis.VPLinear()
    >>> eps_fn = lambda params, x, t, z: params * x - z
    >>> res = jadeis.guide(lambda x0: jnp.sum((x0 - 1.0) ** 2, axis=-1), eps_fn, 0.5,
    ...                    jnp.zeros((3, 2)), jnp.zeros((3, 2)), schedule=sch,
    ...                    ts=jadeis.time_grid(sch, 10), optimizer=optax.adam(0.1),
    ...                    num_iters=30, progress=False)
    >>> res.losses.shape
    (31, 3)
    >>> bool((res.losses[-1] < res.losses[0]).all())
    True

    ```
    """
    where = "guide"
    if (
        isinstance(num_iters, bool)
        or not isinstance(num_iters, (int, np.integer))
        or (num_iters < 0)
    ):
        raise ValueError(f"{where}: num_iters must be an int >= 0, got {num_iters!r}.")
    if tol is not None and not (np.isfinite(tol) and tol >= 0):
        raise ValueError(f"{where}: tol must be a finite number >= 0 (or None), got {tol!r}.")
    if callback is not None and not callable(callback):
        raise ValueError(f"{where}: callback must be callable(i, state), got {callback!r:.80}.")
    g = Guidance(
        loss_fn,
        eps_fn,
        schedule=schedule,
        ts=ts,
        optimizer=optimizer,
        wrt=wrt,
        solver=solver,
        adjoint=adjoint,
        sde_noise=sde_noise,
        projection=projection,
        controller=controller,
    )
    loss_args = tuple(loss_args)
    state = g.init(params, x_T, z, key=key, noise=noise, loss_args=loss_args)
    losses, x0s = [], []
    bar = IterationBar(int(num_iters), desc, disable=not progress)

    def finite(loss, i, what):
        if not np.all(np.isfinite(loss)):
            bar.close()
            raise FloatingPointError(
                f"{where}: the loss is not finite ({what} {i}: {loss.tolist()!r:.120}); "
                f"stopped. Check the loss, the optimizer's step size and the time grid; "
                f"the inputs before this iteration are the last finite ones."
            )

    try:
        for i in range(int(num_iters)):
            state = g.step(state, loss_args)
            loss = _to_host(state.loss)
            finite(loss, i, "iteration")
            if losses and tol is not None:
                prev = losses[-1]
                done = np.all(np.abs(loss - prev) <= tol * np.maximum(1.0, np.abs(prev)))
            else:
                done = False
            losses.append(loss)
            if keep_x0:
                x0s.append(_to_host(state.x_0))
            bar.update(loss)
            if callback is not None and callback(i, state):
                break
            if done:
                break
    finally:
        bar.close()
    # the loss of the returned values: the same compiled step, its update discarded
    loss, x_0 = g.loss(state, loss_args)
    loss = _to_host(loss)
    finite(loss, len(losses), "after update")
    losses.append(loss)
    v = state.inputs
    return GuideResult(
        x_T=v["x_T"],
        z=v["z"],
        params=v["params"],
        x_0=x_0,
        losses=np.stack(losses),
        x0_history=np.stack(x0s) if keep_x0 and x0s else None,
    )
