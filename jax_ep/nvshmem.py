"""The NVSHMEM transport, on the Python side (module ``jax_ep._nvshmem``).

One process per PE: the NVSHMEM PE is the JAX process index, and the number
of PEs the JAX process count. :func:`initialize` bootstraps NVSHMEM with a
unique id that rank 0 creates and publishes on the ``jax.distributed``
key-value store; :func:`symmetric_buffer` allocates a zeroed symmetric buffer
(collectively: every rank, same size, same order) and reports its address in
every peer's memory as this process sees it (``nvshmem_ptr``).

``jax_ep._nvshmem`` is a separate extension from ``jax_ep._C`` (which never
needs libnvshmem). It is device-linked against the ``libnvshmem_device.a`` of
the ``nvidia-nvshmem-cu13`` wheel it was built with and loads that wheel's
``libnvshmem_host.so.3`` at run time: this module preloads the host library
of the ``nvidia.nvshmem`` package importable here (or the file named by
``JAX_EP_NVSHMEM_HOST_LIB``) before importing the extension. NVSHMEM refuses a
device library whose minor version is higher than the host library's, so the
installed wheel must be at least the version the module was built with
(``build_version()``; 3.4.5 today): pin ``nvidia-nvshmem-cu13>=<that>,<4``.

Environment (set by ``jax_ep.launch`` on one host): ``NVSHMEM_REMOTE_TRANSPORT=none``
without a NIC, ``NVSHMEM_DISABLE_NVLS=1``, and under CUDA MPS
``NVSHMEM_IGNORE_CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=1``. ``NVSHMEM_SYMMETRIC_SIZE``
(default 1 GiB per PE) bounds the symmetric heap; it is GPU memory outside
XLA's pool, so leave room for it (``XLA_PYTHON_CLIENT_MEM_FRACTION`` or
``XLA_PYTHON_CLIENT_PREALLOCATE=false``). See docs/nvshmem.md.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import threading
import time

__all__ = [
    "available", "unavailable_reason", "initialize", "is_initialized", "finalize",
    "symmetric_buffer", "SymmetricBuffer", "barrier_all", "version", "build_version", "version_mismatch",
    "nvshmem4py", "BOOTSTRAP_ENV",
]

HOST_LIB_ENV = "JAX_EP_NVSHMEM_HOST_LIB"
HOST_LIB_NAME = "libnvshmem_host.so.3"


def _wheel_host_lib() -> str | None:
    """Path of libnvshmem_host.so.3 in the importable nvidia.nvshmem wheel, or None."""
    path = os.environ.get(HOST_LIB_ENV)
    if path:
        return path
    try:
        import nvidia.nvshmem as pkg  # namespace package: no __file__
    except ImportError:
        return None
    for root in list(getattr(pkg, "__path__", [])):
        candidate = os.path.join(root, "lib", HOST_LIB_NAME)
        if os.path.exists(candidate):
            return candidate
    return None


def _load():
    host = _wheel_host_lib()
    if host is not None:
        try:
            ctypes.CDLL(host, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            return None, f"could not load {host}: {e}"
    try:
        from jax_ep import _nvshmem
    except ImportError as e:
        hint = "" if host else f" ({HOST_LIB_NAME} not found: pip install nvidia-nvshmem-cu13, or set {HOST_LIB_ENV})"
        return None, f"{type(e).__name__}: {e}{hint}"
    mismatch = version_mismatch(_nvshmem.version(), _nvshmem.build_version())
    return (None, mismatch) if mismatch else (_nvshmem, "")


def version_mismatch(host: str, built: str) -> str:
    """Why NVSHMEM would refuse this pair ("" when it works).

    ``host``: version of the loaded ``libnvshmem_host.so.3``; ``built``: the
    version whose device library ``jax_ep._nvshmem`` was linked with. NVSHMEM
    accepts a host library of the same major version and a minor version at
    least the device library's.
    """
    hmaj, hmin = (int(x) for x in host.split(".")[:2])
    bmaj, bmin = (int(x) for x in built.split(".")[:2])
    if hmaj == bmaj and hmin >= bmin:
        return ""
    return (
        f"jax_ep._nvshmem was built with NVSHMEM {built} but the loaded {HOST_LIB_NAME} is {host}, and "
        f"NVSHMEM refuses a device library newer than its host library (it needs {bmaj}.x with x >= {bmin}): "
        f"install the NVSHMEM jax_ep was built with (pip install 'nvidia-nvshmem-cu13=={built}', the pin of "
        "the jax_ep[nvshmem] extra), or rebuild jax_ep against the installed one "
        "(JAX_EP_NVSHMEM=ON pip install --no-build-isolation . in this environment)"
    )


_N, _IMPORT_ERROR = _load()


def register_targets() -> tuple:
    """Register the FFI targets of ``jax_ep._nvshmem`` (the low-latency put
    path, xla_ffi/ll_put.cc; internode mode, xla_ffi/internode.cc) with XLA
    for CUDA, once; their names (empty without the module). Done at import."""
    if _N is None:
        return ()
    import jax

    done = getattr(_N, "_jax_ep_registered_targets", None)  # on the module: survives a reload of this one
    if done is None:
        targets = _N.registrations()
        for name in sorted(targets):
            jax.ffi.register_ffi_target(name, targets[name], platform="CUDA")
        done = tuple(sorted(targets))
        _N._jax_ep_registered_targets = done
    return done


register_targets()

_lock = threading.RLock()
_generation = 0          # bumped by finalize(): keys of a new bootstrap differ
_init_info: dict | None = None
_live: dict[int, "SymmetricBuffer"] = {}


def available() -> bool:
    """True when ``jax_ep._nvshmem`` and a compatible NVSHMEM host library loaded."""
    return _N is not None


def unavailable_reason() -> str:
    """Why the NVSHMEM transport is missing ("" when it is available)."""
    if _N is not None:
        return ""
    return (
        "the NVSHMEM module jax_ep._nvshmem is not usable (build it with "
        "`JAX_EP_NVSHMEM=ON pip install '.[nvshmem]'` from the jax_ep repository): " + _IMPORT_ERROR
    )


def _module():
    if _N is None:
        raise RuntimeError(unavailable_reason())
    return _N


def version() -> str:
    """Version of the loaded NVSHMEM host library, e.g. "3.4.5"."""
    return _module().version()


def build_version() -> str:
    """NVSHMEM version (headers, device library) ``jax_ep._nvshmem`` was built with."""
    return _module().build_version()


def _kv_client():
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError(
            "several JAX processes but no jax.distributed client: call jax.distributed.initialize "
            "(jax_ep.launch.initialize_distributed does) before jax_ep.nvshmem.initialize"
        )
    return client


def _local_gpu() -> int:
    import jax

    local = jax.local_devices()
    if len(local) != 1 or local[0].platform != "gpu":
        raise RuntimeError(
            "the NVSHMEM transport runs one process per PE with one local GPU each "
            f"(this process sees {[d.platform for d in local]}); start the ranks with "
            "`python -m jax_ep.launch -n R script.py`"
        )
    return int(local[0].local_hardware_id or 0)


def _exchange_unique_id(make_uid, uid_bytes: int, rank: int, num_ranks: int, timeout_s: float,
                        client=None, generation: int | None = None) -> bytes:
    """Rank 0 publishes a fresh unique id (``make_uid()``, ``uid_bytes``
    bytes); every rank fetches it and waits until all ranks have it (so that a
    missing rank is named here, not a hang inside NVSHMEM's bootstrap).
    ``client``: a ``jax.distributed`` key-value client (default: this
    process's)."""
    client = _kv_client() if client is None else client
    prefix = f"jax_ep/nvshmem/{_generation if generation is None else generation}"
    deadline = time.monotonic() + timeout_s

    def remaining_ms() -> int:
        return max(1, int((deadline - time.monotonic()) * 1000))

    if rank == 0:
        uid = make_uid()
        client.key_value_set_bytes(f"{prefix}/uid", uid)
    else:
        try:
            uid = client.blocking_key_value_get_bytes(f"{prefix}/uid", remaining_ms())
        except Exception as e:  # the client raises a generic error on deadline
            raise TimeoutError(
                f"jax_ep.nvshmem: rank {rank} waited {timeout_s:.0f} s for rank 0's NVSHMEM unique id "
                f"(key {prefix}/uid): rank 0 did not call jax_ep.nvshmem.initialize"
            ) from e
    uid = bytes(uid)
    if len(uid) != uid_bytes:
        raise RuntimeError(f"jax_ep.nvshmem: the unique id has {len(uid)} bytes, expected {uid_bytes}")
    client.key_value_set(f"{prefix}/arrived/{rank}", "1")
    for peer in range(num_ranks):
        if peer == rank:
            continue
        try:
            client.blocking_key_value_get(f"{prefix}/arrived/{peer}", remaining_ms())
        except Exception as e:
            raise TimeoutError(
                f"jax_ep.nvshmem: rank {rank} waited {timeout_s:.0f} s for rank {peer} to join the NVSHMEM "
                f"bootstrap: rank {peer} did not call jax_ep.nvshmem.initialize"
            ) from e
    return uid


def initialize(timeout_s: float = 120.0, bootstrap: str | None = None) -> dict:
    """Initialise NVSHMEM for this JAX process; idempotent.

    PE = ``jax.process_index()``, PEs = ``jax.process_count()``, on this
    process's one local GPU. Raises TimeoutError naming the rank that did not
    arrive within ``timeout_s``. When the NVSHMEM host library is already
    initialised in this process (by XLA or nvshmem4py), it is reused.

    ``bootstrap`` (default: ``JAX_EP_NVSHMEM_BOOTSTRAP``, else ``"jax_ep"``):
    ``"jax_ep"`` initialises the host library from ``jax_ep._nvshmem``;
    ``"nvshmem4py"`` initialises it through ``nvshmem.core.init`` (package
    ``nvshmem4py-cu13``), with the same unique id exchanged over the
    ``jax.distributed`` key-value store, and then registers jax_ep's device
    code with that instance (both use the one ``libnvshmem_host.so.3``).

    Returns ``{"rank", "num_ranks", "device", "initialized_here", "seconds",
    "version", "bootstrap"}``.
    """
    global _init_info
    N = _module()
    bootstrap = _bootstrap_choice(bootstrap)
    with _lock:
        if _init_info is not None:
            return dict(_init_info)
        import jax

        rank, num_ranks = jax.process_index(), jax.process_count()
        device = _local_gpu()
        t0 = time.monotonic()
        if N.init_status() >= 2:  # NVSHMEM_STATUS_IS_INITIALIZED: reuse, no bootstrap
            uid = b""
        elif bootstrap == "nvshmem4py":
            _init_with_nvshmem4py(rank, num_ranks, device, timeout_s)
            uid = b""
        elif num_ranks == 1:
            uid = N.get_unique_id()
        else:
            uid = _exchange_unique_id(N.get_unique_id, N.unique_id_bytes, rank, num_ranks, timeout_s)
        here = N.init(rank, num_ranks, uid, device)
        if N.my_pe() != rank or N.n_pes() != num_ranks:
            raise RuntimeError(
                f"jax_ep.nvshmem: NVSHMEM says PE {N.my_pe()} of {N.n_pes()}, JAX says {rank} of {num_ranks}"
            )
        _init_info = {
            "rank": rank, "num_ranks": num_ranks, "device": device, "initialized_here": bool(here),
            "seconds": time.monotonic() - t0, "version": N.version(), "bootstrap": bootstrap,
        }
        return dict(_init_info)


# --- nvshmem4py (package nvshmem4py-cu13, module nvshmem.core) --------------------------

BOOTSTRAP_ENV = "JAX_EP_NVSHMEM_BOOTSTRAP"
BOOTSTRAPS = ("jax_ep", "nvshmem4py")


def _bootstrap_choice(bootstrap: str | None) -> str:
    value = bootstrap if bootstrap is not None else (os.environ.get(BOOTSTRAP_ENV, "").strip() or "jax_ep")
    if value not in BOOTSTRAPS:
        where = "bootstrap" if bootstrap is not None else BOOTSTRAP_ENV
        raise ValueError(f"jax_ep.nvshmem: {where} must be one of {BOOTSTRAPS}, got {value!r}")
    return value


def nvshmem4py():
    """``nvshmem.core``, checked to drive the same host library as
    ``jax_ep._nvshmem``; a RuntimeError saying why not otherwise."""
    try:
        import nvshmem.core as core
    except ImportError as e:
        raise RuntimeError(
            f"bootstrap='nvshmem4py' needs nvshmem4py: pip install 'jax_ep[nvshmem4py]' "
            f"(nvshmem4py-cu13 and a matching nvidia-nvshmem-cu13): {type(e).__name__}: {e}"
        ) from e
    problem = shared_host_library_problem(core.get_version().libnvshmem_version, version(), host_library_paths())
    if problem:
        raise RuntimeError(problem)
    return core


def host_library_paths() -> list:
    """The files named libnvshmem_host* mapped into this process (Linux)."""
    try:
        with open("/proc/self/maps") as f:
            return sorted({line.split()[-1] for line in f if "libnvshmem_host" in line})
    except OSError:
        return []


def shared_host_library_problem(nvshmem4py_version: str, jax_ep_version: str, paths) -> str:
    """Why nvshmem4py and jax_ep would drive two host library instances ("" when one)."""
    if len(paths) > 1:
        return (f"jax_ep.nvshmem: two NVSHMEM host libraries are loaded ({', '.join(paths)}); nvshmem4py and "
                f"jax_ep._nvshmem must share one: install one nvidia-nvshmem-cu13, or point "
                f"{HOST_LIB_ENV} at the file nvshmem4py loads")
    if nvshmem4py_version != jax_ep_version:
        return (f"jax_ep.nvshmem: nvshmem4py drives NVSHMEM {nvshmem4py_version} but jax_ep loaded "
                f"{jax_ep_version}: they must share one host library")
    return ""


def uid_to_bytes(uid) -> bytes:
    """An ``nvshmem.core`` unique id as the bytes jax_ep exchanges."""
    return bytes(uid._data.tobytes())


def uid_from_bytes(core, raw: bytes):
    """The ``nvshmem.core`` unique id of ``raw`` (from :func:`uid_to_bytes`)."""
    import numpy as np

    empty = core.get_unique_id(empty=True)
    dtype = empty._data.dtype
    if len(raw) != dtype.itemsize:
        raise RuntimeError(f"jax_ep.nvshmem: the unique id has {len(raw)} bytes, nvshmem4py's has {dtype.itemsize}")
    return type(empty).from_data(np.frombuffer(bytes(raw), dtype=dtype).copy())


def _init_with_nvshmem4py(rank: int, num_ranks: int, device: int, timeout_s: float) -> None:
    core = nvshmem4py()
    from cuda.core import Device

    make = lambda: uid_to_bytes(core.get_unique_id())  # noqa: E731
    size = core.get_unique_id(empty=True)._data.dtype.itemsize
    raw = make() if num_ranks == 1 else _exchange_unique_id(make, size, rank, num_ranks, timeout_s)
    dev = Device(device)
    dev.set_current()
    core.init(device=dev, uid=uid_from_bytes(core, raw), rank=rank, nranks=num_ranks, initializer_method="uid")


def is_initialized() -> bool:
    """True between :func:`initialize` and :func:`finalize` in this process."""
    return _init_info is not None


def _require_initialized():
    N = _module()
    if _init_info is None:
        raise RuntimeError("jax_ep.nvshmem: call jax_ep.nvshmem.initialize() first")
    return N


def barrier_all() -> None:
    """Host-side ``nvshmem_barrier_all`` (every PE must call it)."""
    _require_initialized().barrier_all()


@dataclasses.dataclass(frozen=True)
class SymmetricBuffer:
    """A zeroed symmetric allocation of ``num_bytes`` on every PE.

    buffer_id: the id in ``jax_ep._nvshmem`` (the same on every PE).
    local_pointer: its address in this PE's memory.
    peer_pointers: per PE, the address through which this process loads and
        stores that PE's copy (None where the PE is not P2P-reachable).
    transports: per PE, "p2p", "rdma" or "none".
    """

    buffer_id: int
    num_bytes: int
    rank: int
    num_ranks: int
    local_pointer: int
    peer_pointers: tuple
    transports: tuple

    def free(self) -> None:
        """Collective: every PE frees its copy."""
        with _lock:
            if _live.pop(self.buffer_id, None) is None:
                return
        _module().free(self.buffer_id)

    def self_test(self, round: int = 1) -> str:
        """Device-side put / quiet / barrier round trip; "" when it passed. Collective."""
        return _module().self_test(self.buffer_id, round)

    def write(self, pe: int, offset: int, data: bytes) -> None:
        """Copy ``data`` into PE ``pe``'s copy at ``offset`` through its peer pointer."""
        ptr = self._pointer(pe, offset, len(data))
        _module().copy_to_device(ptr, bytes(data))

    def read(self, offset: int, num_bytes: int, pe: int | None = None) -> bytes:
        """``num_bytes`` of PE ``pe``'s copy (default: this PE's) at ``offset``."""
        ptr = self._pointer(self.rank if pe is None else pe, offset, num_bytes)
        return _module().copy_from_device(ptr, num_bytes)

    def _pointer(self, pe: int, offset: int, num_bytes: int) -> int:
        if not 0 <= pe < self.num_ranks:
            raise ValueError(f"no PE {pe} (there are {self.num_ranks})")
        if offset < 0 or offset + num_bytes > self.num_bytes:
            raise ValueError(f"bytes [{offset}, {offset + num_bytes}) outside a buffer of {self.num_bytes}")
        base = self.peer_pointers[pe]
        if base is None:
            raise RuntimeError(f"PE {pe} is not P2P-reachable from PE {self.rank} ({self.transports[pe]})")
        return base + offset


def symmetric_buffer(num_bytes: int) -> SymmetricBuffer:
    """Allocate a zeroed symmetric buffer (collective: same size, same order on every PE)."""
    N = _require_initialized()
    num_bytes = int(num_bytes)
    if num_bytes <= 0:
        raise ValueError(f"num_bytes must be positive, got {num_bytes}")
    with _lock:
        buffer_id = N.malloc(num_bytes)
        try:
            n = N.n_pes()
            buf = SymmetricBuffer(
                buffer_id, num_bytes, N.my_pe(), n, N.local_pointer(buffer_id),
                tuple(N.peer_pointers(buffer_id)), tuple(N.transport(pe) for pe in range(n)),
            )
        except BaseException:
            N.free(buffer_id)
            raise
        _live[buffer_id] = buf
        return buf


def self_test_bytes(num_ranks: int) -> int:
    """Bytes a buffer needs for :meth:`SymmetricBuffer.self_test` with this many PEs."""
    return int(_module().self_test_bytes(num_ranks))


def finalize() -> None:
    """Free every symmetric buffer and finalise NVSHMEM (collective); idempotent."""
    global _init_info, _generation
    with _lock:
        if _init_info is None:
            return
        _live.clear()
        _module().finalize()  # with the nvshmem4py bootstrap: unregisters jax_ep's device code only
        if _init_info.get("bootstrap") == "nvshmem4py":
            nvshmem4py().finalize()
        _init_info = None
        _generation += 1
