"""Mixed precision: a bfloat16 model drives a float32 state (docs/precision.md)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jadeis


def _rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2)))


@pytest.fixture(scope="module")
def digits():
    from jadeis.digits import load_denoiser

    model = load_denoiser()
    seen = []
    p16 = jax.tree.map(lambda v: v.astype(jnp.bfloat16), model.params)

    def eps16(params, x, t, z):  # the network in bfloat16; returns bfloat16
        seen.append(jnp.asarray(t).dtype)
        bf = jnp.bfloat16
        return model.eps_fn(params, x.astype(bf), jnp.asarray(t).astype(bf), z.astype(bf))

    return model, p16, eps16, seen


def test_bfloat16_model_float32_state(digits):
    model, p16, eps16, seen = digits
    x_T = jax.random.normal(jax.random.key(0), (16, 8, 8), jnp.float32)
    z = model.z_for(np.arange(16) % 10).astype(jnp.float32)
    ts = jadeis.time_grid(model.schedule, 10, dtype=jnp.float32)
    kw = dict(schedule=model.schedule, ts=ts, solver=jadeis.DPMSolverPP(),
              adjoint=jadeis.DiscreteAdjoint())
    # the bundled network mixes its own float32 constants with bfloat16 parameters
    with jax.numpy_dtype_promotion("standard"):
        ref = jadeis.sample(model.eps_fn, model.params, x_T, z, **kw)
        seen.clear()
        out = jadeis.sample(eps16, p16, x_T, z, **kw)
        assert out.dtype == jnp.float32  # the state stays float32
        assert seen and all(d == jnp.float32 for d in seen)  # t reaches the model in float32
        assert _rel(out, ref) < 5e-3  # measured 0.41%

        def loss(f, p):
            return lambda x: jnp.sum(jadeis.sample(f, p, x, z, **kw) ** 2)

        g_ref = jax.grad(loss(model.eps_fn, model.params))(x_T)
        g16 = jax.grad(loss(eps16, p16))(x_T)
    assert g16.dtype == jnp.float32
    # the model's VJP runs in bfloat16 (its dtype): measured 1.4% (bfloat16's unit
    # roundoff is 0.39%); accumulation is float32
    assert _rel(g16, g_ref) < 2.5e-2


def test_time_reaches_model_in_float32_for_bfloat16_state(digits):
    model, _, _, _ = digits
    seen = []

    def eps_fn(params, x, t, z):
        seen.append(jnp.asarray(t).dtype)
        return jnp.zeros_like(x)

    x_T = jnp.ones((2, 8, 8), jnp.bfloat16)
    ts = jadeis.time_grid(model.schedule, 3, dtype=jnp.float32)
    with jax.numpy_dtype_promotion("standard"):
        out = jadeis.sample(eps_fn, None, x_T, None, schedule=model.schedule, ts=ts,
                            solver=jadeis.DDIM())
    assert out.dtype == jnp.bfloat16
    assert seen and all(d == jnp.float32 for d in seen)


def test_eps_of_other_dtype_is_cast_not_rejected_but_ints_are():
    sch = jadeis.VPLinear()
    ts = jadeis.time_grid(sch, 4)
    x_T = jnp.ones((3,), jnp.float64)
    out = jadeis.sample(lambda p, x, t, z: (0.1 * x).astype(jnp.float32), None, x_T, None,
                        schedule=sch, ts=ts)
    assert out.dtype == jnp.float64
    with pytest.raises(ValueError, match="floating-point array"):
        jadeis.sample(lambda p, x, t, z: x.astype(jnp.int32), None, x_T, None,
                      schedule=sch, ts=ts)
