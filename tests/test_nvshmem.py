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
