"""Low-latency CUDA dispatch/combine on R rank processes, checked against numpy,
plus a latency benchmark (DeepEP's LL configuration) when JAX_EP_LL_BENCH_OUT is set.

    python -m jax_ep.launch -n 8 tests/gpu/multirank_low_latency.py
"""

import json
import os
import sys
import time

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


def make_buffer(m, h, k, e, fp8=None, sms=None, transport="ipc"):
    return jax_ep.Buffer(
        num_experts=e, axis_name=None, num_nvl_bytes=1 << 22, ll_transport=transport,
        num_ll_bytes=jax_ep.low_latency_buffer_bytes(m, h, R, k, e, fp8),
        low_latency=jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=m, fp8=fp8, backend="cuda",
                                             num_sms=sms or max(4, 96 // R)),
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


@check("ll_send_recv_split")
def _():
    t, m, k, e, h = 64, 64, 4, 4 * R, 1024
    buf = make_buffer(m, h, k, e)
    xs, idxs, ws = inputs(7, t, k, e, h)

    @jax.jit
    def step(x, i, w):
        pending = buf.low_latency_dispatch_send(x, i)
        busy = jnp.tanh(x.astype(jnp.float32) @ x.astype(jnp.float32).T).sum()
        o = jax_ep.low_latency_dispatch_recv(pending, after=busy)
        back = jax_ep.low_latency_combine_recv(jax_ep.low_latency_combine_send(o.recv_x, o.handle), w, after=busy)
        return back

    out = step(xs[ME], idxs[ME], ws[ME])
    want = xs[ME].astype(np.float64) * np.where(idxs[ME] >= 0, ws[ME], 0).sum(1)[:, None]
    assert calc_diff(np.asarray(out, np.float32), want) < 1e-5
    buf.destroy()


def bench():
    """DeepEP's LL configuration: 128 tokens, hidden 7168, top-8, experts ~288."""
    t = m = 128
    h, k = 7168, 8
    e = (288 // R) * R
    rows = []
    for sms in [int(s) for s in os.environ.get("JAX_EP_LL_SMS", "4,8,16").split(",")]:
        for fp8 in (jax_ep.FP8Options(), None):
            buf = make_buffer(m, h, k, e, fp8, sms=sms)
            xs, idxs, ws = inputs(11, t, k, e, h, mask_prob=0.0)
            x, i, w = jnp.asarray(xs[ME]), jnp.asarray(idxs[ME]), jnp.asarray(ws[ME])
            y = jax.jit(lambda x, i: buf.low_latency_dispatch(x, i).recv_x)(x, i)
            handle = jax.jit(lambda x, i: buf.low_latency_dispatch(x, i).handle)(x, i)
            yb = y if fp8 is None else jax_ep.per_token_cast_back(*y, fp8, out_dtype=jnp.bfloat16)
            iters = 8

            def many(fn, *args):
                def body(*args):
                    acc = jnp.float32(0)
                    for _ in range(iters):
                        args, acc = jax.lax.optimization_barrier((args, acc))
                        acc = acc + fn(*args)
                    return acc
                f = jax.jit(body)
                f(*args).block_until_ready()
                times = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    f(*args).block_until_ready()
                    times.append((time.perf_counter() - t0) / iters)
                return float(np.median(times))

            def disp(x, i):
                r = buf.low_latency_dispatch(x, i).recv_x
                return (r[0] if isinstance(r, tuple) else r)[0, 0, 0].astype(jnp.float32)

            def comb(yb, w, handle):
                return buf.low_latency_combine(yb, w, handle)[0, 0].astype(jnp.float32)

            def trivial(x):  # the loop's own cost: one tiny op per iteration, no communication
                return x[0, 0].astype(jnp.float32)

            empty_us = many(trivial, x) * 1e6
            d_us = many(disp, x, i) * 1e6
            c_us = many(comb, yb, w, handle) * 1e6 if fp8 is not None else None

            # Overlap: a matmul alone, the dispatch then the matmul, and the
            # matmul placed between send and receive (the receive tied after it).
            a = jnp.asarray(np.random.default_rng(ME).standard_normal((4096, 4096)), jnp.bfloat16)

            def compute(a):
                return jnp.sum((a @ a).astype(jnp.float32)) * 1e-9

            def serial(x, i, a):
                return disp(x, i) + compute(a)

            def overlapped(x, i, a):
                pending = buf.low_latency_dispatch_send(x, i)
                busy = compute(a)
                r = jax_ep.low_latency_dispatch_recv(pending, after=busy).recv_x
                return (r[0] if isinstance(r, tuple) else r)[0, 0, 0].astype(jnp.float32) + busy

            mm_us = many(compute, a) * 1e6
            serial_us = many(serial, x, i, a) * 1e6
            overlap_us = many(overlapped, x, i, a) * 1e6
            pairs = int((np.asarray(i) >= 0).sum())
            disp_bytes = pairs * ((h + h / 128 * 4 + 16) if fp8 else 2 * h)
            row = dict(ranks=R, sms=sms, fp8=fp8 is not None, dispatch_us=d_us, dispatch_gbps=disp_bytes / d_us / 1e3,
                       trivial_op_loop_us=empty_us,
                       matmul_us=mm_us, dispatch_then_matmul_us=serial_us, matmul_between_send_and_recv_us=overlap_us)
            if c_us is not None:
                row.update(combine_us=c_us, combine_gbps=pairs * 2 * h / c_us / 1e3)
            rows.append(row)
            if ME == 0:
                print(f"LL R={R} sms={sms} {'FP8' if fp8 else 'BF16'} dispatch {d_us:.1f} us ({row['dispatch_gbps']:.1f} GB/s)"
                      + (f", BF16 combine {c_us:.1f} us ({row['combine_gbps']:.1f} GB/s)" if c_us else "")
                      + f"; trivial op {empty_us:.1f} us; 4096^3 matmul {mm_us:.0f} us, dispatch then matmul {serial_us:.0f} us, "
                        f"matmul between send and receive {overlap_us:.0f} us", flush=True)
            buf.destroy()
    out = os.environ.get("JAX_EP_LL_BENCH_OUT")
    if ME == 0 and out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"low_latency_R{R}.json"), "w") as f:
            json.dump(dict(device=str(jax.devices()[0].device_kind), note="per-rank time, wall clock over 8 back-to-back calls, median of 5", results=rows), f, indent=1)


if os.environ.get("JAX_EP_LL_BENCH_OUT") and checks.all_passed:
    bench()
code = checks.summary(ME, R)
jax.distributed.shutdown()
sys.exit(code)
