"""The device copy roofline the benchmarks compare against (measured in the same run)."""

import numpy as np


def copy_roofline_gbps(nbytes=1 << 30, reps=10):
    """Payload GB/s of a device-to-device copy (bytes copied / time), CUDA
    events; also the median seconds of one copy."""
    import cupy as cp

    a = cp.empty(nbytes, dtype=cp.uint8)
    b = cp.empty_like(a)
    a.fill(1)
    start, end = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(reps + 2):
        start.record()
        cp.cuda.runtime.memcpyAsync(b.data.ptr, a.data.ptr, nbytes, cp.cuda.runtime.memcpyDeviceToDevice, 0)
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) * 1e-3)
    t = float(np.median(times[2:]))
    del a, b
    cp.get_default_memory_pool().free_all_blocks()
    return nbytes / t / 1e9, t
