"""The low-latency buffer of the put path: ranks in several (virtual) nodes.

An NVSHMEM symmetric allocation registered in ``jax_ep._nvshmem`` with each
peer's path from ``jax_ep.topology``: peers of this rank's node through their
``nvshmem_ptr`` (stores), the others through NVSHMEM puts. The kernels and
FFI handlers are cuda/ll_put*.cu and xla_ffi/ll_put.cc; ``jax_ep.cuda_put_ops``
calls them. A ``Buffer(..., low_latency=LowLatencyOptions(backend="cuda"),
ll_transport="nvshmem")`` whose topology has several nodes creates one.
"""

from __future__ import annotations

import dataclasses

from jax_ep import faults
from jax_ep import topology as _topology


@dataclasses.dataclass(frozen=True)
class PutRuntime:
    """One rank's put-path buffer: ``buffer_id`` names it in the FFI calls
    (ids of ``jax_ep._nvshmem``, disjoint from ``jax_ep._C``'s)."""

    buffer_id: int
    rank: int
    num_ranks: int
    num_bytes: int
    topology: _topology.Topology
    transports: tuple = ()  # per peer: "local", "p2p" (a pointer in this node) or "put"
    put_path: bool = True   # how jax_ep.cuda_ops tells this buffer from the pointer path's
    timeout_s: float = 100.0

    @staticmethod
    def create(num_bytes: int, topology: _topology.Topology, *, timeout_s: float = 100.0) -> "PutRuntime":
        """Allocate and register the buffer (collective: every rank, same order)."""
        import jax

        from jax_ep import nvshmem, runtime

        if not nvshmem.available():
            raise RuntimeError(f"the low-latency put path needs jax_ep._nvshmem: {nvshmem.unavailable_reason()}")
        nvshmem.initialize()
        sym = nvshmem.symmetric_buffer(num_bytes)
        try:
            if sym.num_ranks != topology.num_ranks:
                raise ValueError(f"NVSHMEM has {sym.num_ranks} PEs but the topology {topology.num_ranks} ranks")
            paths = topology.peer_paths(sym.rank)
            mapped, names = plan_peers(sym.rank, paths, sym.peer_pointers, sym.transports)
            device = jax.local_devices()[0].local_hardware_id or 0
            buffer_id = nvshmem._module().create_put_buffer(
                device, sym.rank, sym.num_ranks, sym.local_pointer, int(num_bytes), mapped,
                [int(p) for p in paths], float(timeout_s))
        except BaseException:
            sym.free()
            raise
        rt = PutRuntime(buffer_id, sym.rank, sym.num_ranks, int(num_bytes), topology, names, timeout_s=timeout_s)
        with runtime._lock:
            runtime._live[buffer_id] = rt
            runtime._symmetric[buffer_id] = sym
        return rt

    def failure(self) -> faults.CommunicationError | None:
        """What failed on this rank (a receive that timed out, or the abort a
        peer raised), as ``CommunicationError``; None while nothing did."""
        from jax_ep import nvshmem

        return error_from_put_record(dict(nvshmem._module().put_buffer_failure(self.buffer_id)))

    def share_xla_memory(self, **_) -> bool:
        """No zero-copy combine on the put path (it always pushes): False."""
        return False

    xla_memory_shared = False
    xla_memory_note = "the put path (ranks in several nodes) always pushes the combine's rows"

    def destroy(self, timeout_s: float = 60.0) -> None:  # noqa: ARG002 - the signature of IntranodeRuntime.destroy
        """Release the buffer (collective: the symmetric free is)."""
        from jax_ep import nvshmem, runtime

        with runtime._lock:
            if runtime._live.pop(self.buffer_id, None) is None:
                return
            sym = runtime._symmetric.pop(self.buffer_id, None)
        nvshmem._module().destroy_put_buffer(self.buffer_id)
        if sym is not None:
            sym.free()


def error_from_put_record(record: dict) -> faults.CommunicationError | None:
    """The ``CommunicationError`` of a put buffer's failure record
    (``jax_ep._nvshmem.put_buffer_failure``: code, rank, peer, op, call,
    peer_call, seconds, and a mismatch's signatures ``mine`` / ``theirs``),
    or None when its code is 0. The record is the
    pointer path's, and so is the message (``jax_ep._C.failure_message``)."""
    code = int(record.get("code", 0))
    if code == 0:
        return None
    record = dict(record)
    if code > 0:
        from jax_ep import _C

        record["message"] = _C.failure_message(
            code, int(record.get("rank", -1)), int(record.get("peer", -1)), int(record.get("op", -1)),
            int(record.get("call", 0)), int(record.get("peer_call", 0)), list(record.get("mine", ())),
            list(record.get("theirs", ())),
            seconds=float(record.get("seconds", 0.0)))
    else:  # -1: a kernel is still writing it
        record["message"] = "jax_ep: a kernel is recording a failure (put path)"
    return faults.error_from_record(record)


def plan_peers(rank: int, paths, peer_pointers, transports) -> tuple:
    """(mapped addresses per peer, 0 for put peers; transport names per peer).

    A peer on the pointer path (this rank's node) must be reachable through
    ``nvshmem_ptr`` (``peer_pointers[r]`` not None): a clear error otherwise."""
    mapped, names = [], []
    for r, path in enumerate(paths):
        if int(path) == _topology.PATH_POINTER:
            if peer_pointers[r] is None:
                raise RuntimeError(
                    f"rank {r} is in rank {rank}'s node but NVSHMEM reaches it only through "
                    f"{transports[r]!r} (no nvshmem_ptr): the ranks of one node must share NVLink P2P; "
                    f"set ranks_per_node to the ranks that do")
            mapped.append(int(peer_pointers[r]))
            names.append("local" if r == rank else "p2p")
        else:
            mapped.append(0)
            names.append("put")
    return mapped, tuple(names)


def buffer_bytes(max_tokens: int, hidden: int, num_ranks: int, num_topk: int, num_experts: int,
                 payloads=(0,)) -> int:
    """Bytes of the put path's symmetric buffer for these shapes (the largest
    over ``payloads``: 0 BF16, 1-3 FP8); a ValueError for shapes the put
    kernels refuse."""
    from jax_ep import nvshmem

    if not nvshmem.available():
        raise RuntimeError(f"sizing the put path needs jax_ep._nvshmem: {nvshmem.unavailable_reason()}")
    sizes = [int(nvshmem._module().put_buffer_bytes(max_tokens, max_tokens, num_topk, num_experts, hidden, p,
                                                    num_ranks)) for p in payloads]
    if min(sizes) == 0:
        raise ValueError(
            f"the low-latency put path does not take these shapes (M={max_tokens}, H={hidden}, R={num_ranks}, "
            f"K={num_topk}, E={num_experts}): it needs E a multiple of R, E <= 2048, K <= 16 and H % 128 == 0")
    return max(sizes)
