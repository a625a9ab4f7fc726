"""Every solver x controller x gradient strategy cell of docs/compatibility.md, as the page
states it: exact cells equal Backprop (float64, 1e-10; on a fixed grid also with respect to
``ts`` and a schedule parameter), continuous cells (AdjointDEIS) run and point the same way,
refused cells raise a ValueError with the stated reason. The table is read from the page, so
the page and the code cannot drift apart; the registry (tests/helpers.py) must cover every
exported solver.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jadeis

from .helpers import SOLVER_REGISTRY, RandomMLP, all_solver_classes

PAGE = Path(__file__).resolve().parents[1] / "docs" / "compatibility.md"
STRATEGIES = {
    "DiscreteAdjoint": jadeis.DiscreteAdjoint(),
    "Backprop": jadeis.Backprop(),
    "AdjointDEIS": jadeis.AdjointDEIS(order=2),
    "AdjointDEIS reconstruct": jadeis.AdjointDEIS(order=1, trajectory="reconstruct"),
    "ReversibleAdjoint": jadeis.ReversibleAdjoint(),
}
REASONS = {  # the words each refusal's message must contain
    "reversible": "reversible solver",
    "error estimate": "error estimate",
    "Brownian path": "Brownian path",
    "sampled path": "sampled path",
}


def _table(heading_first_cell: str):
    rows = []
    lines = PAGE.read_text().splitlines()
    header = None
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == heading_first_cell:
            header = cells
            continue
        if header is not None:
            if not line.startswith("|"):
                break
            if set(cells[0]) <= {"-"}:
                continue
            rows.append(dict(zip(header, cells)))
    assert rows, f"no table starting with {heading_first_cell!r} in {PAGE}"
    return rows


CELLS = _table("solver")
SCH = jadeis.VPLinear()
MLP = RandomMLP(dim=3, hidden=8, seed=3)
X_T = jax.random.normal(jax.random.key(0), (2, 3), jnp.float64)
Z = 0.1 * jnp.arange(8, dtype=jnp.float64)
KEY = jax.random.key(1)
PID = jadeis.PIDController(rtol=1e-3, atol=1e-3, max_steps=64)


def test_the_table_covers_every_solver_and_the_registry():
    classes = all_solver_classes()
    assert sorted({r["solver"] for r in CELLS}) == classes
    assert sorted(SOLVER_REGISTRY) == classes
    assert {r["controller"] for r in CELLS} == {"FixedGrid", "PIDController"}
    assert len(CELLS) == 2 * len(classes)


def _run(solver, controller, adjoint, grid=True, n=5):
    fixed = isinstance(controller, jadeis.FixedGrid)
    ts = jadeis.time_grid(SCH, n) if fixed else jnp.asarray([SCH.t_max, SCH.t_min])
    extra = {"key": KEY} if solver.stochastic else {}

    def loss(x_T, z, params, ts, beta_max):
        sch = jadeis.VPLinear(beta_max=beta_max)
        x = jadeis.sample(
            MLP.eps_fn,
            params,
            x_T,
            z,
            schedule=sch,
            ts=ts,
            solver=solver,
            controller=controller,
            adjoint=adjoint,
            **extra,
        )
        return jnp.sum(jnp.sin(x) * x)

    argnums = (0, 1, 2, 3, 4) if (fixed and grid) else (0, 1, 2)
    return jax.jit(jax.grad(loss, argnums))(X_T, Z, MLP.params, ts, 20.0)


def _flat(g):
    return jnp.concatenate([jnp.ravel(v) for v in jax.tree.leaves(g)])


@pytest.mark.parametrize("row", CELLS, ids=[f"{r['solver']}-{r['controller']}" for r in CELLS])
def test_every_cell(row):
    fixed_inst, adaptive_inst = SOLVER_REGISTRY[row["solver"]]
    if row["controller"] == "FixedGrid":
        solver, controller = fixed_inst, jadeis.FixedGrid()
    else:
        solver, controller = adaptive_inst, PID
    refs = {}

    def ref(grid, n=5):
        if (grid, n) not in refs:
            refs[grid, n] = _flat(_run(solver, controller, jadeis.Backprop(), grid, n))
            assert bool(jnp.all(jnp.isfinite(refs[grid, n])))
        return refs[grid, n]

    for name, adjoint in STRATEGIES.items():
        claim = row[name]
        if claim.startswith("refused"):
            reason = REASONS[claim.split(":", 1)[1].strip()]
            with pytest.raises(ValueError, match=re.escape(reason)):
                _run(solver, controller, adjoint)
            continue
        if claim == "exact":
            got = _flat(_run(solver, controller, adjoint))
            want = ref(True)
            err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
            # a reversible solver's states are rebuilt by its inverse: rounding, amplified
            # by 1/coupling per step
            tol = 1e-8 if isinstance(adjoint, jadeis.ReversibleAdjoint) else 1e-10
            assert err < tol, (name, err)
        else:
            # the continuous adjoint (no gradient with respect to the grid) approaches the
            # discrete one as the steps shrink: on 40 steps it is within 25% (first order
            # near t = 0 on this stiff model: 11-16% measured)
            assert claim == "continuous", claim
            got = _flat(_run(solver, controller, adjoint, grid=False, n=40))
            want = ref(False, 40)
            err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
            assert err < 0.25, (name, err)


def test_adaptive_grid_gradients_are_refused_by_every_strategy():
    solver = SOLVER_REGISTRY["SinglestepDPMSolver"][1]
    for adjoint in STRATEGIES.values():
        if isinstance(adjoint, jadeis.ReversibleAdjoint):
            continue

        def loss(ts, adjoint=adjoint):
            return jnp.sum(
                jadeis.sample(
                    MLP.eps_fn,
                    MLP.params,
                    X_T,
                    Z,
                    schedule=SCH,
                    ts=ts,
                    solver=solver,
                    controller=PID,
                    adjoint=adjoint,
                )
            )

        with pytest.raises(ValueError, match="not differentiated"):
            jax.grad(loss)(jnp.asarray([SCH.t_max, SCH.t_min]))


ENTRY = _table("entry point")


def test_entry_point_table_is_what_the_code_does():
    """The entry-point table's refusals raise with their reasons; the rest run."""
    rows = {r["entry point"]: r for r in ENTRY}
    ends = jnp.asarray([SCH.t_max, SCH.t_min])
    ss = jadeis.SinglestepDPMSolver(order=3)
    x0 = jadeis.sample(
        MLP.eps_fn, MLP.params, X_T, Z, schedule=SCH, ts=ends, solver=ss, controller=PID
    )
    enc = jadeis.encode_ode(
        MLP.eps_fn, MLP.params, x0, Z, schedule=SCH, ts=ends, solver=ss, controller=PID
    )
    assert enc.shape == X_T.shape
    assert "extrapolates" in rows["`encode_ode`"]["PIDController"]
    with pytest.raises(ValueError, match="extrapolates"):
        jadeis.encode_ode(
            MLP.eps_fn,
            MLP.params,
            x0,
            Z,
            schedule=SCH,
            ts=ends,
            solver=jadeis.DPMSolverPP(order=3),
            controller=PID,
        )
    with pytest.raises(ValueError, match="exact inversion"):
        jadeis.encode_ode(
            MLP.eps_fn,
            MLP.params,
            x0,
            Z,
            schedule=SCH,
            ts=ends,
            solver=jadeis.Rex(),
            controller=PID,
        )
    with pytest.raises(ValueError, match="Brownian path"):
        jadeis.encode_sde(
            MLP.eps_fn,
            MLP.params,
            x0,
            Z,
            schedule=SCH,
            ts=ends,
            solver=jadeis.Adaptive(jadeis.SDEDPMSolver()),
            key=KEY,
        )
    sol = jadeis.solve(
        MLP.eps_fn,
        MLP.params,
        X_T,
        Z,
        schedule=SCH,
        ts=ends,
        solver=ss,
        controller=PID,
        save_trajectory=True,
    )
    n = int(sol.num_steps)
    traj = jadeis.sample_trajectory(
        MLP.eps_fn, MLP.params, X_T, Z, schedule=SCH, ts=ends, solver=ss, controller=PID
    )
    assert traj.shape == (PID.max_steps + 1,) + X_T.shape
    np.testing.assert_array_equal(traj, sol.trajectory)
    np.testing.assert_array_equal(traj[n:], jnp.broadcast_to(sol.x_0, traj[n:].shape))
    g = jadeis.solve_adjoint(
        MLP.eps_fn,
        MLP.params,
        Z,
        2 * sol.x_0,
        schedule=SCH,
        ts=sol.ts[: n + 1],
        trajectory=traj[: n + 1],
        solver=ss,
        controller=PID,
    )
    want = jax.grad(
        lambda x: jnp.sum(
            jadeis.sample(
                MLP.eps_fn, MLP.params, x, Z, schedule=SCH, ts=ends, solver=ss, controller=PID
            )
            ** 2
        )
    )(X_T)
    np.testing.assert_allclose(g.x_T, want, rtol=1e-10, atol=1e-12)


def test_adjoint_deis_noise_gradient_of_a_reversible_sde_solver_is_refused():
    """AdjointDEIS's noise gradient is c_i a_x(t_{i+1}) for the linear multistep SDE solvers;
    SDERex draws its noise differently: a ValueError naming the fix (not an AttributeError)."""
    noise = jax.random.normal(jax.random.key(3), (5, 2) + X_T.shape)

    def loss(noise):
        return jnp.sum(
            jadeis.sample(
                MLP.eps_fn,
                MLP.params,
                X_T,
                Z,
                schedule=SCH,
                ts=jadeis.time_grid(SCH, 5),
                solver=jadeis.SDERex(),
                noise=noise,
                adjoint=jadeis.AdjointDEIS(),
            )
        )

    with pytest.raises(ValueError, match="linear multistep SDE samplers only"):
        jax.grad(loss)(noise)
    # its other gradients are available
    g = jax.grad(
        lambda z: jnp.sum(
            jadeis.sample(
                MLP.eps_fn,
                MLP.params,
                X_T,
                z,
                schedule=SCH,
                ts=jadeis.time_grid(SCH, 5),
                solver=jadeis.SDERex(),
                noise=noise,
                adjoint=jadeis.AdjointDEIS(),
            )
        )
    )(Z)
    assert bool(jnp.all(jnp.isfinite(g)))
