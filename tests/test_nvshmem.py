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


def test_device_library_newer_than_host_library_is_refused():
    """The import check (jax_ep/nvshmem.py) names the versions that work."""
    assert nvshmem.version_mismatch("3.4.5", "3.4.5") == ""
    assert nvshmem.version_mismatch("3.8.0", "3.4.5") == ""  # newer host: NVSHMEM accepts it
    why = nvshmem.version_mismatch("3.4.5", "3.8.0")
    assert "3.8.0" in why and "3.4.5" in why and "nvidia-nvshmem-cu13==3.8.0" in why
    assert nvshmem.version_mismatch("4.0.0", "3.4.5")  # another major version
