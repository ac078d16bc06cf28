"""The put kernels (cuda/ll_put_*.cu) on R rank processes, called directly
(ctypes, tests/gpu/ll_put_direct.py) over an NVSHMEM symmetric buffer, before
any FFI handler calls them: flat (every peer a pointer) and virtual nodes
(peers in other nodes reached by NVSHMEM puts) -- R = 8: 8x1 flat, 2x4,
4x2, 8x1 put; R = 4: 2x2; R = 2: 2x1. Dispatch (BF16, FP8, power-of-two,
UE8M0) must equal numpy bit for bit, and every configuration the flat run;
the combine must match numpy (float32 sums) and the flat run bit for bit.
Three rounds per buffer, so both halves are used and half 0 is reused.
With NVSHMEM_DISABLE_P2P=1 and a remote transport (scripts/gpu_suite.sh's
JAX_EP_TRY_UCX=1 step: UCX over the loopback) every put goes through
NVSHMEM's proxy thread, asynchronous and ordered only by its signals.

    python -m jax_ep.launch -n 8 tests/gpu/multirank_ll_put_direct.py

Not yet run on a GPU.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jax_ep.launch import initialize_distributed  # noqa: E402

info = initialize_distributed()

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

from jax_ep import nvshmem, topology  # noqa: E402
import np_reference as npr  # noqa: E402
from gpu import ll_put_direct as direct  # noqa: E402
from gpu.rank_checks import Checks, calc_diff  # noqa: E402

R, ME = info.num_ranks, info.rank
checks = Checks()
M, K, H = 24, 4, 1024
E = 4 * R
# Ranks per node; R: flat. With NVSHMEM_DISABLE_P2P=1 (NVSHMEM's proxy transport
# between the ranks, e.g. NVSHMEM_REMOTE_TRANSPORT=ucx) no peer has a pointer:
# only one rank per node, checked against numpy.
NO_P2P = os.environ.get("NVSHMEM_DISABLE_P2P", "") in ("1", "true", "y", "yes")
CONFIGS = [1] if NO_P2P else [R] + list({8: (4, 2, 1), 4: (2,), 2: (1,)}.get(R, ()))


def inputs(seed):
    rng = np.random.default_rng(seed)
    xs, idxs, ws = [], [], []
    for r in range(R):
        t = M - (r % 3)
        ids = np.stack([rng.choice(E, K, replace=False) for _ in range(t)])
        ids = np.where(rng.random(ids.shape) < 0.05, -1, ids).astype(np.int32)
        if t > 1:
            ids[1, 1] = ids[1, 0]  # a duplicate expert in one token: one message, first slot
        idxs.append(ids)
        xs.append(rng.standard_normal((t, H)).astype(ml_dtypes.bfloat16))
        ws.append(rng.random((t, K)).astype(np.float32))
    return xs, idxs, ws


def check_dispatch(got, ref, payload, name):
    recv_x, recv_scales, count, src = got
    np.testing.assert_array_equal(count, ref["count"], err_msg=f"{name}: counts")
    np.testing.assert_array_equal(src, ref["src"], err_msg=f"{name}: sources")
    for loc in range(E // R):
        n = int(ref["count"][loc])
        if payload == "bf16":
            np.testing.assert_array_equal(recv_x[loc, :n], ref["x"][loc, :n].view(np.uint16), err_msg=f"{name}: rows")
            continue
        q, s = npr.fp8_quantize(ref["x"][loc, :n].astype(np.float32), round_scale=payload != "fp8")
        np.testing.assert_array_equal(recv_x[loc, :n], q.view(np.uint8), err_msg=f"{name}: fp8 values")
        if payload == "ue8m0":
            want = ((s.view(np.uint32) >> 23) & 0xFF).astype(np.uint8)
            np.testing.assert_array_equal(recv_scales[loc, :n], want, err_msg=f"{name}: ue8m0 scales")
        else:
            np.testing.assert_array_equal(recv_scales[loc, :n].view(np.float32), s, err_msg=f"{name}: scales")


def run_config(lib, rpn, payload, results):
    topo = topology.make_topology(R, rpn, environ={})
    size = direct.buffer_bytes(lib, M, K, E, H, "bf16", R)
    assert size > 0
    buf = nvshmem.symmetric_buffer(size)
    try:
        peers = direct.Peers(buf, topo.peer_paths(ME))
        for rnd in range(3):
            xs, idxs, ws = inputs(1000 * rnd + len(payload))
            name = f"{topo.describe()} {payload} round {rnd}"
            got = direct.dispatch(lib, peers, xs[ME], idxs[ME], M, E, payload)
            check_dispatch(got, npr.ll_dispatch(xs, idxs, E, M)[ME], payload, name)
            out = None
            if payload == "bf16":  # the experts return their input rows
                y = got[0].view(ml_dtypes.bfloat16)
                out = direct.combine(lib, peers, y, got[3], idxs[ME], ws[ME], M, E)
                want = xs[ME].astype(np.float64) * np.where(idxs[ME] >= 0, ws[ME], 0).sum(1)[:, None]
                diff = calc_diff(out.view(ml_dtypes.bfloat16).astype(np.float32), want)
                assert diff < 1e-5, f"{name}: combine calc_diff {diff}"
            key = (payload, rnd)
            if rpn == R:
                results[key] = (got, out)
            elif key in results:
                flat_got, flat_out = results[key]
                for a, b, what in zip(got[2:], flat_got[2:], ("count", "src")):
                    np.testing.assert_array_equal(a, b, err_msg=f"{name}: {what} differs from the flat run")
                for loc, n in enumerate(got[2]):  # rows past the count are unspecified
                    for a, b, what in zip(got[:2], flat_got[:2], ("recv_x", "scales")):
                        np.testing.assert_array_equal(a[loc, :n], b[loc, :n],
                                                      err_msg=f"{name}: {what} differs from the flat run")
                if out is not None:
                    np.testing.assert_array_equal(out, flat_out, err_msg=f"{name}: combine differs from the flat run")
    finally:
        buf.free()


nvshmem.initialize()
lib = direct.library()
results = {}
for rpn in CONFIGS:
    for payload in ("bf16", "fp8", "fp8_pow2", "ue8m0"):
        checks(f"ll_put_direct_{R // rpn}x{rpn}_{payload}")(lambda rpn=rpn, payload=payload: run_config(lib, rpn, payload, results))
nvshmem.finalize()
sys.exit(checks.summary(ME, R))
