"""Properties of every solver configuration on random valid inputs (hypothesis).

The inputs: every configuration of every solver class of the registry (tests/helpers.py
``SOLVER_REGISTRY``: every order, scheme and form, ``CONFIGS``) x schedule x time-grid spacing
x N x controller (fixed grid; PID where the configuration has an error estimate) x gradient
strategy (every exact one) x dtype (float64; float32 with x64 off, as users run; float32
state with a bfloat16 model) x state kind (one array; a pytree of two). Checked:

- ``test_sampling``: finite, the state's dtype, deterministic, vmap == a loop over the
  examples, and jit == eager (a real eager run: ``jax.disable_jit()``) for the first
  configuration of each solver class;
- ``test_exact_strategies_equal_backprop``: every exact strategy's gradient with respect to
  ``x_T``, ``z`` and the parameters equals ``Backprop``'s;
- ``test_round_trip``: ``encode_ode``/``encode_sde`` then ``sample`` returns the data, for
  every reversible solver;
- ``test_time_grid_is_accepted_by_every_entry_point``: grids from ``time_grid`` (every
  schedule, ``t_min``, spacing, N, final time and dtype) pass every entry point's checks;
- ``test_every_order_is_reached``: the smallest N drawn for a configuration takes a step of
  its order (a multistep method warms up, and lowers its last orders).

Each solver configuration (or solver class x controller) is its own parametrised test, so
every one runs in every profile. Profiles (tests/conftest.py): ``ci`` (default,
derandomised, one example per case; CI-sized) and ``thorough`` (``pytest
--hypothesis-profile=thorough tests/test_properties.py``: 25 random examples per case).
``combinations()`` counts the inputs the strategies draw from; the README states it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import jadeis
from jadeis._ei import step_orders
from jadeis._solver.unipc import unipc_orders

from .helpers import SOLVER_REGISTRY, all_solver_classes

# ---------------------------------------------------------------------------------------
# the input space

CONFIGS = {
    "DDIM": [jadeis.DDIM()],
    "DPMSolver": [jadeis.DPMSolver(order=k) for k in (1, 2, 3)],
    "DPMSolverPP": [jadeis.DPMSolverPP(order=k) for k in (1, 2, 3)]
    + [jadeis.DPMSolverPP(order=2, variant="midpoint")],
    "UniPC": [jadeis.UniPC(order=k) for k in (1, 2, 3)] + [jadeis.UniPC(order=2, corrector=False)],
    "SinglestepDPMSolver": [jadeis.SinglestepDPMSolver(order=k) for k in (1, 2, 3)]
    + [jadeis.SinglestepDPMSolver(order=2, prediction="noise")],
    "Rex": [jadeis.Rex(scheme=s) for s in ("euler", "midpoint", "rk3", "rk4")]
    + [jadeis.Rex(scheme=s, prediction="noise") for s in ("midpoint", "rk4")],
    "SDEDPMSolver": [jadeis.SDEDPMSolver()],
    "SDEDPMSolverPP": [jadeis.SDEDPMSolverPP(order=k) for k in (1, 2)],
    "SDERex": [jadeis.SDERex(scheme=s) for s in ("euler", "shark")],
}
ALL_CONFIGS = [(name, s) for name, solvers in CONFIGS.items() for s in solvers]
SCHEDULES = {
    "VPLinear": jadeis.VPLinear(),
    "VPCosine": jadeis.VPCosine(),
    "RectifiedFlow": jadeis.RectifiedFlow(),
    "VE": jadeis.VE(),
    "DiscreteVP": jadeis.DiscreteVP.scaled_linear(),
}
SPACINGS = ("logsnr", "time", "quadratic", "karras")
N_MAX = 8
#: (state dtype, model dtype, x64): float64; float32 with x64 off; float32 state, bfloat16 model
DTYPES = (("float64", "float64", True), ("float32", "float32", False),
          ("float32", "bfloat16", False))
STATES = ("array", "pytree")
PID = jadeis.PIDController(rtol=1e-3, atol=1e-3, max_steps=256)
#: a bfloat16 model's rounding (4e-3) is a floor for the error estimate
PID_BF16 = jadeis.PIDController(rtol=3e-2, atol=3e-2, max_steps=256)


#: sampling's eager run takes every adaptive step op by op: a looser tolerance, fewer steps
PID_SAMPLING = jadeis.PIDController(rtol=1e-2, atol=1e-2, max_steps=256)


def pid_for(model_dtype, sampling=False):
    if model_dtype == "bfloat16":
        return PID_BF16
    return PID_SAMPLING if sampling else PID


def is_reversible(solver) -> bool:
    return isinstance(solver, (jadeis.Rex, jadeis.SDERex))


def adaptive_ok(solver) -> bool:
    try:
        jadeis.PIDController.check_solver(solver, "x")
    except ValueError:
        return False
    return True


def min_steps(solver) -> int:
    """The smallest N drawn: enough for a multistep method to take a step of its order
    (warm-up, then lower orders on the last steps of short grids)."""
    if isinstance(solver, (jadeis.DPMSolver, jadeis.DPMSolverPP, jadeis.UniPC,
                           jadeis.SDEDPMSolverPP)):
        return solver.order + 2
    return 1


def states_of(solver):
    return ("array",) if is_reversible(solver) else STATES


def controllers_of(solver):
    return ("fixed", "pid") if adaptive_ok(solver) else ("fixed",)


def exact_strategies(solver, controller):
    out = ["DiscreteAdjoint"]
    if is_reversible(solver):
        out.append("ReversibleAdjoint")
    if controller == "fixed":
        out.append("Truncated")  # Truncated(k >= N): the exact gradient
    return out


STRATEGY = {
    "DiscreteAdjoint": lambda n: jadeis.DiscreteAdjoint(),
    "ReversibleAdjoint": lambda n: jadeis.ReversibleAdjoint(),
    "Truncated": lambda n: jadeis.Truncated(n),
}
GRADIENT_CELLS = [
    (name, controller)
    for name, (fixed, adaptive) in SOLVER_REGISTRY.items()
    for controller in ("fixed", "pid")
    if controller == "fixed" or (adaptive is not None and adaptive_ok(adaptive))
]
T_MINS = {"VPLinear": (1e-3, 1e-4, 1e-6), "VPCosine": (1e-3, 1e-5), "RectifiedFlow": (1e-3, 1e-5),
          "VE": (2e-3, 1e-4), "DiscreteVP": (None,)}
GRID_DTYPES = ("float32", "float64", "bfloat16")


def combinations() -> dict:
    """How many inputs each test draws from (products of the strategies' domains)."""
    sampling = sum(
        len(SCHEDULES) * len(SPACINGS) * (N_MAX - min_steps(s) + 1) * len(DTYPES)
        * len(states_of(s)) * len(controllers_of(s))
        for _, s in ALL_CONFIGS
    )
    gradients = 0
    for name, controller in GRADIENT_CELLS:
        for s in CONFIGS[name]:
            if controller == "pid" and not adaptive_ok(s):
                continue
            gradients += (len(SCHEDULES) * (N_MAX - min_steps(s) + 1) * len(DTYPES)
                          * len(states_of(s)) * len(exact_strategies(s, controller)))
    round_trips = sum(
        len(SCHEDULES) * N_MAX * 2 * len(COUPLINGS) for _, s in ALL_CONFIGS if is_reversible(s)
    )
    grids = sum(len(t) for t in T_MINS.values()) * len(SPACINGS) * N_MAX * 2 * len(GRID_DTYPES)
    return {"sampling": sampling, "gradients": gradients, "round trips": round_trips,
            "grids": grids}


def rotated(seq, i: int):
    """``seq`` rotated by ``i``: hypothesis tries the simplest example (every first choice)
    first, so each parametrised case starts elsewhere in the space and the one example per
    case of the ``ci`` profile differs from case to case."""
    seq = tuple(seq)
    k = i % len(seq)
    return st.sampled_from(seq[k:] + seq[:k])


def cycled(lo: int, hi: int, i: int):
    """Integers in [lo, hi], the simplest one depending on ``i`` (as :func:`rotated`)."""
    span = hi - lo + 1
    return st.integers(0, span - 1).map(lambda k: lo + (k + 3 * i) % span)


# ---------------------------------------------------------------------------------------
# the model and the inputs


def eps_fn(params, x, t, z):
    """A small nonlinear model, scale-aware so every schedule gives O(1) outputs; leafwise
    on a pytree state; in ``params["dtype"]``'s precision (bfloat16: mixed precision)."""
    def leaf(v, w):
        dt = params["w"].dtype
        u = v.astype(dt)
        tt = t.astype(dt)
        return jnp.tanh(w.astype(dt) * u / (1.0 + jnp.abs(u)) + z.astype(dt) + jnp.log1p(tt)) \
            + 0.1 * u

    if isinstance(x, dict):
        return {k: leaf(v, params["w"][i]) for i, (k, v) in enumerate(sorted(x.items()))}
    return leaf(x, params["w"][0])


def make_inputs(sch, dtype, model_dtype, state):
    dt = jnp.dtype(dtype)
    scale = sch.prior_std
    a = jnp.asarray(scale * np.linspace(-1.5, 1.5, 6).reshape(2, 3), dt)
    x = {"a": a, "b": jnp.asarray(scale * np.array([[0.4, -0.9], [1.1, 0.2]]), dt)} \
        if state == "pytree" else a
    params = {"w": jnp.asarray([0.7, -0.4], jnp.dtype(model_dtype))}
    z = jnp.asarray(0.3, dt)
    return x, params, z


def grid(sch, n, spacing, controller, dtype):
    ts = jadeis.time_grid(sch, n, spacing, dtype=jnp.dtype(dtype))
    return ts if controller == "fixed" else jnp.asarray([ts[0], ts[-1]])


def rows(x):
    first = jax.tree.leaves(x)[0].shape[0]
    return [jax.tree.map(lambda v, i=i: v[i], x) for i in range(first)]


def stack(xs):
    return jax.tree.map(lambda *v: jnp.stack(v), *xs)


def assert_close(a, b, rtol, atol, what=""):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(u, np.float64), np.asarray(v, np.float64),
                                   rtol=rtol, atol=atol, err_msg=what)


def tolerances(dtype, model_dtype):
    if model_dtype == "bfloat16":
        return 5e-2, 5e-2
    return (1e-4, 1e-5) if dtype == "float32" else (1e-9, 1e-11)


def x64_mode(x64: bool):
    return jax.enable_x64(x64)


# ---------------------------------------------------------------------------------------
# sampling: finite, deterministic, jit == eager, vmap == loop


def sampling_case(solver, i):
    return st.fixed_dictionaries({
        "schedule": rotated(sorted(SCHEDULES), i),
        "spacing": rotated(SPACINGS, i),
        "n": cycled(min_steps(solver), N_MAX, i),
        "dtypes": rotated(DTYPES, i),
        "state": rotated(states_of(solver), i),
        "controller": rotated(controllers_of(solver), i),
    })


@pytest.mark.parametrize("name,solver", ALL_CONFIGS, ids=[repr(s) for _, s in ALL_CONFIGS])
@given(data=st.data())
def test_sampling(name, solver, data):
    case = data.draw(sampling_case(solver, ALL_CONFIGS.index((name, solver))))
    dtype, model_dtype, x64 = case["dtypes"]
    with x64_mode(x64):
        sch = SCHEDULES[case["schedule"]]
        x, params, z = make_inputs(sch, dtype, model_dtype, case["state"])
        ts = grid(sch, case["n"], case["spacing"], case["controller"], dtype)
        kw = dict(schedule=sch, ts=ts, solver=solver,
                  controller=pid_for(model_dtype, sampling=True)
                  if case["controller"] == "pid" else None)
        if solver.stochastic:
            kw["key"] = jax.random.key(7)

        def f(x):
            return jadeis.sample(eps_fn, params, x, z, **kw)

        per_row = [f(r) for r in rows(x)]  # compiled (jadeis' own jit)
        loop = stack(per_row)
        for v, u in zip(jax.tree.leaves(loop), jax.tree.leaves(x)):
            assert v.dtype == u.dtype and v.shape == u.shape, case
            assert bool(jnp.all(jnp.isfinite(v))), case
        assert_close(f(rows(x)[0]), per_row[0], 0.0, 0.0, "deterministic")
        rtol, atol = tolerances(dtype, model_dtype)
        scale = atol * sch.prior_std
        # op by op (every primitive compiled on its own): the first configuration of each
        # solver class, with the case's drawn schedule, grid, dtypes, state and controller
        if CONFIGS[name].index(solver) == 0:
            with jax.disable_jit():
                eager = f(rows(x)[1])
            assert_close(eager, per_row[1], rtol, scale, f"jit == eager {case}")
        assert_close(jax.vmap(f)(x), loop, rtol, scale, f"vmap == loop {case}")


# ---------------------------------------------------------------------------------------
# every exact strategy == Backprop


def gradient_case(name, controller, i):
    solvers = [s for s in CONFIGS[name] if controller == "fixed" or adaptive_ok(s)]
    return rotated(solvers, i).flatmap(lambda s: st.fixed_dictionaries({
        "solver": st.just(s),
        "schedule": rotated(sorted(SCHEDULES), i + 2),
        "n": cycled(min_steps(s), N_MAX, i),
        "dtypes": rotated(DTYPES, i),
        "state": rotated(states_of(s), i),
        "strategy": rotated(exact_strategies(s, controller), i),
    }))


def _loss(x0):
    return sum(jnp.sum(jnp.sin(v) * v) for v in jax.tree.leaves(x0))


@pytest.mark.parametrize("name,controller", GRADIENT_CELLS,
                         ids=[f"{n}-{c}" for n, c in GRADIENT_CELLS])
@given(data=st.data())
def test_exact_strategies_equal_backprop(name, controller, data):
    case = data.draw(gradient_case(name, controller, GRADIENT_CELLS.index((name, controller))))
    solver, n = case["solver"], case["n"]
    dtype, model_dtype, x64 = case["dtypes"]
    with x64_mode(x64):
        sch = SCHEDULES[case["schedule"]]
        x, params, z = make_inputs(sch, dtype, model_dtype, case["state"])
        ts = grid(sch, n, "logsnr", controller, dtype)
        kw = dict(schedule=sch, ts=ts, solver=solver,
                  controller=pid_for(model_dtype) if controller == "pid" else None)
        if solver.stochastic:
            kw["key"] = jax.random.key(3)

        def grads(adjoint):
            def loss(x, z, params):
                return _loss(jadeis.sample(eps_fn, params, x, z, adjoint=adjoint, **kw))

            return jax.grad(loss, argnums=(0, 1, 2))(x, z, params)

        got = grads(STRATEGY[case["strategy"]](n))
        want = grads(jadeis.Backprop())
        flat = lambda g: np.concatenate(  # noqa: E731
            [np.ravel(np.asarray(v, np.float64)) for v in jax.tree.leaves(g)])
        g, w = flat(got), flat(want)
        assert np.all(np.isfinite(g)), case
        err = float(np.max(np.abs(g - w)) / (np.max(np.abs(w)) + 1e-30))
        tol = {"float64": 1e-8, "float32": 2e-3}[dtype]
        if dtype == "float32" and controller == "pid":
            # an adaptive float32 solve amplifies rounding more: DPMSolverPP(3) on
            # RectifiedFlow (34 steps) measured 1.1e-3 to 2.5e-3 between the strategies
            # depending on compilation, each 3% from the float64 solve (1e-11 apart there)
            tol = 1e-2
        if model_dtype == "bfloat16":
            tol = 5e-2
        assert err < tol, (case, err)


# ---------------------------------------------------------------------------------------
# round trips of every reversible solver

COUPLINGS = (0.999, 0.9)
REVERSIBLE = [(name, s) for name, s in ALL_CONFIGS if is_reversible(s)]


@pytest.mark.parametrize("name,solver", REVERSIBLE, ids=[repr(s) for _, s in REVERSIBLE])
@given(data=st.data())
def test_round_trip(name, solver, data):
    i = REVERSIBLE.index((name, solver))
    case = data.draw(st.fixed_dictionaries({
        "schedule": rotated(sorted(SCHEDULES), i),
        "n": cycled(1, N_MAX, i),
        "x64": rotated((True, False), i),
        "coupling": rotated(COUPLINGS, i // 2),
    }))
    import equinox as eqx

    solver = eqx.tree_at(lambda s: s.coupling, solver, case["coupling"])
    dtype = "float64" if case["x64"] else "float32"
    with x64_mode(case["x64"]):
        sch = SCHEDULES[case["schedule"]]
        x, params, z = make_inputs(sch, dtype, dtype, "array")
        ts = jadeis.time_grid(sch, case["n"])
        common = dict(schedule=sch, ts=ts, solver=solver)
        # exact, or refused where the inverse's amplification broke it (the encoder decodes
        # its latent to check where the worst case could matter:
        # docs/math/reversible.md#conditioning)
        try:
            if solver.stochastic:
                latent, noise = jadeis.encode_sde(eps_fn, params, x, z, key=jax.random.key(1),
                                                  **common)
                back = jadeis.sample(eps_fn, params, latent, z, noise=noise, **common)
            else:
                latent = jadeis.encode_ode(eps_fn, params, x, z, **common)
                back = jadeis.sample(eps_fn, params, latent, z, **common)
        except ValueError as e:
            assert "does not decode to x_0" in str(e), (case, e)
            bound = solver.log_amplification_bound(sch, ts, case["n"])
            eps = float(jnp.finfo(jnp.dtype(dtype)).eps)
            assert eps * math.exp(bound) > 1e-3, (case, bound)  # only where it can happen
            return
        eps = float(jnp.finfo(jnp.dtype(dtype)).eps)
        err = float(jnp.linalg.norm(back - x) / jnp.linalg.norm(x))
        assert err < math.sqrt(eps), (case, err)


# ---------------------------------------------------------------------------------------
# grids from time_grid pass every entry point


@given(case=st.fixed_dictionaries({
    "schedule": st.sampled_from(sorted(SCHEDULES)),
    "t_min_index": st.integers(0, 2),
    "spacing": st.sampled_from(SPACINGS),
    "n": st.integers(1, N_MAX),
    "final": st.sampled_from((None, "zero")),
    "dtype": st.sampled_from(GRID_DTYPES),
}))
def test_time_grid_is_accepted_by_every_entry_point(case):
    from functools import partial

    import optax

    name = case["schedule"]
    t_mins = T_MINS[name]
    t_min = t_mins[case["t_min_index"] % len(t_mins)]
    sch = SCHEDULES[name] if t_min is None else type(SCHEDULES[name])(t_min=t_min)
    x64 = case["dtype"] == "float64"
    with x64_mode(x64):
        try:
            ts = jadeis.time_grid(sch, case["n"], case["spacing"], final=case["final"],
                                  dtype=jnp.dtype(case["dtype"]))
        except ValueError as e:  # a dtype that cannot resolve the grid says so
            assert case["dtype"] == "bfloat16" and "bfloat16" in str(e), (case, e)
            return
        x = jnp.full((2, 3), 0.3)
        kw = dict(schedule=sch, ts=ts)
        key = jax.random.key(0)
        traj = jax.eval_shape(partial(jadeis.sample_trajectory, eps_fn, {"w": x[0, :2]}, x,
                                      x[0, 0], **kw))
        p, z = {"w": x[0, :2]}, x[0, 0]
        jax.eval_shape(partial(jadeis.sample, eps_fn, p, x, z, **kw))
        jax.eval_shape(partial(jadeis.solve, eps_fn, p, x, z, **kw))
        jax.eval_shape(partial(jadeis.sample, eps_fn, p, x, z, solver=jadeis.SDEDPMSolverPP(),
                               key=key, **kw))
        jax.eval_shape(partial(jadeis.encode_ode, eps_fn, p, x, z, **kw))
        jax.eval_shape(partial(jadeis.encode_sde, eps_fn, p, x, z, key=key, **kw))
        jax.eval_shape(partial(jadeis.solve_adjoint, eps_fn, p, z, x,
                               trajectory=jnp.zeros(traj.shape, traj.dtype),
                               check_trajectory=False, **kw))
        jadeis.Guidance(lambda x0: jnp.sum(x0), eps_fn, optimizer=optax.sgd(0.1), **kw)
        if case["final"] is None:
            jax.eval_shape(partial(jadeis.sample, eps_fn, p, x, z, solver=jadeis.Rex(), **kw))
            ends = jnp.asarray([ts[0], ts[-1]])
            jax.eval_shape(partial(jadeis.sample, eps_fn, p, x, z, schedule=sch, ts=ends,
                                   solver=jadeis.DPMSolverPP(order=3), controller=PID))


# ---------------------------------------------------------------------------------------
# what the suite covers


def test_every_order_is_reached_and_every_solver_is_drawn():
    assert sorted(CONFIGS) == all_solver_classes() == sorted(SOLVER_REGISTRY)
    for _, solver in ALL_CONFIGS:
        n = min_steps(solver)
        if isinstance(solver, jadeis.UniPC):
            orders = unipc_orders(solver.order, n, solver.lower_order_final)
        elif isinstance(solver, (jadeis.DPMSolver, jadeis.DPMSolverPP, jadeis.SDEDPMSolverPP)):
            orders = step_orders(solver.order, np.arange(n), n, solver.lower_order_final)
        else:
            continue  # one-step methods: every step has the configuration's order
        assert int(np.max(orders)) == solver.order, (solver, orders)


def test_the_readme_states_the_number_of_combinations():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    total = sum(combinations().values())
    assert f"{total:,}" in readme, (total, combinations())
