"""Every FP8 cast of jax_ep on np_reference.fp8_edge_rows, as what it
returned beside what np_reference.fp8_cast says it must be: the standalone
op, the low-latency dispatch's received rows, and the rows of a combine with
``combine_fp8``. tests/gpu/test_single_device_kernels.py runs them with the
CUDA backend (each kernel's cast, byte for byte); tests/test_fp8.py with the
xla backend on the CPU, which checks this file's own logic.
"""

from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp
import jax_ep
import np_reference as npr

# (T, M, K, E, H) of the low-latency calls: one rank, so E local experts.
DISPATCH_SHAPE = (24, 32, 2, 8, 2048)
COMBINE_SHAPE = (24, 24, 1, 8, 2048)


def cast_op(rng, dtype, opts, backend, finite=False):
    """per_token_cast_to_fp8 of [40, 2048] edge rows in `dtype`.

    Returns (uint8 [40, 2048] bytes, scales as uint32 bits, and the same two
    from np_reference.fp8_cast)."""
    x = npr.fp8_edge_rows(rng, 40, 2048, finite=finite)
    if dtype == jnp.float32:  # values BF16 cannot hold too
        x[20:] += rng.standard_normal((20, 2048)).astype(np.float32) * np.float32(1e-6) * np.abs(x[20:])
    q, s = jax.jit(lambda v: jax_ep.per_token_cast_to_fp8(v, opts, backend=backend))(jnp.asarray(x, dtype))
    want_q, want_s = npr.fp8_cast(x, opts.round_scale, opts.use_ue8m0)
    return np.asarray(q).view(np.uint8), np.asarray(s).view(np.uint32), want_q, want_s.view(np.uint32)


def _one_device_mesh():
    return jax.make_mesh((1,), ("ep",), devices=jax.devices()[:1])


def ll_dispatch(rng, options, finite=False):
    """One-rank low_latency_dispatch (DISPATCH_SHAPE, ``options.fp8`` set) of
    edge rows (row i of x is token i). Returns the valid received rows'
    (bytes, scale bits) and np_reference.fp8_cast's for their tokens."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from conftest import random_routing

    t, m, k, e, h = DISPATCH_SHAPE
    opts = options.fp8
    mesh = _one_device_mesh()
    x = npr.fp8_edge_rows(rng, t, h, finite=finite)
    idx = random_routing(rng, 1, t, k, e, mask_prob=0.05)[0]
    xs, ids = (jax.device_put(jnp.asarray(a), NamedSharding(mesh, P("ep"))) for a in (x.astype(jnp.bfloat16), idx))

    def body(x, i):
        o = jax_ep.low_latency_dispatch(x, i, num_experts=e, axis_name="ep", options=options)
        return o.recv_x, o.handle.recv_src_rank, o.handle.recv_src_token

    (q, s), src_rank, src_token = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))(xs, ids)
    want_q, want_s = npr.fp8_cast(x, opts.round_scale, opts.use_ue8m0)
    valid = np.asarray(src_rank) >= 0
    tokens = np.asarray(src_token)[valid]
    assert len(tokens) == (idx >= 0).sum()
    return (np.asarray(q)[valid].view(np.uint8), np.asarray(s)[valid].view(np.uint32),
            want_q[tokens], want_s[tokens].view(np.uint32))


def ll_combine_fp8(rng, options, finite=False):
    """One-rank low_latency_combine with ``options.combine_fp8`` (COMBINE_SHAPE:
    token t to expert t % E, weight 1) of expert outputs whose valid rows are
    edge rows. Returns (the combined float32 [T, H], and numpy's
    bf16(float32(scale * e4m3) + 0) of np_reference.fp8_cast's bytes, the
    CUDA combine's arithmetic for one slot of weight 1). An e4m3 step is far
    above a BF16 rounding, so the result pins every cast byte."""
    import ml_dtypes
    from jax.sharding import NamedSharding, PartitionSpec as P

    t, m, k, e, h = COMBINE_SHAPE
    mesh = _one_device_mesh()
    x = rng.standard_normal((t, h)).astype(np.float32)
    idx = (np.arange(t) % e).astype(np.int32)[:, None]  # expert ee's valid rows: 0 .. t / e - 1
    y = rng.standard_normal((e, m, h)).astype(np.float32)
    y[:, : t // e] = npr.fp8_edge_rows(rng, t, h, finite=finite).reshape(e, t // e, h)
    w = np.ones((t, k), np.float32)
    put = lambda a: jax.device_put(jnp.asarray(a), NamedSharding(mesh, P("ep")))  # noqa: E731

    def body(x, i, y, w):
        o = jax_ep.low_latency_dispatch(x, i, num_experts=e, axis_name="ep", options=options)
        return jax_ep.low_latency_combine(y, w, o.handle), o.handle.recv_src_rank, o.handle.recv_src_token

    out, src_rank, src_token = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))(
        put(x.astype(jnp.bfloat16)), put(idx), put(y.astype(jnp.bfloat16)), put(w))
    src_rank, src_token = np.asarray(src_rank), np.asarray(src_token)
    rows = [(ee, j) for ee in range(e) for j in range(m) if src_rank[ee, j] >= 0]
    assert len(rows) == t
    q, sc = npr.fp8_cast(np.stack([y[ee, j] for ee, j in rows]).astype(ml_dtypes.bfloat16).astype(np.float32))
    f = q.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    with np.errstate(invalid="ignore"):
        summed = (np.repeat(sc, 128, axis=1) * f).astype(np.float32) + np.float32(0)
    want = np.zeros((t, h), np.float32)
    for n, (ee, j) in enumerate(rows):
        want[src_token[ee, j]] = summed[n]
    return np.asarray(out).astype(np.float32), want.astype(ml_dtypes.bfloat16).astype(np.float32)
