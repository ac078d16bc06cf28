"""Ranks agree on their buffers before any call (jax_ep.faults): the pure
comparison, and the exchange over the key-value store with R ranks as
threads of one process and a dict as the store."""

import numpy as np
import pytest

import jax_ep
from jax_ep import faults, runtime
from conftest import run_ranks
from fake_kv import FakeKV, run_threads


# --- the pure comparison ------------------------------------------------------------


def test_first_difference_names_the_first_field_in_order():
    mine = {"num_bytes": 100, "num_sms": 24, "ring": 64}
    assert faults.first_difference(mine, dict(mine)) is None
    assert faults.first_difference(mine, {"num_bytes": 100, "num_sms": 20, "ring": 32}) == ("num_sms", 24, 20)
    assert faults.first_difference(mine, {**mine, "extra": 1}) == ("extra", None, 1)
    assert faults.first_difference(mine, {"num_bytes": 100, "num_sms": 24}) == ("ring", 64, None)


def test_check_agreement_names_both_ranks_and_the_field():
    configs = {0: {"a": 1, "b": 2}, 1: {"a": 1, "b": 2}, 2: {"a": 1, "b": 3}}
    faults.check_agreement("buffers", 2, {0: configs[0], 2: configs[0]})  # agree: nothing raised
    with pytest.raises(faults.BufferMismatchError) as e:
        faults.check_agreement("buffers", 0, configs)
    assert (e.value.field, e.value.rank, e.value.peer, e.value.mine, e.value.theirs) == ("b", 0, 2, 2, 3)
    assert "rank 0 and rank 2" in str(e.value) and "b is 2 on rank 0 and 3 on rank 2" in str(e.value)
    with pytest.raises(faults.BufferMismatchError, match="rank 2 and rank 0"):
        faults.check_agreement("buffers", 2, configs)


def test_buffer_config_covers_sizes_and_every_option():
    base = jax_ep.Buffer(8, axis_name=None)._agreed_config()
    cases = {
        "num_nvl_bytes": jax_ep.Buffer(8, axis_name=None, num_nvl_bytes=1 << 20),
        "num_experts": jax_ep.Buffer(16, axis_name=None),
        "normal.num_sms": jax_ep.Buffer(8, axis_name=None, normal=jax_ep.NormalOptions(num_sms=20)),
        "normal.combine_ring_rows": jax_ep.Buffer(
            8, axis_name=None, normal=jax_ep.NormalOptions(combine_ring_rows=32)),
        "low_latency.num_max_dispatch_tokens_per_rank": jax_ep.Buffer(
            8, axis_name=None, low_latency=jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=64)),
        "low_latency.fp8": jax_ep.Buffer(
            8, axis_name=None, low_latency=jax_ep.LowLatencyOptions(fp8=jax_ep.FP8Options())),
    }
    for field, buffer in cases.items():
        assert faults.first_difference(base, buffer._agreed_config())[0] == field


# --- the exchange, ranks as threads ---------------------------------------------------


def test_exchange_agrees_and_every_rank_refuses_a_mismatch():
    store = FakeKV()
    ok = run_threads(4, lambda r: faults.exchange_and_check(store, "t/ok", "buffers", r, 4, {"bytes": 64}, 10.0))
    assert ok == {r: None for r in range(4)}

    configs = [{"bytes": 64, "sms": 24}] * 3 + [{"bytes": 64, "sms": 20}]
    out = run_threads(4, lambda r: faults.exchange_and_check(store, "t/bad", "buffers", r, 4, configs[r], 10.0))
    for r in range(4):
        assert isinstance(out[r], faults.BufferMismatchError), out[r]
        assert out[r].field == "sms"
        assert out[r].peer == (3 if r < 3 else 0)


def test_exchange_times_out_naming_the_missing_rank():
    store = FakeKV()
    with pytest.raises(TimeoutError, match="rank 0 waited 0 s for rank 1's buffers"):
        faults.exchange_and_check(store, "t/missing", "buffers", 0, 2, {"bytes": 1}, 0.05)


class FakeExtension:
    """What _exchange_handles calls: handles, and which peers were mapped."""

    def __init__(self):
        self.opened = []

    def intranode_ipc_handle(self, buffer_id):
        return b"h" * 80

    def open_intranode_peer_ipc(self, buffer_id, peer, handle):
        self.opened.append(peer)


def test_handle_exchange_refuses_different_sizes_before_mapping(monkeypatch):
    """A rank with another num_nvl_bytes: every rank raises naming the field,
    and nobody maps a peer buffer whose size it would get wrong."""
    store = FakeKV(num_ranks=3)
    monkeypatch.setattr(runtime, "_kv_client", lambda: store)
    exts = [FakeExtension() for _ in range(3)]
    sizes = [1 << 20, 1 << 20, 1 << 21]

    def rank(r):
        config = {"num_ranks": 3, "num_bytes": sizes[r]}
        runtime._exchange_handles(exts[r], 7, 900, r, 3, 10.0, config)

    out = run_threads(3, rank)
    for r in range(3):
        assert isinstance(out[r], faults.BufferMismatchError) and out[r].field == "num_bytes", out[r]
        assert f"rank {r} and rank {2 if r < 2 else 0}" in str(out[r])
        assert exts[r].opened == []

    same = run_threads(3, lambda r: runtime._exchange_handles(exts[r], 7, 901, r, 3, 10.0, {"num_bytes": 1}))
    assert same == {r: None for r in range(3)}
    assert [sorted(e.opened) for e in exts] == [[1, 2], [0, 2], [0, 1]]


def test_buffer_creation_exchanges_its_config(monkeypatch):
    """Buffer(...) with the CUDA backend calls the agreement first: with a
    peer (a fake one) that chose another num_sms it raises before allocating."""
    store = FakeKV()
    monkeypatch.setattr(runtime, "_kv_client", lambda: store)
    monkeypatch.setattr(runtime.jax, "process_count", lambda: 2)
    monkeypatch.setattr(runtime.jax, "process_index", lambda: 0)
    seq = next(runtime._agree_counter) + 1  # the one the Buffer below takes
    opts = jax_ep.NormalOptions(backend="cuda", num_sms=20)
    peer = jax_ep.Buffer(8, axis_name=None)._agreed_config()
    peer.update({"num_ranks": 2, "normal.backend": "cuda", "normal.num_sms": 24})
    store.key_value_set_bytes(f"jax_ep/buffer/{seq}/1", faults.json.dumps(peer).encode())
    monkeypatch.setattr(jax_ep.buffer.jax, "process_count", lambda: 2)
    # Both ranks on one host (the topology's own exchange is tested in test_topology.py).
    monkeypatch.setattr(jax_ep.buffer._topology, "discover",
                        lambda nodes, timeout_s: jax_ep.buffer._topology.make_topology(2, nodes, environ={}))
    with pytest.raises(jax_ep.BufferMismatchError, match="normal.num_sms is 20 on rank 0 and 24 on rank 1"):
        jax_ep.Buffer(8, axis_name=None, normal=opts)


# --- status as data and as an exception -------------------------------------------------


def test_reference_status_is_ok_on_every_rank():
    buffer = jax_ep.Buffer(8, axis_name="ep")
    out = np.asarray(run_ranks(lambda x: buffer.status(x), 4, [np.zeros(2, np.float32)] * 4))
    assert out.tolist() == [[0, -1, r, -1] for r in range(4)]
    with pytest.raises(ValueError, match="mode must be"):
        jax_ep.status(buffer, mode="fast")


def test_failure_record_becomes_a_communication_error():
    assert faults.error_from_record({"code": 0}) is None
    err = faults.error_from_record({"code": 4, "rank": 1, "peer": 3, "op": 0, "call": 9,
                                    "message": "jax_ep: rank 1 stopped its dispatch: rank 3 failed first"})
    assert isinstance(err, jax_ep.CommunicationError)
    assert (err.kind, err.rank, err.peer, err.call) == ("aborted", 1, 3, 9)
    assert "rank 3 failed first" in str(err)


def test_buffer_methods_raise_after_a_failure():
    """Every method checks the failure record first: a buffer whose call
    failed says so on its next use instead of computing garbage."""

    class FailedRuntime:
        def failure(self):
            return jax_ep.CommunicationError("jax_ep: rank 0 timed out waiting for rank 1", kind="timeout",
                                             rank=0, peer=1)

    buffer = jax_ep.Buffer(8, axis_name=None)
    buffer._runtime = FailedRuntime()
    with pytest.raises(jax_ep.CommunicationError, match="waiting for rank 1"):
        buffer.get_dispatch_layout(np.zeros((4, 2), np.int32))
    with pytest.raises(jax_ep.CommunicationError):
        buffer.check()


# --- the host's message of a failure record (the extension's own decoder) --------------

needs_extension = pytest.mark.skipif(not jax_ep._extension.available(), reason="needs jax_ep._C")


@needs_extension
def test_mismatch_message_names_both_ranks_and_the_first_differing_field():
    C = jax_ep._extension._C
    n = C.signature_fields
    # dispatch (op 0): T differs (field 1), and so does C (field 2): T is named.
    mine = [0, 32, 64, 512, 2, 8, 24] + [0] * (n - 7)
    theirs = [0, 40, 80, 512, 2, 8, 24] + [0] * (n - 7)
    msg = C.failure_message(3, 0, 1, 0, 7, 0, mine, theirs)
    assert "rank 0 and rank 1 made different calls in the dispatch (call 7)" in msg
    assert "T (tokens per rank) is 32 on rank 0 and 40 on rank 1" in msg
    # row bytes only (another H)
    msg = C.failure_message(3, 1, 0, 0, 2, 0, mine, mine[:3] + [1024] + mine[4:])
    assert "row bytes (hidden size x item size) is 512 on rank 1 and 1024 on rank 0" in msg
    # a dispatch meeting a combine: the op differs first
    msg = C.failure_message(3, 0, 2, 2, 4, 0, [2] + mine[1:], mine)
    assert "op (which call) is 2 on rank 0 and 0 on rank 2" in msg
    # low-latency dispatch (op 3): the SM budget
    ll = [3, 0, 32, 1024, 2, 8, 4] + [0] * (n - 7)
    msg = C.failure_message(3, 0, 1, 3, 1, 0, ll, ll[:6] + [8] + ll[7:])
    assert "num_sms is 4 on rank 0 and 8 on rank 1" in msg and "low-latency dispatch" in msg


@needs_extension
def test_timeout_and_abort_messages_name_the_ranks():
    C = jax_ep._extension._C
    msg = C.failure_message(1, 0, 3, 0, 5, 4, [], [])
    assert "rank 0 timed out after 5.0 s in the dispatch barrier waiting for rank 3" in msg
    assert "unusable until re-created" in msg
    msg = C.failure_message(4, 2, 0, -1, 0, 1, [], [])
    assert "rank 2 stopped its next call: rank 0 failed first (timeout; see rank 0's error)" in msg
    assert C.buffer_failure is not None
