"""The NVSHMEM module builds, links and loads; its GPU behaviour is checked by
tests/gpu/multirank_nvshmem.py on a GPU machine."""

import pytest

from jax_ep import nvshmem


def test_module_loads_or_says_why():
    if not nvshmem.available():
        assert nvshmem.unavailable_reason()
        pytest.skip(nvshmem.unavailable_reason())
    assert nvshmem.version() and nvshmem.build_version()
    uid = nvshmem._module().get_unique_id()  # host library only, no GPU needed
    assert isinstance(uid, bytes) and len(uid) > 0


def test_not_initialized_is_a_clear_error():
    if not nvshmem.available():
        pytest.skip(nvshmem.unavailable_reason())
    assert not nvshmem.is_initialized()
    with pytest.raises(RuntimeError, match="initialize"):
        nvshmem.symmetric_buffer(1024)


# --- host side without a GPU: unique-id exchange, versions, nvshmem4py -------------------

from fake_kv import FakeKV, run_threads  # noqa: E402


def _run_ranks(kv, num_ranks, present, make_uid, timeout_s=5.0):
    """The unique-id exchange on the ranks in `present`; returns
    ({rank: unique id}, {rank: exception raised})."""
    out = run_threads(present, lambda r: nvshmem._exchange_unique_id(
        make_uid(r), 16, r, num_ranks, timeout_s, client=kv, generation=9))
    got = {r: v for r, v in out.items() if not isinstance(v, Exception)}
    errors = {r: v for r, v in out.items() if isinstance(v, Exception)}
    return got, errors


def test_unique_id_exchange_over_kv():
    calls = []

    def make_uid(r):
        return lambda: calls.append(r) or bytes(range(16))

    got, errors = _run_ranks(FakeKV(), 4, range(4), make_uid)
    assert not errors and calls == [0]  # only rank 0 creates the id
    assert all(got[r] == bytes(range(16)) for r in range(4))


def test_unique_id_exchange_names_missing_ranks():
    _, errors = _run_ranks(FakeKV(), 3, [1, 2], lambda r: lambda: bytes(16), timeout_s=0.2)
    assert "rank 0 did not call jax_ep.nvshmem.initialize" in str(errors[1])
    _, errors = _run_ranks(FakeKV(), 3, [0, 1], lambda r: lambda: bytes(16), timeout_s=0.2)
    assert "waited 0 s for rank 2 to join the NVSHMEM bootstrap" in str(errors[0])
    _, errors = _run_ranks(FakeKV(), 2, [0, 1], lambda r: lambda: bytes(15))
    assert "the unique id has 15 bytes, expected 16" in str(errors[1])


def test_bootstrap_choice(monkeypatch):
    monkeypatch.delenv(nvshmem.BOOTSTRAP_ENV, raising=False)
    assert nvshmem._bootstrap_choice(None) == "jax_ep"
    monkeypatch.setenv(nvshmem.BOOTSTRAP_ENV, "nvshmem4py")
    assert nvshmem._bootstrap_choice(None) == "nvshmem4py"
    assert nvshmem._bootstrap_choice("jax_ep") == "jax_ep"
    monkeypatch.setenv(nvshmem.BOOTSTRAP_ENV, "mpi")
    with pytest.raises(ValueError, match=r"JAX_EP_NVSHMEM_BOOTSTRAP must be one of \('jax_ep', 'nvshmem4py'\)"):
        nvshmem._bootstrap_choice(None)


def test_shared_host_library_problem():
    one = ["/x/nvidia/nvshmem/lib/libnvshmem_host.so.3"]
    assert nvshmem.shared_host_library_problem("3.4.5", "3.4.5", one) == ""
    assert "two NVSHMEM host libraries" in nvshmem.shared_host_library_problem("3.4.5", "3.4.5", one + ["/y/libnvshmem_host.so.3"])
    assert "must share one host library" in nvshmem.shared_host_library_problem("3.8.0", "3.4.5", one)


def test_nvshmem4py_shares_the_host_library():
    """nvshmem4py opens the libnvshmem_host.so.3 jax_ep loaded (one file
    mapped, one version), and its unique id round-trips through bytes. Host
    side only: no GPU."""
    if not nvshmem.available():
        pytest.skip(nvshmem.unavailable_reason())
    pytest.importorskip("nvshmem.core", reason="nvshmem4py-cu13 not installed (pip install 'jax_ep[nvshmem4py]')")
    core = nvshmem.nvshmem4py()
    assert len(nvshmem.host_library_paths()) == 1
    assert core.get_version().libnvshmem_version == nvshmem.version()
    raw = nvshmem.uid_to_bytes(core.get_unique_id())
    assert len(raw) == nvshmem._module().unique_id_bytes
    assert nvshmem.uid_to_bytes(nvshmem.uid_from_bytes(core, raw)) == raw


def test_put_kernels_direct_entry_points_load():
    """The put kernels' host entry points are exported by jax_ep._nvshmem
    (tests/gpu/multirank_ll_put_direct.py calls them on a GPU); sizing needs no GPU."""
    if not nvshmem.available():
        pytest.skip(nvshmem.unavailable_reason())
    from gpu import ll_put_direct as direct

    lib = direct.library()
    small = direct.buffer_bytes(lib, 24, 4, 32, 1024, "bf16", 8)
    assert small > 2 * 8 * 4 * 24 * 1024 * 2  # at least both halves of the dispatch rows
    assert direct.buffer_bytes(lib, 48, 4, 32, 1024, "bf16", 8) > small
    assert direct.buffer_bytes(lib, 24, 4, 4096, 1024, "bf16", 8) == 0  # E > 2048 words per half
    assert direct.buffer_bytes(lib, 24, 17, 32, 1024, "bf16", 8) == 0  # K > 16


def test_device_library_newer_than_host_library_is_refused():
    """The import check (jax_ep/nvshmem.py) names the versions that work."""
    assert nvshmem.version_mismatch("3.4.5", "3.4.5") == ""
    assert nvshmem.version_mismatch("3.8.0", "3.4.5") == ""  # newer host: NVSHMEM accepts it
    why = nvshmem.version_mismatch("3.4.5", "3.8.0")
    assert "3.8.0" in why and "3.4.5" in why and "nvidia-nvshmem-cu13==3.8.0" in why
    assert nvshmem.version_mismatch("4.0.0", "3.4.5")  # another major version
