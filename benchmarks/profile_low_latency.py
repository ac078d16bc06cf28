"""One rank's low-latency dispatch + combine at DeepEP's LL shape, for a kernel
profiler (no peers to wait for):

    ncu --metrics gpu__time_duration.sum -k regex:"send|recv|wait" \\
        python -m jax_ep.launch -n 1 benchmarks/profile_low_latency.py
"""

from jax_ep.launch import initialize_distributed

initialize_distributed()
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jax_ep  # noqa: E402

T = M = 128
H, K, E = 7168, 8, 288
fp8 = jax_ep.FP8Options()
buf = jax_ep.Buffer(num_experts=E, axis_name=None, num_nvl_bytes=1 << 22,
                    num_ll_bytes=jax_ep.low_latency_buffer_bytes(M, H, 1, K, E, fp8),
                    low_latency=jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=M, fp8=fp8, backend="cuda",
                                                         num_sms=8))
rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((T, H)), jnp.bfloat16)
idx = jnp.asarray(np.stack([rng.choice(E, K, replace=False) for _ in range(T)]).astype(np.int32))
w = jnp.asarray(rng.random((T, K)).astype(np.float32))


@jax.jit
def step(x, i, w):
    o = buf.low_latency_dispatch(x, i)
    y = jax_ep.per_token_cast_back(*o.recv_x, fp8, out_dtype=jnp.bfloat16)
    return buf.low_latency_combine(y, w, o.handle)


for _ in range(3):
    step(x, idx, w).block_until_ready()
print("done")
