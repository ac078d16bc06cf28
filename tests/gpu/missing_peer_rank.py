"""A rank script for check_missing_peer.py: every rank creates the buffer, but
the last rank never dispatches. The others must stop with a timeout error that
names the missing rank (a jax_ep.CommunicationError) instead of hanging."""

import os
import sys

from jax_ep.launch import initialize_distributed

info = initialize_distributed()
import jax  # noqa: E402

from absent_rank import buffer_and_inputs  # noqa: E402

buf, x, idx, w = buffer_and_inputs(info, float(os.environ.get("JAX_EP_TEST_TIMEOUT_S", "5")), sleep_s="30")
out = jax.jit(lambda x, i, w: buf.dispatch(x, i, w).recv_x)(x, idx, w)
out.block_until_ready()  # the kernels return (no trap) once the wait failed
buf.check()  # raises jax_ep.CommunicationError with the rank's record
print("UNEXPECTED: dispatch returned without the missing rank", flush=True)
sys.exit(0)
