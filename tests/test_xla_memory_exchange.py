"""The exchange that maps every rank's XLA memory into every rank process
(jax_ep.runtime._exchange_xla_memory), run on CPU: R ranks as threads of one
process, a dict as the key-value store, real Unix sockets and real file
descriptors (temporary files standing in for the exported allocations)."""

import os
import tempfile

import pytest

from jax_ep import runtime
from fake_kv import FakeKV, run_threads


class FakeExtension:
    """Records which peer allocation each rank mapped (reading the file behind the fd)."""

    def __init__(self, fail_peer=None):
        self.mapped = {}
        self.fail_peer = fail_peer

    def open_peer_xla_memory(self, buffer_id, peer, fd, size):
        if peer == self.fail_peer:
            raise RuntimeError("cuMemImportFromShareableHandle failed: CUDA_ERROR_INVALID_VALUE")
        self.mapped[peer] = (os.pread(fd, 64, 0).decode(), size)


def run_ranks(monkeypatch, num_ranks, exported, extensions, seq):
    """Runs the exchange on every rank; exported[r] is False where rank r could not export."""
    store = FakeKV()
    monkeypatch.setattr(runtime, "_kv_client", lambda: store)
    files = []
    for r in range(num_ranks):
        f = tempfile.TemporaryFile()
        f.write(f"pool of rank {r}".encode())
        f.flush()
        files.append(f)

    def rank(r):
        fd = files[r].fileno() if exported[r] else -1
        note = "" if exported[r] else f"rank {r}'s XLA memory cannot be exported: no handle"
        return runtime._exchange_xla_memory(extensions[r], 5, seq, r, num_ranks, fd, 1000 + r, note, 20.0)

    results = run_threads(num_ranks, rank)
    for f in files:
        f.close()
    return results


def test_every_rank_maps_every_peer(monkeypatch):
    num_ranks = 4
    extensions = [FakeExtension() for _ in range(num_ranks)]
    results = run_ranks(monkeypatch, num_ranks, [True] * num_ranks, extensions, seq=1000)
    assert results == {r: (True, "") for r in range(num_ranks)}
    for r, ext in enumerate(extensions):
        assert ext.mapped == {p: (f"pool of rank {p}", 1000 + p) for p in range(num_ranks) if p != r}


@pytest.mark.parametrize("case", ["a rank cannot export", "a rank cannot map a peer"])
def test_one_failure_turns_zero_copy_off_everywhere(monkeypatch, case):
    num_ranks = 3
    exported = [True, case != "a rank cannot export", True]
    extensions = [FakeExtension(fail_peer=0 if (r == 2 and case == "a rank cannot map a peer") else None)
                  for r in range(num_ranks)]
    results = run_ranks(monkeypatch, num_ranks, exported, extensions, seq=2000 + len(case))
    assert all(ok is False for ok, _ in results.values()), results
    if case == "a rank cannot export":
        assert results[1][1] == "rank 1's XLA memory cannot be exported: no handle"
        assert "received the XLA memory of 1 of its 2 peers" in results[0][1]
        assert 1 not in extensions[0].mapped and extensions[0].mapped[2][0] == "pool of rank 2"
    else:
        assert results[2][1].startswith("rank 2 cannot map rank 0's XLA memory")
        assert results[0][1] == results[2][1]  # the others report the first failing rank's reason


IMPOSTOR = """
import array, socket, struct, sys, tempfile
name, claimed = sys.argv[1], int(sys.argv[2])
f = tempfile.TemporaryFile()
f.write(b"forged pool")
f.flush()
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendmsg([struct.pack("<iQ", claimed, 999)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [f.fileno()]))],
          0, "\\0" + name)
"""


@pytest.mark.parametrize("claimed", [1, 2])
def test_a_process_claiming_a_peers_rank_is_not_believed(monkeypatch, claimed):
    """Another local process sends rank 0 a descriptor claiming to be rank
    `claimed` before any rank has sent: rank 1 exports nothing (so rank 0
    expects nothing from it), rank 2 does. Rank 0 maps neither forgery."""
    import json
    import subprocess
    import sys

    real_set = FakeKV.key_value_set_bytes

    def set_and_impersonate(self, key, value):
        if key.endswith("/addr/0"):  # before any peer can learn rank 0's address
            name = json.loads(value)["name"]
            subprocess.run([sys.executable, "-c", IMPOSTOR, name, str(claimed)], check=True, timeout=60)
        real_set(self, key, value)

    monkeypatch.setattr(FakeKV, "key_value_set_bytes", set_and_impersonate)
    extensions = [FakeExtension() for _ in range(3)]
    results = run_ranks(monkeypatch, 3, [True, False, True], extensions, seq=3000 + claimed)
    assert all(v != "forged pool" for v, _ in extensions[0].mapped.values()), extensions[0].mapped
    assert extensions[0].mapped == {2: ("pool of rank 2", 1002)}
    assert f"rank 0 dropped an XLA-memory descriptor that claimed to come from rank {claimed}" in results[0][1]
