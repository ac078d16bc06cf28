"""A rank script for check_misordered_calls.py: every rank issues a low-latency
dispatch send, then a second send before receiving the first. The second
send must stop with jax_ep's message on call order instead of corrupting the
peers' buffers or hanging."""

import os
import sys

from jax_ep.launch import initialize_distributed

info = initialize_distributed()
import jax  # noqa: E402
import numpy as np  # noqa: E402

import jax_ep  # noqa: E402

R, ME = info.num_ranks, info.rank
t = m = 16
k, e, h = 2, 2 * R, 512
buf = jax_ep.Buffer(num_experts=e, axis_name=None, timeout_s=float(os.environ.get("JAX_EP_TEST_TIMEOUT_S", "5")),
                    num_nvl_bytes=1 << 22, num_ll_bytes=jax_ep.low_latency_buffer_bytes(m, h, R, k, e),
                    low_latency=jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=m, backend="cuda", num_sms=4))
rng = np.random.default_rng(ME)
x = rng.standard_normal((t, h)).astype(jax.numpy.bfloat16)
idx = rng.integers(0, e, (t, k)).astype(np.int32)


@jax.jit
def twice(x, i):
    first = buf.low_latency_dispatch_send(x, i)
    second = buf.low_latency_dispatch_send(x, i, after=first.token)  # no receive in between
    return jax_ep.low_latency_dispatch_recv(second).recv_count


twice(x, idx).block_until_ready()  # the kernels return (no trap) after the order check failed
buf.check()  # raises jax_ep.CommunicationError naming the call
print("UNEXPECTED: a second send ran without the first one's receive", flush=True)
sys.exit(0)
