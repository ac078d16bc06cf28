"""A masked (failed) rank in low-latency mode, on R rank processes: the other
ranks go on through the same buffer, with the masked rank's experts as masked
slots, checked against numpy.

    python -m jax_ep.launch -n 4 tests/gpu/multirank_rank_mask.py

Calls 0-1: no rank masked. Calls 2-3: rank R-1 masked and still calling (it
talks to nobody, its results are empty). Calls 4-6: rank R-1 masked and
stopped (a failed rank): the others must finish without it. Each call runs
the one-call dispatch and combine (pull, zero copy) and the split calls.
"""

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
DEAD = R - 1
checks = Checks()


def inputs(seed, t, k, e, h):
    rng = np.random.default_rng(seed)
    idxs, xs, ws = [], [], []
    for _ in range(R):
        ids = np.stack([rng.choice(e, k, replace=False) for _ in range(t)])
        idxs.append(np.where(rng.random(ids.shape) < 0.05, -1, ids).astype(np.int32))
        xs.append(rng.standard_normal((t, h)).astype(ml_dtypes.bfloat16))
        ws.append(rng.random((t, k)).astype(np.float32))
    return xs, idxs, ws


def masked_ids(idxs, masked, e):
    out = []
    for s, ids in enumerate(idxs):
        owner = np.where(ids >= 0, ids // (e // R), -1)
        off = np.isin(owner, list(masked)) | (s in masked)
        out.append(np.where(off & (ids >= 0), -1, ids).astype(np.int32))
    return out


@checks("ll_masked_rank")
def _():
    t, m, k, e, h = 24, 32, 4, 4 * R, 512
    buf = jax_ep.Buffer(
        num_experts=e, axis_name=None, num_nvl_bytes=1 << 22,
        num_ll_bytes=jax_ep.low_latency_buffer_bytes(m, h, R, k, e),
        low_latency=jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=m, backend="cuda",
                                             num_sms=max(4, 96 // R)),
        timeout_s=30.0)

    @jax.jit
    def step(x, i, w, mask):
        o = buf.low_latency_dispatch(x, i, rank_mask=mask)
        out = buf.low_latency_combine(o.recv_x, w, o.handle)
        pending = buf.low_latency_dispatch_send(x, i, rank_mask=mask, after=out)
        split = jax_ep.low_latency_dispatch_recv(pending)
        split_out = jax_ep.low_latency_combine_recv(jax_ep.low_latency_combine_send(split.recv_x, split.handle), w)
        return o.recv_x, o.recv_count, o.handle.recv_src_rank, out, split.recv_count, split_out

    for call in range(7):
        masked = set() if call < 2 else {DEAD}
        if ME == DEAD and call >= 4:
            break  # a failed rank: the others go on without it
        buf.set_masked_ranks(masked)
        xs, idxs, ws = inputs(100 + call, t, k, e, h)
        recv, count, src_rank, out, split_count, split_out = step(xs[ME], idxs[ME], ws[ME], buf.rank_mask())
        want_ids = masked_ids(idxs, masked, e)
        ref = npr.ll_dispatch(xs, want_ids, e, m)[ME]
        name = f"call {call} (masked {sorted(masked)})"
        np.testing.assert_array_equal(np.asarray(count), ref["count"], err_msg=f"{name}: counts")
        np.testing.assert_array_equal(np.asarray(split_count), ref["count"], err_msg=f"{name}: split counts")
        assert not np.isin(np.asarray(src_rank), list(masked)).any(), f"{name}: rows from a masked rank"
        for loc in range(e // R):
            n = int(ref["count"][loc])
            got = np.asarray(recv)[loc, :n]
            np.testing.assert_array_equal(got.view(np.uint16), ref["x"][loc, :n].view(np.uint16), err_msg=name)
        want = xs[ME].astype(np.float64) * np.where(want_ids[ME] >= 0, ws[ME], 0).sum(1)[:, None]
        for got in (out, split_out):
            diff = calc_diff(np.asarray(got, np.float32), want)
            assert diff < 1e-5, f"{name}: combine calc_diff {diff}"
        if ME in masked:
            assert not np.asarray(count).any() and not np.asarray(out, np.float32).any(), name
    buf.destroy()  # collective: the stopped rank joins here


code = checks.summary(ME, R)
jax.distributed.shutdown()
sys.exit(code)
