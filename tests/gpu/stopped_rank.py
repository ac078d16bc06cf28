"""A rank script for check_stopped_rank.py: the last rank never dispatches.
Rank 0 waits `JAX_EP_TEST_TIMEOUT_S` (10 s) for it, the other ranks 60 s:
rank 0's timeout raises the abort in every rank, so all of them must leave
within a second of it (not after their own 60 s), each with a
jax_ep.CommunicationError and a status array saying why."""

import os

from jax_ep.launch import initialize_distributed

info = initialize_distributed()
import jax  # noqa: E402
import numpy as np  # noqa: E402

import jax_ep  # noqa: E402
from absent_rank import buffer_and_inputs, report_exit  # noqa: E402

ME = info.rank
timeout = float(os.environ.get("JAX_EP_TEST_TIMEOUT_S", "10")) if ME == 0 else 60.0
buf, x, idx, w = buffer_and_inputs(info, timeout, sleep_s="40")
f = jax.jit(lambda x, i, w: buf.dispatch(x, i, w).recv_x)
f.lower(x, idx, w).compile()  # compile before the call: rank 0's 10 s cover only the wait
out = f(x, idx, w)
out.block_until_ready()
status = np.asarray(jax_ep.status(buf, out)).tolist()
report_exit(buf, ME, status, lambda: buf.dispatch(x, idx, w), "dispatch")
