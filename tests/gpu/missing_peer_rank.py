"""A rank script for check_missing_peer.py: every rank creates the buffer, but
the last rank never dispatches. The others must stop with a timeout error that
names the missing rank (a jax_ep.CommunicationError) instead of hanging."""

import os
import sys
import time

from jax_ep.launch import initialize_distributed

info = initialize_distributed()
import jax  # noqa: E402
import numpy as np  # noqa: E402

import jax_ep  # noqa: E402

R, ME = info.num_ranks, info.rank
t, k, e, h = 32, 2, 2 * R, 128
buf = jax_ep.Buffer(num_experts=e, axis_name=None, timeout_s=float(os.environ.get("JAX_EP_TEST_TIMEOUT_S", "5")),
                    num_nvl_bytes=jax_ep.intranode_buffer_bytes(t, h, R, k, e, itemsize=4),
                    normal=jax_ep.NormalOptions(backend="cuda", num_sms=4))
if ME == R - 1:
    print("rank that never arrives: sleeping", flush=True)
    time.sleep(float(os.environ.get("JAX_EP_TEST_SLEEP_S", "30")))
    sys.exit(0)
rng = np.random.default_rng(ME)
x = rng.standard_normal((t, h)).astype(np.float32)
idx = rng.integers(0, e, (t, k)).astype(np.int32)
w = rng.random((t, k)).astype(np.float32)
out = jax.jit(lambda x, i, w: buf.dispatch(x, i, w).recv_x)(x, idx, w)
out.block_until_ready()  # the kernels return (no trap) once the wait failed
buf.check()  # raises jax_ep.CommunicationError with the rank's record
print("UNEXPECTED: dispatch returned without the missing rank", flush=True)
sys.exit(0)
