"""NVSHMEM bootstrapped through nvshmem4py (jax_ep.nvshmem.initialize(bootstrap=
"nvshmem4py")) on R rank processes: nvshmem.core.init with the unique id sent
over the jax.distributed key-value store, then jax_ep._nvshmem registers its
device code with that host library instance (the reuse path); a symmetric
buffer from jax_ep, its device self test (put / quiet / barrier from jax_ep's
kernels) and peer pointers; finalize. Prints SKIP and exits 0 where
nvshmem4py (pip install 'jax_ep[nvshmem4py]') is not installed.

    python -m jax_ep.launch -n 4 tests/gpu/multirank_nvshmem4py.py

Not yet run on a GPU.
"""

import importlib.util
import os
import sys

os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", "268435456")
os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jax_ep.launch import initialize_distributed  # noqa: E402

info = initialize_distributed()

from jax_ep import nvshmem  # noqa: E402
from gpu.rank_checks import Checks  # noqa: E402

R, ME = info.num_ranks, info.rank
if importlib.util.find_spec("nvshmem") is None:
    print("SKIP nvshmem4py is not installed (pip install 'jax_ep[nvshmem4py]')", flush=True)
    sys.exit(0)

checks = Checks()
state = {}


@checks("initialize through nvshmem4py")
def _():
    got = nvshmem.initialize(timeout_s=60, bootstrap="nvshmem4py")
    assert got["rank"] == ME and got["num_ranks"] == R and got["bootstrap"] == "nvshmem4py", got
    assert not got["initialized_here"], got  # nvshmem4py initialised the host library; jax_ep reused it
    assert len(nvshmem.host_library_paths()) == 1, nvshmem.host_library_paths()
    core = nvshmem.nvshmem4py()
    assert core.my_pe() == ME and core.n_pes() == R


@checks("jax_ep symmetric buffer and device self test on nvshmem4py's instance")
def _():
    buf = nvshmem.symmetric_buffer(max(1 << 20, nvshmem.self_test_bytes(R)))
    state["buf"] = buf
    assert all(p is not None for p in buf.peer_pointers), buf.transports
    for rnd in (1, 2):
        err = buf.self_test(rnd)
        assert err == "", err


@checks("finalize")
def _():
    state.pop("buf").free()
    nvshmem.finalize()
    assert not nvshmem.is_initialized()


sys.exit(checks.summary(ME, R))
