"""A model of the low-latency put protocol (cuda/ll_put_dispatch.cu,
cuda/ll_put_combine.cu, cuda/transport.cuh), for the explorer in explore.py.

Each rank, call after call, sends its messages for a call into half
``call % 2`` of every peer and then receives that call. A message to a peer
in another node is a put-with-signal: the network delivers its data, and
only then adds 1 to the (source, half) word at the receiver; deliveries of
different puts happen in any order (a proxy transport or IBGDA over several
queue pairs orders nothing without a fence). After its messages the sender
issues one more signal, ``final(count)``, which may overtake them. The
receiver of a half waits until every source's word reads "done" (all of the
count's messages and the final signal arrived), takes the count from the
word, reads the data, and sets the word back to 0. A rank sends call n + 1
only after receiving call n, which needed every peer's call n, which each
peer sent after receiving call n - 1: so a half is written again only after
its reader reset it, and a put's source (the sender's own staging half) is
rewritten only after the put was delivered.

Peers in the sender's own node take the pointer path: stores, then a
release add of the same values, at once (modelled as one step).

The kernels keep one word per (local expert, source) in the dispatch and one
per source in the combine; each word is a channel of this model, with the
rows counted on it.

Masked ranks (the call's rank mask): no rank writes to or waits for a
masked rank, and a masked rank that still runs writes to and waits for no
one (its routing is all -1), so a dead masked rank stops nobody and no word
changes after its reader reset it.

Faults (ll_put.cuh: detail::wait_done, fail, raise_abort, block_aborted):
``stop=(rank, call)`` stops a rank before it sends that call (crashed, or
making other calls). Every wait polls its word, the rank's abort word and a
timeout; the whole system gets ``timeouts`` timeouts (one: once a rank timed
out, every other rank must leave through the abort words alone, within a
bounded number of its own steps, not after its own timeout). A rank whose
wait timed out records it and raises the abort in every rank that is not
masked: a store for itself and its pointer peers, a signal set for put peers,
delivered by the network later and in any order, overwriting (so two ranks
failing at once may each be named). A rank whose wait saw the abort records
"aborted" naming the raiser; every send and receive checks the abort word at
entry. Checked: no rank stays blocked, every running rank ends with a
record, nobody completes the stopped call, an "aborted" record names a rank
that timed out. ``use_abort=False`` (nobody told) blocks.

Call signatures (ll_put.cuh: detail::send_signature, signature_agrees).
Before its messages a sender puts its signature of the call into a slot of
every peer that no call's shapes move, with a signal of its own on a fixed
word (``final(0)``); the receiver waits for that word first, reads the
signature, resets the word and compares. ``mismatch=(rank, call)`` makes
that rank sign that call differently: every running rank must end with a
record (a mismatch, or "aborted" naming a rank that recorded a failure),
nobody completes the call, and no receiver reads a stale signature (one of
an earlier call in the same half). ``signal_signature=False`` (the
signature put without a signal, read once the data words are done) reads
stale signatures.

``final`` and ``decode`` are the arithmetic of cuda/transport.cuh
(signal_final_value, signal_done / signal_count).
"""

from __future__ import annotations

import types

from explore import wait

MASK = (1 << 64) - 1
DONE = 1 << 63
TIMEOUT, ABORTED, MISMATCH = "timeout", "aborted", "mismatch"


def final(count: int) -> int:
    """The last signal of a (source, half) word: with ``count`` adds of 1
    (one per message), the word becomes ``DONE | count << 32`` exactly."""
    return (DONE + (count << 32) - count) & MASK


def decode(word: int):
    """(done, count): done once the final signal and all ``count`` messages arrived."""
    done = bool(word & DONE) and (word & 0xFFFFFFFF) == 0
    return done, (word >> 32) & 0x7FFFFFFF


def count_of(src: int, dst: int, call: int, max_msgs: int) -> int:
    """Messages from src to dst in a call (deterministic, includes zeros)."""
    return (src + 2 * dst + call) % (max_msgs + 1)


def make_model(num_ranks=2, calls=3, ranks_per_node=1, max_msgs=1, halves=2, count_arrivals=True,
               reset_words=True, masked=(), masked_alive=False, skip_masked=True, stop=None, timeouts=0,
               use_abort=True, mismatch=None, signal_signature=True, signatures=True):
    """(shared, processes) for the explorer.

    Broken variants for the tests: ``halves=1`` (no alternation),
    ``count_arrivals=False`` (the receiver trusts the final signal to come
    after the data, as it would with ordered delivery), ``reset_words=False``,
    ``skip_masked=False`` (the survivors still wait for a masked rank).
    ``masked``: the masked ranks, which run only with ``masked_alive``.
    ``stop``, ``timeouts``, ``use_abort``: the faults above; ``mismatch``,
    ``signal_signature``: the call signatures above; ``signatures=False``:
    none sent or checked (hash 0, JAX_EP_CALL_SIGNATURES=0), which keeps the
    exhaustive explorations of the other rules small.
    """
    r_ = range(num_ranks)
    s = types.SimpleNamespace(
        # slots[dst][half][src][k]: the tag (src, call, k) of the message there
        slots=[[[[None] * max_msgs for _ in r_] for _ in range(halves)] for _ in r_],
        words=[[[0] * num_ranks for _ in range(halves)] for _ in r_],  # words[dst][half][src]
        stage=[[[None] * max_msgs for _ in range(halves)] for _ in r_],  # stage[src][half][k]: the put source
        sig_slots=[[[None] * num_ranks for _ in range(halves)] for _ in r_],  # [dst][half][src]: (src, call, sig)
        sig_words=[[[0] * num_ranks for _ in range(halves)] for _ in r_],     # [dst][half][src]
        sig_stage=[[None] * halves for _ in r_],                              # [src][half]: the put source
        issued=set(),       # ops handed to the network: (src, dst, call, k) or (..., "F")
        received=[0] * num_ranks,  # calls each rank has received
        abort=[None] * num_ranks,   # (code, raiser) in each rank's abort word
        record=[None] * num_ranks,  # (code, peer): what each rank recorded
        finished=[False] * num_ranks,
        timeouts=timeouts,
    )

    def same_node(a, b):
        return a // ranks_per_node == b // ranks_per_node

    def skips(me, peer):  # ll_put.cuh: detail::skips
        return skip_masked and (me in masked or peer in masked)

    def add(dst, half, src, value):
        s.words[dst][half][src] = (s.words[dst][half][src] + value) & MASK

    def fail(me, code, peer):
        """detail::fail: record (first wins), then raise the abort unless aborted."""
        if s.record[me] is None:
            s.record[me] = (code, peer)
        if code == ABORTED or not use_abort:
            return
        for dst in r_:  # raise_abort: every rank not masked, this one too
            if dst != me and dst in masked:
                continue
            if same_node(me, dst):  # a store, kept only if the word is still clear
                if s.abort[dst] is None:
                    s.abort[dst] = (code, me)
            else:  # a signal set: the network delivers it later
                s.issued.add((me, dst, "abort"))
            yield

    def entry_aborted(me):  # detail::block_aborted at a kernel's entry
        if s.abort[me] is None:
            return False
        if s.record[me] is None:
            s.record[me] = (ABORTED, s.abort[me][1])
        return True

    def rank(me):
        yield from run_calls(me)
        s.finished[me] = True

    def signature(me, call):
        return "other" if mismatch == (me, call) else "same"

    def receive_signature(me, call, half, src):
        """detail::signature_agrees: wait for src's signature word (with the
        signal), read the signature, reset the word, compare. False: failed."""
        if signal_signature:
            yield wait(lambda: (decode(s.sig_words[me][half][src])[0] or s.abort[me] is not None
                                or s.timeouts > 0), f"rank {me} call {call} signature of {src}")
            if not decode(s.sig_words[me][half][src])[0]:
                if s.abort[me] is not None:
                    yield from fail(me, ABORTED, s.abort[me][1])
                else:
                    s.timeouts -= 1
                    yield from fail(me, TIMEOUT, src)
                return False
        got = s.sig_slots[me][half][src]
        assert got is not None and got[:2] == (src, call), (
            f"rank {me} call {call}: stale signature from {src}: {got}")
        s.sig_words[me][half][src] = 0
        yield
        if got[2] != signature(me, call):
            yield from fail(me, MISMATCH, src)
            return False
        return True

    def run_calls(me):
        for call in range(calls):
            half = call % halves
            if stop == (me, call):
                return
            if entry_aborted(me):
                return
            # Send: the signature first (block 0 of the send kernel), then the
            # messages, built in the own staging half and handed out.
            s.sig_stage[me][half] = (me, call, signature(me, call))
            for dst in r_:
                if skips(me, dst) or not signatures:
                    continue
                if same_node(me, dst):  # stores, then the release add
                    s.sig_slots[dst][half][me] = s.sig_stage[me][half]
                    if signal_signature:
                        s.sig_words[dst][half][me] = (s.sig_words[dst][half][me] + final(0)) & MASK
                else:
                    s.issued.add((me, dst, call, "S"))
                yield
            for dst in r_:
                if skips(me, dst):
                    continue
                n = count_of(me, dst, call, max_msgs)
                for k in range(n):
                    s.stage[me][half][k] = (me, call, k)
                    if same_node(me, dst):  # pointer path: store, then release add
                        s.slots[dst][half][me][k] = (me, call, k)
                        if count_arrivals:
                            add(dst, half, me, 1)
                    else:
                        s.issued.add((me, dst, call, k))
                if same_node(me, dst):
                    add(dst, half, me, final(n) if count_arrivals else DONE | n << 32)
                else:
                    s.issued.add((me, dst, call, "F"))
                yield
            # Receive: every source's signature (unless it is read after the
            # data, the broken variant), then wait for every source's word,
            # then read, then reset.
            if entry_aborted(me):
                return
            for src in r_:
                if signatures and signal_signature and not skips(me, src) and not (
                        yield from receive_signature(me, call, half, src)):
                    return
            for src in r_:
                if skips(me, src):
                    continue
                yield wait(lambda src=src: (decode(s.words[me][half][src])[0] or s.abort[me] is not None
                                            or s.timeouts > 0), f"rank {me} call {call} from {src}")
                if decode(s.words[me][half][src])[0]:  # ready is polled first
                    continue
                if s.abort[me] is not None:
                    yield from fail(me, ABORTED, s.abort[me][1])
                else:
                    s.timeouts -= 1
                    yield from fail(me, TIMEOUT, src)
                return
            for src in r_:
                if signatures and not signal_signature and not skips(me, src) and not (
                        yield from receive_signature(me, call, half, src)):
                    return
            for src in r_:
                if skips(me, src):
                    continue
                _, n = decode(s.words[me][half][src])
                want = count_of(src, me, call, max_msgs)
                assert n == want, f"rank {me} call {call}: count {n} from {src}, want {want}"
                for k in range(n):
                    got = s.slots[me][half][src][k]
                    assert got == (src, call, k), f"rank {me} call {call}: slot {k} from {src} holds {got}"
                yield
            if reset_words:
                for src in r_:
                    s.words[me][half][src] = 0
            s.received[me] = call + 1
            yield

    def deliver(src, dst, call, k):
        """One network operation: waits until issued (or its sender finished
        without issuing it), then lands."""
        half = call % halves
        yield wait(lambda: (src, dst, call, k) in s.issued or s.finished[src], "not issued")
        if (src, dst, call, k) not in s.issued:
            return
        if k == "S":  # the signature, then (with it) its signal
            s.sig_slots[dst][half][src] = s.sig_stage[src][half]
            yield
            if signal_signature:
                s.sig_words[dst][half][src] = (s.sig_words[dst][half][src] + final(0)) & MASK
            return
        if k == "F":
            n = count_of(src, dst, call, max_msgs)
            add(dst, half, src, final(n) if count_arrivals else DONE | n << 32)
            return
        s.slots[dst][half][src][k] = s.stage[src][half][k]  # data first (read from the source now) ...
        yield
        if count_arrivals:
            add(dst, half, src, 1)  # ... then its signal

    def deliver_abort(src, dst):
        """The signal set of src's abort at put peer dst (it overwrites)."""
        yield wait(lambda: (src, dst, "abort") in s.issued or s.finished[src], "abort not issued")
        if (src, dst, "abort") in s.issued:
            s.abort[dst] = (TIMEOUT, src)

    def check():
        yield wait(lambda: all(s.finished[r] for r in running), "every rank finished")
        fault = stop or mismatch
        if fault is None:
            return
        for r in running:
            if stop is not None and r == stop[0]:
                continue
            assert s.record[r] is not None, f"rank {r} finished without a record: {s.record}"
            assert s.received[r] <= fault[1], f"rank {r} completed call {fault[1]}, which rank {fault[0]} " \
                                              f"{'never sent' if stop else 'made differently'}"
            code, peer = s.record[r]
            if code == ABORTED:
                assert s.record[peer] is not None and s.record[peer][0] in (TIMEOUT, MISMATCH), (
                    f"rank {r}'s abort names rank {peer}, which did not fail: {s.record}")

    running = [r for r in r_ if masked_alive or r not in masked]
    for r in r_:
        s.finished[r] = r not in running
    procs = {f"rank{r}": rank(r) for r in running}
    for src in running:
        for dst in r_:
            if same_node(src, dst) or skips(src, dst):
                continue
            for call in range(calls):
                for k in list(range(count_of(src, dst, call, max_msgs))) + ["F"] + ["S"] * signatures:
                    procs[f"net{src}>{dst}.{call}.{k}"] = deliver(src, dst, call, k)
            if (timeouts or mismatch) and use_abort:
                procs[f"abort{src}>{dst}"] = deliver_abort(src, dst)
    procs["check"] = check()
    return s, procs
