"""A warning for silent recompiles: the same configuration compiled again and again
because a function or optimizer object is new at every call.

Every jitted entry point compiles once per configuration: its static part (the model
function, the solver, the strategy, the optimizer, ...) is hashed by identity or value, and
its arrays by shape and dtype. A new ``lambda`` or a new ``optax.adam(...)`` per call is a
new configuration, so every call compiles again (minutes with a U-Net), and nothing says
so. Each entry point records, when it traces, a *structural* key of what it traces: the
functions by their code and the types of what they close over, the other static values
by value, the arrays by shape, dtype and sharding. Traces that share a structural key but
not the objects are the symptom: on the third, a ``UserWarning`` names the objects that
were new and the fix, once per configuration. Genuinely new configurations (other shapes,
another solver) have other keys and are not warned about.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import types
import warnings

import equinox as eqx
import jax
import numpy as np

#: how many compiles of one structural key, each with new objects, make a warning
THRESHOLD = 3
_MAX_DEPTH = 4

_FIXES = {
    "optimizer": (
        "create the optimizer once and pass the same object to every call (optax "
        "optimizers are closures: optax.adam(1e-2) twice is two configurations); to vary "
        "a learning rate without compiling again, build it with "
        "optax.inject_hyperparams(optax.adam)(learning_rate=...) and set the rate in "
        "the optimizer state (Guidance.init / Guidance.step)"
    ),
}
_DEFAULT_FIX = (
    "define it once (at module level, or outside the loop) and pass the same object to "
    "every call; pass what changes between calls (weights, a guidance scale, targets) as "
    "arrays, through params, z or loss_args, which are traced and do not recompile"
)


def _array_key(v):
    if isinstance(v, jax.Array):
        aval = jax.typeof(v)
        spec = getattr(getattr(aval, "sharding", None), "spec", None)
        return ("array", aval.shape, str(aval.dtype), aval.weak_type, str(spec))
    return ("array", np.shape(v), str(np.result_type(v)))


def _by_identity(obj) -> bool:
    """Whether ``obj`` is hashed (so cached by ``jax.jit``) by identity: functions, and
    objects without a ``__hash__`` of their own."""
    return type(obj).__hash__ is object.__hash__


def _structure(obj, depth: int = 0, closure: bool = False):
    """A hashable description of ``obj`` that two objects built by the same code share:
    functions by their code and the types of what they close over, arrays by shape, dtype
    and sharding, other values by value (inside a closure: by type), pytrees leaf by leaf."""
    if isinstance(obj, (jax.Array, np.ndarray, np.generic)):
        return _array_key(obj)
    if depth > _MAX_DEPTH:
        return ("type", type(obj))
    if isinstance(obj, types.FunctionType):
        cells = tuple(
            _structure(_cell(c), depth + 1, closure=True) for c in (obj.__closure__ or ())
        )
        return ("function", obj.__code__, cells)
    if isinstance(obj, types.MethodType):
        return ("method", _structure(obj.__func__, depth + 1), type(obj.__self__))
    if isinstance(obj, functools.partial):
        return (
            "partial",
            _structure(obj.func, depth + 1),
            tuple(_structure(a, depth + 1, closure=True) for a in obj.args),
            tuple(
                (k, _structure(v, depth + 1, closure=True)) for k, v in sorted(obj.keywords.items())
            ),
        )
    if closure:
        return ("type", type(obj))
    # a pytree (tuples, dicts, equinox modules, optax's GradientTransformation): leaf by leaf
    leaves, treedef = jax.tree.flatten(obj, is_leaf=lambda v: v is not obj and callable(v))
    if len(leaves) != 1 or leaves[0] is not obj:
        return ("tree", treedef, tuple(_structure(v, depth + 1) for v in leaves))
    if _by_identity(obj):
        return ("type", type(obj))
    return ("value", obj)


def _cell(cell):
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def _identities(obj) -> tuple:
    """The identities of the objects in ``obj`` that ``jax.jit`` caches by identity (a new
    one is a new configuration), down to the functions inside modules and optimizers."""
    out = []
    for v in jax.tree.leaves(obj, is_leaf=lambda v: v is not obj and callable(v)):
        if _by_identity(v):
            out.append(id(v))
        elif v is not obj and isinstance(v, eqx.Module):
            out.extend(_identities(v))
    return tuple(out)


class Registry:
    """The traced configurations of one entry point (see the module documentation)."""

    def __init__(self, where: str):
        self.where = where
        self.seen: dict = {}  # structural key -> list of identity tuples, one per compile
        self.warned: set = set()

    def note(self, parts: dict) -> None:
        """Record one trace of ``parts`` (name -> object); warn on the third compile of one
        structural key with new objects."""
        try:
            key = tuple((name, _structure(v)) for name, v in parts.items())
            hash(key)
        except Exception:  # noqa: BLE001 - a diagnostic must never break a compile
            return
        ids = tuple(_identities(v) for v in parts.values())
        history = self.seen.setdefault(key, [])
        if ids in history:
            return  # the same objects again (an outer retrace): not the symptom
        history.append(ids)
        if len(history) < THRESHOLD or key in self.warned:
            return
        names = [n for n, a, b in zip(parts, history[-2], history[-1]) if a != b]
        if not names:
            return
        self.warned.add(key)
        groups: dict[str, list[str]] = {}
        for n in names:
            groups.setdefault(_FIXES.get(n, _DEFAULT_FIX), []).append(n)
        fixes = "; ".join(
            fix if len(groups) == 1 else f"for {_join(ns)}: {fix}" for fix, ns in groups.items()
        )
        verb = "is a new object" if len(names) == 1 else "are new objects"
        warnings.warn(
            f"{self.where}: compiled {len(history)} times for the same configuration (same "
            f"shapes, dtypes, solver and strategy) because {_join(names)} {verb} at every "
            f"call (a new lambda or closure, a new optax optimizer). jadeis compiles once "
            f"per configuration, and a new object is a new configuration. Fix: {fixes}.",
            UserWarning,
            stacklevel=2,
        )


def _join(names) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


_REGISTRIES: dict[str, Registry] = {}
#: set while an entry point traces another inside its own trace (guide's step samples)
_NESTED: contextvars.ContextVar[bool] = contextvars.ContextVar("jadeis_nested", default=False)


@contextlib.contextmanager
def nested():
    """Inside, entry points traced as part of another's trace record nothing (the outer
    entry point warns)."""
    token = _NESTED.set(True)
    try:
        yield
    finally:
        _NESTED.reset(token)


def note_trace(where: str, parts: dict) -> None:
    """Record a trace of the entry point ``where`` (called inside its jitted function, so
    once per compilation)."""
    if _NESTED.get():
        return
    registry = _REGISTRIES.get(where)
    if registry is None:
        registry = _REGISTRIES[where] = Registry(where)
    registry.note(parts)


def clear() -> None:
    """Forget every recorded trace (for tests)."""
    _REGISTRIES.clear()


def problem_parts(problem, args, adjoint=None, **flags) -> dict:
    """The parts of a sampling problem's trace, by the names users know them by."""
    static = problem.static_params
    return {
        "eps_fn": problem.eps_fn,
        "params": None if static is None else static.tree,
        "solver": problem.solver,
        "controller": problem.controller,
        "adjoint": adjoint,
        "flags": (
            problem.per_step_z,
            problem.noise_mode,
            problem.save_trajectory,
            problem.first_step,
            problem.resume,
            tuple(sorted(flags.items())),
        ),
        "arrays": args,
    }
