"""CPU model of the internode dispatch rings (docs/internode.md), one channel,
for the schedule explorer (``explore.py``).

Ranks ``R = N * L``; rank ``(n, l)`` is ``n * L + l``. Every rank runs

* ``send (s)``: packs its tokens, in order, into one send ring per destination
  node (its own included), waiting for a free slot (RDMA credit);
* ``coord (s)``: puts completed chunks of each send ring into the matching
  receive ring on the forwarder ``(m, l_s)``, then (after a fence) advances
  that ring's tail there; a partial chunk only once the sender has finished;
* ``fwd (f, j)``, one per NVL peer ``j`` of the node: reads the receive rings
  of every source node, copies the tokens whose bitmask names ``j`` into the
  NVLink ring ``f -> (m, j)``, publishes its tail every ``nvl_chunk`` tokens,
  before it idles waiting for RDMA data, and at the end;
* ``fcoord (f)``: returns RDMA credits (the receive ring's head, written into
  the sender's memory) in whole chunks: the head it writes is the tokens every
  forwarder warp has passed, rounded down to a multiple of ``rdma_chunk``, or
  the whole stream once it is complete;
* ``recv (d)``: copies what the NVLink rings from its node's forwarders hold
  into its output and returns their heads.

Every ring slot carries the sequence number of the token it holds; the model
asserts that a writer only overwrites a slot every reader has passed (safety),
that a reader finds the token it expects, and that every rank receives
exactly the tokens routed to it. The explorer reports deadlocks.
"""

from __future__ import annotations

import dataclasses
import types


@dataclasses.dataclass(frozen=True)
class RingConfig:
    """Tokens per chunk and per ring of each leg (one channel)."""

    rdma_chunk: int
    rdma_ring: int
    nvl_chunk: int
    nvl_ring: int


def streams(tokens, num_nodes, ranks_per_node):
    """tokens[s]: list of destination-rank sets, one per token of rank s.

    Returns {(s, m): [(t, nvl_mask), ...]}: the tokens rank s sends to node m, in order.
    """
    out = {}
    for s, toks in enumerate(tokens):
        for m in range(num_nodes):
            out[(s, m)] = []
        for t, dests in enumerate(toks):
            for m in range(num_nodes):
                mask = sum(1 << (d % ranks_per_node) for d in dests if d // ranks_per_node == m)
                if mask:
                    out[(s, m)].append((t, mask))
    return out


def dispatch_model(tokens, num_nodes: int, ranks_per_node: int, cfg: RingConfig):
    """A ``make`` for the explorer: the dispatch of ``tokens`` (see ``streams``)."""
    nn, el = num_nodes, ranks_per_node
    r = nn * el
    st = streams(tokens, nn, el)

    def make():
        sh = types.SimpleNamespace(
            send_slot={k: [None] * cfg.rdma_ring for k in st},
            recv_slot={k: [None] * cfg.rdma_ring for k in st},
            recv_passed={k: [el] * cfg.rdma_ring for k in st},  # forwarder warps past the slot's token
            send_tail={k: 0 for k in st}, issued={k: 0 for k in st},
            rdma_tail={k: 0 for k in st}, rdma_head={k: 0 for k in st},
            sender_done=[False] * r,
            fwd_head={(f, j, n): 0 for f in range(r) for j in range(el) for n in range(nn)},
            nvl_slot={(f, j): [None] * cfg.nvl_ring for f in range(r) for j in range(el)},
            nvl_read={(f, j): [True] * cfg.nvl_ring for f in range(r) for j in range(el)},
            nvl_tail={(f, j): 0 for f in range(r) for j in range(el)},
            nvl_head={(f, j): 0 for f in range(r) for j in range(el)},
            received={d: [] for d in range(r)},
        )

        def send(s):
            for t, dests in enumerate(tokens[s]):
                for m in range(nn):
                    if not any(d // el == m for d in dests):
                        continue
                    key = (s, m)
                    yield _wait(lambda: sh.send_tail[key] - sh.rdma_head[key] < cfg.rdma_ring, f"rdma credit {key}")
                    i = sh.send_tail[key]
                    prev = sh.send_slot[key][i % cfg.rdma_ring]
                    assert prev is None or prev[2] < sh.issued[key], f"send slot of {key} overwritten before its put"
                    sh.send_slot[key][i % cfg.rdma_ring] = st[key][i] + (i,)
                    sh.send_tail[key] = i + 1
                    yield
            sh.sender_done[s] = True

        def issuable(s, m):
            avail = sh.send_tail[(s, m)] - sh.issued[(s, m)]
            return avail >= cfg.rdma_chunk or (sh.sender_done[s] and avail > 0)

        def coord(s):
            keys = [(s, m) for m in range(nn)]
            while True:
                yield _wait(lambda: any(issuable(*k) for k in keys)
                            or (sh.sender_done[s] and all(sh.issued[k] == len(st[k]) for k in keys)), "chunk")
                ready = [k for k in keys if issuable(*k)]
                if not ready:
                    return
                key = ready[0]
                lo = sh.issued[key]
                hi = lo + min(sh.send_tail[key] - lo, cfg.rdma_chunk)
                for i in range(lo, hi):  # the put lands
                    slot = i % cfg.rdma_ring
                    assert sh.recv_passed[key][slot] == el, f"receive slot of {key} overwritten before it was read"
                    sh.recv_slot[key][slot] = sh.send_slot[key][slot]
                    sh.recv_passed[key][slot] = 0
                sh.issued[key] = hi
                yield  # fence, then the tail
                sh.rdma_tail[key] = hi

        def fwd(f, j):
            m, l = divmod(f, el)
            srcs = [(n, (n * el + l, m)) for n in range(nn)]
            tail = 0  # written, not yet published
            while any(sh.fwd_head[(f, j, n)] < len(st[k]) for n, k in srcs):
                avail = [(n, k) for n, k in srcs if sh.fwd_head[(f, j, n)] < sh.rdma_tail[k]]
                if not avail:
                    sh.nvl_tail[(f, j)] = tail  # publish before idling
                    yield _wait(lambda: any(sh.fwd_head[(f, j, n)] < sh.rdma_tail[k] for n, k in srcs)
                                or all(sh.fwd_head[(f, j, n)] == len(st[k]) for n, k in srcs), "rdma data")
                    continue
                for n, k in avail:
                    i = sh.fwd_head[(f, j, n)]
                    tok = sh.recv_slot[k][i % cfg.rdma_ring]
                    assert tok is not None and tok[2] == i, f"forwarder {f} read a stale slot of {k}"
                    if tok[1] >> j & 1:
                        yield _wait(lambda: tail - sh.nvl_head[(f, j)] < cfg.nvl_ring, f"nvl credit {(f, j)}")
                        slot = tail % cfg.nvl_ring
                        assert sh.nvl_read[(f, j)][slot], f"nvl slot {(f, j)} overwritten before it was read"
                        sh.nvl_slot[(f, j)][slot] = (k[0], tok[0], tail)
                        sh.nvl_read[(f, j)][slot] = False
                        tail += 1
                        if tail - sh.nvl_tail[(f, j)] >= cfg.nvl_chunk:
                            sh.nvl_tail[(f, j)] = tail
                    sh.recv_passed[k][i % cfg.rdma_ring] += 1
                    sh.fwd_head[(f, j, n)] = i + 1
                    yield
            sh.nvl_tail[(f, j)] = tail

        def fcoord(f):
            m, l = divmod(f, el)
            keys = [(n, (n * el + l, m)) for n in range(nn)]
            returned = [0] * nn

            def passed(n):
                return min(sh.fwd_head[(f, j, n)] for j in range(el))

            def credit(n, k):
                # Whole chunks only (on the ring's chunk grid); the rest once the stream is complete.
                h = passed(n)
                return h if h == len(st[k]) else h - h % cfg.rdma_chunk

            def due(n, k):
                return credit(n, k) > returned[n]

            while any(returned[n] < len(st[k]) for n, k in keys):
                yield _wait(lambda: any(due(n, k) for n, k in keys), "forwarders")
                for n, k in keys:
                    if due(n, k):
                        returned[n] = credit(n, k)
                        sh.rdma_head[k] = returned[n]  # a remote write into the sender's memory
                yield

        def recv(d):
            m, j = divmod(d, el)
            rings = [(m * el + l, j) for l in range(el)]
            want = sorted((s, t) for s in range(r) for t, dests in enumerate(tokens[s]) if d in dests)
            while len(sh.received[d]) < len(want):
                yield _wait(lambda: any(sh.nvl_head[q] < sh.nvl_tail[q] for q in rings), "nvl data")
                for q in rings:
                    head = sh.nvl_head[q]
                    if head < sh.nvl_tail[q]:
                        src, t, seq = sh.nvl_slot[q][head % cfg.nvl_ring]
                        assert seq == head, f"rank {d} read a stale slot of {q}"
                        sh.received[d].append((src, t))
                        sh.nvl_read[q][head % cfg.nvl_ring] = True
                        sh.nvl_head[q] = head + 1
                        break
                yield
            assert sorted(sh.received[d]) == want, f"rank {d} received {sorted(sh.received[d])}, wants {want}"

        # Ranks with nothing to send, forward or receive run no process (fewer states to explore).
        procs = {}
        for s in range(r):
            m, l = divmod(s, el)
            if tokens[s]:
                procs[f"send{s}"] = send(s)
                procs[f"coord{s}"] = coord(s)
            if any(st[(n * el + l, m)] for n in range(nn)):
                procs[f"fcoord{s}"] = fcoord(s)
                for j in range(el):
                    procs[f"fwd{s}.{j}"] = fwd(s, j)
            if any(s in dests for toks in tokens for dests in toks):
                procs[f"recv{s}"] = recv(s)
        return sh, procs

    return make


def combine_model(tokens, num_nodes: int, ranks_per_node: int, cfg: RingConfig):
    """A ``make`` for the explorer: the combine back along the dispatch of ``tokens``.

    * ``nsend (d, l)``: rank ``d = (m, j)`` sends one row per token of
      forwarder ``(m, l)``'s table that it received (its rows of the token
      summed), in table order, into the NVLink ring ``d -> (m, l)``; publishes
      its tail every ``nvl_chunk`` rows and at the end;
    * ``reduce (f)``: walks its table in order; for each token waits for the
      row of every rank in the token's bitmask at the head of that rank's ring,
      returns those heads, and writes the partial sum into the RDMA send ring
      to the token's source (one per source node), once a slot is free;
    * ``coord (f)``: puts whole chunks of each send ring into the receive ring
      on the source (a partial chunk once the reducer is done), then the tail;
    * ``rrecv (s)``: takes its tokens in order, for each the partial of every
      node the token went to at the head of that node's ring, and returns
      credits (the head, written into the forwarder's memory) on the chunk
      grid, or all of them once the ring's stream is complete.
    """
    nn, el = num_nodes, ranks_per_node
    r = nn * el
    st = streams(tokens, nn, el)
    # Forwarder f = (m, l)'s table: (source node, token, bitmask), by source node then token.
    table = {f: [(n, t, mask) for n in range(nn) for t, mask in st[(n * el + f % el, f // el)]] for f in range(r)}
    rkeys = [(f, n) for f in range(r) for n in range(nn)]  # RDMA ring forwarder f -> source (n, l_f)
    rlen = {(f, n): len(st[(n * el + f % el, f // el)]) for f, n in rkeys}
    nkeys = [(d, f) for d in range(r) for f in range(r) if d // el == f // el]  # NVLink ring d -> f

    def make():
        sh = types.SimpleNamespace(
            nvl_slot={k: [None] * cfg.nvl_ring for k in nkeys}, nvl_read={k: [True] * cfg.nvl_ring for k in nkeys},
            nvl_tail={k: 0 for k in nkeys}, nvl_head={k: 0 for k in nkeys},
            send_slot={k: [None] * cfg.rdma_ring for k in rkeys}, recv_slot={k: [None] * cfg.rdma_ring for k in rkeys},
            recv_read={k: [True] * cfg.rdma_ring for k in rkeys},
            send_tail={k: 0 for k in rkeys}, issued={k: 0 for k in rkeys},
            rdma_tail={k: 0 for k in rkeys}, rdma_head={k: 0 for k in rkeys},
            reduce_done=[False] * r, combined={s: [] for s in range(r)},
        )

        def nsend(d, f):
            key = (d, f)
            rows = [(n, t) for n, t, mask in table[f] if mask >> (d % el) & 1]
            tail = 0
            for n, t in rows:
                yield _wait(lambda: tail - sh.nvl_head[key] < cfg.nvl_ring, f"nvl credit {key}")
                slot = tail % cfg.nvl_ring
                assert sh.nvl_read[key][slot], f"nvl slot {key} overwritten before it was read"
                sh.nvl_slot[key][slot] = (n, t, tail)
                sh.nvl_read[key][slot] = False
                tail += 1
                if tail - sh.nvl_tail[key] >= cfg.nvl_chunk:
                    sh.nvl_tail[key] = tail
                yield
            sh.nvl_tail[key] = tail

        def reduce(f):
            m = f // el
            for n, t, mask in table[f]:
                for j in range(el):
                    if mask >> j & 1:
                        q = (m * el + j, f)
                        yield _wait(lambda: sh.nvl_head[q] < sh.nvl_tail[q], f"row of {t} from {q[0]}")
                        head = sh.nvl_head[q]
                        got = sh.nvl_slot[q][head % cfg.nvl_ring]
                        assert got == (n, t, head), f"forwarder {f} found {got} for token {(n, t)}"
                        sh.nvl_read[q][head % cfg.nvl_ring] = True
                        sh.nvl_head[q] = head + 1
                key = (f, n)
                yield _wait(lambda: sh.send_tail[key] - sh.rdma_head[key] < cfg.rdma_ring, f"rdma credit {key}")
                i = sh.send_tail[key]
                prev = sh.send_slot[key][i % cfg.rdma_ring]
                assert prev is None or prev[1] < sh.issued[key], f"send slot of {key} overwritten before its put"
                sh.send_slot[key][i % cfg.rdma_ring] = (t, i)
                sh.send_tail[key] = i + 1
                yield
            sh.reduce_done[f] = True

        def issuable(k):
            avail = sh.send_tail[k] - sh.issued[k]
            return avail >= cfg.rdma_chunk or (sh.reduce_done[k[0]] and avail > 0)

        def coord(f):
            keys = [(f, n) for n in range(nn)]
            while True:
                yield _wait(lambda: any(issuable(k) for k in keys)
                            or (sh.reduce_done[f] and all(sh.issued[k] == rlen[k] for k in keys)), "chunk")
                ready = [k for k in keys if issuable(k)]
                if not ready:
                    return
                key = ready[0]
                lo = sh.issued[key]
                hi = lo + min(sh.send_tail[key] - lo, cfg.rdma_chunk)
                for i in range(lo, hi):
                    slot = i % cfg.rdma_ring
                    assert sh.recv_read[key][slot], f"receive slot of {key} overwritten before it was read"
                    sh.recv_slot[key][slot] = sh.send_slot[key][slot]
                    sh.recv_read[key][slot] = False
                sh.issued[key] = hi
                yield  # fence, then the tail
                sh.rdma_tail[key] = hi

        def rrecv(s):
            n, l = divmod(s, el)
            heads = {m: 0 for m in range(nn)}
            for t, dests in enumerate(tokens[s]):
                for m in sorted({d // el for d in dests}):
                    key = (m * el + l, n)
                    yield _wait(lambda: heads[m] < sh.rdma_tail[key], f"partial of {t} from node {m}")
                    got = sh.recv_slot[key][heads[m] % cfg.rdma_ring]
                    assert got == (t, heads[m]), f"rank {s} found {got} for token {t} from node {m}"
                    sh.recv_read[key][heads[m] % cfg.rdma_ring] = True
                    heads[m] += 1
                    h = heads[m]
                    credit = h if h == rlen[key] else h - h % cfg.rdma_chunk
                    if credit > sh.rdma_head[key]:
                        sh.rdma_head[key] = credit  # a remote write into the forwarder's memory
                sh.combined[s].append(t)
                yield
            assert sh.combined[s] == list(range(len(tokens[s])))

        procs = {}
        for f in range(r):
            if table[f]:
                procs[f"reduce{f}"] = reduce(f)
                procs[f"coord{f}"] = coord(f)
        for d, f in nkeys:
            if any(mask >> (d % el) & 1 for _, _, mask in table[f]):
                procs[f"nsend{d}>{f}"] = nsend(d, f)
        for s in range(r):
            if tokens[s]:
                procs[f"rrecv{s}"] = rrecv(s)
        return sh, procs

    return make


def _wait(cond, label):
    from explore import wait

    return wait(cond, label)
