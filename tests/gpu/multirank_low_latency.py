"""Low-latency CUDA dispatch/combine on R rank processes, checked against numpy
(the benchmark is benchmarks/bench_low_latency.py).

    python -m jax_ep.launch -n 8 tests/gpu/multirank_low_latency.py
"""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

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
checks = Checks()
check = checks



def inputs(seed, t, k, e, h, mask_prob=0.05, distinct=True):
    rng = np.random.default_rng(seed)
    idxs, xs, ws = [], [], []
    for _ in range(R):
        ids = np.stack([rng.choice(e, k, replace=False) for _ in range(t)]) if distinct else rng.integers(0, e, (t, k))
        idxs.append(np.where(rng.random(ids.shape) < mask_prob, -1, ids).astype(np.int32))
        xs.append(rng.standard_normal((t, h)).astype(ml_dtypes.bfloat16))
        ws.append(rng.random((t, k)).astype(np.float32))
    return xs, idxs, ws


def make_buffer(m, h, k, e, fp8=None, transport="ipc"):
    return jax_ep.Buffer(
        num_experts=e, axis_name=None, num_nvl_bytes=1 << 22, ll_transport=transport,
        num_ll_bytes=jax_ep.low_latency_buffer_bytes(m, h, R, k, e, fp8),
        low_latency=jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=m, fp8=fp8, backend="cuda",
                                             num_sms=max(4, 96 // R)),
        timeout_s=60.0)


def run_case(name, seed, t, m, k, e, h, fp8=None, distinct=True, iters=3, transport="ipc", mask_prob=0.05):
    buf = make_buffer(m, h, k, e, fp8, transport=transport)

    @jax.jit
    def step(x, i, w):
        o = buf.low_latency_dispatch(x, i)
        y = o.recv_x if fp8 is None else jax_ep.per_token_cast_back(*o.recv_x, fp8, out_dtype=jnp.bfloat16)
        return o.recv_x, o.recv_count, o.handle.recv_src_rank, o.handle.recv_src_token, buf.low_latency_combine(y, w, o.handle)

    for it in range(iters):  # back-to-back calls alternate the buffer halves
        xs, idxs, ws = inputs(seed + it, t, k, e, h, mask_prob=mask_prob, distinct=distinct)
        recv, count, src_rank, src_token, out = step(xs[ME], idxs[ME], ws[ME])
        ref = npr.ll_dispatch(xs, idxs, e, m)[ME]
        np.testing.assert_array_equal(np.asarray(count), ref["count"], err_msg=f"{name}: counts")
        le = e // R
        for loc in range(le):
            n = int(ref["count"][loc])
            if fp8 is None:
                got = np.asarray(recv)[loc, :n]
                np.testing.assert_array_equal(got.view(np.uint16), ref["x"][loc, :n].view(np.uint16), err_msg=f"{name}: rows")
            else:
                q, s = (np.asarray(a) for a in recv)
                want_q, want_s = npr.fp8_quantize(ref["x"][loc, :n].astype(np.float32), round_scale=fp8.round_scale)
                np.testing.assert_array_equal(q[loc, :n].view(np.uint8), want_q.view(np.uint8), err_msg=f"{name}: fp8")
                if not fp8.use_ue8m0:
                    np.testing.assert_array_equal(s[loc, :n], want_s, err_msg=f"{name}: scales")
            assert (np.asarray(src_rank)[loc, n:] == -1).all()
        # combine: sum_k w_k * (the row the expert returned); the experts return their input here
        deq = xs[ME].astype(np.float64)
        if fp8 is not None:
            q, s = npr.fp8_quantize(xs[ME].astype(np.float32), round_scale=fp8.round_scale)
            deq = (q.astype(np.float32).reshape(t, -1, 128) * s[..., None]).reshape(t, h)
            deq = deq.astype(ml_dtypes.bfloat16).astype(np.float64)
        want = deq * np.where(idxs[ME] >= 0, ws[ME], 0).sum(1)[:, None]
        diff = calc_diff(np.asarray(out, np.float32), want)
        assert diff < (9e-4 if fp8 else 1e-5), f"{name}: combine calc_diff {diff}"
    buf.destroy()


@check("ll_bf16_small")
def _():
    run_case("ll_bf16_small", 1, 37, 40, 4, 4 * R, 512)


@check("ll_bf16_duplicates_and_masks")
def _():
    run_case("ll_bf16_duplicates_and_masks", 2, 20, 32, 5, 2 * R, 256, distinct=False)


@check("ll_sparse_routing")
def _():
    # Few tokens, most slots masked: many (expert, source) counts are 0 in one
    # call and not in the next (the sender's per-expert counts carry the call
    # number instead of being reset), on both halves.
    run_case("ll_sparse_routing", 8, 5, 16, 3, 8 * R, 256, iters=6, mask_prob=0.6)
    run_case("ll_sparse_routing_fp8", 9, 3, 8, 2, 8 * R, 512, fp8=jax_ep.FP8Options(round_scale=True), iters=5,
             mask_prob=0.5)


@check("ll_dispatch_pull_and_push")
def _():
    """The one-call dispatch pulls (dispatch_pull, the default) or pushes;
    both give numpy's rows, scales, counts and sources, in calls that switch
    between the two over both buffer halves, with a different token count on
    each rank."""
    m, k, e, h = 48, 6, 6 * R, 1024
    fp8 = jax_ep.FP8Options()
    buf = make_buffer(m, h, k, e, fp8=fp8)
    step = {}
    for pull in (True, False):
        opts = dataclasses.replace(buf.low_latency, dispatch_pull=pull)

        def dispatch(x, i, opts=opts):
            o = buf.low_latency_dispatch(x, i, options=opts)
            hd = o.handle
            return o.recv_x, o.recv_count, jnp.stack([hd.recv_src_rank, hd.recv_src_token, hd.recv_src_slot], -1)

        step[pull] = jax.jit(dispatch)
    for it, pull in enumerate((True, True, False, True, False, False, True)):
        xs, idxs, _ = inputs(60 + it, m, k, e, h, distinct=it % 2 == 0)
        xs = [x[: m - 3 * r] for r, x in enumerate(xs)]
        idxs = [i[: m - 3 * r] for r, i in enumerate(idxs)]
        (q, sc), count, src = step[pull](xs[ME], idxs[ME])
        ref = npr.ll_dispatch(xs, idxs, e, m)[ME]
        name = f"call {it} ({'pull' if pull else 'push'})"
        np.testing.assert_array_equal(np.asarray(count), ref["count"], err_msg=f"{name}: counts")
        np.testing.assert_array_equal(np.asarray(src), ref["src"], err_msg=f"{name}: sources")
        for loc in range(e // R):
            n = int(ref["count"][loc])
            want_q, want_s = npr.fp8_quantize(ref["x"][loc, :n].astype(np.float32))
            np.testing.assert_array_equal(np.asarray(q)[loc, :n].view(np.uint8), want_q.view(np.uint8), err_msg=name)
            np.testing.assert_array_equal(np.asarray(sc)[loc, :n], want_s, err_msg=f"{name}: scales")
    buf.destroy()


@check("ll_combine_zero_copy_and_push")
def _():
    """The one-call combine reads rows straight from the expert ranks' XLA
    memory (combine_zero_copy, the default) or has them pushed; each rank
    picks per call, so one receive mixes both kinds of source, over both
    buffer halves, with duplicated ids and masked slots."""
    t, m, k, e, h = 40, 48, 5, 3 * R, 1024
    buf = make_buffer(m, h, k, e)
    assert buf.low_latency_zero_copy, f"XLA memory is not shared: {buf.low_latency_zero_copy_note}"
    step = {}
    for zero_copy in (True, False):
        opts = dataclasses.replace(buf.low_latency, combine_zero_copy=zero_copy)

        def roundtrip(x, i, w, opts=opts):
            o = buf.low_latency_dispatch(x, i, options=opts)
            y = (o.recv_x.astype(jnp.float32) * 3).astype(jnp.bfloat16)  # a fresh XLA buffer
            return buf.low_latency_combine(y, w, o.handle)  # the handle carries the dispatch's options

        step[zero_copy] = jax.jit(roundtrip)
    for it in range(6):
        xs, idxs, ws = inputs(80 + it, t, k, e, h, distinct=it % 2 == 0, mask_prob=0.1)
        zero_copy = (it < 2) or (it >= 4 and (ME + it) % 2 == 0)  # all, then none, then mixed
        out = np.asarray(step[zero_copy](xs[ME], idxs[ME], ws[ME]), np.float32)
        x3 = (xs[ME].astype(np.float32) * 3).astype(ml_dtypes.bfloat16).astype(np.float64)
        want = x3 * np.where(idxs[ME] >= 0, ws[ME], 0).sum(1)[:, None]
        diff = calc_diff(out, want)
        assert diff < 1e-5, f"call {it} (zero_copy={zero_copy}): combine calc_diff {diff}"

    # One compiled combine given y at different addresses: each call must
    # read the y it was given, also compiled with XLA's minimum CUDA-graph
    # size at 1, so that where command buffers are on XLA captures the call
    # and replays it.
    xs, idxs, ws = inputs(90, t, k, e, h)
    recv, handle = jax.jit(lambda x, i: (lambda o: (o.recv_x, o.handle))(buf.low_latency_dispatch(x, i)))(
        xs[ME], idxs[ME])
    ys = [(recv.astype(jnp.float32) * (j + 1)).astype(jnp.bfloat16) for j in range(4)]  # alive together
    combine = jax.jit(buf.low_latency_combine)
    captured = combine.lower(ys[0], ws[ME], handle).compile({"xla_gpu_graph_min_graph_size": 1})
    for fn_name, fn in (("jit", combine), ("captured", captured)):
        for j in (0, 1, 2, 3, 1, 0):
            out = np.asarray(fn(ys[j], ws[ME], handle), np.float32)
            xj = (xs[ME].astype(np.float32) * (j + 1)).astype(ml_dtypes.bfloat16).astype(np.float64)
            diff = calc_diff(out, xj * np.where(idxs[ME] >= 0, ws[ME], 0).sum(1)[:, None])
            assert diff < 1e-5, f"{fn_name}: y number {j}: combine calc_diff {diff}"
    buf.destroy()


@check("ll_fp8_deepep_shape")
def _():
    run_case("ll_fp8_deepep_shape", 3, 128, 128, 8, (288 // R) * R, 7168, fp8=jax_ep.FP8Options())


@check("ll_fp8_ue8m0")
def _():
    run_case("ll_fp8_ue8m0", 4, 64, 64, 8, 8 * R, 2048, fp8=jax_ep.FP8Options(use_ue8m0=True))


@check("ll_over_nvshmem_symmetric_memory")
def _():
    from jax_ep import nvshmem

    if not nvshmem.available():
        raise RuntimeError(f"jax_ep._nvshmem is not available: {nvshmem.unavailable_reason()}")
    run_case("ll_over_nvshmem", 5, 48, 64, 4, 4 * R, 1024, fp8=jax_ep.FP8Options(), transport="nvshmem")
    buf = make_buffer(64, 1024, 4, 4 * R, transport="nvshmem")
    assert set(buf.low_latency_transports) == {"p2p"}, buf.low_latency_transports
    buf.destroy()


@check("ll_gradients_match_numpy")
def _():
    # Duplicated ids and masked slots; the experts return their input.
    t, m, k, e, h = 24, 32, 4, 4 * R, 256
    le = e // R
    buf = make_buffer(m, h, k, e)
    xs, idxs, ws = inputs(21, t, k, e, h, distinct=False, mask_prob=0.15)
    bf = lambda a: a.astype(ml_dtypes.bfloat16).astype(np.float64)  # noqa: E731
    gs = [bf(np.random.default_rng(300 + r).standard_normal((t, h))) for r in range(R)]
    gds = [bf(np.random.default_rng(400 + r).standard_normal((le, R * m, h))) for r in range(R)]

    @jax.jit
    def combine_grads(x, i, w, g):
        o = buf.low_latency_dispatch(x, i)
        out, vjp = jax.vjp(lambda y, w: buf.low_latency_combine(y, w, o.handle), o.recv_x, w)
        gy, gw = vjp(g.astype(out.dtype))
        return gy, gw, o.handle.recv_src_rank, o.handle.recv_src_token

    gy, gw, src_rank, src_token = (np.asarray(a) for a in combine_grads(
        xs[ME], idxs[ME], ws[ME], jnp.asarray(gs[ME], jnp.float32)))
    valid = idxs[ME] >= 0
    want_w = np.where(valid, (gs[ME] * xs[ME].astype(np.float64)).sum(1)[:, None], 0.0)
    np.testing.assert_allclose(gw, want_w, rtol=1e-3, atol=1e-3, err_msg="combine: d/dw")
    want_y = np.zeros((le, R * m, h))
    for loc in range(le):
        for j in np.nonzero(src_rank[loc] >= 0)[0]:
            r, tt = src_rank[loc, j], src_token[loc, j]
            weight = ws[r][tt][idxs[r][tt] == ME * le + loc].sum()
            want_y[loc, j] = weight * gs[r][tt]
    gy = gy.astype(np.float64)
    assert (gy[src_rank < 0] == 0).all(), "combine: d/dy is not zero on padding rows"
    np.testing.assert_allclose(gy, want_y, rtol=1e-2, atol=1e-2, err_msg="combine: d/dy")

    @jax.jit
    def dispatch_grad(x, i, gd):
        recv, vjp = jax.vjp(lambda x: buf.low_latency_dispatch(x, i).recv_x, x)
        return vjp(gd.astype(recv.dtype))[0]

    gx = np.asarray(dispatch_grad(xs[ME], idxs[ME], jnp.asarray(gds[ME], jnp.float32))).astype(np.float64)
    want_x = np.zeros((t, h))
    for tt in range(t):
        for g in sorted({int(v) for v in idxs[ME][tt] if v >= 0}):
            owner, loc = g // le, g % le
            before = sum(int(np.any(idxs[s] == g, axis=1).sum()) for s in range(ME))
            j = before + int(np.any(idxs[ME][:tt] == g, axis=1).sum())
            want_x[tt] += gds[owner][loc, j]
    np.testing.assert_allclose(gx, want_x, rtol=1e-2, atol=1e-2, err_msg="dispatch: d/dx")
    buf.destroy()


@check("ll_combine_fp8_rows")
def _():
    """combine_fp8: the rows travel as FP8; the sum equals numpy's over the
    FP8 round trip of each row (the one-call and the split combine, twice
    back to back)."""

    t = m = 128
    k, h = 8, 7168
    e = (288 // R) * R
    buf = make_buffer(m, h, k, e)
    opts = dataclasses.replace(buf.low_latency, combine_fp8=True)
    for it in range(2):
        xs, idxs, ws = inputs(40 + it, t, k, e, h)

        @jax.jit
        def step(x, i, w):
            o = buf.low_latency_dispatch(x, i, options=opts)
            fused = buf.low_latency_combine(o.recv_x, w, o.handle)
            split = jax_ep.low_latency_combine_recv(jax_ep.low_latency_combine_send(o.recv_x, o.handle, after=fused), w)
            return fused, split

        fused, split = step(xs[ME], idxs[ME], ws[ME])
        q, sc = npr.fp8_quantize(xs[ME].astype(np.float32))
        deq = (q.astype(np.float32).reshape(t, -1, 128) * sc[..., None]).reshape(t, h).astype(np.float64)
        want = deq * np.where(idxs[ME] >= 0, ws[ME], 0).sum(1)[:, None]
        for got in (fused, split):
            diff = calc_diff(np.asarray(got, np.float32), want)
            assert diff < 1e-5, f"combine_fp8 calc_diff {diff} against the FP8 round trip"
        exact = calc_diff(np.asarray(fused, np.float32), xs[ME].astype(np.float64) * np.where(idxs[ME] >= 0, ws[ME], 0).sum(1)[:, None])
        assert exact < 1e-3, f"combine_fp8 calc_diff {exact} against the exact sum"
    buf.destroy()


@check("ll_send_recv_split")
def _():
    """Split calls, with the send on the send stream (async_send) and on XLA's
    stream, compute between send and receive, three rounds back to back."""

    t, m, k, e, h = 64, 64, 4, 4 * R, 1024
    buf = make_buffer(m, h, k, e)
    xs, idxs, ws = inputs(7, t, k, e, h)
    for async_send in (True, False):
        opts = dataclasses.replace(buf.low_latency, async_send=async_send)

        @jax.jit
        def step(x, i, w):
            outs = []
            for r in range(3):
                xr = (x.astype(jnp.float32) * (r + 1)).astype(jnp.bfloat16)
                # XLA orders calls only by data: each round follows the previous one.
                pending = buf.low_latency_dispatch_send(xr, i, options=opts, after=outs[-1] if outs else None)
                a = pending.then(x.astype(jnp.float32))
                busy = jnp.tanh(a @ a.T).sum()
                o = jax_ep.low_latency_dispatch_recv(pending, after=busy)
                p2 = jax_ep.low_latency_combine_send(o.recv_x, o.handle)
                b = p2.then(a)
                busy2 = jnp.tanh(b @ b.T).sum()
                outs.append(jax_ep.low_latency_combine_recv(p2, w, after=busy2))
            return jnp.stack(outs)

        out = np.asarray(step(xs[ME], idxs[ME], ws[ME]), np.float32)
        for r in range(3):
            xr = (xs[ME].astype(np.float32) * (r + 1)).astype(ml_dtypes.bfloat16).astype(np.float64)
            want = xr * np.where(idxs[ME] >= 0, ws[ME], 0).sum(1)[:, None]
            assert calc_diff(out[r], want) < 1e-5, (async_send, r)
    buf.destroy()


@check("ll_empty_rank")
def _():
    """Rank 0 has no tokens (T = 0, an empty local batch): it still takes part
    in every call, receives its experts' rows, and the others are served."""
    t, m, k, e, h = 12, 16, 3, 2 * R, 512
    buf = make_buffer(m, h, k, e)

    @jax.jit
    def step(x, i, w):
        o = buf.low_latency_dispatch(x, i)
        return o.recv_x, o.recv_count, buf.low_latency_combine(o.recv_x, w, o.handle)

    for it in range(3):
        xs, idxs, ws = inputs(300 + it, t, k, e, h)
        xs, idxs, ws = [xs[0][:0]] + xs[1:], [idxs[0][:0]] + idxs[1:], [ws[0][:0]] + ws[1:]
        recv, count, out = step(xs[ME], idxs[ME], ws[ME])
        ref = npr.ll_dispatch(xs, idxs, e, m)[ME]
        np.testing.assert_array_equal(np.asarray(count), ref["count"], err_msg=f"call {it}: counts")
        for loc in range(e // R):
            n = int(ref["count"][loc])
            got = np.asarray(recv)[loc, :n]
            np.testing.assert_array_equal(got.view(np.uint16), ref["x"][loc, :n].view(np.uint16))
        want = xs[ME].astype(np.float64) * np.where(idxs[ME] >= 0, ws[ME], 0).sum(1)[:, None]
        assert np.asarray(out).shape == want.shape
        if want.size:
            assert calc_diff(np.asarray(out, np.float32), want) < 1e-5
    buf.destroy()


code = checks.summary(ME, R)
jax.distributed.shutdown()
sys.exit(code)
