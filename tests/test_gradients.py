"""custom_vjp rules (combine is the VJP of dispatch and vice versa) against
numerical differentiation, and a jit-compiled shard_map training step."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from jax.test_util import check_grads

import jax_ep
from conftest import AXIS, make_mesh, random_routing


def _global(rng, r, t, k, e, h, distinct=True):
    idx = np.concatenate(random_routing(rng, r, t, k, e, distinct=distinct))
    x = rng.standard_normal((r * t, h)).astype(np.float32)
    w = rng.random((r * t, k)).astype(np.float32)
    return x, idx, w


def _sharded(fn, mesh, n_args):
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(AXIS),) * n_args, out_specs=P(AXIS)))


def _put(mesh, *arrays):
    return [jax.device_put(a, NamedSharding(mesh, P(AXIS))) for a in arrays]


@pytest.mark.parametrize("r", [2, 4])
@pytest.mark.parametrize("layout", ["rank_major", "expert_major"])
def test_dispatch_combine_grads(rng, r, layout):
    t, k, e, h = 5, 3, 2 * r, 8
    x, idx, w = _global(rng, r, t, k, e, h)
    mesh = make_mesh(r)
    opts = jax_ep.NormalOptions(layout=layout, expert_alignment=2)

    def moe(x, w, idx):
        o = jax_ep.dispatch(x, idx, w, num_experts=e, options=opts)
        rank = jax.lax.axis_index(AXIS).astype(jnp.float32)
        y = jnp.tanh(o.recv_x * (1.0 + rank)) * jnp.sum(o.recv_topk_weights, 1, keepdims=True)
        return jax_ep.combine(y, o.handle)

    f_sharded = _sharded(moe, mesh, 3)
    x, w, idx = _put(mesh, x, w, idx)
    with jax.set_mesh(mesh):
        check_grads(lambda x, w: f_sharded(x, w, idx), (x, w), order=1, modes=("rev",), atol=2e-2, rtol=2e-2)


def test_combine_grad_is_cached_dispatch(rng):
    r, t, k, e, h = 4, 6, 2, 8, 8
    x, idx, w = _global(rng, r, t, k, e, h)
    mesh = make_mesh(r)

    def f(x, w, idx, g):
        o = jax_ep.dispatch(x, idx, w, num_experts=e)
        _, vjp = jax.vjp(lambda y: jax_ep.combine(y, o.handle), o.recv_x)
        return vjp(g)[0], jax_ep.cached_dispatch(g, o.handle)

    g = rng.standard_normal((r * t, h)).astype(np.float32)
    fs = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P(AXIS),) * 4, out_specs=(P(AXIS), P(AXIS))))
    with jax.set_mesh(mesh):
        a, b = fs(*_put(mesh, x, w, idx, g))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("r", [2, 4])
def test_low_latency_grads(rng, r):
    t, k, e, h, m = 4, 3, 2 * r, 8, 4
    x, idx, w = _global(rng, r, t, k, e, h, distinct=False)
    mesh = make_mesh(r)
    opts = jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=m)
    scale = jnp.linspace(0.5, 1.5, e // r)[:, None, None]

    def moe(x, w, idx):
        o = jax_ep.low_latency_dispatch(x, idx, num_experts=e, options=opts)
        y = jnp.sin(o.recv_x) * scale
        return jax_ep.low_latency_combine(y, w, o.handle)

    f_sharded = _sharded(moe, mesh, 3)
    x, w, idx = _put(mesh, x, w, idx)
    with jax.set_mesh(mesh):
        check_grads(lambda x, w: f_sharded(x, w, idx), (x, w), order=1, modes=("rev",), atol=2e-2, rtol=2e-2)


def test_fp8_low_latency_grad_is_a_clear_error(rng):
    r, t, k, e, h = 2, 4, 2, 4, 128
    x, idx, w = _global(rng, r, t, k, e, h)
    mesh = make_mesh(r)
    opts = jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=4, fp8=jax_ep.FP8Options())

    def loss(x, idx):
        o = jax_ep.low_latency_dispatch(x.astype(jnp.bfloat16), idx, num_experts=e, options=opts)
        return jnp.sum(o.recv_x[0].astype(jnp.float32))[None]

    f = _sharded(loss, mesh, 2)
    x, idx = _put(mesh, x, idx)
    with jax.set_mesh(mesh), pytest.raises(NotImplementedError, match="FP8 has no gradient"):
        jax.grad(lambda x: f(x, idx).sum())(x)


def test_training_step_lowers_loss(rng):
    """A jit-compiled shard_map step with experts sharded over EP learns a target."""
    r, t, k, e, h = 4, 16, 2, 8, 8
    mesh = make_mesh(r)
    x = rng.standard_normal((r * t, h)).astype(np.float32)
    target = np.tanh(x @ rng.standard_normal((h, h)).astype(np.float32))
    router = rng.standard_normal((h, e)).astype(np.float32)
    experts = (rng.standard_normal((e, h, h)) * 0.1).astype(np.float32)

    def loss_fn(experts, x, target):
        def local(experts, x, target):
            logits = x @ router
            w, idx = jax.lax.top_k(jax.nn.softmax(logits), k)
            o = jax_ep.dispatch(x, idx.astype(jnp.int32), w, num_experts=e,
                                options=jax_ep.NormalOptions(layout="expert_major"))
            y = jax.lax.ragged_dot(o.recv_x, experts, o.expert_group_sizes)
            y = y * jnp.sum(o.recv_topk_weights, axis=1, keepdims=True)
            out = jax_ep.combine(y, o.handle)
            return jnp.mean((out - target) ** 2)[None]
        per_rank = jax.shard_map(local, mesh=mesh, in_specs=(P(AXIS), P(AXIS), P(AXIS)), out_specs=P(AXIS))
        return jnp.mean(per_rank(experts, x, target))

    @jax.jit
    def step(experts, x, target):
        loss, g = jax.value_and_grad(loss_fn)(experts, x, target)
        return experts - 0.5 * g, loss

    experts, x, target = _put(mesh, experts, x, target)
    with jax.set_mesh(mesh):
        losses = []
        for _ in range(20):
            experts, loss = step(experts, x, target)
            losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses
