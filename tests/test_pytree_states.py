"""Pytree states: a dict of two latents of different shapes sampled together, with a
leaf-wise model, equals sampling each leaf on its own; every strategy's gradient agrees
with Backprop (or with the per-leaf gradients), for x_T, z, params and ts (float64). Also
integer conditioning (class labels) under every strategy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadeis

SCH = jadeis.VPLinear()
N = 5
TS = jadeis.time_grid(SCH, N)
_k1, _k2, _k3, _k4 = jax.random.split(jax.random.key(0), 4)
X_T = {
    "image": jax.random.normal(_k1, (2, 8, 8), jnp.float64),
    "audio": jax.random.normal(_k2, (2, 16), jnp.float64),
}
W = {  # weights of the loss
    "image": jax.random.normal(_k3, (2, 8, 8), jnp.float64),
    "audio": jax.random.normal(_k4, (2, 16), jnp.float64),
}
PARAMS = {"a": jnp.asarray(0.7, jnp.float64), "b": jnp.asarray(1.3, jnp.float64)}
Z = jnp.asarray(0.1, jnp.float64)


def f_image(a, x, t, z):
    return 0.5 * jnp.tanh(a * x) * (1.0 + t) + z * x


def f_audio(b, x, t, z):
    return 0.3 * jnp.sin(b * x) + z * t


def eps_tree(p, x, t, z):
    return {"image": f_image(p["a"], x["image"], t, z), "audio": f_audio(p["b"], x["audio"], t, z)}


LEAF_FN = {
    "image": lambda p, x, t, z: f_image(p["a"], x, t, z),
    "audio": lambda p, x, t, z: f_audio(p["b"], x, t, z),
}


def close(a, b, rtol=1e-9, atol=1e-11):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)
    assert jax.tree.structure(a) == jax.tree.structure(b)


def loss_of(x0):
    return sum(jnp.sum(W[k] * x0[k] ** 2) for k in x0)


def test_sample_equals_per_leaf():
    for solver in (jadeis.DPMSolver(order=3), jadeis.UniPC()):
        out = jadeis.sample(eps_tree, PARAMS, X_T, Z, schedule=SCH, ts=TS, solver=solver)
        assert jax.tree.structure(out) == jax.tree.structure(X_T)
        for k in X_T:
            ref = jadeis.sample(LEAF_FN[k], PARAMS, X_T[k], Z, schedule=SCH, ts=TS, solver=solver)
            close(out[k], ref, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize(
    "adjoint",
    [jadeis.DiscreteAdjoint(), jadeis.DiscreteAdjoint(fast=False)],
    ids=["fast", "generic"],
)
def test_discrete_adjoint_equals_backprop(adjoint):
    def loss(adj):
        def f(p, x, z, ts):
            return loss_of(jadeis.sample(eps_tree, p, x, z, schedule=SCH, ts=ts, adjoint=adj))
        return f

    ref = jax.grad(loss(jadeis.Backprop()), argnums=(0, 1, 2, 3))(PARAMS, X_T, Z, TS)
    got = jax.grad(loss(adjoint), argnums=(0, 1, 2, 3))(PARAMS, X_T, Z, TS)
    close(got, ref)


@pytest.mark.parametrize("trajectory", ["cached", "reconstruct"])
def test_adjoint_deis_equals_per_leaf(trajectory):
    adj = jadeis.AdjointDEIS(order=2, trajectory=trajectory)

    def loss(p, x, z):
        return loss_of(jadeis.sample(eps_tree, p, x, z, schedule=SCH, ts=TS, adjoint=adj))

    gp, gx, gz = jax.grad(loss, argnums=(0, 1, 2))(PARAMS, X_T, Z)
    gz_sum = 0.0
    for k, name in (("image", "a"), ("audio", "b")):
        def leaf_loss(p, x, z, k=k):
            x0 = jadeis.sample(LEAF_FN[k], p, x, z, schedule=SCH, ts=TS, adjoint=adj)
            return jnp.sum(W[k] * x0**2)

        rp, rx, rz = jax.grad(leaf_loss, argnums=(0, 1, 2))(PARAMS, X_T[k], Z)
        close(gx[k], rx)
        close(gp[name], rp[name])
        gz_sum = gz_sum + rz
    close(gz, gz_sum)


@pytest.mark.parametrize("adjoint", [jadeis.DiscreteAdjoint(), jadeis.DiscreteAdjoint(fast=False),
                                     jadeis.AdjointDEIS()], ids=["fast", "generic", "deis"])
def test_sde_key_and_noise_pytree(adjoint):
    solver = jadeis.SDEDPMSolverPP(order=2)
    key = jax.random.key(3)
    out_key = jadeis.sample(eps_tree, PARAMS, X_T, Z, schedule=SCH, ts=TS, solver=solver, key=key)
    # the documented draw: leaf j of step i from fold_in(fold_in(key, i), j); leaves in
    # jax.tree order ("audio", "image")
    leaves, treedef = jax.tree.flatten(X_T)
    noise = jax.tree.unflatten(treedef, [
        jnp.stack([jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), j), v.shape,
                                     v.dtype) for i in range(N)])
        for j, v in enumerate(leaves)
    ])
    out_noise = jadeis.sample(eps_tree, PARAMS, X_T, Z, schedule=SCH, ts=TS, solver=solver,
                              noise=noise)
    close(out_key, out_noise, rtol=1e-12, atol=1e-13)
    for k in X_T:
        ref = jadeis.sample(LEAF_FN[k], PARAMS, X_T[k], Z, schedule=SCH, ts=TS, solver=solver,
                            noise=noise[k])
        close(out_noise[k], ref, rtol=1e-12, atol=1e-13)

    def loss(adj):
        def f(p, x, z, nz):
            return loss_of(jadeis.sample(eps_tree, p, x, z, schedule=SCH, ts=TS, solver=solver,
                                         noise=nz, adjoint=adj))
        return f

    ref = jax.grad(loss(jadeis.Backprop()), argnums=(0, 1, 2, 3))(PARAMS, X_T, Z, noise)
    got = jax.grad(loss(adjoint), argnums=(0, 1, 2, 3))(PARAMS, X_T, Z, noise)
    if isinstance(adjoint, jadeis.DiscreteAdjoint):
        close(got, ref)
    else:  # the continuous SDE adjoint: per leaf, compare with the leaf's own AdjointDEIS
        for k, name in (("image", "a"), ("audio", "b")):
            def leaf_loss(p, x, nz, k=k):
                x0 = jadeis.sample(LEAF_FN[k], p, x, Z, schedule=SCH, ts=TS, solver=solver,
                                   noise=nz, adjoint=adjoint)
                return jnp.sum(W[k] * x0**2)

            rp, rx, rn = jax.grad(leaf_loss, argnums=(0, 1, 2))(PARAMS, X_T[k], noise[k])
            close(got[1][k], rx)
            close(got[3][k], rn)
            close(got[0][name], rp[name])


def test_trajectory_and_solve_adjoint():
    traj = jadeis.sample_trajectory(eps_tree, PARAMS, X_T, Z, schedule=SCH, ts=TS)
    assert jax.tree.map(jnp.shape, traj) == {"image": (N + 1, 2, 8, 8), "audio": (N + 1, 2, 16)}
    for k in X_T:
        ref = jadeis.sample_trajectory(LEAF_FN[k], PARAMS, X_T[k], Z, schedule=SCH, ts=TS)
        close(traj[k], ref, rtol=1e-12, atol=1e-13)
    x0 = jax.tree.map(lambda v: v[-1], traj)
    grad_x0 = jax.grad(loss_of)(x0)

    def loss(p, x, z):
        return loss_of(jadeis.sample(eps_tree, p, x, z, schedule=SCH, ts=TS))

    gp, gx, gz = jax.grad(loss, argnums=(0, 1, 2))(PARAMS, X_T, Z)
    res = jadeis.solve_adjoint(eps_tree, PARAMS, Z, grad_x0, schedule=SCH, ts=TS,
                               trajectory=traj)
    close((res.params, res.x_T, res.z), (gp, gx, gz))
    # AdjointDEIS from x_0 alone equals it from the trajectory (reconstruct vs cached path)
    deis = jadeis.solve_adjoint(eps_tree, PARAMS, Z, grad_x0, schedule=SCH, ts=TS,
                                trajectory=traj, adjoint=jadeis.AdjointDEIS())
    assert jax.tree.structure(deis.x_T) == jax.tree.structure(X_T)
    # gradients through every state of the trajectory
    def traj_loss(adj):
        def f(x):
            tr = jadeis.sample_trajectory(eps_tree, PARAMS, x, Z, schedule=SCH, ts=TS,
                                          adjoint=adj)
            return sum(jnp.sum(jnp.sin(v)) for v in jax.tree.leaves(tr))
        return f

    close(jax.grad(traj_loss(jadeis.DiscreteAdjoint()))(X_T),
          jax.grad(traj_loss(jadeis.Backprop()))(X_T))
    with pytest.raises(ValueError, match="grad_x0 must be a pytree"):
        jadeis.solve_adjoint(eps_tree, PARAMS, Z, grad_x0["image"], schedule=SCH, ts=TS,
                             trajectory=traj)
    with pytest.raises(ValueError, match="does not match"):  # a reversed trajectory
        jadeis.solve_adjoint(eps_tree, PARAMS, Z, grad_x0, schedule=SCH, ts=TS,
                             trajectory=jax.tree.map(lambda v: v[::-1], traj))


def eps_gauss(p, x, t, z):  # the exact noise prediction of Gaussian data, per leaf
    s, a = SCH.sigma(t), SCH.alpha(t)
    return {k: s * x[k] / (a**2 * p[k] + s**2) for k in x}


def test_encode_round_trip():
    sch = SCH
    ts = jadeis.time_grid(sch, 40)
    var = {"image": jnp.asarray(0.25, jnp.float64), "audio": jnp.asarray(0.5, jnp.float64)}
    x_0 = jax.tree.map(lambda v: 0.3 * v, X_T)
    x_T = jadeis.encode_ode(eps_gauss, var, x_0, None, schedule=sch, ts=ts)
    for k in X_T:
        leaf = lambda p, x, t, z, k=k: eps_gauss(p, {k: x}, t, z)[k]  # noqa: E731
        ref = jadeis.encode_ode(leaf, var, x_0[k], None, schedule=sch, ts=ts)
        close(x_T[k], ref, rtol=1e-12, atol=1e-13)
    back = jadeis.sample(eps_gauss, var, x_T, None, schedule=sch, ts=ts, solver=jadeis.DDIM())
    close(back, x_0, rtol=0.2, atol=1e-2)  # DDIM inversion's discretisation error at N = 40
    # Cycle-SDE encoding reproduces x_0 exactly
    solver = jadeis.SDEDPMSolver()
    x_T, noise = jadeis.encode_sde(eps_tree, PARAMS, x_0, Z, schedule=sch, ts=TS, solver=solver,
                                   key=jax.random.key(5))
    out = jadeis.sample(eps_tree, PARAMS, x_T, Z, schedule=sch, ts=TS, solver=solver, noise=noise)
    close(out, x_0, rtol=1e-8, atol=1e-9)


def test_guide_over_dict_x_T():
    target = jax.tree.map(jnp.zeros_like, X_T)

    def loss_fn(x_0):
        return sum(jnp.mean((x_0[k] - target[k]) ** 2) for k in x_0)

    res = jadeis.guide(loss_fn, eps_tree, PARAMS, X_T, Z, schedule=SCH, ts=TS,
                       optimizer=optax.adam(0.05), num_iters=3, wrt=("x_T",), progress=False)
    assert jax.tree.structure(res.x_T) == jax.tree.structure(X_T)
    assert res.losses[-1] < res.losses[0]


def test_errors():
    mixed = {"image": X_T["image"], "audio": X_T["audio"].astype(jnp.float32)}
    with pytest.raises(ValueError, match="x_T is a pytree state, whose leaves must all share"):
        jadeis.sample(eps_tree, PARAMS, mixed, Z, schedule=SCH, ts=TS)
    solver = jadeis.SDEDPMSolverPP()
    with pytest.raises(ValueError, match="noise must be a pytree of the structure of x_T"):
        jadeis.sample(eps_tree, PARAMS, X_T, Z, schedule=SCH, ts=TS, solver=solver,
                      noise={"image": jnp.zeros((N, 2, 8, 8))})
    with pytest.raises(ValueError, match="noise must be a pytree"):
        jadeis.sample(eps_tree, PARAMS, X_T, Z, schedule=SCH, ts=TS, solver=solver,
                      noise=jax.tree.map(lambda v: jnp.zeros((N + 1,) + v.shape), X_T))
    with pytest.raises(ValueError, match="pytree states are not supported by Rex"):
        jadeis.sample(eps_tree, PARAMS, X_T, Z, schedule=SCH, ts=TS, solver=jadeis.Rex())
    with pytest.raises(ValueError, match="must return a pytree of the same structure"):
        jadeis.sample(lambda p, x, t, z: x["image"], PARAMS, X_T, Z, schedule=SCH, ts=TS)


# -- integer conditioning (class labels): not differentiable, float0 cotangents ----------

LABELS = jnp.array([0, 1])


def eps_labels(p, x, t, z):
    emb = p["emb"][z["label"]]  # (B,) class embedding
    return p["w"] * x + emb[:, None] * t + z["shift"]


@pytest.mark.parametrize(
    "adjoint",
    [jadeis.DiscreteAdjoint(), jadeis.DiscreteAdjoint(fast=False), jadeis.AdjointDEIS()],
    ids=["fast", "generic", "deis"],
)
def test_integer_conditioning(adjoint):
    params = {"w": jnp.asarray(0.5, jnp.float64), "emb": jnp.array([0.3, -0.2], jnp.float64),
              "steps": jnp.array(3)}  # an integer leaf of params too
    x_T = jax.random.normal(jax.random.key(2), (2, 3), jnp.float64)
    z = {"label": LABELS, "shift": jnp.asarray(0.05, jnp.float64)}

    def loss(adj):
        def f(p, zz):
            return jnp.sum(jadeis.sample(eps_labels, p, x_T, zz, schedule=SCH, ts=TS,
                                         adjoint=adj) ** 2)
        return f

    ref = jax.grad(loss(jadeis.Backprop()), argnums=(0, 1), allow_int=True)(params, z)
    got = jax.grad(loss(adjoint), argnums=(0, 1), allow_int=True)(params, z)
    assert got[0]["steps"].dtype == jax.dtypes.float0
    assert got[1]["label"].dtype == jax.dtypes.float0
    drop = lambda g: {k: v for k, v in g.items() if v.dtype != jax.dtypes.float0}  # noqa: E731
    if not isinstance(adjoint, jadeis.DiscreteAdjoint):
        # the continuous adjoint is not Backprop's gradient: compare it with the same
        # strategy on the model with the labels closed over (no integer input at all)
        def closed(p, zz):
            fn = lambda p, x, t, s: eps_labels(p, x, t, {"label": LABELS, "shift": s})  # noqa
            return jnp.sum(jadeis.sample(fn, p, x_T, zz["shift"], schedule=SCH, ts=TS,
                                         adjoint=adjoint) ** 2)

        fl = {"w": params["w"], "emb": params["emb"]}
        ref = jax.grad(closed, argnums=(0, 1))(fl, {"shift": z["shift"]})
    close(drop(got[0]), drop(ref[0]))
    close(drop(got[1]), drop(ref[1]))
    # the plain case of the report: z an integer array, gradient w.r.t. params
    ps = {"w": params["w"], "emb": params["emb"]}
    fn = lambda p, x, t, z: p["w"] * x + p["emb"][z][:, None] * t  # noqa: E731
    g = jax.grad(lambda p: jnp.sum(jadeis.sample(fn, p, x_T, LABELS, schedule=SCH, ts=TS,
                                                 adjoint=adjoint)))(ps)
    assert np.all(np.isfinite(np.asarray(g["emb"])))
