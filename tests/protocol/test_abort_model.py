"""A model of how a failure stops every rank (cuda/intranode.cuh: fail,
raise_abort, wait_at_least, signature_agrees; cuda/sync.cuh: wait_until).

R ranks make N calls. In each call a rank publishes its call signature into
every peer's header, then its arrival flag (the release after the signature),
then waits for every peer's flag; the one wait helper returns when the flag is
there, when this rank's abort word is raised, or on a timeout. A rank whose
wait timed out, or whose peer's signature differs, records it and raises the
abort word in every rank (one store per rank); a rank whose wait saw the abort
records "aborted" naming the rank that raised it. Every call first checks the
abort word (a dead buffer runs nothing).

Faults: a rank that stops at call k (never arrives: crashed, or made other
calls), or a rank whose call k has another signature (another T). The whole
system gets a single timeout: once one rank timed out, every other rank must
leave through the abort words alone, i.e. within a bounded number of its own
steps rather than after its own timeout.

Checked for every schedule (exhaustively at R = 2 and 3, randomly at R = 4):
no rank stays blocked; every rank that did not stop ends with a record;
nobody completes the call where the fault is; an "aborted" record names a
rank that failed first; a rank that accepted a peer's flag saw that peer's
signature of the same call (never a stale one). Ablations show the model can
fail: without the abort word the ranks block, and a signature written after
the flag is read stale.
"""

import types

from explore import explore_exhaustive, explore_random, wait

OK, TIMEOUT, MISMATCH, ABORTED = "ok", "timeout", "mismatch", "aborted"


def abort_model(num_ranks, num_calls, stop=None, differ=None, timeouts=1, use_abort=True, sig_after_flag=False):
    """stop / differ: (rank, call) of the fault, or None."""
    R, N = num_ranks, num_calls

    def signature(rank, call):
        return 2 if differ == (rank, call) else 1  # the fields' hash; the same for every call otherwise

    s = types.SimpleNamespace(
        arrived=[[0] * R for _ in range(R)],          # arrived[r][p]: call p announced in r's header
        sig=[[[0] * R for _ in range(2)] for _ in range(R)],  # sig[r][slot][p]
        abort=[None] * R,                             # (code, raiser) in r's header
        record=[None] * R,                            # (code, peer)
        completed=[0] * R,                            # calls a rank completed
        finished=[False] * R,
        timeouts=timeouts,
    )
    published = {}  # ghost: (rank, call) -> signature it published

    def fail(me, code, peer):
        if s.record[me] is None:
            s.record[me] = (code, peer)
        if code != ABORTED and use_abort:
            for r in range(R):  # one store per rank, any interleaving
                if s.abort[r] is None:
                    s.abort[r] = (code, me)
                yield

    def rank(me):
        for n in range(1, N + 1):
            if stop == (me, n):
                s.finished[me] = True
                return
            if s.abort[me] is not None:  # block_aborted at a kernel's entry
                yield from fail(me, ABORTED, s.abort[me][1])
                break
            mine = signature(me, n)
            published[(me, n)] = mine
            for p in range(R):
                if not sig_after_flag:
                    s.sig[p][n % 2][me] = mine
                    yield
                s.arrived[p][me] = n
                yield
                if sig_after_flag:
                    s.sig[p][n % 2][me] = mine
                    yield
            failed = False
            for p in range(R):
                yield wait(lambda p=p: s.arrived[me][p] >= n or s.abort[me] is not None or s.timeouts > 0,
                           f"call {n}: flag of rank {p}")
                if s.arrived[me][p] >= n:  # ready is polled first
                    theirs = s.sig[me][n % 2][p]
                    if theirs != mine:
                        assert published[(p, n)] != mine, f"rank {me} saw a stale signature of rank {p}"
                        yield from fail(me, MISMATCH, p)
                        failed = True
                        break
                    assert published[(p, n)] == mine, f"rank {me} accepted rank {p}'s call {n} of another signature"
                elif s.abort[me] is not None:
                    yield from fail(me, ABORTED, s.abort[me][1])
                    failed = True
                    break
                else:
                    s.timeouts -= 1
                    yield from fail(me, TIMEOUT, p)
                    failed = True
                    break
            if failed:
                break
            s.completed[me] = n
        s.finished[me] = True

    def check():
        yield wait(lambda: all(s.finished), "every rank finished")
        fault = stop or differ
        for r in range(R):
            if stop is not None and r == stop[0]:
                continue
            if fault is None:
                continue
            assert s.record[r] is not None, f"rank {r} finished without a record: {s.record}"
            assert s.completed[r] < fault[1], f"rank {r} completed call {fault[1]}, where rank {fault[0]} failed"
            code, peer = s.record[r]
            if code == ABORTED:
                assert s.record[peer] is not None and s.record[peer][0] != ABORTED, (
                    f"rank {r}'s abort names rank {peer}, which did not fail first: {s.record}")

    procs = {f"rank{r}": rank(r) for r in range(R)}
    procs["check"] = check()
    return s, procs


def test_without_faults_every_call_completes():
    r = explore_exhaustive(lambda: abort_model(2, 3, timeouts=0))
    assert r.ok, r
    r = explore_exhaustive(lambda: abort_model(3, 2, timeouts=0))
    assert r.ok, r


def test_a_stopped_rank_stops_everyone_after_one_timeout():
    for stop in [(0, 1), (1, 2)]:
        r = explore_exhaustive(lambda: abort_model(2, 2, stop=stop))
        assert r.ok, (stop, r)
    for stop in [(2, 1), (0, 2)]:
        r = explore_exhaustive(lambda: abort_model(3, 2, stop=stop))
        assert r.ok, (stop, r)
        assert r.states > 500


def test_a_different_call_stops_everyone_without_a_timeout():
    for differ in [(1, 1), (0, 2)]:
        r = explore_exhaustive(lambda: abort_model(2, 3, differ=differ, timeouts=0))
        assert r.ok, (differ, r)
    r = explore_exhaustive(lambda: abort_model(3, 2, differ=(2, 2), timeouts=0))
    assert r.ok, r


def test_random_schedules_at_four_ranks():
    assert explore_random(lambda: abort_model(4, 3, stop=(3, 2)), runs=1000, seed=1).ok
    assert explore_random(lambda: abort_model(4, 3, differ=(1, 3), timeouts=0), runs=1000, seed=2).ok


def test_without_the_abort_word_the_others_block():
    """One timeout is not enough when nobody tells the peers: each would
    need its own (each rank waiting out its own 100 s, as before)."""
    r = explore_exhaustive(lambda: abort_model(3, 2, stop=(2, 1), use_abort=False))
    assert r.kind == "deadlock", r


def test_a_signature_written_after_the_flag_can_be_read_stale():
    """The signature must be written before the release that publishes the
    flag: written after it, a peer can accept call 3 with the signature of
    call 1 (same parity slot) although call 3's differs."""
    r = explore_exhaustive(lambda: abort_model(2, 3, differ=(1, 3), timeouts=0, sig_after_flag=True))
    assert r.kind == "violation" and "signature" in r.message, r
    r = explore_exhaustive(lambda: abort_model(2, 3, differ=(1, 3), timeouts=0))
    assert r.ok, r
