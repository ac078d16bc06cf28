"""Flax NNX MoE layer: modes agree with each other and with the dense
single-device reference (outputs and gradients), optax training lowers the
loss, and a msgpack round trip of the state restores bitwise-identical outputs."""

import numpy as np
import pytest

flax = pytest.importorskip("flax")
optax = pytest.importorskip("optax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx, serialization  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import jax_ep.flax as epx  # noqa: E402
from conftest import AXIS, make_mesh  # noqa: E402

R, T, CFG = 4, 8, epx.MoEConfig(num_experts=8, hidden=16, ffn=16, topk=2, expert_alignment=4)


def _model(mode="normal", seed=0):
    import dataclasses

    return epx.MoE(dataclasses.replace(CFG, mode=mode), rngs=nnx.Rngs(seed))


def _loss_sharded(model, x, mesh):
    def local(m, x):
        y, aux = m(x)
        return y, aux

    y, aux = epx.ep_shard_map(local, model, x, mesh=mesh, in_specs=(P(AXIS),), out_specs=(P(AXIS), P()))
    return jnp.sum(jnp.sin(y)) + 0.1 * aux, y


def _loss_reference(model, x):
    y, aux = model.reference(x)
    return jnp.sum(jnp.sin(y)) + 0.1 * aux, y


def _value_grad(loss_fn, model, *args):
    (loss, y), grads = nnx.jit(nnx.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(model, *args)
    return float(loss), np.asarray(y), grads


def test_modes_match_dense_reference():
    mesh = make_mesh(R)
    x = jax.random.normal(jax.random.key(1), (R * T, CFG.hidden))
    ref = _value_grad(_loss_reference, _model("normal"), x)
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P(AXIS)))
        runs = {mode: _value_grad(lambda m, x: _loss_sharded(m, x, mesh), epx.shard_model(_model(mode), mesh), xs)
                for mode in ("normal", "low_latency")}
    for mode, (loss, y, (g_model, g_x)) in runs.items():
        np.testing.assert_allclose(loss, ref[0], rtol=1e-5, err_msg=mode)
        np.testing.assert_allclose(y, ref[1], rtol=1e-5, atol=1e-5, err_msg=mode)
        np.testing.assert_allclose(np.asarray(g_x), np.asarray(ref[2][1]), rtol=1e-4, atol=1e-5, err_msg=mode)
        for a, b in zip(jax.tree.leaves(g_model), jax.tree.leaves(ref[2][0]), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5, err_msg=mode)


def test_partition_specs():
    specs = epx.partition_specs(_model())
    assert specs["router"] == P() and specs["w_up"] == P(AXIS) and specs["w_down"] == P(AXIS)


def test_optax_training_lowers_loss():
    mesh = make_mesh(R)
    teacher = _model(seed=1)
    model = _model(seed=2)
    x = jax.random.normal(jax.random.key(3), (R * T, CFG.hidden))
    target = teacher.reference(x)[0]
    with jax.set_mesh(mesh):
        epx.shard_model(model, mesh)
        x, target = (jax.device_put(a, NamedSharding(mesh, P(AXIS))) for a in (x, target))
        optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)

        @nnx.jit
        def step(model, optimizer, x, target):
            def loss_fn(model):
                def local(m, x, t):
                    y, aux = m(x)
                    return (jnp.mean((y - t) ** 2) + 1e-2 * aux)[None]
                per_rank = epx.ep_shard_map(local, model, x, target, mesh=mesh,
                                            in_specs=(P(AXIS), P(AXIS)), out_specs=P(AXIS))
                return jnp.mean(per_rank)
            loss, grads = nnx.value_and_grad(loss_fn)(model)
            optimizer.update(model, grads)
            return loss

        losses = [float(step(model, optimizer, x, target)) for _ in range(8)]
    assert losses[-1] < 0.7 * losses[0], losses


def test_state_msgpack_round_trip_is_bitwise():
    mesh = make_mesh(R)
    model = _model(seed=5)
    blob = serialization.msgpack_serialize(nnx.to_pure_dict(nnx.state(model)))

    restored = _model(seed=6)  # different weights until restored
    state = nnx.state(restored)
    nnx.replace_by_pure_dict(state, serialization.msgpack_restore(blob))
    nnx.update(restored, state)

    x = jax.random.normal(jax.random.key(7), (R * T, CFG.hidden))

    def run(m):
        with jax.set_mesh(mesh):
            xs = jax.device_put(x, NamedSharding(mesh, P(AXIS)))
            out = nnx.jit(lambda m, x: epx.ep_shard_map(lambda m, x: m(x)[0], m, x, mesh=mesh,
                                                        in_specs=(P(AXIS),), out_specs=P(AXIS)))(m, xs)
        return np.asarray(out)

    a, b = run(model), run(restored)
    assert a.tobytes() == b.tobytes()
    assert not np.array_equal(a, run(_model(seed=6)))
