"""Sampling with adaptive step sizes (:class:`jadeis.Adaptive`) and its exact gradient.

The forward pass is one ``lax.while_loop`` of at most ``max_steps`` attempts. Each attempt is
one step of the wrapped solver from the current time to ``t(lambda + h)`` with its embedded
error estimate; the PID controller (docs/math/adaptive.md) accepts or rejects it and proposes
the next ``h``. One grid serves the whole batch (the error norm is over the whole state).

Gradient (one ``jax.custom_vjp``): the exact discrete adjoint of the accepted steps, i.e. the
reverse-mode derivative of the map ``x_T -> x_0`` with the accepted grid held fixed (the
controller's choices are not differentiated, as in diffrax). The forward pass records the
accepted times (``max_steps + 1`` scalars) and, for :class:`jadeis.DiscreteAdjoint`, the state
at the start of every accepted step; with :class:`jadeis.ReversibleAdjoint` and a Rex solver
the states are reconstructed with the solver's ``inverse_step`` instead. The backward pass is a
``lax.while_loop`` over the accepted steps only, taking the VJP of ``solver.step`` (the model
evaluations rematerialised inside it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from . import _validate as V
from ._adjoint import _tree
from ._adjoint.reversible import ReversibleAdjoint
from ._core import Args, Problem, bind_model, state_dtype
from ._phi import multistep_weights, phi


def _row(tree):
    return jax.tree.map(lambda v: v[0], tree)


def _step_inputs(inner, schedule, t, t_next, dtype):
    return _row(inner.inputs(schedule, jnp.stack([t, t_next]), dtype))


def _buffer(M):
    """A zero buffer of M copies of an array, laid out (sharded) like the array: under an
    explicit-axis mesh each device then keeps only its own rows of every saved state."""

    def make(v):
        return jnp.broadcast_to(jnp.zeros_like(v)[None], (M,) + v.shape)

    return make


def _error_norm(ad, err, x, x_new):
    """RMS over every element of ``err / (atol + rtol * max(|x|, |x_new|))`` (in at least
    float32)."""
    total = None
    count = 0
    for e, a, b in zip(jax.tree.leaves(err), jax.tree.leaves(x), jax.tree.leaves(x_new)):
        dt = e.dtype if jnp.dtype(e.dtype).itemsize >= 4 else jnp.dtype(jnp.float32)
        e, a, b = e.astype(dt), a.astype(dt), b.astype(dt)
        b = jnp.where(jnp.isfinite(b), b, a)
        scale = ad.atol + ad.rtol * jnp.maximum(jnp.abs(a), jnp.abs(b))
        part = jnp.sum(jnp.square(e / scale)).astype(jnp.float32)
        total = part if total is None else total + part
        count += e.size
    return jnp.sqrt(total / max(count, 1))


def controller(ad, E, e1, e2):
    """One decision of the PID controller (the formula of ``diffrax.PIDController``):
    ``(accept, factor, e1', e2')`` from the scaled error ``E`` of this attempt and the
    inverse scaled errors ``e1``, ``e2`` of the last two accepted steps."""
    k = ad.error_order
    c1 = (ad.pcoeff + ad.icoeff + ad.dcoeff) / k
    c2 = -(ad.pcoeff + 2 * ad.dcoeff) / k
    c3 = ad.dcoeff / k
    accept = E < 1.0
    inv = 1.0 / E
    factor = ad.safety * inv**c1
    if c2 != 0:
        factor = factor * e1**c2
    if c3 != 0:
        factor = factor * e2**c3
    factor = jnp.clip(
        factor,
        jnp.where(accept, 1.0, ad.factormin),
        jnp.where(accept, ad.factormax, ad.safety),
    )
    # a failed step (E = inf) or an exact one (E = 0) does not steer the next ones
    inv = jnp.where((inv == 0) | jnp.isinf(inv), jnp.ones_like(inv), inv)
    return accept, factor, jnp.where(accept, inv, e1), jnp.where(accept, e1, e2)


def _ends(ad, schedule, ts, first_fraction):
    """``(t_start, t_end, lam0, lam_end, span, h0)``: the end times, their log-SNRs in the
    grid's dtype, and the first step (``dlambda0``, or ``span * first_fraction``)."""
    tdt = ts.dtype
    t_start, t_end = ts[0], ts[-1]
    lam0 = schedule.log_snr(t_start).astype(tdt)
    lam_end = schedule.log_snr(t_end).astype(tdt)
    span = lam_end - lam0
    if ad.dlambda0 is None:
        h0 = span * first_fraction
    else:
        h0 = jnp.minimum(jnp.asarray(ad.dlambda0, tdt), span)
    return t_start, t_end, lam0, lam_end, span, h0.astype(tdt)


def _next_time(schedule, lam, h, lam_end, t_end):
    """``(last, h_eff, t_next)`` of an attempt of size ``h`` from ``lam``: a step that would
    leave less than 1% of itself before ``lam_end`` is stretched to end exactly at ``t_end``."""
    rem = lam_end - lam
    last = h * 1.01 >= rem
    h_eff = jnp.where(last, rem, h)
    t_next = jnp.where(last, t_end, schedule.t_from_log_snr(lam + h_eff).astype(t_end.dtype))
    return last, h_eff, t_next


def _forward(problem: Problem, args: Args, record: str | None):
    """``(x_0, ts_buf, n_accepted, states_buf, final_state, done)``; ``record`` is None,
    ``"grid"`` (accepted times) or ``"states"`` (times and the state at the start of every
    accepted step)."""
    ad = problem.solver
    inner = ad.solver
    params, x_T, z, schedule, ts, _ = args
    dtype = state_dtype(x_T)
    tdt = ts.dtype
    t_start, t_end, lam0, lam_end, span, h0 = _ends(ad, schedule, ts, 1 / 16)
    model = bind_model(problem, params, z)
    M = ad.max_steps
    state0 = inner.init(x_T)
    one = jnp.ones((), jnp.float32)
    ts_buf = jnp.full((M + 1,), t_end, tdt).at[0].set(t_start) if record else None
    states_buf = (
        jax.tree.map(_buffer(M), state0)
        if record == "states" else None
    )

    hmin = jnp.abs(span) * 1e-12  # a collapsed step size stops the loop (then an error)

    def cond(c):
        return ~c["done"] & (c["n_try"] < M) & (c["h"] > hmin)

    def body(c):
        state, lam, h = c["state"], c["lam"], c["h"]
        last, h_eff, t_next = _next_time(schedule, lam, h, lam_end, t_end)
        inp = _step_inputs(inner, schedule, c["t"], t_next, dtype)
        new_state, err = inner.step_with_error(model, inp, state, None)
        E = _error_norm(ad, err, inner.output(state), inner.output(new_state))
        E = jnp.where(jnp.isnan(E), jnp.inf, E).astype(jnp.float32)
        accept, factor, e1, e2 = controller(ad, E, c["e1"], c["e2"])
        sel = lambda a, b: jax.tree.map(lambda u, v: jnp.where(accept, u, v), a, b)  # noqa: E731
        out = {
            "state": sel(new_state, state),
            "t": jnp.where(accept, t_next, c["t"]),
            "lam": jnp.where(accept, jnp.where(last, lam_end, lam + h_eff), lam),
            "h": (h_eff * factor.astype(tdt)).astype(tdt),
            "e1": e1,
            "e2": e2,
            "n_acc": c["n_acc"] + accept.astype(jnp.int32),
            "n_try": c["n_try"] + 1,
            "done": accept & last,
        }
        n = c["n_acc"]
        if record:
            buf = c["ts_buf"]
            out["ts_buf"] = buf.at[n + 1].set(jnp.where(accept, t_next, buf[n + 1]))
        if record == "states":
            # the state at the start of the step (unchanged by a rejection, so rewriting it
            # on every attempt is harmless)
            out["states_buf"] = jax.tree.map(
                lambda b, s: b.at[n].set(s), c["states_buf"], state
            )
        return out

    carry = {
        "state": state0,
        "t": t_start,
        "lam": lam0,
        "h": h0,
        "e1": one,
        "e2": one,
        "n_acc": jnp.zeros((), jnp.int32),
        "n_try": jnp.zeros((), jnp.int32),
        "done": jnp.zeros((), bool),
    }
    if record:
        carry["ts_buf"] = ts_buf
    if record == "states":
        carry["states_buf"] = states_buf
    c = lax.while_loop(cond, body, carry)
    x_0 = _budget_check(inner.output(c["state"]), c["done"], M)
    return x_0, c.get("ts_buf"), c["n_acc"], c.get("states_buf"), c["state"], c["done"]


def _budget_check(x_0, done, M):
    return V.runtime_check(
        x_0,
        [(
            ~done,
            f"sample: Adaptive did not reach ts[-1] within max_steps={M} attempts (or its "
            f"step size collapsed); raise max_steps, loosen rtol/atol, or check the model for "
            f"non-finite outputs.",
        )],
    )


def _forward_any(problem, args, record):
    if is_multistep(problem.solver.solver):
        return _forward_multistep(problem, args, record)
    return _forward(problem, args, record)


def _is_primal(v):
    return isinstance(v, jax.custom_derivatives.CustomVJPPrimal)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def run(problem: Problem, args: Args):
    """``x_0`` of an adaptive solve, with the exact gradient of the accepted steps."""
    return _forward_any(problem, args, None)[0]


def _run_fwd(problem, args):
    values = Args(*jax.tree.map(lambda p: p.value, args, is_leaf=_is_primal))
    perturbed = Args(*jax.tree.map(lambda p: p.perturbed, args, is_leaf=_is_primal))
    if any(jax.tree.leaves((perturbed.ts, perturbed.schedule))):
        raise ValueError(
            "sample: with jadeis.Adaptive the time grid is chosen by the step-size controller "
            "and is not differentiated, so gradients with respect to ts or the schedule's "
            "parameters are not available; differentiate with a fixed grid (ts of N + 1 "
            "times and a fixed-step solver) instead."
        )
    reversible = isinstance(problem.adjoint, ReversibleAdjoint)
    x_0, ts_buf, n_acc, states_buf, final, _ = _forward_any(
        problem, values, "grid" if reversible else "states"
    )
    flags = (
        any(jax.tree.leaves(perturbed.params)),
        any(jax.tree.leaves(perturbed.z)),
        any(jax.tree.leaves(perturbed.x_T)),
    )
    return x_0, (values, ts_buf, n_acc, states_buf, final, flags)


def _run_bwd(problem, res, x0_bar):
    values, ts_buf, n_acc, states_buf, final, (want_p, want_z, want_x) = res
    ad = problem.solver
    inner = ad.solver
    params, x_T, z, schedule, _, _ = values
    dtype = state_dtype(x_T)
    x_final = final if is_multistep(inner) else inner.output(final)
    if isinstance(x0_bar, jax.custom_derivatives.SymbolicZero):
        x0_bar = jax.tree.map(jnp.zeros_like, x_final)
    else:
        x0_bar = jax.tree.map(
            lambda g, v: jnp.zeros_like(v) if isinstance(g, jax.custom_derivatives.SymbolicZero)
            else g.astype(v.dtype),
            x0_bar, x_final,
            is_leaf=lambda g: isinstance(g, jax.custom_derivatives.SymbolicZero),
        )
    if is_multistep(inner):
        xT_bar, pbar, zbar = _multistep_backward(
            problem, values, ts_buf, n_acc, states_buf, x0_bar, (want_p, want_z, want_x)
        )
        return (Args(pbar, xT_bar if want_x else None, zbar, None, None, None),)
    _, out_vjp = jax.vjp(inner.output, final)
    (sbar0,) = out_vjp(x0_bar)
    reversible = states_buf is None
    model0 = bind_model(problem, params, z)

    def vjp_step(state, inp, sbar):
        # differentiate only with respect to what is asked for
        def f(st, *diff):
            p = diff[0] if want_p else params
            zz = diff[-1] if want_z else z
            return inner.step(bind_model(problem, p, zz), inp, st, None)

        primals = (state,) + ((params,) if want_p else ()) + ((z,) if want_z else ())
        _, vjp = jax.vjp(f, *primals)
        bars = vjp(sbar)
        return bars[0], (bars[1] if want_p else None), (bars[-1] if want_z else None)

    def cond(c):
        return c["i"] >= 0

    def body(c):
        i = c["i"]
        ts2 = lax.dynamic_slice(ts_buf, (i,), (2,))
        inp = _step_inputs(inner, schedule, ts2[0], ts2[1], dtype)
        if reversible:
            state = inner.inverse_step(model0, inp, c["state"], None)
        else:
            state = jax.tree.map(lambda b: b[i], states_buf)
        st_bar, gp, gz = vjp_step(state, inp, c["sbar"])
        out = dict(c, i=i - 1, sbar=st_bar)
        if want_p:
            out["pbar"] = _tree.add(c["pbar"], gp)
        if want_z:
            out["zbar"] = _tree.add(c["zbar"], gz)
        if reversible:
            out["state"] = state
        return out

    carry = {"i": n_acc - 1, "sbar": sbar0}
    if want_p:
        carry["pbar"] = _tree.zeros_like(params)
    if want_z:
        carry["zbar"] = _tree.zeros_like(z)
    if reversible:
        carry["state"] = final
    c = lax.while_loop(cond, body, carry)
    xT_bar = None
    if want_x:
        _, init_vjp = jax.vjp(inner.init, x_T)
        (xT_bar,) = init_vjp(c["sbar"])
    return (Args(c.get("pbar"), xT_bar, c.get("zbar"), None, None, None),)


run.defvjp(_run_fwd, _run_bwd, symbolic_zeros=True)


# ---------------------------------------------------------------------------------------
# Linear multistep solvers (DPMSolverPP, DPMSolver): one model evaluation per accepted step


def is_multistep(inner) -> bool:
    from ._solver.base import AbstractExponentialSolver

    return isinstance(inner, AbstractExponentialSolver) and not inner.stochastic


def _ms_coefficients(inner, schedule, i, t_s, t_t, t_1, t_2, order, dtype):
    """``(a, b)`` of step ``i`` from ``t_s`` to ``t_t`` of the multistep method of ``order``
    (a traced int) with history times ``t_1``, ``t_2``: the row the fixed-grid solver computes
    for this step (with its corrected warm-up at step 1)."""
    lam_s, lam_t = schedule.log_snr(t_s), schedule.log_snr(t_t)
    lam_1, lam_2 = schedule.log_snr(t_1), schedule.log_snr(t_2)
    kappa = inner.kappa
    w = multistep_weights(lam_t, lam_s, lam_1, lam_2, kappa, order, midpoint=inner._midpoint())
    if inner._corrected_warmup():
        h0 = lam_s - lam_1
        corr = jnp.exp(-kappa * (lam_t - lam_s)) * h0 * phi(2, -kappa * h0)
        # the correction of the first step belongs to step 1 whatever order is compared
        # (so it is not part of the error estimate, which differences two orders)
        on = i == 1
        corr = jnp.where(on, corr, jnp.zeros_like(corr))
        w = w.at[..., 0].add(corr).at[..., 1].add(-corr)
    a, scale, _ = inner._step_scalars(
        lam_t - lam_s,
        schedule.log_alpha(t_s), schedule.log_alpha(t_t),
        schedule.log_sigma(t_s), schedule.log_sigma(t_t),
    )
    return a.astype(dtype), (scale * w).astype(dtype)


def _ms_output(inner, model, schedule, x, t, dtype):
    """The model output in the solver's parameterisation at ``(x, t)``."""
    from ._solver.base import model_time_dtype

    alpha = jnp.exp(schedule.log_alpha(t)).astype(dtype)
    sigma = jnp.exp(schedule.log_sigma(t)).astype(dtype)
    return inner.convert(model(x, t.astype(model_time_dtype(dtype))), x, alpha, sigma)


def _lin(a, b, x, ms):
    out = jax.tree.map(lambda v: a * v, x)
    for j, m in enumerate(ms):
        out = jax.tree.map(lambda o, mm, j=j: o + b[j] * mm, out, m)
    return out


def _forward_multistep(problem: Problem, args: Args, record: str | None):
    ad = problem.solver
    inner = ad.solver
    params, x_T, z, schedule, ts, _ = args
    dtype = state_dtype(x_T)
    tdt = ts.dtype
    K = inner.order
    t_start, t_end, lam0, lam_end, span, h0 = _ends(ad, schedule, ts, 1 / 64)
    model = bind_model(problem, params, z)
    M = ad.max_steps
    zeros = jax.tree.map(jnp.zeros_like, x_T)
    m0 = _ms_output(inner, model, schedule, x_T, t_start, dtype)
    one = jnp.ones((), jnp.float32)

    def body(c):
        x, lam, h, n = c["x"], c["lam"], c["h"], c["n_acc"]
        last, h_eff, t_next = _next_time(schedule, lam, h, lam_end, t_end)
        k_hi = jnp.minimum(K, n + 1)
        ms = (c["m"], c["m1"], c["m2"])
        # both orders' weights in one (vectorised) evaluation
        a, b2 = _ms_coefficients(inner, schedule, n, c["t"], t_next, c["t1"], c["t2"],
                                 jnp.stack([k_hi, jnp.maximum(k_hi - 1, 1)]), dtype)
        b_hi, b_lo = b2[0], b2[1]
        x_new = _lin(a, b_hi, x, ms)
        err = jax.tree.map(jnp.zeros_like, x)
        for j in range(3):
            err = jax.tree.map(lambda e, m, j=j: e + (b_hi[j] - b_lo[j]) * m, err, ms[j])
        first = k_hi == 1  # the first step has no estimate: accepted, h kept
        E = _error_norm(ad, err, x, x_new)
        E = jnp.where(jnp.isnan(E), jnp.inf, E).astype(jnp.float32)
        E = jnp.where(first, jnp.zeros_like(E), E)
        accept, factor, e1, e2 = controller(ad, E, c["e1"], c["e2"])
        factor = jnp.where(first, jnp.ones_like(factor), factor)
        e1 = jnp.where(first, c["e1"], e1)
        e2 = jnp.where(first, c["e2"], e2)
        sel = lambda u, v: jax.tree.map(lambda p, q: jnp.where(accept, p, q), u, v)  # noqa: E731
        # one model evaluation per accepted step (none on rejection, none after the last)
        m_next = lax.cond(
            accept & ~last,
            lambda xx: _ms_output(inner, model, schedule, xx, t_next, dtype),
            lambda xx: c["m"],
            x_new,
        )
        out = {
            "x": sel(x_new, x),
            "m": m_next,
            "m1": sel(c["m"], c["m1"]),
            "m2": sel(c["m1"], c["m2"]),
            "t": jnp.where(accept, t_next, c["t"]),
            "t1": jnp.where(accept, c["t"], c["t1"]),
            "t2": jnp.where(accept, c["t1"], c["t2"]),
            "lam": jnp.where(accept, jnp.where(last, lam_end, lam + h_eff), lam),
            "h": (h_eff * factor.astype(tdt)).astype(tdt),
            "e1": e1,
            "e2": e2,
            "n_acc": n + accept.astype(jnp.int32),
            "n_try": c["n_try"] + 1,
            "done": accept & last,
        }
        if record:
            buf = c["ts_buf"]
            out["ts_buf"] = buf.at[n + 1].set(jnp.where(accept, t_next, buf[n + 1]))
            out["xs_buf"] = jax.tree.map(lambda bb, s: bb.at[n].set(s), c["xs_buf"], x)
            # the accepted step's coefficients, for the backward sweep
            row = jnp.concatenate([a[None], b_hi]).astype(c["coef_buf"].dtype)
            out["coef_buf"] = c["coef_buf"].at[n].set(row)
        return out

    carry = {
        "x": x_T, "m": m0, "m1": zeros, "m2": zeros,
        "t": t_start, "t1": t_start, "t2": t_start,
        "lam": lam0, "h": h0, "e1": one, "e2": one,
        "n_acc": jnp.zeros((), jnp.int32), "n_try": jnp.zeros((), jnp.int32),
        "done": jnp.zeros((), bool),
    }
    if record:
        carry["ts_buf"] = jnp.full((M + 1,), t_end, tdt).at[0].set(t_start)
        carry["xs_buf"] = jax.tree.map(_buffer(M), x_T)
        carry["coef_buf"] = jnp.zeros((M, 4), dtype)
    hmin = jnp.abs(span) * 1e-12  # a collapsed step size stops the loop (then an error)
    c = lax.while_loop(lambda c: ~c["done"] & (c["n_try"] < M) & (c["h"] > hmin), body, carry)
    x_0 = _budget_check(c["x"], c["done"], M)
    saved = (c["xs_buf"], c["coef_buf"]) if record else None
    return x_0, c.get("ts_buf"), c["n_acc"], saved, c["x"], c["done"]


def _multistep_backward(problem, values, ts_buf, n_acc, saved, x0_bar, want):
    """Reverse sweep of x' = a x + sum_j b_j m_{i-j} over the accepted steps (as the fixed-grid
    discrete adjoint, docs/math/adjoint.md), keeping the recorded samples only."""
    want_p, want_z, _ = want
    xs_buf, coef_buf = saved
    ad = problem.solver
    inner = ad.solver
    params, x_T, z, schedule, _, _ = values
    dtype = state_dtype(x_T)
    K = inner.order
    tm = jax.tree.map

    def body(c):
        i = c["i"]
        xbar = c["xbar"]
        t_s = ts_buf[i]
        row = coef_buf[i]
        a, b = row[0], row[1:]
        pend = c["pend"]
        m_bar = tm(lambda v, p: b[0] * v + p, xbar, pend[0])
        new_pend = tuple(
            tm(lambda v, p, j=j: b[j + 1] * v + p, xbar, pend[j + 1]) if j + 1 < K - 1
            else tm(lambda v, j=j: b[j + 1] * v, xbar)
            for j in range(K - 1)
        )
        x_i = tm(lambda bb: bb[i], xs_buf)

        def f(x, *diff):
            p = diff[0] if want_p else params
            zz = diff[-1] if want_z else z
            return _ms_output(inner, bind_model(problem, p, zz), schedule, x, t_s, dtype)

        primals = (x_i,) + ((params,) if want_p else ()) + ((z,) if want_z else ())
        _, vjp = jax.vjp(f, *primals)
        bars = vjp(m_bar)
        out = dict(c, i=i - 1, pend=new_pend, xbar=tm(lambda v, g: a * v + g, xbar, bars[0]))
        if want_p:
            out["pbar"] = _tree.add(c["pbar"], bars[1])
        if want_z:
            out["zbar"] = _tree.add(c["zbar"], bars[-1])
        return out

    zeros = tm(jnp.zeros_like, x0_bar)
    carry = {"i": n_acc - 1, "xbar": x0_bar, "pend": tuple(zeros for _ in range(K - 1))}
    if want_p:
        carry["pbar"] = _tree.zeros_like(params)
    if want_z:
        carry["zbar"] = _tree.zeros_like(z)
    c = lax.while_loop(lambda c: c["i"] >= 0, body, carry)
    return c["xbar"], c.get("pbar"), c.get("zbar")
