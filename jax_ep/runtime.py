"""The CUDA backend's communication buffers, on the Python side.

``IntranodeRuntime.create`` allocates this process's registered buffer
(``jax_ep._C``), publishes its CUDA IPC handle on the ``jax.distributed``
key-value store, maps every peer's buffer from theirs, and waits until all
ranks have done so. One process per rank (one local GPU each); ranks may share
a GPU under CUDA MPS. The EP rank is the JAX process index, so the EP mesh axis
must list devices in process order (``jax.make_mesh`` over ``jax.devices()``
does).

One process driving several GPUs (JAX's single-host default) gets a buffer
*group* instead: one buffer per device, rank i on ``jax.devices()[i]``, peers
mapped through CUDA peer access; every handler finds the member of the device
it runs on. Mixing the two (several processes with several GPUs each) is not
supported.
"""

from __future__ import annotations

import array
import dataclasses
import itertools
import json
import os
import socket
import struct
import threading
import time
import uuid
import warnings

import jax
import numpy as np

from jax_ep import _extension, faults

_lock = threading.Lock()
_counter = itertools.count()  # buffers are created in the same order on every rank
_xla_counter = itertools.count()  # so are the XLA-memory exchanges
_xla_memory_notes: dict[int, str] = {}  # buffer id -> why XLA memory is not shared ("" when it is)
_live: dict[int, "IntranodeRuntime"] = {}
_symmetric: dict = {}  # buffer id -> the NVSHMEM allocation it lives in


@dataclasses.dataclass(frozen=True)
class IntranodeRuntime:
    """One rank's registered buffer: ``buffer_id`` is its handle for the FFI calls."""

    buffer_id: int
    rank: int
    num_ranks: int
    num_bytes: int
    staging_half_bytes: int
    transports: tuple = ()  # per peer: "ipc", "p2p" (NVSHMEM) or "peer" (a group in one process)
    group_devices: tuple = ()  # a group: each rank's CUDA device
    seq: int = -1  # one process per rank: the creation number every rank agrees on (names its teardown)

    @staticmethod
    def create(num_bytes: int, *, timeout_s: float = 100.0, bootstrap_timeout_s: float = 120.0) -> "IntranodeRuntime":
        if not _extension.available():
            raise RuntimeError(f"backend='cuda' needs jax_ep._C: {_extension.unavailable_reason()}")
        local = jax.local_devices()
        if len(local) > 1 and jax.process_count() == 1 and all(d.platform == "gpu" for d in local):
            return IntranodeRuntime.create_group([d.local_hardware_id for d in jax.devices()], num_bytes,
                                                 timeout_s=timeout_s)
        if not any(d.platform == "gpu" for d in local):
            raise RuntimeError(
                f"backend='cuda' needs an NVIDIA GPU, and this process sees none ({[d.platform for d in local]}); "
                "on a machine without one use backend='xla' (the default), which runs every op on CPU"
            )
        if len(local) != 1 or local[0].platform != "gpu":
            raise RuntimeError(
                "the CUDA backend runs one process per EP rank with one local GPU each "
                f"(this process sees {[d.platform for d in local]}); start the ranks with "
                "`python -m jax_ep.launch -n R script.py`, which also shares GPUs under MPS"
            )
        rank, num_ranks = jax.process_index(), jax.process_count()
        C = _extension._C
        seq = next(_counter)
        buffer_id = C.create_intranode_buffer(local[0].local_hardware_id or 0, rank, num_ranks, int(num_bytes), float(timeout_s))
        try:
            if num_ranks > 1:
                config = {"num_ranks": num_ranks, "num_bytes": int(num_bytes),
                          "staging_half_bytes": int(C.intranode_staging_half_bytes(buffer_id))}
                _exchange_handles(C, buffer_id, seq, rank, num_ranks, bootstrap_timeout_s, config)
            runtime = IntranodeRuntime(
                buffer_id, rank, num_ranks, int(num_bytes), C.intranode_staging_half_bytes(buffer_id),
                transports=tuple("local" if r == rank else "ipc" for r in range(num_ranks)), seq=seq,
            )
        except BaseException:
            C.destroy_intranode_buffer(buffer_id)
            raise
        with _lock:
            _live[buffer_id] = runtime
        return runtime

    @staticmethod
    def create_group(devices: list[int], num_bytes: int, *, timeout_s: float = 100.0) -> "IntranodeRuntime":
        """One process, several GPUs: a buffer per CUDA device in ``devices``
        (rank i on ``devices[i]``), peers mapped through peer access. The
        returned id names the whole group in FFI calls."""
        if not _extension.available():
            raise RuntimeError(f"backend='cuda' needs jax_ep._C: {_extension.unavailable_reason()}")
        C = _extension._C
        buffer_id = C.create_intranode_group([int(d) for d in devices], int(num_bytes), float(timeout_s))
        first = C.intranode_group_members(buffer_id)[0]
        runtime = IntranodeRuntime(buffer_id, 0, len(devices), int(num_bytes), C.intranode_staging_half_bytes(first),
                                   transports=("peer",) * len(devices), group_devices=tuple(int(d) for d in devices))
        with _lock:
            _live[buffer_id] = runtime
        return runtime

    @staticmethod
    def create_nvshmem(num_bytes: int, *, timeout_s: float = 100.0) -> "IntranodeRuntime":
        """The same kind of buffer over an NVSHMEM symmetric allocation: peers
        are reached through ``nvshmem_ptr`` (NVLink P2P). Collective."""
        from jax_ep import nvshmem

        if not _extension.available():
            raise RuntimeError(f"backend='cuda' needs jax_ep._C: {_extension.unavailable_reason()}")
        if not nvshmem.available():
            raise RuntimeError(f"transport='nvshmem' needs jax_ep._nvshmem: {nvshmem.unavailable_reason()}")
        nvshmem.initialize()
        sym = nvshmem.symmetric_buffer(num_bytes)
        unreachable = [pe for pe, p in enumerate(sym.peer_pointers) if p is None]
        if unreachable:
            sym.free()
            raise RuntimeError(
                f"PEs {unreachable} are reachable only through {sym.transports[unreachable[0]]!r}; the "
                f"low-latency kernels need NVLink P2P (nvshmem_ptr) to every peer today"
            )
        device = jax.local_devices()[0].local_hardware_id or 0
        buffer_id = _extension._C.create_external_buffer(
            device, sym.rank, sym.num_ranks, int(num_bytes), float(timeout_s), sym.local_pointer, list(sym.peer_pointers)
        )
        runtime = IntranodeRuntime(buffer_id, sym.rank, sym.num_ranks, int(num_bytes),
                                   _extension._C.intranode_staging_half_bytes(buffer_id), transports=sym.transports)
        with _lock:
            _live[buffer_id] = runtime
            _symmetric[buffer_id] = sym
        return runtime

    def share_xla_memory(self, *, timeout_s: float = 120.0) -> bool:
        """Map every rank's XLA device memory into this process, for the
        zero-copy low-latency combine (``LowLatencyOptions.combine_zero_copy``).
        Collective. Returns whether it is on: every rank could export its
        memory and map every peer's; otherwise combines push their rows and
        ``xla_memory_note`` says why.

        XLA's GPU pool is one CUDA virtual-memory allocation that can be
        exported as a POSIX file descriptor; the descriptors travel between
        the rank processes (one host) over Unix sockets whose names go through
        the ``jax.distributed`` key-value store. Where one process drives
        several GPUs (a buffer group), every device's pool is already in the
        process: the other devices are only granted access to it."""
        C = _extension._C
        if "peer" in self.transports:
            return self._share_group_xla_memory()
        probe = _xla_probe(jax.local_devices()[0])
        fd, size, note = -1, 0, ""
        try:
            fd, size = C.export_xla_memory(self.buffer_id, probe.unsafe_buffer_pointer())
        except RuntimeError as e:
            note = f"rank {self.rank}'s XLA memory cannot be exported: {e}"
        try:
            ok = fd >= 0
            if self.num_ranks > 1:
                ok, note = _exchange_xla_memory(C, self.buffer_id, next(_xla_counter), self.rank, self.num_ranks,
                                                fd, size, note, timeout_s)
            C.enable_xla_memory(self.buffer_id, ok)
        finally:
            if fd >= 0:
                os.close(fd)
        return self._xla_memory_outcome(note)

    def _share_group_xla_memory(self) -> bool:
        C = _extension._C
        by_id = {d.local_hardware_id: d for d in jax.local_devices()}
        missing = [d for d in self.group_devices if d not in by_id]
        if missing:
            _xla_memory_notes[self.buffer_id] = f"CUDA devices {missing} of the group are not JAX devices here"
            return False
        probes = [_xla_probe(by_id[d]) for d in self.group_devices]
        try:
            C.share_group_xla_memory(self.buffer_id, [p.unsafe_buffer_pointer() for p in probes])
            note = ""
        except (RuntimeError, ValueError) as e:
            note = f"the group's XLA memory cannot be shared between its devices: {e}"
        return self._xla_memory_outcome(note)

    def _xla_memory_outcome(self, note: str) -> bool:
        """Whether zero copy ended up on, remembering why not (``note``)."""
        on = bool(_extension._C.xla_memory_enabled(self.buffer_id))
        _xla_memory_notes[self.buffer_id] = "" if on else (note or "not mapped")
        return on

    def failure(self) -> "faults.CommunicationError | None":
        """What failed in a call on this buffer (read from the record its
        kernels leave in mapped host memory), or None. Once set the buffer's
        kernels return at once: it must be re-created."""
        return faults.error_from_record(_extension._C.buffer_failure(self.buffer_id))

    @property
    def xla_memory_shared(self) -> bool:
        """Whether zero-copy combines can read every peer's XLA memory."""
        return bool(_extension._C.xla_memory_enabled(self.buffer_id))

    @property
    def xla_memory_note(self) -> str:
        """Why peers' XLA memory is not mapped ("" when it is)."""
        return _xla_memory_notes.get(self.buffer_id, "share_xla_memory was not called")

    def destroy(self, timeout_s: float = 60.0) -> None:
        """Release the buffer; collective where the ranks are processes.

        Every rank waits until all ranks stopped using it, unmaps its peers'
        memory (after its own kernels finished), waits until all ranks did,
        and only then frees its own: no rank frees memory that a peer still
        has mapped or is writing. A rank that does not arrive within
        ``timeout_s`` is taken as gone (a warning says so).
        """
        with _lock:
            if _live.pop(self.buffer_id, None) is None:
                return
            sym = _symmetric.pop(self.buffer_id, None)
        C = _extension._C
        if self.seq >= 0 and self.num_ranks > 1:
            _teardown_barrier(self, "quiet", timeout_s)
            C.close_intranode_imports(self.buffer_id)
            _teardown_barrier(self, "closed", timeout_s)
        C.destroy_intranode_buffer(self.buffer_id)
        if sym is not None:
            sym.free()  # collective, like the allocation


def _teardown_barrier(runtime: "IntranodeRuntime", stage: str, timeout_s: float) -> None:
    try:
        _kv_client().wait_at_barrier(f"jax_ep/teardown/{runtime.seq}/{stage}", int(timeout_s * 1000))
    except Exception as e:  # noqa: BLE001 - the client raises a generic error on deadline
        warnings.warn(
            f"jax_ep: rank {runtime.rank} did not see every rank reach the '{stage}' step of destroying buffer "
            f"{runtime.seq} within {timeout_s:g} s ({e}); going on as if the missing ranks were gone",
            RuntimeWarning, stacklevel=3,
        )


def _kv_client():
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError(
            "several JAX processes but no jax.distributed client: call jax.distributed.initialize "
            "(jax_ep.launch.initialize_distributed does) before creating a CUDA jax_ep.Buffer"
        )
    return client


def _exchange_handles(C, buffer_id: int, seq: int, rank: int, num_ranks: int, timeout_s: float,
                      config: dict | None = None) -> None:
    client = _kv_client()
    prefix = f"jax_ep/intranode/{seq}"
    # Sizes first: peers compute addresses in this rank's buffer from their own.
    faults.exchange_and_check(client, f"{prefix}/config", f"registered buffers (#{seq})", rank, num_ranks,
                              config or {}, timeout_s)
    client.key_value_set_bytes(f"{prefix}/handle/{rank}", C.intranode_ipc_handle(buffer_id))
    timeout_ms = int(timeout_s * 1000)
    for peer in range(num_ranks):
        if peer == rank:
            continue
        try:
            handle = client.blocking_key_value_get_bytes(f"{prefix}/handle/{peer}", timeout_ms)
        except Exception as e:  # the client raises a generic error on deadline
            raise TimeoutError(
                f"jax_ep: rank {rank} waited {timeout_s:.0f} s for rank {peer}'s buffer handle; "
                f"every rank must create the same jax_ep.Buffer objects in the same order"
            ) from e
        C.open_intranode_peer_ipc(buffer_id, peer, handle)
    try:
        client.wait_at_barrier(f"{prefix}/mapped", timeout_ms)
    except Exception as e:
        raise TimeoutError(
            f"jax_ep: rank {rank} waited {timeout_s:.0f} s for all ranks to map buffer {seq}"
        ) from e


_agree_counter = itertools.count()  # Buffers are created in the same order on every rank


def agree_on_buffer(config: dict, *, timeout_s: float = 120.0) -> None:
    """Every rank process publishes ``config`` (a Buffer's arguments) and
    checks that every peer's is the same: ``faults.BufferMismatchError``
    naming both ranks and the first differing field otherwise. Nothing to do
    with one process."""
    num_ranks = jax.process_count()
    seq = next(_agree_counter)
    if num_ranks == 1:
        return
    faults.exchange_and_check(_kv_client(), f"jax_ep/buffer/{seq}", f"jax_ep.Buffer objects (#{seq})",
                              jax.process_index(), num_ranks, config, timeout_s)


def _xla_probe(device):
    """A small array in XLA's pool on `device` (its address finds the pool)."""
    probe = jax.device_put(np.zeros(256, np.uint8), device)
    probe.block_until_ready()
    return probe


def _exchange_xla_memory(C, buffer_id: int, seq: int, rank: int, num_ranks: int, fd: int, size: int, note: str,
                         timeout_s: float) -> tuple[bool, str]:
    """Send this rank's XLA-memory descriptor to every peer on this host and
    map theirs. Returns whether every rank mapped every peer (agreed by all)
    and, when not, why (this rank's reason, else the first failing rank's)."""
    client = _kv_client()
    prefix = f"jax_ep/xla_memory/{seq}"
    timeout_ms = int(timeout_s * 1000)
    host = socket.gethostname()

    def get(key):
        return json.loads(client.blocking_key_value_get_bytes(f"{prefix}/{key}", timeout_ms))

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    # The kernel attaches each sender's real pid to what it sends: a message
    # is taken from rank p only when it comes from the pid rank p published.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    name = f"jax_ep-{uuid.uuid4().hex}"
    sock.bind("\0" + name)  # abstract namespace: nothing to clean up
    received: dict[int, tuple[int, int]] = {}  # peer -> (fd, size)
    arrived: list[tuple[int, int, int, int]] = []  # (claimed peer, sender pid, fd, size), checked below
    stop = threading.Event()

    def receive():  # in a thread: peers' sends must never wait on this rank's
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                msg, fds, pid = _recv_fd_and_pid(sock)
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            if len(msg) != struct.calcsize("<iQ") or not fds:
                for extra in fds:
                    os.close(extra)
                continue
            peer, peer_size = struct.unpack("<iQ", msg)
            arrived.append((peer, pid, fds[0], peer_size))
            for extra in fds[1:]:
                os.close(extra)

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    try:
        client.key_value_set_bytes(f"{prefix}/addr/{rank}", json.dumps(
            {"name": name, "host": host, "ok": fd >= 0, "pid": os.getpid()}).encode())
        sent = []
        pids = {}
        for peer in range(num_ranks):
            if peer == rank:
                continue
            info = get(f"addr/{peer}")
            pids[peer] = info.get("pid")
            if fd < 0:
                continue
            if info["host"] != host:
                note = note or f"rank {peer} runs on another host ({info['host']})"
                continue
            try:
                # (socket.send_fds ignores its address argument)
                sock.sendmsg([struct.pack("<iQ", rank, size)],
                             [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))], 0, "\0" + info["name"])
                sent.append(peer)
            except OSError as e:
                note = note or f"sending rank {rank}'s XLA memory to rank {peer} failed: {e}"
        client.key_value_set_bytes(f"{prefix}/sent/{rank}", json.dumps(sent).encode())
        expected = [peer for peer in range(num_ranks) if peer != rank and rank in get(f"sent/{peer}")]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            while arrived:
                peer, pid, peer_fd, peer_size = arrived.pop(0)
                if peer in expected and peer not in received and pid == pids.get(peer):
                    received[peer] = (peer_fd, peer_size)
                    continue
                os.close(peer_fd)
                if peer not in received:
                    note = note or (
                        f"rank {rank} dropped an XLA-memory descriptor that claimed to come from rank {peer} but "
                        f"was sent by process {pid} (rank {peer} is process {pids.get(peer)})")
            if all(peer in received for peer in expected):
                break
            time.sleep(0.001)
    finally:
        stop.set()
        receiver.join()
        sock.close()
        for _, _, peer_fd, _ in arrived:
            os.close(peer_fd)
    mapped = 0
    for peer, (peer_fd, peer_size) in sorted(received.items()):
        try:
            if fd >= 0:
                C.open_peer_xla_memory(buffer_id, peer, peer_fd, peer_size)
                mapped += 1
        except RuntimeError as e:
            note = note or f"rank {rank} cannot map rank {peer}'s XLA memory: {e}"
        finally:
            os.close(peer_fd)
    ok = fd >= 0 and mapped == num_ranks - 1
    if not ok and not note:
        note = f"rank {rank} received the XLA memory of {mapped} of its {num_ranks - 1} peers"
    client.key_value_set_bytes(f"{prefix}/ok/{rank}", json.dumps([ok, note]).encode())
    results = [get(f"ok/{peer}") for peer in range(num_ranks)]
    failed = [peer_note for peer_ok, peer_note in results if not peer_ok]
    return not failed, note or (failed[0] if failed else "")


def _recv_fd_and_pid(sock):
    """One datagram: (bytes, received file descriptors, the sender's pid as
    the kernel reports it, None if it did not)."""
    fd_size = array.array("i").itemsize
    msg, ancdata, _, _ = sock.recvmsg(64, socket.CMSG_SPACE(4 * fd_size) + socket.CMSG_SPACE(12))
    fds, pid = [], None
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", data[: len(data) - len(data) % fd_size]))
        elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(data) >= 12:
            pid = struct.unpack("iII", data[:12])[0]
    return msg, fds, pid


def lookup(buffer_id: int | None) -> IntranodeRuntime:
    """The live runtime of a buffer id, or a clear error."""
    if buffer_id is None:
        raise ValueError(
            "backend='cuda' communicates through a jax_ep.Buffer: create one per rank process, outside jit, "
            "with the CUDA backend in the options of the mode you use, e.g. "
            "`buffer = jax_ep.Buffer(num_experts, normal=jax_ep.NormalOptions(backend='cuda'), "
            "num_nvl_bytes=jax_ep.intranode_buffer_bytes(T, H, R, K, E))` or "
            "`buffer = jax_ep.Buffer(num_experts, low_latency=jax_ep.LowLatencyOptions(M, backend='cuda'), "
            "num_ll_bytes=jax_ep.low_latency_buffer_bytes(M, H, R, K, E))`; then call its methods "
            "(buffer.dispatch, buffer.low_latency_dispatch, ...), pass options=buffer.normal / buffer.low_latency, "
            "or set MoEConfig(buffer_id=buffer.normal.buffer_id, ll_buffer_id=buffer.low_latency.buffer_id)"
        )
    with _lock:
        runtime = _live.get(buffer_id)
    if runtime is None:
        raise ValueError(f"jax_ep buffer {buffer_id} is not alive in this process (destroyed?)")
    return runtime


def intranode_buffer_bytes(
    num_tokens: int, hidden: int, num_ranks: int, num_topk: int, num_experts: int,
    capacity: int | None = None, itemsize: int = 2, combine_ring_rows: int = 64,
) -> int:
    """``num_nvl_bytes`` a Buffer needs for dispatch, cached dispatch and combine
    of these shapes (T tokens per rank, rows of ``hidden * itemsize`` bytes,
    ``capacity`` receive rows, default ``R*T``; ``combine_ring_rows`` as in
    ``NormalOptions``)."""
    if not _extension.available():
        raise RuntimeError(_extension.unavailable_reason())
    C = _extension._C
    capacity = capacity or num_ranks * num_tokens
    row = -(-hidden * itemsize // 16) * 16
    half = max(
        C.dispatch_staging_bytes(num_tokens, num_topk, num_ranks, num_experts, row),
        C.row_staging_bytes(capacity, row),
        C.row_staging_bytes(num_tokens, row),
        C.row_staging_bytes(num_ranks * combine_ring_rows, row),
    )
    ws = C.workspace_map  # cuda/workspace.cuh: signal block and workspace, then the two halves
    return int(ws["staging_offset"] + 2 * half + 2 * ws["staging_align"])


def low_latency_buffer_bytes(
    max_tokens: int, hidden: int, num_ranks: int, num_topk: int, num_experts: int, fp8=None,
    ranks_per_node: int | None = None,
) -> int:
    """``num_ll_bytes`` a Buffer needs for low-latency calls of these shapes
    (``max_tokens`` = ``num_max_dispatch_tokens_per_rank``; ``fp8`` an
    ``FP8Options`` or None). ``ranks_per_node`` smaller than ``num_ranks``
    (the Buffer's, when it spans several nodes) sizes the put path's buffer
    instead (``jax_ep.ll_put_runtime``; needs ``jax_ep._nvshmem``)."""
    from jax_ep.options import FP8Options

    if fp8 is not None and not isinstance(fp8, FP8Options):  # e.g. fp8=True
        raise TypeError(f"low_latency_buffer_bytes: fp8 must be None (BF16) or the FP8Options of the calls' "
                        f"LowLatencyOptions.fp8, got {fp8!r}")
    payload = 0 if fp8 is None else (3 if fp8.use_ue8m0 else (2 if fp8.round_scale else 1))
    if ranks_per_node is not None and ranks_per_node < num_ranks:
        from jax_ep import ll_put_runtime

        return ll_put_runtime.buffer_bytes(max_tokens, hidden, num_ranks, num_topk, num_experts, payloads={0, payload})
    if not _extension.available():
        raise RuntimeError(_extension.unavailable_reason())
    # The BF16 layout is the larger one; size for it so either payload fits.
    size = max(
        _extension._C.low_latency_buffer_bytes(max_tokens, max_tokens, num_topk, num_experts, hidden, p, num_ranks)
        for p in {0, payload}
    )
    return int(size)
