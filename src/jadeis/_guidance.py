"""Guided generation: optimise the inputs of sampling for a loss on the sample."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from ._adjoint import AbstractAdjoint, DiscreteAdjoint
from ._sample import sample
from ._schedule import AbstractSchedule
from ._solver import AbstractSolver, DPMSolverPP

_WRT = ("x_T", "z", "params")


class GuideResult(NamedTuple):
    """What :func:`guide` returns.

    - `x_T`, `z`, `params`: the optimised values (the inputs, where not optimised).
    - `x_0`: the sample from the optimised values.
    - `losses`: loss history, shape ``(num_iters + 1,) + loss_shape``: entry ``k`` is the loss
      before update ``k``; the last entry is the loss of the returned values.
    - `x0_history`: with ``keep_x0=True``, the sample before every update,
      ``(num_iters,) + x_0.shape``; else ``None``.
    """

    x_T: Any
    z: Any
    params: Any
    x_0: Any
    losses: np.ndarray
    x0_history: np.ndarray | None


def _to_host(v) -> np.ndarray:
    """A (possibly multi-process) array as a NumPy array on every process: a per-example
    loss sharded over the devices of several processes is gathered (every process runs
    the same loop, so every process takes part in the gather)."""
    if getattr(v, "is_fully_addressable", True):
        return np.asarray(v)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(v, tiled=True))


def guide(
    loss_fn: Callable,
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
    adjoint: AbstractAdjoint = DiscreteAdjoint(),
    key=None,
    noise=None,
    loss_args: tuple = (),
    progress: bool = True,
    keep_x0: bool = False,
    desc: str = "guide",
) -> GuideResult:
    r"""Optimise any subset of ``(x_T, z, params)`` so that the sample
    ``x_0 = sample(eps_fn, params, x_T, z, ...)`` minimises ``loss_fn(x_0, *loss_args)``.

    Each iteration is one jit-compiled step: a forward sampling pass, the gradient with the
    strategy ``adjoint`` (e.g. ``AdjointDEIS(order=1)``, ``DiscreteAdjoint()``,
    ``Backprop()``), and one update of ``optimizer``. Batched: when ``loss_fn`` returns one
    loss per example (shape ``(B,)``), the objective is their sum, so with an elementwise
    optimiser (Adam, SGD, ...) the B problems are optimised independently and the history
    keeps each. Inputs sharded over devices stay sharded.

    **Arguments:**

    - `loss_fn`: ``loss_fn(x_0, *loss_args) -> loss`` (scalar or per-example array).
    - `eps_fn`, `params`, `x_T`, `z`, `schedule`, `ts`, `solver`, `adjoint`, `key`, `noise`:
      as in :func:`jadeis.sample` (an SDE sampler with a fixed ``key`` or ``noise`` sees the
      same noise at every iteration).
    - `optimizer`: any ``optax.GradientTransformation``.
    - `num_iters`: number of updates.
    - `wrt`: which of ``"x_T"``, ``"z"``, ``"params"`` to optimise (non-empty).
    - `loss_args`: extra (traced) arguments of ``loss_fn``, e.g. per-example targets.
    - `progress`: show a tqdm progress bar with the current mean loss.
    - `keep_x0`: also return the sample of every iteration.

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
    if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 0:
        raise ValueError(f"{where}: num_iters must be an int >= 0, got {num_iters!r}.")
    values = {"x_T": x_T, "z": z, "params": params}
    for w in wrt:
        leaves = jax.tree.leaves(values[w])
        if not leaves or not all(
            jnp.issubdtype(jnp.asarray(v).dtype, jnp.floating) for v in leaves
        ):
            raise ValueError(
                f"{where}: cannot optimise {w!r}: it must be a pytree of floating-point arrays, "
                f"got {values[w]!r:.80}."
            )
    opt_vars = {w: values[w] for w in wrt}
    fixed = {w: values[w] for w in _WRT if w not in wrt}
    loss_args = tuple(loss_args)

    # ts is closed over, not traced: sample checks it once on the host, and the compiled step
    # has no host callback (which would pin data to one device under sharding)
    ts = jnp.asarray(ts)

    def objective(opt_vars, fixed, key, noise, loss_args):
        v = {**fixed, **opt_vars}
        x_0 = sample(
            eps_fn,
            v["params"],
            v["x_T"],
            v["z"],
            schedule=schedule,
            ts=ts,
            solver=solver,
            adjoint=adjoint,
            key=key,
            noise=noise,
        )
        loss = loss_fn(x_0, *loss_args)
        return jnp.sum(loss), (loss, x_0)

    @jax.jit
    def step(opt_vars, opt_state, fixed, key, noise, loss_args):
        grad_fn = jax.value_and_grad(objective, has_aux=True)
        (_, (loss, x_0)), grads = grad_fn(opt_vars, fixed, key, noise, loss_args)
        # optax mixes Python floats with int32 step counts (e.g. Adam's bias correction):
        # run the optimiser with standard promotion even where the user set "strict"
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, opt_state, opt_vars)
            opt_vars = optax.apply_updates(opt_vars, updates)
        return opt_vars, opt_state, loss, x_0

    with jax.numpy_dtype_promotion("standard"):
        opt_state = optimizer.init(opt_vars)
    losses, x0s = [], []
    bar = tqdm(total=num_iters, desc=desc, disable=not progress, unit="it")
    for _ in range(num_iters):
        opt_vars, opt_state, loss, x_0 = step(opt_vars, opt_state, fixed, key, noise, loss_args)
        loss = _to_host(loss)
        losses.append(loss)
        if keep_x0:
            x0s.append(_to_host(x_0))
        bar.update(1)
        bar.set_postfix(loss=f"{float(np.mean(loss)):.4f}")
    bar.close()
    # the loss of the returned values: one more step, its update discarded (no new compile)
    _, _, loss, x_0 = step(opt_vars, opt_state, fixed, key, noise, loss_args)
    losses.append(_to_host(loss))
    v = {**fixed, **opt_vars}
    return GuideResult(
        x_T=v["x_T"],
        z=v["z"],
        params=v["params"],
        x_0=x_0,
        losses=np.stack(losses),
        x0_history=np.stack(x0s) if keep_x0 and x0s else None,
    )
