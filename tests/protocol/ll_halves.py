"""Model of the low-latency protocol of cuda/low_latency_*.cu: two alternating
buffer halves, per-call counts and flags (low_latency.cuh has the argument).

Each rank runs `calls` calls of one kind in stream order (send n, receive n,
send n + 1, ...: ``check_order`` refuses any other order). Call n uses half
``n % 2``. Three variants, each a faithful step list of its kernels:

* ``"push"``, the pushed dispatch: ``send_kernel`` writes the rank's messages
  into every destination's half (one step per destination), then its last
  block publishes the counts (``dispatch_counts``, a serial word per
  (expert, source)); ``wait_counts_kernel`` waits for every source's count
  word of call n; ``dispatch_recv_kernel`` reads the messages and ``advance``
  ends the call.
* ``"pull"``, the pulled dispatch: ``stage_kernel`` writes the rank's
  messages and routing into its *own* half, then flags every peer
  (``pull_flags``); ``wait_staged_kernel`` waits for every source's flag;
  ``dispatch_pull_kernel`` reads every source's half.
* ``"zero_copy"``, the zero-copy combine: ``wait_flags_kernel`` publishes
  where this rank's rows lie in its XLA memory y and flags every peer
  (``combine_flags``, mode 1), waits for every peer's flag, and
  ``combine_recv_kernel`` reads the peers' y, tells every rank it is done
  (``combine_done``) and, before returning, waits until every rank is done
  with its own y (``wait_readers``): XLA may reuse y's memory after that
  (modelled by overwriting y).

Words carry the call's serial ``n mod serial_modulus`` (cuda/serial.cuh:
2^32; the model takes a small modulus to reach the wrap). ``match`` is how a
waiter recognises its call's word: ``"equal"`` (word_in_call, the kernels),
or ``"packed_ge"``, the comparison of the packed words' call numbers against
the unwrapped call that the kernels made before the serials
(``(v >> 32) >= call``), which never holds again after the wrap.

Safety checks: a half's data is never overwritten before every reader of
that call read it (a reader finds call n's data, not n + 2's or n - 2's), and
a zero-copy reader never reads y after its owner reused it.
"""

from __future__ import annotations

import types

from explore import wait

VARIANTS = ("push", "pull", "zero_copy")


def make_model(variant: str, num_ranks: int, calls: int, serial_modulus: int = 1 << 32, match: str = "equal",
               start: int = 0):
    """A model factory for explore.*; calls start + 1 .. start + calls."""
    assert variant in VARIANTS and match in ("equal", "packed_ge")
    R, S = num_ranks, serial_modulus

    def ready(word, n):
        if word is None:  # never written: holds the serial of `start` (fresh words)
            word = start % S
        return word == n % S if match == "equal" else word >= n

    def make():
        s = types.SimpleNamespace(
            # push: data[d][h][r] = the call whose messages r put in d's half h
            # pull: data[r][h][r] = the call r staged in its own half h
            data=[[[None] * R for _ in range(2)] for _ in range(R)],
            flags=[[[None] * R for _ in range(2)] for _ in range(R)],  # flags[d][h][r]: serial r sent d
            done=[[[None] * R for _ in range(2)] for _ in range(R)],  # zero copy: done[r][h][q]
            y=[None] * R,  # zero copy: the call whose rows rank r's y holds
        )

        def rank(me):
            for n in range(start + 1, start + calls + 1):
                h = n % 2
                if variant == "push":  # send_kernel
                    for d in range(R):
                        s.data[d][h][me] = n
                        yield
                    for d in range(R):  # its last block publishes the counts
                        s.flags[d][h][me] = n % S
                    yield
                elif variant == "pull":  # stage_kernel
                    s.data[me][h][me] = n
                    yield
                    for d in range(R):
                        s.flags[d][h][me] = n % S
                    yield
                else:  # wait_flags_kernel, zero copy: publish y, flag every rank
                    s.y[me] = n
                    for d in range(R):
                        s.flags[d][h][me] = n % S
                    yield
                for r in range(R):  # wait_counts_kernel / wait_staged_kernel / wait_flags_kernel
                    yield wait(lambda: ready(s.flags[me][h][r], n), f"call {n}: word of rank {r}")
                for r in range(R):  # dispatch_recv_kernel / dispatch_pull_kernel / combine_recv_kernel
                    if variant == "push":
                        got = s.data[me][h][r]
                    elif variant == "pull":
                        got = s.data[r][h][r]
                    else:
                        got = s.y[r]
                    assert got == n, f"rank {me}, call {n}: read rank {r}'s data of call {got}"
                    yield
                if variant == "zero_copy":  # combine_recv_kernel's last block
                    for q in range(R):
                        s.done[q][h][me] = n % S
                    yield
                    for q in range(R):
                        yield wait(lambda: ready(s.done[me][h][q], n), f"call {n}: rank {q} done reading")
                    s.y[me] = -n  # the call returned: XLA may reuse y's memory
                    yield

        return s, {f"rank{r}": rank(r) for r in range(R)}

    return make
