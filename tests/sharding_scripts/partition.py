"""Every entry point partitions the work over a batch-sharded x_T.

For each mesh construction given on the command line (``Mesh`` = ``Mesh(jax.devices(),
("batch",))``, ``make_mesh`` = ``jax.make_mesh`` with Auto axes, ``explicit`` = an
Explicit-axis mesh used under ``jax.set_mesh``) and every entry point and strategy, with
x_T (8, 5) and a batched z (8, 16) sharded along "batch" over 4 host devices:

- the compiled per-device program holds the local batch (2, .) and never the global one;
- it has no all-gather / all-to-all / collective-permute / reduce-scatter, and its only
  all-reduces are of parameter-gradient (or tiny time-grid) shapes;
- it has no host callback when ts is concrete (the traced ts check is skipped), and where
  ts is traced (learn_time_grid) the callback sees only ts;
- the outputs are sharded like the inputs, and equal the single-device values.

``guide`` and ``learn_time_grid`` jit internally: their step programs are recorded by
wrapping ``jax.jit`` while they run. A final canary (``eqx.error_if`` on the
state) must be caught by the same checks, which proves they work;
XLA's warnings go to stderr, where the test looks for "Involuntary full rematerialization"
before and after the marker CANARY.
"""

import contextlib
import re
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jadeis

jax.config.update("jax_enable_x64", True)
assert jax.device_count() == 4, jax.devices()
B, D, H, N = 8, 5, 16, 6
LOCAL = B // 4
PARAM_SHAPES = {(D, H), (H,), (H, D), (), (N + 1,), (N,), (1,)}
sch = jadeis.VPLinear()
ts = jadeis.time_grid(sch, N)


def mlp(params, x, t, z):
    w1, b1, w2 = params
    return jnp.tanh(x @ w1 + b1 + t.astype(x.dtype) * z) @ w2


k = jax.random.split(jax.random.key(0), 5)
params = (
    jax.random.normal(k[1], (D, H)) / 3,
    jax.random.normal(k[2], (H,)) / 4,
    jax.random.normal(k[3], (H, D)) / 4,
)
x_T = jax.random.normal(k[0], (B, D))
z = jax.random.normal(k[4], (B, H)) / 4
SHAPE = re.compile(r"\b[a-z]+[0-9]*\[([0-9,]*)\]")
COLLECTIVE = re.compile(
    r"= .*\b(all-gather|all-to-all|collective-permute|reduce-scatter|"
    r"all-reduce)(-start)?\("
)


def shapes(line):
    return {tuple(int(d) for d in m.split(",") if d) for m in SHAPE.findall(line)}


def problems_in(hlo, callbacks_ok=False):
    """What in a per-device HLO module shows that the state is not split."""
    bad = []
    glob_ = [s for s in shapes(hlo) if len(s) >= 2 and s[-2:] in {(B, D), (B, H)}]
    if glob_:
        bad.append(f"global-batch shapes {sorted(glob_)}")
    if not any(len(s) >= 2 and s[-2:] == (LOCAL, D) for s in shapes(hlo)):
        bad.append("no local-batch (2, 5) array")
    for line in hlo.splitlines():
        m = COLLECTIVE.search(line)
        if m is None:
            continue
        lhs = line.split("=")[1].split(m.group(1))[0]  # the result shape(s)
        if m.group(1) != "all-reduce" or not shapes(lhs) <= PARAM_SHAPES:
            bad.append(f"{m.group(1)} of {sorted(shapes(lhs))}")
    for line in hlo.splitlines():
        if "custom-call" in line and "callback" in line:
            if not callbacks_ok:
                bad.append("host callback: " + line.strip()[:100])
            elif any(len(s) >= 2 for s in shapes(line)):
                bad.append("host callback on the state: " + line.strip()[:100])
    return bad


def check(name, f, args, expect, ref=None):
    """Compile f, inspect its program, run it and compare shardings (and values)."""
    compiled = jax.jit(f).lower(*args).compile()
    bad = problems_in(compiled.as_text())
    assert not bad, (name, bad)
    out = compiled(*args)
    for o, e in zip(jax.tree.leaves(out), jax.tree.leaves(expect)):
        assert o.sharding.is_equivalent_to(e, o.ndim), (name, o.sharding.spec, e)
    if ref is not None:
        for o, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
            np.testing.assert_allclose(
                np.asarray(o), np.asarray(r), rtol=1e-9, atol=1e-11, err_msg=name
            )
    return out


@contextlib.contextmanager
def jit_programs():
    """Collect the compiled programs of the functions that jadeis jit-compiles internally
    (guide's and learn_time_grid's step) by wrapping jax.jit while they run."""
    programs, real_jit = [], jax.jit

    def recording_jit(fun, **kw):
        jitted = real_jit(fun, **kw)

        compiled = []

        def call(*a, **k):
            if not compiled:
                compiled.append(jitted.lower(*a, **k).compile())
                programs.append(compiled[0].as_text())
            return compiled[0](*a, **k)

        return call

    jax.jit = recording_jit
    try:
        yield programs
    finally:
        jax.jit = real_jit


def run(kind, full):
    if kind == "Mesh":
        mesh = Mesh(jax.devices(), ("batch",))
    elif kind == "make_mesh":
        mesh = jax.make_mesh((4,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    else:
        mesh = jax.make_mesh((4,), ("batch",), axis_types=(jax.sharding.AxisType.Explicit,))
    ctx = jax.set_mesh(mesh) if kind == "explicit" else contextlib.nullcontext()
    row = NamedSharding(mesh, P("batch"))
    col = NamedSharding(mesh, P(None, "batch"))
    rep = NamedSharding(mesh, P())
    xs, zs = jax.device_put(x_T, row), jax.device_put(z, row)
    S = dict(schedule=sch, ts=ts)
    with ctx:
        check(
            "sample",
            lambda x, z: jadeis.sample(mlp, params, x, z, **S),
            (xs, zs),
            row,
            REF["sample"],
        )
        if not full:
            g = lambda x, z, p: jax.grad(
                lambda x, z, p: jnp.sum(
                    jadeis.sample(  # noqa: E731
                        mlp, p, x, z, **S
                    )
                    ** 2
                ),
                argnums=(0, 1, 2),
            )(x, z, p)
            check(
                "grad", g, (xs, zs, params), (row, row) + (rep,) * 3, REF["grad DiscreteAdjoint()"]
            )
            print("ok", kind, "(short)", flush=True)
            return
        sde = dict(solver=jadeis.SDEDPMSolverPP(), **S)
        check(
            "sample sde key",
            lambda x, z: jadeis.sample(mlp, params, x, z, key=jax.random.key(1), **sde),
            (xs, zs),
            row,
            REF["sde key"],
        )
        noise = jax.device_put(jax.random.normal(jax.random.key(3), (N, B, D)), col)
        check(
            "sample sde noise",
            lambda x, z, nz: jadeis.sample(mlp, params, x, z, noise=nz, **sde),
            (xs, zs, noise),
            row,
        )
        traj = check(
            "sample_trajectory",
            lambda x, z: jadeis.sample_trajectory(mlp, params, x, z, **S),
            (xs, zs),
            col,
            REF["trajectory"],
        )
        for adj in ADJOINTS:
            g = lambda x, z, p, adj=adj: jax.grad(  # noqa: E731
                lambda x, z, p: jnp.sum(jadeis.sample(mlp, p, x, z, adjoint=adj, **S) ** 2),
                argnums=(0, 1, 2),
            )(x, z, p)
            check(f"grad {adj}", g, (xs, zs, params), (row, row) + (rep,) * 3, REF[f"grad {adj}"])
        g = lambda x, z, nz: jax.grad(
            lambda x, z, nz: jnp.sum(
                jadeis.sample(  # noqa: E731
                    mlp, params, x, z, noise=nz, adjoint=jadeis.DiscreteAdjoint(), **sde
                )
                ** 2
            ),
            argnums=(0, 1, 2),
        )(x, z, nz)
        check("grad sde noise", g, (xs, zs, noise), (row, row, col))
        for adj, kw in [
            (jadeis.AdjointDEIS(), {}),
            (jadeis.DiscreteAdjoint(), {"solver": jadeis.DPMSolverPP(order=2)}),
        ]:
            f = lambda tr, z, adj=adj, kw=kw: jadeis.solve_adjoint(  # noqa: E731
                mlp, params, z, tr[-1], trajectory=tr, adjoint=adj, **kw, **S
            )
            check(f"solve_adjoint {adj}", f, (traj, zs), (row, row) + (rep,) * 3)
        f = lambda x0, z: jadeis.solve_adjoint(  # noqa: E731
            mlp, params, z, x0, x_0=x0, adjoint=jadeis.AdjointDEIS(trajectory="reconstruct"), **S
        )
        check("solve_adjoint reconstruct", f, (traj[-1], zs), (row, row) + (rep,) * 3)
        check(
            "encode_ode",
            lambda x, z: jadeis.encode_ode(mlp, params, x, z, **S),
            (xs, zs),
            row,
            REF["encode_ode"],
        )
        check(
            "encode_sde",
            lambda x, z: jadeis.encode_sde(
                mlp, params, x, z, key=jax.random.key(2), solver=jadeis.SDEDPMSolverPP(), **S
            ),
            (xs, zs),
            (row, col),
            REF["encode_sde"],
        )
        # guide runs the module-level compiled step of jadeis.Guidance: its program, lowered
        # for these (sharded) inputs
        guide_loss = lambda x0: jnp.sum((x0 - 1.0) ** 2, axis=-1)  # noqa: E731
        opt = optax.adam(0.05)
        res = jadeis.guide(
            guide_loss, mlp, params, xs, zs, optimizer=opt, num_iters=2, progress=False, **S
        )
        from jadeis._guidance._guide import _step

        g = jadeis.Guidance(guide_loss, mlp, optimizer=opt, **S)
        st = g.init(params, xs, zs)
        program = (
            _step.lower(
                g, st.opt_vars, st.opt_state, st.fixed, st.iteration, st.key, st.noise, (), True
            )
            .compile()
            .compiled.as_text()
        )
        assert not (bad := problems_in(program)), ("guide", bad)
        for o in (res.x_T, res.z, res.x_0):
            assert o.sharding.is_equivalent_to(row, 2), ("guide", o.sharding.spec)
        np.testing.assert_allclose(np.asarray(res.x_0), np.asarray(REF["guide"]), rtol=1e-9)
        # learn_time_grid: ts is a traced function of the logits, so its values are checked
        # by a host callback, which must see ts only
        with jit_programs() as programs:
            jadeis.learn_time_grid(
                mlp,
                params,
                xs,
                zs,
                schedule=sch,
                n=N,
                num_iters=1,
                reference=jax.device_put(REF["sample"], row),
            )
        assert len(programs) == 1, programs
        assert not (bad := problems_in(programs[0], callbacks_ok=True)), ("grid", bad)
    print("ok", kind, flush=True)


def main():
    global ADJOINTS, REF, S
    ADJOINTS = [
        jadeis.DiscreteAdjoint(),
        jadeis.DiscreteAdjoint(fast=False),
        jadeis.AdjointDEIS(),
        jadeis.AdjointDEIS(trajectory="reconstruct"),
        jadeis.Backprop(),
    ]
    # single-device references
    S = dict(schedule=sch, ts=ts)
    REF = {
        "sample": jadeis.sample(mlp, params, x_T, z, **S),
        "sde key": jadeis.sample(
            mlp, params, x_T, z, key=jax.random.key(1), solver=jadeis.SDEDPMSolverPP(), **S
        ),
        "trajectory": jadeis.sample_trajectory(mlp, params, x_T, z, **S),
        "encode_ode": jadeis.encode_ode(mlp, params, x_T, z, **S),
        "encode_sde": jadeis.encode_sde(
            mlp, params, x_T, z, key=jax.random.key(2), solver=jadeis.SDEDPMSolverPP(), **S
        ),
        "guide": jadeis.guide(
            lambda x0: jnp.sum((x0 - 1.0) ** 2, axis=-1),
            mlp,
            params,
            x_T,
            z,
            optimizer=optax.adam(0.05),
            num_iters=2,
            progress=False,
            **S,
        ).x_0,
    }
    for adj in ADJOINTS:
        REF[f"grad {adj}"] = jax.jit(
            jax.grad(
                lambda x, z, p, adj=adj: jnp.sum(
                    jadeis.sample(mlp, p, x, z, adjoint=adj, **S) ** 2
                ),
                argnums=(0, 1, 2),
            )
        )(x_T, z, params)

    for arg in sys.argv[1:]:
        kind, _, size = arg.partition(":")
        run(kind, size != "short")

    # the canary: the pre-fix bug (a traced check attached to the state) must be caught
    mesh = Mesh(jax.devices(), ("batch",))
    xs = jax.device_put(x_T, NamedSharding(mesh, P("batch")))
    hlo = jax.jit(lambda x: jnp.sin(eqx.error_if(x, jnp.any(x > 9), "bad"))).lower(xs).compile()
    assert problems_in(hlo.as_text()), "canary: the HLO checks missed a gathered state"
    print("CANARY", file=sys.stderr, flush=True)
    with jax.set_mesh(
        em := jax.make_mesh((4,), ("batch",), axis_types=(jax.sharding.AxisType.Explicit,))
    ):
        xe = jax.device_put(x_T, NamedSharding(em, P("batch")))
        jax.jit(lambda x: jnp.sin(eqx.error_if(x, jnp.any(x > 9), "bad"))).lower(xe).compile()
    print("ALL OK", flush=True)


if __name__ == "__main__":
    main()
