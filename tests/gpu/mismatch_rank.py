"""A rank script for check_mismatch.py: the last rank makes a different call
than the others (JAX_EP_TEST_DIFFER: "T" more tokens in a normal dispatch,
"H" a wider hidden size, "ll_sms" a low-latency dispatch with another SM
budget; on the low-latency put path, ranks in virtual nodes of
JAX_EP_TEST_RANKS_PER_NODE: "put_sms" another SM budget, "put_fp8" an FP8
dispatch where the others send BF16, "put_combine_fp8" FP8 combine rows
where the others send BF16). The call's signature differs, so every rank
must stop at once (no timeout: 60 s) with a jax_ep.CommunicationError naming
the ranks and the field. The same compiled program run again on the dead
buffer must not go through: its handlers refuse the buffer ("failed earlier"),
or (a replayed CUDA graph runs no handler) its status is not ok."""

import dataclasses
import os
import sys
import time

# The put path's symmetric heap (GPU memory outside XLA's pool): these shapes need a few MiB.
os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", "268435456")

from jax_ep.launch import initialize_distributed

info = initialize_distributed()
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jax_ep  # noqa: E402

R, ME = info.num_ranks, info.rank
DIFFER = os.environ.get("JAX_EP_TEST_DIFFER", "T")
odd = ME == R - 1
t, k, e, h, m = 32, 2, 2 * R, 512, 32
t_here = t + 8 if odd and DIFFER == "T" else t
h_here = 2 * h if odd and DIFFER == "H" else h
put = DIFFER.startswith("put_")
ll = DIFFER == "ll_sms" or put
rpn = int(os.environ.get("JAX_EP_TEST_RANKS_PER_NODE", "1")) if put else None
buf = jax_ep.Buffer(num_experts=e, axis_name=None, timeout_s=60.0, ranks_per_node=rpn,
                    ll_transport="nvshmem" if put else "ipc",
                    num_nvl_bytes=None if put else jax_ep.intranode_buffer_bytes(t + 8, 2 * h, R, k, e, itemsize=4),
                    num_ll_bytes=jax_ep.low_latency_buffer_bytes(m, h, R, k, e, ranks_per_node=rpn) if ll else None,
                    normal=jax_ep.NormalOptions(backend="xla" if put else "cuda", num_sms=4),
                    low_latency=jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=m,
                                                         backend="cuda" if ll else "xla", num_sms=4))
rng = np.random.default_rng(ME)
x = rng.standard_normal((t_here, h_here)).astype(np.float32)
idx = rng.integers(0, e, (t_here, k)).astype(np.int32)
w = rng.random((t_here, k)).astype(np.float32)
t0 = time.time()
mode = "low_latency" if ll else "normal"
if DIFFER == "put_combine_fp8":  # the same dispatch, then a combine whose rows differ
    options = dataclasses.replace(buf.low_latency, combine_fp8=odd)

    def step(x, i, w):
        o = buf.low_latency_dispatch(x, i, options=options)
        y = buf.low_latency_combine(o.recv_x, w, o.handle)
        return y, jax_ep.status(buf, y, mode=mode)

    args = (x[:, :h].astype(jnp.bfloat16), idx, w)
elif ll:
    change = dict(fp8=jax_ep.FP8Options()) if DIFFER == "put_fp8" else dict(num_sms=8)
    options = dataclasses.replace(buf.low_latency, **change) if odd else None  # a per-call override

    def step(x, i):
        count = buf.low_latency_dispatch(x, i, options=options).recv_count
        return count, jax_ep.status(buf, count, mode=mode)

    args = (x[:, :h].astype(jnp.bfloat16), idx)
else:
    def step(x, i, w):
        y = buf.dispatch(x, i, w).recv_x
        return y, jax_ep.status(buf, y, mode=mode)

    args = (x, idx, w)
program = jax.jit(step)
out, status = program(*args)
out.block_until_ready()
status = np.asarray(status).tolist()
print(f"jax_ep test: rank {ME} left after {time.time() - t0:.2f} s status {status}", flush=True)
try:
    buf.check()
except jax_ep.CommunicationError as err:
    print(f"jax_ep test: rank {ME} raised CommunicationError kind={err.kind}: {err}", flush=True)
    try:  # the same compiled program again, on the dead buffer
        again = np.asarray(program(*args)[1]).tolist()
        verdict = "not ok" if again[0] != 0 else "UNEXPECTED ok"
        print(f"jax_ep test: rank {ME} ran the program again: status {again} ({verdict})", flush=True)
    except Exception as again_err:  # noqa: BLE001 - XLA raises its own type
        refused = "failed earlier" in str(again_err)
        print(f"jax_ep test: rank {ME} ran the program again: "
              f"{'refused' if refused else 'UNEXPECTED error'}: {str(again_err)[:300]}", flush=True)
    time.sleep(3)  # the launcher stops every rank once one exits non-zero: let the others print first
    sys.exit(1)
print("UNEXPECTED: the different calls went through", flush=True)
sys.exit(0)
