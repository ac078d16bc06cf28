"""The NVSHMEM transport on R rank processes (one PE each; ranks may share a GPU under MPS).

Run through the launcher:

    python -m jax_ep.launch -n 4 tests/gpu/multirank_nvshmem.py

Bootstraps NVSHMEM through the jax.distributed key-value store, allocates a
symmetric buffer, checks that every peer is P2P-reachable ("p2p"), runs the
device-side put / quiet / barrier self test of jax_ep._nvshmem, writes a
rank-specific pattern into every peer through its peer pointer (cudaMemcpy),
checks what arrived, and finalises. Prints PASS/FAIL per check and TIME lines;
exits 1 if any check failed.

The symmetric heap defaults to 256 MiB here (NVSHMEM_SYMMETRIC_SIZE, when set,
wins) and XLA's preallocation is off unless JAX_EP_TEST_XLA_PREALLOCATE=1 (then
the launcher's XLA_PYTHON_CLIENT_MEM_FRACTION of 0.85/R applies).
"""

import os
import sys
import time
import traceback

# GPU memory outside XLA's pool: the symmetric heap (NVSHMEM_SYMMETRIC_SIZE per
# PE) and NVSHMEM's own buffers. Small heap, no XLA preallocation.
os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", "268435456")
if os.environ.get("JAX_EP_TEST_XLA_PREALLOCATE") != "1":
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"

from jax_ep.launch import initialize_distributed  # noqa: E402

info = initialize_distributed()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jax_ep import nvshmem  # noqa: E402

R, ME = info.num_ranks, info.rank
RESULTS = []
STATE = {}


def check(name):
    def wrap(fn):
        t0 = time.time()
        try:
            fn()
            RESULTS.append((name, True, ""))
            print(f"PASS {name} ({time.time() - t0:.2f} s)", flush=True)
        except Exception as e:  # report and go on
            RESULTS.append((name, False, repr(e)))
            print(f"FAIL {name}: {e}\n{traceback.format_exc()}", flush=True)
        return fn
    return wrap


def pattern(rank: int, n: int) -> bytes:
    rng = np.random.default_rng(1000 + rank)
    return rng.integers(0, 256, n, dtype=np.uint8).tobytes()


@check("nvshmem module available")
def _():
    assert nvshmem.available(), nvshmem.unavailable_reason()
    print(f"nvshmem host library {nvshmem.version()}, built with {nvshmem.build_version()}", flush=True)


@check("initialize through the KV store")
def _():
    got = nvshmem.initialize(timeout_s=45)
    assert got["rank"] == ME and got["num_ranks"] == R, got
    assert nvshmem.initialize() == got  # idempotent
    print(f"TIME init {got['seconds']:.3f} s (initialized_here={got['initialized_here']})", flush=True)


@check("symmetric buffer: every peer P2P")
def _():
    t0 = time.perf_counter()
    buf = nvshmem.symmetric_buffer(1 << 20)
    print(f"TIME malloc 1 MiB {time.perf_counter() - t0:.4f} s", flush=True)
    STATE["buf"] = buf
    assert buf.rank == ME and buf.num_ranks == R
    assert buf.peer_pointers[ME] == buf.local_pointer, (buf.peer_pointers, buf.local_pointer)
    missing = [pe for pe, p in enumerate(buf.peer_pointers) if p is None]
    assert not missing, f"no P2P pointer to PE(s) {missing}; transports {buf.transports}"
    assert all(t == "p2p" for t in buf.transports), buf.transports
    assert len(set(buf.peer_pointers)) == R, "two PEs map to the same address"
    assert buf.read(0, 4096) == bytes(4096), "symmetric buffer not zeroed"


@check("device self test: nvshmem_int_p + putmem_nbi_block + quiet + barrier_all_block")
def _():
    buf = STATE["buf"]
    assert buf.num_bytes >= nvshmem.self_test_bytes(R)
    for rnd in (1, 2, 3):
        err = buf.self_test(rnd)
        assert err == "", err
    n = 20
    t0 = time.perf_counter()
    for rnd in range(4, 4 + n):
        err = buf.self_test(rnd)
        assert err == "", err
    dt = (time.perf_counter() - t0) / n
    print(f"TIME self_test round trip (launch + puts + 2 device barriers + sync) {dt * 1e6:.1f} us", flush=True)


@check("pattern through every peer pointer")
def _():
    buf = STATE["buf"]
    chunk, base = 4096, 64 * 1024  # past the self-test area
    assert base + R * chunk <= buf.num_bytes
    mine = pattern(ME, chunk)
    for pe in range(R):  # my pattern into slot ME of every PE (self included)
        buf.write(pe, base + ME * chunk, mine)
    nvshmem.barrier_all()
    for src in range(R):
        got = buf.read(base + src * chunk, chunk)
        assert got == pattern(src, chunk), f"slot of rank {src} differs on rank {ME}"
    # And read a peer's copy through its pointer: the next PE got my pattern too.
    nxt = (ME + 1) % R
    assert buf.read(base + ME * chunk, chunk, pe=nxt) == mine
    nvshmem.barrier_all()


@check("host barrier_all timing")
def _():
    n = 50
    t0 = time.perf_counter()
    for _ in range(n):
        nvshmem.barrier_all()
    print(f"TIME host barrier_all {(time.perf_counter() - t0) / n * 1e6:.1f} us", flush=True)


@check("second buffer, free, JAX still works")
def _():
    b2 = nvshmem.symmetric_buffer(3 * 4096 + 17)
    assert all(p is not None for p in b2.peer_pointers)
    assert b2.local_pointer != STATE["buf"].local_pointer
    b2.write((ME + 1) % R, 0, b"\x5a" * 17)
    nvshmem.barrier_all()
    assert b2.read(0, 17) == b"\x5a" * 17
    b2.free()
    b2.free()  # idempotent
    x = jnp.arange(1024, dtype=jnp.float32)
    assert float(jax.jit(lambda v: (v * 2).sum())(x)) == 2 * 1023 * 1024 / 2


@check("finalize")
def _():
    nvshmem.finalize()
    assert not nvshmem.is_initialized()
    nvshmem.finalize()  # idempotent


failed = [n for n, ok, _ in RESULTS if not ok]
print(f"rank {ME}/{R}: {len(RESULTS) - len(failed)} passed, {len(failed)} failed", flush=True)
sys.exit(1 if failed else 0)
