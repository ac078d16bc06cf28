"""Equinox MoE layer: modes agree with each other and with the dense
single-device reference (outputs and gradients), optax training lowers the
loss, and tree_serialise_leaves/tree_deserialise_leaves restores
bitwise-identical outputs."""

import dataclasses

import numpy as np
import pytest

eqx = pytest.importorskip("equinox")
optax = pytest.importorskip("optax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import jax_ep.equinox as epx  # noqa: E402
from conftest import AXIS, make_mesh  # noqa: E402

R, T = 4, 8
CFG = epx.MoEConfig(num_experts=8, hidden=16, ffn=16, topk=2, expert_alignment=4, activation="gelu",
                    n_group=4, topk_group=2)


def _model(mode="normal", seed=0):
    return epx.MoE(dataclasses.replace(CFG, mode=mode), key=jax.random.key(seed))


def _put(mesh, *arrays):
    return [jax.device_put(a, NamedSharding(mesh, P(AXIS))) for a in arrays]


def test_modes_match_dense_reference():
    mesh = make_mesh(R)
    x = jax.random.normal(jax.random.key(1), (R * T, CFG.hidden))

    def ref_loss(model, x):
        y, aux = model.reference(x)
        return jnp.sum(jnp.sin(y)) + 0.1 * aux, y

    def sharded_loss(model, x):
        y, aux = epx.ep_shard_map(lambda m, x: m(x), model, x, mesh=mesh,
                                  in_specs=(P(AXIS),), out_specs=(P(AXIS), P()))
        return jnp.sum(jnp.sin(y)) + 0.1 * aux, y

    vg = lambda f: eqx.filter_jit(eqx.filter_value_and_grad(lambda m, x: f(m, x), has_aux=True))
    (ref_l, ref_y), ref_g = vg(ref_loss)(_model(), x)
    with jax.set_mesh(mesh):
        (xs,) = _put(mesh, x)
        for mode in ("normal", "low_latency"):
            (loss, y), g = vg(sharded_loss)(epx.shard_model(_model(mode), mesh), xs)
            np.testing.assert_allclose(float(loss), float(ref_l), rtol=1e-5, err_msg=mode)
            np.testing.assert_allclose(np.asarray(y), np.asarray(ref_y), rtol=1e-5, atol=1e-5, err_msg=mode)
            for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g), strict=True):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5, err_msg=mode)


def test_partition_specs_match_array_partition():
    model = _model()
    specs = epx.partition_specs(model)
    assert specs.router == P() and specs.experts.w_up == P(AXIS) and specs.experts.w_gate is None
    params = eqx.filter(model, eqx.is_array)
    assert jax.tree.structure(params) == jax.tree.structure(specs, is_leaf=lambda s: isinstance(s, P))


def test_optax_training_lowers_loss():
    mesh = make_mesh(R)
    x = jax.random.normal(jax.random.key(3), (R * T, CFG.hidden))
    target = _model(seed=1).reference(x)[0]
    optimizer = optax.adam(3e-2)
    with jax.set_mesh(mesh):
        model = epx.shard_model(_model(seed=2), mesh)
        opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
        x, target = _put(mesh, x, target)

        def loss_fn(model, x, target):
            def local(m, x, t):
                y, aux = m(x)
                return (jnp.mean((y - t) ** 2) + 1e-2 * aux)[None]
            return jnp.mean(epx.ep_shard_map(local, model, x, target, mesh=mesh,
                                             in_specs=(P(AXIS), P(AXIS)), out_specs=P(AXIS)))

        @eqx.filter_jit
        def step(model, opt_state, x, target):
            loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, target)
            updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
            return eqx.apply_updates(model, updates), opt_state, loss

        losses = []
        for _ in range(8):
            model, opt_state, loss = step(model, opt_state, x, target)
            losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses


def test_serialise_leaves_round_trip_is_bitwise(tmp_path):
    mesh = make_mesh(R)
    model = _model(seed=5)
    path = tmp_path / "moe.eqx"
    eqx.tree_serialise_leaves(path, model)
    restored = eqx.tree_deserialise_leaves(path, _model(seed=6))
    x = jax.random.normal(jax.random.key(7), (R * T, CFG.hidden))

    @eqx.filter_jit
    def run(m, x):
        return epx.ep_shard_map(lambda m, x: m(x)[0], m, x, mesh=mesh, in_specs=(P(AXIS),), out_specs=P(AXIS))

    with jax.set_mesh(mesh):
        (xs,) = _put(mesh, x)
        a, b = np.asarray(run(model, xs)), np.asarray(run(restored, xs))
        other = np.asarray(run(_model(seed=6), xs))
    assert a.tobytes() == b.tobytes()
    assert not np.array_equal(a, other)
