"""Shared by the rank scripts whose last rank never makes the call
(missing_peer_rank.py, stopped_rank.py, put_stopped_rank.py): the buffer,
the inputs, the absent rank's sleep, and how a live rank reports its exit."""

import os
import sys
import time


def buffer_and_inputs(info, timeout_s: float, sleep_s: str):
    """A normal-mode CUDA Buffer over 2R experts waiting `timeout_s` for its
    peers, and this rank's dispatch inputs: x float32 [32, 128], topk_idx
    int32 [32, 2], topk_weights float32 [32, 2]. The last rank returns
    nothing: it sleeps JAX_EP_TEST_SLEEP_S (default `sleep_s`) seconds with
    its buffer created and exits 0, never making the call.

    Call after jax_ep.launch.initialize_distributed (it imports jax_ep)."""
    import numpy as np

    import jax_ep

    R, ME = info.num_ranks, info.rank
    t, k, e, h = 32, 2, 2 * R, 128
    buf = jax_ep.Buffer(num_experts=e, axis_name=None, timeout_s=timeout_s,
                        num_nvl_bytes=jax_ep.intranode_buffer_bytes(t, h, R, k, e, itemsize=4),
                        normal=jax_ep.NormalOptions(backend="cuda", num_sms=4))
    if ME == R - 1:
        print("rank that never arrives: sleeping", flush=True)
        time.sleep(float(os.environ.get("JAX_EP_TEST_SLEEP_S", sleep_s)))
        sys.exit(0)
    rng = np.random.default_rng(ME)
    x = rng.standard_normal((t, h)).astype(np.float32)
    idx = rng.integers(0, e, (t, k)).astype(np.int32)
    w = rng.random((t, k)).astype(np.float32)
    return buf, x, idx, w


def report_exit(buf, me: int, status, use_again, what: str):
    """What check_stopped_rank.check_bounded_exit reads: when this rank left
    and its `status` (the list of jax_ep.status), the CommunicationError that
    `buf.check()` raises, and that `use_again()` (a second call on the dead
    buffer) is refused. Exits 1 without teardown (a rank is missing); exits 0
    with an UNEXPECTED line when nothing failed."""
    import jax_ep

    print(f"jax_ep test: rank {me} left at {time.time():.3f} status {status}", flush=True)
    try:
        buf.check()
    except jax_ep.CommunicationError as err:
        print(f"jax_ep test: rank {me} raised CommunicationError kind={err.kind} peer={err.peer}: {err}", flush=True)
        try:
            use_again()
        except jax_ep.CommunicationError:
            print(f"jax_ep test: rank {me} refuses the dead buffer", flush=True)
        time.sleep(3)  # the launcher stops every rank once one exits non-zero: let the others print first
        os._exit(1)  # no collective teardown with a rank missing
    print(f"UNEXPECTED: {what} returned without the missing rank", flush=True)
    os._exit(0)
