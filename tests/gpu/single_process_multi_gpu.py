"""One process driving every local GPU (JAX's single-host default).

A ``jax_ep.Buffer`` created in such a process is a buffer group: one buffer
per GPU, peers mapped through CUDA peer access, each FFI call using the member
of the device it runs on. This script runs normal dispatch + combine (both
layouts) and low-latency dispatch + combine inside ``shard_map`` over all local
GPUs and checks them against the ``xla`` reference backend on the same inputs.

    JAX_EP_TEST_GPU=1 python tests/gpu/single_process_multi_gpu.py

Exits 0 after printing "skip" with fewer than two GPUs; exit 1 on a mismatch.
"""

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_ep

devices = jax.devices()
R = len(devices)
if R < 2 or devices[0].platform != "gpu":
    print(f"skip: needs at least two GPUs in one process (found {R} {devices[0].platform} device(s))")
    sys.exit(0)

mesh = jax.make_mesh((R,), ("ep",), devices=devices)
t, k, h = 256, 8, 1024
e = 8 * R
rng = np.random.default_rng(0)
idx = np.stack([rng.choice(e, k, replace=False) for _ in range(R * t)]).astype(np.int32)
idx[rng.random(idx.shape) < 0.05] = -1
x_np = rng.standard_normal((R * t, h)).astype(np.float32)
w_np = rng.random((R * t, k)).astype(np.float32)


def shard(a):
    return jax.device_put(jnp.asarray(a), NamedSharding(mesh, P("ep")))


X, I, W = shard(x_np.astype(jnp.bfloat16)), shard(idx), shard(w_np)
failures = []


def check_true(name, ok, why=""):
    print(f"{'PASS' if ok else 'FAIL'} {name}{'' if ok else ': ' + why}", flush=True)
    if not ok:
        failures.append(name)


def check(name, got, want, exact):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    ok = np.array_equal(got, want) if exact else np.allclose(got, want, rtol=2e-2, atol=2e-2)
    print(f"{'PASS' if ok else 'FAIL'} {name}", flush=True)
    if not ok:
        failures.append(name)


def ep_map(body):
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))


for layout in ("rank_major", "expert_major"):
    capacity = R * t if layout == "rank_major" else R * t * min(k, e // R)
    buf = jax_ep.Buffer(
        num_experts=e, axis_name="ep",
        num_nvl_bytes=jax_ep.intranode_buffer_bytes(t, h, R, k, e, capacity=capacity),
        normal=jax_ep.NormalOptions(backend="cuda", num_sms=8, layout=layout),
    )
    ref_opts = jax_ep.NormalOptions(layout=layout)

    def cuda_body(x, i, w):
        out = buf.dispatch(x, i, w)
        return out.recv_x, buf.combine(out.recv_x, out.handle)

    def ref_body(x, i, w):
        out = jax_ep.dispatch(x, i, w, num_experts=e, axis_name="ep", options=ref_opts)
        return out.recv_x, jax_ep.combine(out.recv_x, out.handle)

    got, want = ep_map(cuda_body)(X, I, W), ep_map(ref_body)(X, I, W)
    check(f"{layout} dispatch", got[0], want[0], exact=True)
    check(f"{layout} combine", got[1], want[1], exact=False)
    buf.destroy()

ll_opts = jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=t)
buf = jax_ep.Buffer(
    num_experts=e, axis_name="ep", num_ll_bytes=jax_ep.low_latency_buffer_bytes(t, h, R, k, e),
    low_latency=jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=t, backend="cuda", num_sms=8),
)


def ll_cuda(x, i, w):
    out = buf.low_latency_dispatch(x, i)
    return out.recv_x, out.recv_count, buf.low_latency_combine(out.recv_x, w, out.handle)


def ll_ref(x, i, w):
    out = jax_ep.low_latency_dispatch(x, i, num_experts=e, axis_name="ep", options=ll_opts)
    return out.recv_x, out.recv_count, jax_ep.low_latency_combine(out.recv_x, w, out.handle)


def ll_cuda_push(x, i, w):
    out = buf.low_latency_dispatch(x, i)
    spec = out.handle.spec
    pushed = dataclasses.replace(out.handle, spec=dataclasses.replace(
        spec, options=dataclasses.replace(spec.options, combine_zero_copy=False)))
    return buf.low_latency_combine(out.recv_x, w, pushed)


# The one-call combine reads the rows in place on the GPU that computed them:
# each device's XLA memory is made readable by the others.
check_true("low-latency zero copy across the GPUs", buf.low_latency_zero_copy, buf.low_latency_zero_copy_note)
want = ep_map(ll_ref)(X, I, W)
step = ep_map(ll_cuda)
for _ in range(3):  # back to back: alternating halves, each call waiting for its readers
    got = step(X, I, W)
    check("low-latency combine (zero copy), repeated", got[2], want[2], exact=False)
check("low-latency combine (pushed)", ep_map(ll_cuda_push)(X, I, W), want[2], exact=False)
check("low-latency counts", got[1], want[1], exact=True)
# Rows past each expert's count are padding (unspecified on the CUDA backend).
counts = np.asarray(got[1]).reshape(-1)
gx, wx = np.asarray(got[0], np.float32), np.asarray(want[0], np.float32)
gx = gx.reshape(len(counts), -1, h)
wx = wx.reshape(len(counts), -1, h)
check("low-latency dispatch", np.concatenate([gx[j, :c] for j, c in enumerate(counts)]),
      np.concatenate([wx[j, :c] for j, c in enumerate(counts)]), exact=True)
check("low-latency combine", got[2], want[2], exact=False)
buf.destroy()

print(f"{R} GPUs in one process: {'all passed' if not failures else 'FAILED: ' + ', '.join(failures)}")
sys.exit(1 if failures else 0)
