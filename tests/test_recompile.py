"""Silent recompiles are warned about: the same configuration compiled again and again
because a function or optimizer object is new at every call (a new lambda, a new
``optax.adam(...)``), and only then (jadeis._recompile)."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import optax
import pytest

import jadeis
from jadeis import _recompile

SCH = jadeis.VPLinear()
TS = jadeis.time_grid(SCH, 4)


@pytest.fixture(autouse=True)
def _fresh_registry():
    _recompile.clear()
    yield
    _recompile.clear()


def _recompile_warnings(record):
    return [w for w in record if "compiled" in str(w.message) and w.category is UserWarning]


def _new_eps_fn(scale):
    return lambda params, x, t, z: scale * params * x  # a new closure at every call


def test_a_new_lambda_per_call_warns_once_on_the_third_compile():
    x_T = jnp.ones((3, 2))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for i in range(2):
            jadeis.sample(_new_eps_fn(1.0 + i), 0.5, x_T, schedule=SCH, ts=TS)
        assert not _recompile_warnings(record)
        for i in range(2, 6):
            jadeis.sample(_new_eps_fn(1.0 + i), 0.5, x_T, schedule=SCH, ts=TS)
    found = _recompile_warnings(record)
    assert len(found) == 1, [str(w.message) for w in found]
    text = str(found[0].message)
    assert text.startswith("sample: compiled 3 times") and "eps_fn is a new object" in text
    assert "define it once" in text and "params, z" in text


def test_new_shapes_and_configurations_do_not_warn():
    eps_fn = _new_eps_fn(1.0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for b in range(1, 5):  # genuinely new shapes
            jadeis.sample(eps_fn, 0.5, jnp.ones((b, 2)), schedule=SCH, ts=TS)
        for solver in (jadeis.DDIM(), jadeis.DPMSolver(), jadeis.UniPC(), jadeis.Rex()):
            jadeis.sample(eps_fn, 0.5, jnp.ones((1, 2)), schedule=SCH, ts=TS, solver=solver)
        for dtype in (jnp.float32, jnp.float64, jnp.bfloat16):
            jadeis.sample(eps_fn, 0.5, jnp.ones((1, 2), dtype), schedule=SCH, ts=TS)
        # the same objects again (cached: no compile at all)
        for _ in range(3):
            jadeis.sample(eps_fn, 0.5, jnp.ones((1, 2)), schedule=SCH, ts=TS)
    assert not _recompile_warnings(record), [str(w.message) for w in record]


def test_a_new_optimizer_per_guide_call_warns_and_names_it():
    eps_fn = _new_eps_fn(1.0)
    loss = lambda x0: jnp.sum((x0 - 1.0) ** 2)  # noqa: E731 - one object for every call
    x_T = jnp.zeros((2, 2))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for lr in (0.1, 0.05, 0.02):
            jadeis.guide(loss, eps_fn, 0.5, x_T, schedule=SCH, ts=TS,
                         optimizer=optax.adam(lr), wrt="x_T", num_iters=1, progress=False)
    found = _recompile_warnings(record)
    assert len(found) == 1, [str(w.message) for w in record]
    text = str(found[0].message)
    assert text.startswith("guide: compiled 3 times") and "optimizer is a new object" in text
    assert "optax.inject_hyperparams" in text
    # the sample traced inside guide's step does not warn a second time
    assert not any(str(w.message).startswith("sample:") for w in found)


def test_one_optimizer_object_does_not_warn():
    eps_fn = _new_eps_fn(1.0)
    opt = optax.adam(0.1)
    loss = lambda x0: jnp.sum((x0 - 1.0) ** 2)  # noqa: E731
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for b in (1, 2, 3, 4):  # new shapes: compiles, but no warning
            jadeis.guide(loss, eps_fn, 0.5, jnp.zeros((b, 2)), schedule=SCH, ts=TS,
                         optimizer=opt, wrt="x_T", num_iters=1, progress=False)
        for _ in range(3):
            jadeis.guide(loss, eps_fn, 0.5, jnp.zeros((1, 2)), schedule=SCH, ts=TS,
                         optimizer=opt, wrt="x_T", num_iters=1, progress=False)
    assert not _recompile_warnings(record), [str(w.message) for w in record]


def test_a_new_lambda_under_the_users_jit_warns():
    """A user's own jit around sample, rebuilt with a new lambda per call."""
    x_T = jnp.ones((2, 2))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for i in range(3):
            eps_fn = _new_eps_fn(float(i))
            g = jax.jit(jax.grad(
                lambda x, f=eps_fn: jnp.sum(jadeis.sample(f, 0.5, x, schedule=SCH, ts=TS))
            ))
            g(x_T)
    assert len(_recompile_warnings(record)) == 1
