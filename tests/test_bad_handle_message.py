"""The host's message for a handle index out of range (kFailBadHandle), as
the kernels record it, through the extension's own decoder."""

import pytest

from jax_ep import _extension, faults

needs_extension = pytest.mark.skipif(not _extension.available(), reason=_extension.unavailable_reason() or "-")


@needs_extension
def test_bad_handle_message_names_the_rank_row_and_index():
    C = _extension._C
    # cached dispatch (op 1) on rank 2: row 5 of the handle names source rank 9
    msg = C.failure_message(faults.STATUS_BAD_HANDLE, 2, -1, 1, 5, 9, [], [])
    assert "rank 2's cached-dispatch was given a handle whose row 5 names 9, out of range" in msg
    assert "pass the handle of the dispatch that this call answers" in msg and "unusable until re-created" in msg
    # a peer stopped by it says why
    msg = C.failure_message(faults.STATUS_ABORTED, 0, 2, -1, 0, faults.STATUS_BAD_HANDLE, [], [])
    assert "rank 2 failed first (bad handle" in msg
    assert faults.STATUS_NAMES[faults.STATUS_BAD_HANDLE] == "bad handle"
