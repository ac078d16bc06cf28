"""ctypes access to the put kernels' direct entry points (cuda/ll_put_direct.cu)
in the jax_ep._nvshmem module: one low-latency dispatch or combine over a
symmetric buffer, inputs and outputs as numpy arrays, outside XLA."""

import ctypes

import numpy as np

PAYLOADS = {"bf16": 0, "fp8": 1, "fp8_pow2": 2, "ue8m0": 3}

_u64p = ctypes.POINTER(ctypes.c_uint64)
_u8p = ctypes.POINTER(ctypes.c_uint8)
_ip = ctypes.POINTER(ctypes.c_int)


def library():
    """The loaded jax_ep._nvshmem module, as a ctypes library."""
    from jax_ep import nvshmem

    lib = ctypes.CDLL(nvshmem._module().__file__)
    lib.jax_ep_ll_put_buffer_bytes.restype = ctypes.c_uint64
    lib.jax_ep_ll_put_buffer_bytes.argtypes = [_ip, ctypes.c_int]
    lib.jax_ep_ll_put_dispatch.restype = ctypes.c_int
    lib.jax_ep_ll_put_combine.restype = ctypes.c_int
    return lib


def _shape(t, m, k, e, h, payload):
    return (ctypes.c_int * 6)(t, m, k, e, h, PAYLOADS[payload])


def _ptr(a):
    return a.ctypes.data_as(ctypes.c_void_p)


def buffer_bytes(lib, m, k, e, h, payload, num_ranks) -> int:
    """Bytes of the symmetric buffer for these shapes (0: not supported)."""
    return int(lib.jax_ep_ll_put_buffer_bytes(_shape(m, m, k, e, h, payload), num_ranks))


class Peers:
    """One rank's view of a symmetric buffer: its address, each peer's mapped
    address (0 for put peers) and the path table (jax_ep.topology)."""

    def __init__(self, buf, paths):
        self.local = ctypes.c_void_p(buf.local_pointer)
        self.paths = np.ascontiguousarray(paths, np.uint8)
        self.mapped = np.array([p if (path == 0 and p is not None) else 0
                                for p, path in zip(buf.peer_pointers, self.paths)], np.uint64)
        self.rank, self.num_ranks = buf.rank, buf.num_ranks

    def args(self):
        return (self.local, self.mapped.ctypes.data_as(_u64p), self.paths.ctypes.data_as(_u8p),
                self.rank, self.num_ranks)


def dispatch(lib, peers, x_bf16, topk_idx, m, e, payload, timeout_s=60.0, num_blocks=32):
    """x [T, H] bfloat16, topk_idx [T, K] -> (recv_x, recv_scales, count, src [E/R, R*M, 3])."""
    t, h = x_bf16.shape
    k = topk_idx.shape[1]
    r = peers.num_ranks
    le = e // r
    fp8 = payload != "bf16"
    x = np.ascontiguousarray(x_bf16).view(np.uint16)
    idx = np.ascontiguousarray(topk_idx, np.int32)
    recv_x = np.zeros((le, r * m, h), np.uint8 if fp8 else np.uint16)
    scale_cols = h // 128 if payload == "ue8m0" else h // 128 * 4
    recv_scales = np.zeros((le, r * m, scale_cols if fp8 else 0), np.uint8)
    count = np.zeros(le, np.int32)
    src = [np.zeros((le, r * m), np.int32) for _ in range(3)]
    status = np.zeros(1, np.int32)
    err = lib.jax_ep_ll_put_dispatch(
        *peers.args(), _shape(t, m, k, e, h, payload), ctypes.c_double(timeout_s), num_blocks,
        _ptr(x), _ptr(idx), _ptr(recv_x), ctypes.c_uint64(recv_x.nbytes), _ptr(recv_scales),
        ctypes.c_uint64(recv_scales.nbytes), _ptr(count), *(_ptr(a) for a in src), _ptr(status))
    if err or status[0]:
        raise RuntimeError(f"put dispatch: CUDA error {err}, status {status[0]} (1 + the peer waited for)")
    return recv_x, recv_scales, count, np.stack(src, -1)


def combine(lib, peers, y_bf16, src, topk_idx, topk_weights, m, e, timeout_s=60.0, num_blocks=32):
    """y [E/R, R*M, H] bfloat16 with the dispatch's src -> out [T, H] (bfloat16 bits as uint16)."""
    t, k = topk_idx.shape
    h = y_bf16.shape[-1]
    y = np.ascontiguousarray(y_bf16).view(np.uint16)
    parts = [np.ascontiguousarray(src[..., i], np.int32) for i in range(3)]
    idx = np.ascontiguousarray(topk_idx, np.int32)
    w = np.ascontiguousarray(topk_weights, np.float32)
    out = np.zeros((t, h), np.uint16)
    status = np.zeros(1, np.int32)
    err = lib.jax_ep_ll_put_combine(
        *peers.args(), _shape(t, m, k, e, h, "bf16"), ctypes.c_double(timeout_s), num_blocks,
        _ptr(y), *(_ptr(p) for p in parts), _ptr(idx), _ptr(w), _ptr(out), _ptr(status))
    if err or status[0]:
        raise RuntimeError(f"put combine: CUDA error {err}, status {status[0]} (1 + the peer waited for)")
    return out
