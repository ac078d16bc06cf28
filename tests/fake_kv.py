"""A stand-in for the jax.distributed key-value client, and ranks as threads.

The CPU tests of the exchanges between ranks (buffer agreement, IPC handles,
XLA memory, host names, NVSHMEM unique ids, teardown) run R ranks as threads of
one process that share one FakeKV."""

import threading


class FakeKV:
    """The calls of the jax.distributed client that jax_ep uses, over a dict.

    Both the str and the bytes variants of set/get share one table. A key set
    twice fails the test (the real exchanges write each key once). A get that
    times out raises a generic RuntimeError naming DEADLINE_EXCEEDED, as the
    real client does. wait_at_barrier waits for num_ranks arrivals under a
    name; with num_ranks=None it returns at once.
    """

    def __init__(self, num_ranks=None):
        self.num_ranks = num_ranks
        self.data = {}
        self.arrived = {}
        self.changed = threading.Condition()

    def key_value_set(self, key, value):
        with self.changed:
            assert key not in self.data, f"{key} set twice"
            self.data[key] = value
            self.changed.notify_all()

    def key_value_set_bytes(self, key, value):
        self.key_value_set(key, value)

    def blocking_key_value_get(self, key, timeout_ms):
        with self.changed:
            if not self.changed.wait_for(lambda: key in self.data, timeout_ms / 1000):
                raise RuntimeError(f"DEADLINE_EXCEEDED: {key}")
            return self.data[key]

    def blocking_key_value_get_bytes(self, key, timeout_ms):
        return self.blocking_key_value_get(key, timeout_ms)

    def wait_at_barrier(self, name, timeout_ms):
        if self.num_ranks is None:
            return
        with self.changed:
            self.arrived[name] = self.arrived.get(name, 0) + 1
            self.changed.notify_all()
            if not self.changed.wait_for(lambda: self.arrived[name] >= self.num_ranks, timeout_ms / 1000):
                raise RuntimeError(f"DEADLINE_EXCEEDED: barrier {name}")


def run_threads(ranks, fn):
    """fn(rank) for every rank in `ranks` (an int R means range(R)), each on
    its own thread; returns {rank: fn's result, or the exception it raised}.
    A thread still running after 60 s fails the test."""
    ranks = range(ranks) if isinstance(ranks, int) else ranks
    results = {}

    def rank(r):
        try:
            results[r] = fn(r)
        except Exception as e:  # noqa: BLE001 (the test inspects it)
            results[r] = e

    threads = [threading.Thread(target=rank, args=(r,)) for r in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    return results
