"""Model of the ring pipeline of internode normal mode (docs/internode.md,
"Rings and flow control"), role for role, for the schedule explorer.

``R = N * L`` ranks run the same list of calls; call ``n`` (1, 2, ...) uses
buffer half ``n % 2``. Channel ``c`` holds tokens ``[c * Tc, (c + 1) * Tc)``.
Per rank and channel one process per warp role ("slot"); a slot plays a
dispatch role in dispatch calls and a combine role in combine calls:

* dispatch: ``pack<w>`` (packer warps, tokens ``w, w + P, ...`` of the
  channel; per destination node: wait for send-ring space, write the slot,
  count the chunk), ``scoord`` (source coordinator: chunks of each node in
  order, put + flag SET ``tag(call, k + 1)`` once complete; advances the credit
  bases at the end), ``fcoord`` (forwarder coordinator: credit = min of the
  node's tagged heads, signal ADD of the increase into the source's credit
  word), ``recv<w>`` (receiver warps: poll owned streams round-robin, take
  each stream's chunks in order, copy rows naming the rank, store the tagged
  head in the forwarder's memory);
* combine: ``nvl<f>`` (NVLink sender warp per forwarder of the node: tail
  published every ``nvl_chunk`` rows, before waiting, and at the end),
  ``red<w>`` (reducer warps, batches of ``min(warps, nvl_ring)`` rows, tagged
  heads after each batch; RDMA send ring with credits as in dispatch),
  ``rcoord`` (RDMA coordinator, as ``scoord``), ``rrecv<w>`` (RDMA receiver
  warps of the source, tokens striding), ``credit`` (returns consumed chunks
  in order by signal ADD, the last partial chunk at the stream's end).

Puts (with their flag SET) and signal ADDs are messages: ``net<x>`` delivers
the oldest message to rank ``x`` and ``rot<x>`` moves the oldest to the back,
so messages arrive in any order and ADDs may arrive during a later call. The
rail exchange and node barriers of every call are abstracted as one barrier:
no slot starts call ``n + 1`` before every slot of every rank ended call ``n``
(messages in flight are not waited for).

Credit words are cumulative per (rank, half, channel, peer node) over every
call that used them; ``base`` advances by the stream length at the end of a
call. Tagged words hold ``(call + 1) << 32 | value``; another call's tag reads 0.

Checks: no ring slot (send, receive, NVLink) is overwritten before every
reader passed it (a send slot's reader is its put); every read finds the
token it expects; every rank receives exactly its tokens; every source sums
exactly one partial per node of each token, of exactly that node's ranks;
every chunk counter counts exactly its chunk's rows; every credit word ends
at its base. ``bugs`` breaks one rule to show the checks bite.
"""

from __future__ import annotations

import dataclasses
import itertools
import types

from explore import wait

MASK = (1 << 32) - 1
BUGS = ("packer_ahead", "credit_max", "head_untagged", "flag_untagged", "no_base")


def tag(call: int, value: int) -> int:
    """A tagged word: the call in the upper 32 bits, so another call's word never matches."""
    return (call + 1) << 32 | value


@dataclasses.dataclass(frozen=True)
class RingConfig:
    """Sizes of one configuration (tokens) and warps per role, per channel.

    batch: the reducer's batch; None: min(reducers, nvl_ring) as the kernels.
    node_capacity: Cn, table rows of a forwarder (None: never drops).
    """

    rdma_chunk: int
    rdma_ring: int
    nvl_chunk: int
    nvl_ring: int
    channels: int = 1
    packers: int = 2
    receivers: int = 2
    reducers: int = 2
    batch: int | None = None
    node_capacity: int | None = None
    reorder: bool = True


def plan(tokens, num_nodes: int, ranks_per_node: int, channels: int, node_capacity=None):
    """The streams of one routing. tokens[s][t]: set of destination ranks (T per rank).

    Returns {(f, c, n): [(row i, token t, local mask), ...]}: stream (c, source
    (n, l_f) -> forwarder f), in table order; rows >= node_capacity dropped.
    """
    nn, el = num_nodes, ranks_per_node
    t_all = len(tokens[0])
    assert all(len(toks) == t_all for toks in tokens), "every rank has T tokens"
    tc = max(-(-t_all // channels), 1)
    out = {(f, c, n): [] for f in range(nn * el) for c in range(channels) for n in range(nn)}
    for f in range(nn * el):
        m, fl = divmod(f, el)
        i = 0
        for n in range(nn):
            for t, dests in enumerate(tokens[n * el + fl]):
                mask = tuple(sorted(d % el for d in dests if d // el == m))
                if not mask:
                    continue
                if node_capacity is None or i < node_capacity:
                    out[(f, t // tc, n)].append((i, t, mask))
                i += 1
    return out


class _Plan:
    """One call's streams and the indices the roles derive from them (an object,
    not a dict, so that the explorer does not copy it into every state)."""

    def __init__(self, tokens, nn, el, channels, node_capacity):
        self.streams = st = plan(tokens, nn, el, channels, node_capacity)
        self.t = len(tokens[0])
        self.tc = max(-(-self.t // channels), 1)
        # index[(s, c, m)]: {token: stream index} of source s's stream to node m
        self.index = {(n * el + f % el, c, f // el): {t: q for q, (_, t, _) in enumerate(rows)}
                      for (f, c, n), rows in st.items()}
        # table[(f, c)]: channel c's rows of f's table in order, (n, q, i, t, mask)
        self.table = {(f, c): [(n, q, i, t, mask) for n in range(nn) for q, (i, t, mask) in enumerate(st[(f, c, n)])]
                      for f in range(nn * el) for c in range(channels)}
        # pos[(f, c, jl)]: {table row: position in the NVLink ring (jl -> f)}
        self.pos = {(f, c, jl): {i: p for p, i in enumerate(r[2] for r in rows if jl in r[4])}
                    for (f, c), rows in self.table.items() for jl in range(el)}


def alternate(routings):
    """dispatch, combine of each routing in turn: [(op, tokens), ...]."""
    return [(op, r) for r in routings for op in ("dispatch", "combine")]


def make_model(calls, num_nodes: int, ranks_per_node: int, cfg: RingConfig, bugs=()):
    """A model factory for explore.*: every rank runs ``calls`` = [(op, tokens), ...],
    op "dispatch" (or "cached": the same payload kernel) or "combine" (back along
    the dispatch of ``tokens``)."""
    assert set(bugs) <= set(BUGS) and all(op in ("dispatch", "cached", "combine") for op, _ in calls)
    N, L, C = num_nodes, ranks_per_node, cfg.channels
    R = N * L
    RC, RR, NC, NR = cfg.rdma_chunk, cfg.rdma_ring, cfg.nvl_chunk, cfg.nvl_ring
    NCK = max(RR // RC, 1)
    P, W, RW = cfg.packers, cfg.receivers, cfg.reducers
    batch = cfg.batch or min(RW, NR)
    plans = [_Plan(tok, N, L, C, cfg.node_capacity) for _, tok in calls]
    dispatch_roles = [f"pack{w}" for w in range(P)] + ["scoord", "fcoord"] + [f"recv{w}" for w in range(W)]
    combine_roles = ([f"nvl{f}" for f in range(L)] + [f"red{w}" for w in range(RW)] + ["rcoord"]
                     + [f"rrecv{w}" for w in range(P)] + ["credit"])
    nslots = max(len(dispatch_roles), len(combine_roles))

    def chan(c, p):  # channel c's tokens in the call of plan p
        return range(c * p.tc, min((c + 1) * p.tc, p.t))

    def owned(d, c, w):  # a receiver warp's streams (forwarder local index, source node)
        return [s for i, s in enumerate(itertools.product(range(L), range(N))) if i % W == w]

    def has_work(x, c, name, p):
        """Whether role ``name`` of rank x, channel c moves anything in the call
        of plan p (idle roles take no step: fewer states to explore)."""
        node, el = divmod(x, L)
        st = p.streams
        to = [len(st[(m * L + el, c, node)]) for m in range(N)]  # x's streams as a source
        into = [len(st[(x, c, n)]) for n in range(N)]           # x's streams as a forwarder
        if name.startswith("pack") or name.startswith("rrecv"):
            w = int(name[4:] if name[0] == "p" else name[5:])
            return any(t in p.index[(x, c, m)] for t in chan(c, p)[w::P] for m in range(N))
        if name in ("scoord", "credit"):
            return any(to)
        if name in ("fcoord", "rcoord") or name.startswith("red"):
            return any(into)
        if name.startswith("recv"):
            return any(st[(node * L + fl, c, n)] for fl, n in owned(x, c, int(name[4:])))
        return bool(p.pos[(node * L + int(name[3:]), c, el)])  # nvl<f>

    work = [[[[calls[k][0] != "combine" and s < len(dispatch_roles) and has_work(x, c, dispatch_roles[s], plans[k])
               or calls[k][0] == "combine" and s < len(combine_roles) and has_work(x, c, combine_roles[s], plans[k])
               for k in range(len(calls))] for s in range(nslots)] for c in range(C)] for x in range(R)]
    # Slots with work in call k (the barrier after call k waits for them).
    busy = [sum(work[x][c][s][k] for x in range(R) for c in range(C) for s in range(nslots)) for k in range(len(calls))]

    def make():
        sh = types.SimpleNamespace(
            send={}, recv={},  # rings: key -> slots; send slot [content, put delivered], recv [content, passed, readers]
            flag={}, word={}, base={}, count={}, used={},  # sparse: a missing word is 0
            dhead={}, nvl={}, ntail={}, nhead={}, bsync={},
            net=[[] for _ in range(R)], finished=[0] * len(calls), checked=0, got={}, out={},
        )

        def ring(d, key, size):
            if key not in d:
                d[key] = [None] * size
            return d[key]

        def untag(word, call, bug=False):
            return word & MASK if bug or word >> 32 == call + 1 else 0

        def flag_reached(key, call, k):
            word = sh.flag.get(key + (k % NCK,), 0)
            return (word & MASK) >= k + 1 if "flag_untagged" in bugs else word >= tag(call, k + 1)

        def write_send(key, q, content):
            slots = ring(sh.send, key, RR)
            old = slots[q % RR]
            assert old is None or old[1], f"send slot {q % RR} of {key} overwritten before its put ({old[0]})"
            slots[q % RR] = [content, False]
            ck = key[:1] + key[2:] + ((q // RC) % NCK,)
            sh.count[ck] = sh.count.get(ck, ()) + (q,)

        def credit_space(key, base, q):
            slack = RR + 1 if "packer_ahead" in bugs else RR
            return q - (sh.word.get(key, 0) - (0 if "no_base" in bugs else base)) < slack

        def in_order(lens, ready, act, label):
            """Chunks of each stream in order, whichever stream's next one is ready."""
            nxt = {m: 0 for m in lens}
            while any(nxt[m] * RC < lens[m] for m in lens):
                yield wait(lambda: any(nxt[m] * RC < lens[m] and ready(m, nxt[m]) for m in lens), label)
                for m in lens:
                    if nxt[m] * RC < lens[m] and ready(m, nxt[m]):
                        act(m, nxt[m], min(RC, lens[m] - nxt[m] * RC))
                        nxt[m] += 1

        def chunk_rows(counts, ck, k, size):
            return len(counts.get(ck, ())) == size and sorted(counts[ck]) == list(range(k * RC, k * RC + size))

        def coordinator(x, c, call, lens, dest, readers):
            """Source coordinator (dispatch) / RDMA coordinator (combine) of rank x."""
            h, me = call % 2, x // L

            def ready(m, k):
                return len(sh.count.get((x, c, m, k % NCK), ())) == min(RC, lens[m] - k * RC)

            def issue(m, k, size):
                ck = (x, c, m, k % NCK)
                assert chunk_rows(sh.count, ck, k, size), f"rank {x}: chunk {k} to node {m} counted {sh.count[ck]}"
                sh.count[ck] = ()
                sh.net[dest(m)].append(("put", (x, h, c, m), (dest(m), h, c, me), k, size, call, readers))

            yield from in_order(lens, ready, issue, "complete chunks")
            for m in lens:
                sh.base[(x, h, c, m)] = sh.base.get((x, h, c, m), 0) + lens[m]

        def packer(x, c, w, call, p):
            h = call % 2
            base = [sh.base.get((x, h, c, m), 0) for m in range(N)]
            for t in chan(c, p)[w::P]:
                for m in range(N):
                    if t not in p.index[(x, c, m)]:
                        continue
                    q, key = p.index[(x, c, m)][t], (x, h, c, m)
                    yield wait(lambda: credit_space(key, base[m], q), f"credit {key} for row {q}")
                    write_send(key, q, ("d", call, x, t, q))

        def fcoord(f, c, call, p):
            m_me, el = divmod(f, L)
            h = call % 2
            lens = {n: len(p.streams[(f, c, n)]) for n in range(N)}
            sent = {n: 0 for n in range(N)}
            pick = max if "credit_max" in bugs else min

            def credit(n):
                return pick(untag(sh.dhead.get((f, h, c, n, j), 0), call, "head_untagged" in bugs) for j in range(L))

            while any(sent[n] < lens[n] for n in lens):
                yield wait(lambda: any(credit(n) > sent[n] for n in lens), "heads of the node")
                for n in lens:
                    if credit(n) > sent[n]:
                        sh.net[n * L + el].append(("add", (n * L + el, h, c, m_me), credit(n) - sent[n]))
                        sent[n] = credit(n)

        def receiver(d, c, w, call, p):
            m_me, jl = divmod(d, L)
            h = call % 2
            mine = owned(d, c, w)
            nxt = [0] * len(mine)
            rr = 0

            def left(i):
                fl, n = mine[i]
                return nxt[i] * RC < len(p.streams[(m_me * L + fl, c, n)])

            def ready(i):
                fl, n = mine[i]
                return left(i) and flag_reached((m_me * L + fl, h, c, n), call, nxt[i])

            while any(left(i) for i in range(len(mine))):
                yield wait(lambda: any(ready(i) for i in range(len(mine))), "chunk flags")
                i = next((rr + i) % len(mine) for i in range(len(mine)) if ready((rr + i) % len(mine)))
                rr = (i + 1) % len(mine)
                fl, n = mine[i]
                f, k = m_me * L + fl, nxt[i]
                rows = p.streams[(f, c, n)]
                hi = min((k + 1) * RC, len(rows))
                for q in range(k * RC, hi):
                    _, t, mask = rows[q]
                    slot = ring(sh.recv, (f, h, c, n), RR)[q % RR]
                    want = ("d", call, n * L + fl, t, q)
                    assert slot is not None and slot[0] == want, (
                        f"rank {d} found {slot and slot[0]} in slot {q % RR} of {(f, h, c, n)}, expected {want}")
                    slot[1] += 1
                    if jl in mask:
                        sh.got.setdefault(d, []).append((n * L + fl, t))
                nxt[i] = k + 1
                sh.dhead[(f, h, c, n, jl)] = tag(call, hi)  # into f's memory, after the copies

        def nvl_sender(j, c, fl, call, p):
            m, jl = divmod(j, L)
            f, h = m * L + fl, call % 2
            key = (f, h, c, jl)
            rows = sorted(p.pos[(f, c, jl)], key=p.pos[(f, c, jl)].get)
            for at, i in enumerate(rows):
                def space():
                    return at - untag(sh.nhead.get((j, h, c, fl), 0), call) < NR
                if not space():
                    sh.ntail[key] = tag(call, at)  # publish before waiting
                    yield wait(space, f"nvl space {key} for {at}")
                slots = ring(sh.nvl, key, NR)
                old = slots[at % NR]
                assert old is None or old[1], f"nvl slot {at % NR} of {key} overwritten before it was read ({old[0]})"
                slots[at % NR] = [("n", call, i, j), False]
                if (at + 1) % NC == 0:
                    sh.ntail[key] = tag(call, at + 1)
                yield
            sh.ntail[key] = tag(call, len(rows))

        def reducer(f, c, w, call, p):
            m, fl = divmod(f, L)
            h = call % 2
            base = [sh.base.get((f, h, c, n), 0) for n in range(N)]
            nrows = len(p.table[(f, c)])
            for b, b0 in enumerate(range(0, nrows, batch)):
                if w < batch and b0 + w < nrows:
                    n, q, i, t, mask = p.table[(f, c)][b0 + w]
                    for jl in mask:  # ascending local rank
                        key, at = (f, h, c, jl), p.pos[(f, c, jl)][i]
                        yield wait(lambda: untag(sh.ntail.get(key, 0), call) > at, f"nvl tail {key} past {at}")
                        slot = ring(sh.nvl, key, NR)[at % NR]
                        want = ("n", call, i, m * L + jl)
                        assert slot is not None and slot[0] == want, (
                            f"reducer {f} found {slot and slot[0]} in nvl slot {at % NR} of {key}, expected {want}")
                        slot[1] = True
                    key = (f, h, c, n)
                    yield wait(lambda: credit_space(key, base[n], q), f"credit {key} for row {q}")
                    write_send(key, q, ("c", call, f, t, q, tuple(m * L + jl for jl in mask)))
                bk = (f, c, call, b)
                sh.bsync[bk] = sh.bsync.get(bk, 0) + 1
                yield wait(lambda: sh.bsync[bk] == RW, f"batch {b}")
                if w == 0:  # heads into each sender's memory, after the batch
                    done = p.table[(f, c)][:b0 + batch]
                    for jl in range(L):
                        sh.nhead[(m * L + jl, h, c, fl)] = tag(call, sum(jl in r[4] for r in done))
                    yield

        def rdma_receiver(s, c, w, call, p):
            el = s % L
            h = call % 2
            for t in chan(c, p)[w::P]:
                for m in range(N):
                    if t not in p.index[(s, c, m)]:
                        continue
                    q, key = p.index[(s, c, m)][t], (s, h, c, m)
                    yield wait(lambda: flag_reached(key, call, q // RC), f"flag of chunk {q // RC} of {key}")
                    slot = ring(sh.recv, key, RR)[q % RR]
                    want = ("c", call, m * L + el, t, q)
                    assert slot is not None and slot[0][:5] == want, (
                        f"rank {s} found {slot and slot[0]} in slot {q % RR} of {key}, expected {want}")
                    slot[1] += 1
                    sh.out.setdefault((s, t), []).append((m, slot[0][5]))
                    ck = (s, c, m, (q // RC) % NCK)
                    sh.used[ck] = sh.used.get(ck, ()) + (q,)

        def credit_warp(s, c, call, p):
            n_me, el = divmod(s, L)
            h = call % 2
            lens = {m: len(p.streams[(m * L + el, c, n_me)]) for m in range(N)}

            def ready(m, k):
                return len(sh.used.get((s, c, m, k % NCK), ())) == min(RC, lens[m] - k * RC)

            def give(m, k, size):
                ck = (s, c, m, k % NCK)
                assert chunk_rows(sh.used, ck, k, size), f"rank {s}: consumed {sh.used[ck]} of chunk {k} from {m}"
                sh.used[ck] = ()
                sh.net[m * L + el].append(("add", (m * L + el, h, c, n_me), size))

            yield from in_order(lens, ready, give, "consumed chunks")

        def role(x, c, name, call, p):
            node, el = divmod(x, L)
            if name.startswith("pack"):
                yield from packer(x, c, int(name[4:]), call, p)
            elif name == "scoord":
                lens = {m: len(p.streams[(m * L + el, c, node)]) for m in range(N)}
                yield from coordinator(x, c, call, lens, lambda m: m * L + el, L)
            elif name == "fcoord":
                yield from fcoord(x, c, call, p)
            elif name.startswith("recv"):
                yield from receiver(x, c, int(name[4:]), call, p)
            elif name.startswith("nvl"):
                yield from nvl_sender(x, c, int(name[3:]), call, p)
            elif name.startswith("red"):
                yield from reducer(x, c, int(name[3:]), call, p)
            elif name == "rcoord":
                lens = {n: len(p.streams[(x, c, n)]) for n in range(N)}
                yield from coordinator(x, c, call, lens, lambda n: n * L + el, 1)
            elif name.startswith("rrecv"):
                yield from rdma_receiver(x, c, int(name[5:]), call, p)
            else:
                yield from credit_warp(x, c, call, p)

        def end_of_call(call, op, p):
            """Every rank received exactly its tokens / every source summed one
            partial per node of each token, of exactly that node's ranks."""
            if op == "combine":
                for s in range(R):
                    n_me, el = divmod(s, L)
                    for t in range(p.t):
                        want = sorted((m, tuple(m * L + j for j in mask)) for m in range(N)
                                      for _, tt, mask in p.streams[(m * L + el, t // p.tc, n_me)] if tt == t)
                        got = sorted(sh.out.get((s, t), []))
                        assert got == want, f"call {call}: rank {s} summed {got} for token {t}, expected {want}"
            else:
                for d in range(R):
                    m, jl = divmod(d, L)
                    want = sorted((n * L + fl, t) for fl in range(L) for c in range(C) for n in range(N)
                                  for _, t, mask in p.streams[(m * L + fl, c, n)] if jl in mask)
                    got = sorted(sh.got.get(d, []))
                    assert got == want, f"call {call}: rank {d} received {got}, wants {want}"
            sh.out, sh.got, sh.bsync = {}, {}, {}

        def ended(k):  # every slot with work in calls 0..k-1 (0-based) is past it
            return all(sh.finished[j] == busy[j] for j in range(k))

        def slot_proc(x, c, slot):
            for k, ((op, _), p) in enumerate(zip(calls, plans)):
                if not work[x][c][slot][k]:
                    continue
                call = k + 1
                yield wait(lambda: ended(k) and sh.checked == k, f"end of call {k}")
                names = combine_roles if op == "combine" else dispatch_roles
                yield from role(x, c, names[slot], call, p)
                sh.finished[k] += 1

        def all_done():
            return ended(len(calls))

        def deliver(msg):
            if msg[0] == "add":
                sh.word[msg[1]] = sh.word.get(msg[1], 0) + msg[2]
                return
            _, src, dst, k, size, call, readers = msg
            for q in range(k * RC, k * RC + size):
                old = ring(sh.send, src, RR)[q % RR]
                assert old is not None and old[0][1] == call and old[0][4] == q, (
                    f"put of chunk {k} from {src} read {old and old[0]} for row {q} of call {call}")
                slots = ring(sh.recv, dst, RR)
                prev = slots[q % RR]
                assert prev is None or prev[1] == prev[2], (
                    f"receive slot {q % RR} of {dst} overwritten before every reader passed it ({prev[0]})")
                slots[q % RR] = [old[0], 0, readers]
                old[1] = True
            sh.flag[dst + (k % NCK,)] = tag(call, k + 1)  # the put's signal, after its data

        def net(x):
            """Delivers the messages to rank x (oldest first; rot(x) reorders them)."""
            while True:
                yield wait(lambda: bool(sh.net[x]) or all_done(), f"messages to {x}")
                if not sh.net[x]:
                    for k, v in sh.word.items():
                        assert k[0] != x or v == sh.base.get(k, 0), f"credit word {k} ends at {v}, base {sh.base.get(k)}"
                    return
                deliver(sh.net[x].pop(0))

        def rot(x):
            while True:
                yield wait(lambda: len(sh.net[x]) >= 2 or all_done(), f"two messages to {x}")
                if all_done():
                    return
                sh.net[x].append(sh.net[x].pop(0))

        def checker():
            """Runs each call's end-of-call checks once every slot is past it."""
            for k, ((op, _), p) in enumerate(zip(calls, plans)):
                yield wait(lambda: ended(k + 1), f"end of call {k + 1}")
                end_of_call(k + 1, op, p)
                sh.checked = k + 1

        procs = {}
        for x in range(R):
            for c in range(C):
                for slot in range(nslots):
                    if any(work[x][c][slot]):
                        d = dispatch_roles[slot] if slot < len(dispatch_roles) else "-"
                        cb = combine_roles[slot] if slot < len(combine_roles) else "-"
                        procs[f"r{x}c{c}:{d}|{cb}"] = slot_proc(x, c, slot)
        procs["check"] = checker()
        for x in range(R):
            procs[f"net{x}"] = net(x)
            if cfg.reorder:
                procs[f"rot{x}"] = rot(x)
        return sh, procs

    return make
