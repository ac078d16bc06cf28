"""Calls through the 2^32 wrap of the call serials in protocol words, on R rank
processes, checked against numpy:

    python -m jax_ep.launch -n 2 tests/gpu/multirank_counter_wrap.py

JAX_EP_TEST_COUNTER_START (read when a buffer is created, the same on every
rank) starts the call counters 3 calls below 2^32, so a few back-to-back
low-latency and normal calls cross the wrap (cuda/serial.cuh). Also runs the
ring combine with a ring as small as its chunk (num_sms=4,
combine_chunk_rows=2, combine_ring_rows=2), which deadlocked before the
reducer batch was fitted to the ring.
"""

import os
import sys

os.environ["JAX_EP_TEST_COUNTER_START"] = str((1 << 32) - 3)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jax_ep.launch import initialize_distributed  # noqa: E402

info = initialize_distributed()

import dataclasses  # noqa: E402

import jax  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

import jax_ep  # noqa: E402
import np_reference as npr  # noqa: E402
from gpu.rank_checks import Checks, calc_diff  # noqa: E402

R, ME = info.num_ranks, info.rank
check = checks = Checks()
CALLS = 7  # from 3 below the wrap to 4 past it (each half twice past it)


def inputs(seed, t, k, e, h, mask_prob=0.1):
    rng = np.random.default_rng(seed)
    idxs, xs, ws = [], [], []
    for _ in range(R):
        ids = np.stack([rng.choice(e, k, replace=False) for _ in range(t)])
        idxs.append(np.where(rng.random(ids.shape) < mask_prob, -1, ids).astype(np.int32))
        xs.append(rng.standard_normal((t, h)).astype(ml_dtypes.bfloat16))
        ws.append(rng.random((t, k)).astype(np.float32))
    return xs, idxs, ws


@check("ll_calls_through_the_wrap")
def _():
    """Dispatch (pulled and pushed) and combine (zero-copy and pushed) calls
    through the wrap of both low-latency call counters."""
    t, m, k, e, h = 24, 32, 4, 4 * R, 512
    buf = jax_ep.Buffer(
        num_experts=e, axis_name=None, num_nvl_bytes=1 << 22,
        num_ll_bytes=jax_ep.low_latency_buffer_bytes(m, h, R, k, e),
        low_latency=jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=m, backend="cuda", num_sms=4),
        timeout_s=20.0)
    steps = {}
    for pull in (True, False):
        opts = dataclasses.replace(buf.low_latency, dispatch_pull=pull, combine_zero_copy=pull)

        def step(x, i, w, opts=opts):
            o = buf.low_latency_dispatch(x, i, options=opts)
            return o.recv_x, o.recv_count, buf.low_latency_combine(o.recv_x, w, o.handle)

        steps[pull] = jax.jit(step)
    for call in range(CALLS):
        pull = call % 3 != 2
        xs, idxs, ws = inputs(10 + call, t, k, e, h)
        recv, count, out = steps[pull](xs[ME], idxs[ME], ws[ME])
        ref = npr.ll_dispatch(xs, idxs, e, m)[ME]
        name = f"call {call} ({'pull' if pull else 'push'})"
        np.testing.assert_array_equal(np.asarray(count), ref["count"], err_msg=f"{name}: counts")
        for loc in range(e // R):
            n = int(ref["count"][loc])
            np.testing.assert_array_equal(np.asarray(recv)[loc, :n].view(np.uint16),
                                          ref["x"][loc, :n].view(np.uint16), err_msg=f"{name}: rows")
        want = xs[ME].astype(np.float64) * np.where(idxs[ME] >= 0, ws[ME], 0).sum(1)[:, None]
        diff = calc_diff(np.asarray(out, np.float32), want)
        assert diff < 1e-5, f"{name}: combine calc_diff {diff}"
    buf.destroy()


def normal_calls(name, layout, num_sms, chunk_rows, ring_rows, t=64, k=4, h=256):
    e = 4 * R
    nbytes = jax_ep.intranode_buffer_bytes(t, h, R, k, e, capacity=R * t * k)
    buf = jax_ep.Buffer(num_experts=e, axis_name=None, num_nvl_bytes=nbytes,
                        normal=jax_ep.NormalOptions(backend="cuda", num_sms=num_sms), timeout_s=20.0)
    cap = R * t if layout == "rank_major" else R * t * min(k, e // R)
    opts = jax_ep.NormalOptions(layout=layout, backend="cuda", num_sms=num_sms, combine_chunk_rows=chunk_rows,
                                combine_ring_rows=ring_rows, buffer_id=buf.normal.buffer_id)

    @jax.jit
    def step(x, i, w):
        o = buf.dispatch(x, i, w, options=opts)
        return o.recv_x, buf.combine(o.recv_x, o.handle)

    for call in range(CALLS):  # each call is two epochs (dispatch, combine)
        xs, idxs, ws = inputs(50 + call, t, k, e, h)
        recv, back = step(xs[ME], idxs[ME], ws[ME])
        if layout == "rank_major":
            refs = npr.dispatch_rank_major(xs, idxs, ws, e, cap)
        else:
            refs = npr.dispatch_expert_major(xs, idxs, ws, e, cap, 1)
        np.testing.assert_array_equal(np.asarray(recv).view(np.uint16), refs[ME]["x"].view(np.uint16),
                                      err_msg=f"{name} call {call}: rows")
        want = np.zeros((t, h), np.float64)
        for d in range(R):
            for row, (s, i) in zip(refs[d]["pos"], refs[d]["src"]):
                if s == ME:
                    want[i] += np.asarray(refs[d]["x"][row], np.float64)
        diff = calc_diff(np.asarray(back, np.float32), want)
        assert diff < 5e-6, f"{name} call {call}: combine calc_diff {diff}"
    buf.destroy()


@check("normal_rank_major_through_the_wrap")
def _():
    normal_calls("rank_major", "rank_major", num_sms=8, chunk_rows=2, ring_rows=8)


@check("normal_expert_major_through_the_wrap")
def _():
    normal_calls("expert_major", "expert_major", num_sms=8, chunk_rows=2, ring_rows=64)


@check("ring_as_small_as_its_chunk")
def _():
    normal_calls("small_ring", "rank_major", num_sms=4, chunk_rows=2, ring_rows=2)


code = checks.summary(ME, R)
jax.distributed.shutdown()
sys.exit(code)
