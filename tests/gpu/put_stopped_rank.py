"""A rank script for check_put_stopped_rank.py: ranks in virtual nodes of
JAX_EP_TEST_RANKS_PER_NODE (NVSHMEM puts between nodes) in the mode
JAX_EP_TEST_MODE ("low_latency": the low-latency put path; "internode": the
internode normal mode), and the last rank never dispatches. Rank 0 waits
`JAX_EP_TEST_TIMEOUT_S` (10 s) for it, the other ranks 60 s: rank 0's
timeout raises the buffer's abort word in every rank (a store in its node, a
signal put elsewhere), so all of them must leave within a second of it, each
with a jax_ep.CommunicationError and a status array saying why."""

import os
import time

# The NVSHMEM symmetric heap (GPU memory outside XLA's pool): these shapes need a few MiB.
os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", "268435456")

from jax_ep.launch import initialize_distributed  # noqa: E402

info = initialize_distributed()
import jax  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

import jax_ep  # noqa: E402
from absent_rank import report_exit  # noqa: E402

R, ME = info.num_ranks, info.rank
RPN = int(os.environ.get("JAX_EP_TEST_RANKS_PER_NODE", "1"))
MODE = os.environ.get("JAX_EP_TEST_MODE", "low_latency")
assert MODE in ("low_latency", "internode"), MODE
t, k, e, h = 32, 2, 2 * R, 512
timeout = float(os.environ.get("JAX_EP_TEST_TIMEOUT_S", "10")) if ME == 0 else 60.0
if MODE == "internode":
    buf = jax_ep.Buffer(
        num_experts=e, axis_name=None, timeout_s=timeout, ranks_per_node=RPN,
        num_nvl_bytes=jax_ep.internode_buffer_bytes(t, h, R, k, e, ranks_per_node=RPN),
        normal=jax_ep.NormalOptions(backend="cuda", num_sms=4))
else:
    buf = jax_ep.Buffer(
        num_experts=e, axis_name=None, timeout_s=timeout, ranks_per_node=RPN, ll_transport="nvshmem",
        num_ll_bytes=jax_ep.low_latency_buffer_bytes(t, h, R, k, e, ranks_per_node=RPN),
        low_latency=jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=t, backend="cuda", num_sms=8))
    print(f"jax_ep test: rank {ME} transports {buf.low_latency_transports}", flush=True)
if ME == R - 1:
    print("rank that never arrives: sleeping", flush=True)
    time.sleep(float(os.environ.get("JAX_EP_TEST_SLEEP_S", "40")))
    os._exit(0)
rng = np.random.default_rng(ME)
x = rng.standard_normal((t, h)).astype(ml_dtypes.bfloat16)
idx = np.stack([rng.choice(e, k, replace=False) for _ in range(t)]).astype(np.int32)
w = rng.random((t, k)).astype(np.float32)


def step(x, i, w):
    if MODE == "internode":
        o = buf.dispatch(x, i, w)
        return buf.combine(o.recv_x, o.handle)
    o = buf.low_latency_dispatch(x, i)
    return buf.low_latency_combine(o.recv_x, w, o.handle)


f = jax.jit(step)
f.lower(x, idx, w).compile()  # compile before the call: rank 0's 10 s cover only the wait
out = f(x, idx, w)
out.block_until_ready()
if MODE == "internode":
    status = np.asarray(jax.jit(lambda o: jax_ep.status(buf, o))(out)).tolist()
    report_exit(buf, ME, status, lambda: buf.dispatch(x, idx, w), "the internode dispatch")
else:
    status = np.asarray(jax.jit(lambda o: jax_ep.status(buf, o, mode="low_latency"))(out)).tolist()
    report_exit(buf, ME, status, lambda: buf.low_latency_dispatch(x, idx), "the low-latency dispatch")
