"""Gradients and FP8 combine rows of the low-latency put path over virtual
nodes (R = 8: 2x4, 4x2, 8x1; R = 4: 2x2; R = 2: 2x1), each against the
flat run (one node, the pointer path) bit for bit and against numpy:

- the VJPs of low_latency_combine (d/dy, d/dw: rows gathered back unsummed
  over puts, and per-slot rows dispatched over puts) and of
  low_latency_dispatch (d/dx), with duplicated ids and masked slots, against
  np_reference.ll_combine_grads / ll_dispatch_grad (which
  tests/test_ll_put_ops.py checks against the reference backend on CPU);
- a whole training-step gradient (jax.grad through dispatch, an expert and
  combine in one program, twice back to back over both buffer halves);
- combine_fp8=True: the one-call and the split combine, twice back to back,
  against numpy's sum over the FP8 round trip of each row.

    python -m jax_ep.launch -n 8 tests/gpu/multirank_put_path.py
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# The put path's symmetric heap (GPU memory outside XLA's pool): these shapes need a few MiB.
os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", "268435456")

from jax_ep.launch import initialize_distributed  # noqa: E402

info = initialize_distributed()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

import jax_ep  # noqa: E402
import np_reference as npr  # noqa: E402
from gpu.rank_checks import Checks, calc_diff  # noqa: E402

R, ME = info.num_ranks, info.rank
CONFIGS = {8: (4, 2, 1), 4: (2,), 2: (1,)}.get(R, ())  # ranks per node
if not CONFIGS:
    print(f"multirank_put_path: R = {R} has no virtual-node configuration here (R = 2, 4 or 8); skipped", flush=True)
    sys.exit(0)
checks = Checks()
bf = lambda a: np.asarray(a).astype(ml_dtypes.bfloat16).astype(np.float64)  # noqa: E731


def make_buffer(m, h, k, e, ranks_per_node, combine_fp8=False):
    """The flat run's Buffer (ranks_per_node None: pointers, CUDA IPC), or the
    put path's over virtual nodes of ranks_per_node."""
    return jax_ep.Buffer(
        num_experts=e, axis_name=None, num_nvl_bytes=1 << 22, ranks_per_node=ranks_per_node,
        ll_transport="ipc" if ranks_per_node is None else "nvshmem",
        num_ll_bytes=jax_ep.low_latency_buffer_bytes(m, h, R, k, e, ranks_per_node=ranks_per_node),
        low_latency=jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=m, backend="cuda",
                                             num_sms=max(4, 96 // R), combine_fp8=combine_fp8),
        timeout_s=60.0)


def inputs(seed, t, k, e, h, mask_prob=0.15, distinct=False):
    rng = np.random.default_rng(seed)
    idxs, xs, ws = [], [], []
    for _ in range(R):
        ids = np.stack([rng.choice(e, k, replace=False) for _ in range(t)]) if distinct else rng.integers(0, e, (t, k))
        idxs.append(np.where(rng.random(ids.shape) < mask_prob, -1, ids).astype(np.int32))
        xs.append(rng.standard_normal((t, h)).astype(ml_dtypes.bfloat16))
        ws.append(rng.random((t, k)).astype(np.float32))
    return xs, idxs, ws


def bits(a):
    a = np.asarray(a)
    return a.view(np.uint8) if a.dtype.itemsize == 1 else a.view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)


def same(got, flat, what):
    for u, v in zip(jax.tree.leaves(got), jax.tree.leaves(flat)):
        np.testing.assert_array_equal(bits(u), bits(v), err_msg=f"{what} differs from the flat run")


def run_grads(buf, xs, idxs, ws, gs, gds):
    """(d/dy, d/dw, src_rank) of the combine, d/dx of the dispatch, and a
    training step's (d/dx, d/dw) twice, as numpy."""

    @jax.jit
    def combine_grads(x, i, w, g):
        o = buf.low_latency_dispatch(x, i)
        out, vjp = jax.vjp(lambda y, w: buf.low_latency_combine(y, w, o.handle), o.recv_x, w)
        gy, gw = vjp(g.astype(out.dtype))
        return gy, gw, o.handle.recv_src_rank

    @jax.jit
    def dispatch_grad(x, i, gd):
        recv, vjp = jax.vjp(lambda x: buf.low_latency_dispatch(x, i).recv_x, x)
        return vjp(gd.astype(recv.dtype))[0]

    @jax.jit
    def step_grads(x, i, w):
        def loss(x, w):
            o = buf.low_latency_dispatch(x, i)
            y = jnp.tanh(o.recv_x.astype(jnp.float32)).astype(jnp.bfloat16)
            return jnp.sum(buf.low_latency_combine(y, w, o.handle).astype(jnp.float32) ** 2)

        return jax.grad(loss, argnums=(0, 1))(x, w)

    out = [jax.tree.map(np.asarray, combine_grads(xs[ME], idxs[ME], ws[ME], jnp.asarray(gs[ME], jnp.float32)))]
    out.append(np.asarray(dispatch_grad(xs[ME], idxs[ME], jnp.asarray(gds[ME], jnp.float32))))
    for _ in range(2):  # back to back: both halves of every kind
        out.append(jax.tree.map(np.asarray, step_grads(xs[ME], idxs[ME], ws[ME])))
    return out


def check_grads(ranks_per_node, seed, t=24, m=32, k=4, h=256):
    e = 4 * R
    le = e // R
    xs, idxs, ws = inputs(seed, t, k, e, h)
    gs = [bf(np.random.default_rng(seed + 300 + r).standard_normal((t, h))) for r in range(R)]
    gds = [bf(np.random.default_rng(seed + 400 + r).standard_normal((le, R * m, h))) for r in range(R)]
    flat_buf = make_buffer(m, h, k, e, None)
    flat = run_grads(flat_buf, xs, idxs, ws, gs, gds)
    flat_buf.destroy()
    buf = make_buffer(m, h, k, e, ranks_per_node)
    got = run_grads(buf, xs, idxs, ws, gs, gds)
    buf.destroy()
    name = f"{R // ranks_per_node}x{ranks_per_node}"
    for what, a, b in zip(("combine VJP", "dispatch VJP", "step grads", "step grads (again)"), got, flat):
        same(a, b, f"{name}: {what}")
    (gy, gw, src_rank), gx = got[0], got[1]
    want_y, want_w = npr.ll_combine_grads(xs, idxs, ws, gs, e, m)[ME]
    np.testing.assert_allclose(gw, want_w, rtol=1e-3, atol=1e-3, err_msg=f"{name}: combine d/dw")
    gy = np.where((src_rank >= 0)[..., None], gy.astype(np.float64), 0.0)
    np.testing.assert_allclose(gy, want_y, rtol=1e-2, atol=1e-2, err_msg=f"{name}: combine d/dy")
    np.testing.assert_allclose(gx.astype(np.float64), npr.ll_dispatch_grad(idxs, gds, e, m)[ME], rtol=1e-2,
                               atol=1e-2, err_msg=f"{name}: dispatch d/dx")
    same(got[3], got[2], f"{name}: the second training step")


def run_fp8_combine(buf, rounds):
    """Per round (one-call combine, split combine) of a combine_fp8 Buffer, as numpy."""
    assert buf.low_latency.combine_fp8

    @jax.jit
    def step(x, i, w):
        o = buf.low_latency_dispatch(x, i)
        fused = buf.low_latency_combine(o.recv_x, w, o.handle)
        split = jax_ep.low_latency_combine_recv(jax_ep.low_latency_combine_send(o.recv_x, o.handle, after=fused), w)
        return fused, split

    return [jax.tree.map(np.asarray, step(x, i, w)) for x, i, w in rounds]


def check_fp8_combine(ranks_per_node, seed, t=32, m=32, k=4, h=1024):
    e = 4 * R
    rounds = [inputs(seed + it, t, k, e, h, mask_prob=0.05, distinct=True) for it in range(2)]
    mine = [(xs[ME], idxs[ME], ws[ME]) for xs, idxs, ws in rounds]
    flat_buf = make_buffer(m, h, k, e, None, combine_fp8=True)
    flat = run_fp8_combine(flat_buf, mine)
    flat_buf.destroy()
    buf = make_buffer(m, h, k, e, ranks_per_node, combine_fp8=True)
    got = run_fp8_combine(buf, mine)
    buf.destroy()
    name = f"{R // ranks_per_node}x{ranks_per_node} combine_fp8"
    for it, ((x, i, w), a, b) in enumerate(zip(mine, got, flat)):
        same(a, b, f"{name} round {it}")
        q, sc = npr.fp8_quantize(x.astype(np.float32))
        deq = (q.astype(np.float32).reshape(t, -1, 128) * sc[..., None]).reshape(t, h).astype(np.float64)
        want = deq * np.where(i >= 0, w, 0).sum(1)[:, None]
        for out in a:
            diff = calc_diff(out.astype(np.float32), want)
            assert diff < 1e-5, f"{name} round {it}: calc_diff {diff} against the FP8 round trip"


for rpn in CONFIGS:
    checks(f"put_grads_{R // rpn}x{rpn}")(lambda rpn=rpn: check_grads(rpn, seed=10 * rpn))
    checks(f"put_combine_fp8_{R // rpn}x{rpn}")(lambda rpn=rpn: check_fp8_combine(rpn, seed=20 * rpn))
sys.exit(checks.summary(ME, R))
