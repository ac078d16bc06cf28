"""Collective teardown of a CUDA buffer (jax_ep.runtime.IntranodeRuntime.destroy),
run on CPU: R ranks as threads, a fake extension that records each step and a
key-value store with barriers. No rank frees its memory before every rank has
unmapped it, and none unmaps before every rank has stopped using the buffer."""

import threading
import time
import warnings

import pytest

from jax_ep import _extension, runtime
from fake_kv import FakeKV, run_threads


class Extension:
    def __init__(self):
        self.events = []  # (step, rank), in the order they happened
        self.lock = threading.Lock()

    def _log(self, step, buffer_id):
        time.sleep(0.01 * (buffer_id % 3))  # ranks arrive at different times
        with self.lock:
            self.events.append((step, buffer_id))

    def close_intranode_imports(self, buffer_id):
        self._log("close", buffer_id)

    def destroy_intranode_buffer(self, buffer_id):
        self._log("free", buffer_id)


def _destroy_all(monkeypatch, num_ranks, arriving, timeout_s=20.0):
    store, ext = FakeKV(num_ranks), Extension()
    monkeypatch.setattr(runtime, "_kv_client", lambda: store)
    monkeypatch.setattr(_extension, "_C", ext, raising=False)
    rts = [runtime.IntranodeRuntime(9000 + r, r, num_ranks, 1 << 20, 1 << 19, seq=77) for r in range(num_ranks)]
    for rt in rts:
        runtime._live[rt.buffer_id] = rt
    out = run_threads(arriving, lambda r: rts[r].destroy(timeout_s))
    assert out == {r: None for r in arriving}, out
    for rt in rts:
        runtime._live.pop(rt.buffer_id, None)
    return [(step, bid - 9000) for step, bid in ext.events]


def test_teardown_is_collective_and_ordered(monkeypatch):
    events = _destroy_all(monkeypatch, 4, range(4))
    steps = [s for s, _ in events]
    assert sorted(events) == sorted([("close", r) for r in range(4)] + [("free", r) for r in range(4)])
    assert steps == ["close"] * 4 + ["free"] * 4  # every rank unmapped its peers before any rank freed


def test_a_missing_rank_is_taken_as_gone(monkeypatch):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        events = _destroy_all(monkeypatch, 2, [0], timeout_s=0.2)
    messages = [str(w.message) for w in caught if w.category is RuntimeWarning]
    assert any("did not see every rank reach the 'quiet' step" in m for m in messages), messages
    assert any("'closed' step" in m for m in messages), messages
    assert events == [("close", 0), ("free", 0)]


def test_single_process_buffers_free_at_once(monkeypatch):
    ext = Extension()
    monkeypatch.setattr(_extension, "_C", ext, raising=False)
    rt = runtime.IntranodeRuntime(9100, 0, 4, 1 << 20, 1 << 19, transports=("peer",) * 4)  # a group: no seq
    runtime._live[rt.buffer_id] = rt
    rt.destroy()
    rt.destroy()  # idempotent
    assert ext.events == [("free", 9100)]
