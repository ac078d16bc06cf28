"""Model of the internode calls' reuse of buffer halves (cuda/internode.cuh):
every op's kernels, in order, as reads and writes of the ranks' halves, the
rail signal words (reset by their reader) and node barriers A (data ready)
and B (reads done). The rings inside a call (chunks, flags, credits) are
modelled by internode_ring.py; here a call's ring traffic is its writes into
peers' halves and its reads of them.

``R = N * L`` ranks run the same list of ops, call n in half ``n % 2``:

* ``"dispatch"``: notify_send puts a message into every rail peer's half and
  signals its notify word; notify_wait waits for the rail's words, reads the
  messages and writes its stream ranges; dispatch_send puts the rank's metas
  into every rail peer's meta table and signals its rows word; dispatch_scan
  waits for the rows words, meets barrier A, reads its node's messages and
  meta tables and writes its placements (out_pos, its own); the payload
  kernel puts rows into every rail peer's receive ring and reads its node's
  receive rings, meta tables and stream ranges; dispatch_finish meets barrier
  B, reads the node's placements and resets its rail words.
* ``"cached"`` / ``"combine"`` (calls along a handle): handle_clear and
  handle_scatter write the rank's own out_pos and stream ranges;
  handle_meet signals every rail peer (the rows / partials word) and waits
  for the rail, then barrier A; the rings: a cached dispatch puts rows into
  the rail's receive rings and reads its node's; a combine writes its rows
  into its node peers' NVLink rings, reads its own and its node's stream
  ranges, puts partials into the rail's receive rings and reads its own;
  handle_end meets barrier B and resets its word.

Signal words hold the call that signalled them (None once reset); a writer
asserts the word is None (its previous use was read and reset), a reader
waits for its call. Every data read asserts it finds its own call's data
(not n - 2's or n + 2's). Each op (and each op's shapes) lays its half out
differently (cuda/internode.cuh: Layout::make), so any write into a half
may land on any region of an earlier call's layout: ``stamp[r][h]`` keeps
the latest call that wrote into rank r's half h (its own writes, a peer's
put or store), and every read of call n asserts that no later call wrote
there yet. Node barrier flags are monotonic call numbers.
A source sends rows to a forwarder only when one of its tokens goes there:
``sends(n, src, dst)`` leaves some streams of some calls empty (no rows, no
flag), so only the signal words and barriers order such a pair of ranks.
``skip`` removes one step to show the model catches what it guards:
``"barrier_b"`` (a rank ends a call without waiting for its node's reads),
``"hello"`` (a call along a handle without its rail exchange).
"""

from __future__ import annotations

import types

from explore import wait

OPS = ("dispatch", "cached", "combine")


def make_model(num_nodes: int, ranks_per_node: int, ops: tuple, skip: str | None = None):
    """A model factory for explore.*: every rank runs ``ops`` (calls 1, 2, ...)."""
    assert all(op in OPS for op in ops) and skip in (None, "barrier_b", "hello")
    N, L = num_nodes, ranks_per_node
    R = N * L

    def sends(n, src, dst):  # the stream of call n from rank src to forwarder dst carries rows
        return (n * 5 + src * 3 + dst * 7) % 4 != 0

    def make():
        s = types.SimpleNamespace(
            notify=[[[None] * N for _ in range(2)] for _ in range(R)],   # notify[f][h][src node]
            table=[[[None] * N for _ in range(2)] for _ in range(R)],    # metas: table[f][h][src node]
            ring=[[[None] * N for _ in range(2)] for _ in range(R)],     # RDMA receive rings: ring[r][h][src node]
            nvl=[[[None] * L for _ in range(2)] for _ in range(R)],      # NVLink rings: nvl[f][h][sender local]
            ranges=[[None] * 2 for _ in range(R)],
            words=[[[[None] * N for _ in range(3)] for _ in range(2)] for _ in range(R)],  # [r][h][kind][node]
            out_pos=[[None] * 2 for _ in range(R)],
            flags=[[[0] * L for _ in range(2)] for _ in range(R)],       # flags[r][phase][local]: latest call
            stamp=[[0] * 2 for _ in range(R)],                           # stamp[r][h]: latest call writing there
        )
        NOTIFY, ROWS, PARTIALS = 0, 1, 2

        def rank(me):
            node, local = divmod(me, L)
            rail = [m * L + local for m in range(N)]
            peers = [node * L + j for j in range(L)]

            def signal(f, h, kind, n):
                assert s.words[f][h][kind][node] is None, (
                    f"rank {me}, call {n}: word {kind} of rank {f} still holds call {s.words[f][h][kind][node]}")
                s.words[f][h][kind][node] = n

            def wait_rail(h, kind, n):
                for m in range(N):
                    yield wait(lambda: s.words[me][h][kind][m] == n, f"call {n}: word {kind} from node {m}")

            def barrier(phase, n):
                for j in peers:
                    s.flags[j][phase][local] = n
                yield
                for j in range(L):
                    yield wait(lambda: s.flags[me][phase][j] >= n, f"call {n}: barrier {phase}, local {j}")

            def touch(f, h, n):  # a write of call n anywhere in rank f's half h
                s.stamp[f][h] = max(s.stamp[f][h], n)

            def read(value, n, what, owner):
                assert value == n, f"rank {me}, call {n}: read {what} of call {value}"
                assert s.stamp[owner][n % 2] == n, (
                    f"rank {me}, call {n}: read {what} after call {s.stamp[owner][n % 2]} wrote into that half")

            def put_rows(h, n):  # the RDMA leg of the rings: into the receive rings of its streams
                for f in rail:
                    if sends(n, me, f):
                        s.ring[f][h][node] = n
                        touch(f, h, n)
                    yield

            def read_rows(f, h, n, metas):  # rank f's receive rings (the streams that carry rows)
                for m in range(N):
                    if not sends(n, m * L + f % L, f):
                        continue
                    yield wait(lambda: s.ring[f][h][m] is not None and s.ring[f][h][m] >= n,
                               f"call {n}: rows of node {m} at rank {f}")
                    read(s.ring[f][h][m], n, f"rank {f}'s receive ring of node {m}", f)
                    if metas:
                        read(s.table[f][h][m], n, f"rank {f}'s metas of node {m}", f)

            def end(h, n, kinds):
                if skip != "barrier_b":
                    yield from barrier(1, n)
                for kind in kinds:
                    for m in range(N):
                        s.words[me][h][kind][m] = None
                yield

            for n, op in enumerate(ops, start=1):
                h = n % 2
                if op == "dispatch":
                    touch(me, h, n)  # notify_send: the rank's own messages, masks, stream indices
                    for f in rail:
                        s.notify[f][h][node] = n
                        touch(f, h, n)
                        signal(f, h, NOTIFY, n)
                    yield
                    yield from wait_rail(h, NOTIFY, n)  # notify_wait
                    for m in range(N):
                        read(s.notify[me][h][m], n, f"notify from node {m}", me)
                    s.ranges[me][h] = n
                    touch(me, h, n)
                    yield
                    touch(me, h, n)  # dispatch_send: the staged metas
                    for f in rail:
                        s.table[f][h][node] = n
                        touch(f, h, n)
                        yield
                        signal(f, h, ROWS, n)
                    yield from wait_rail(h, ROWS, n)  # dispatch_scan
                    yield from barrier(0, n)
                    for f in peers:
                        for m in range(N):
                            read(s.notify[f][h][m], n, f"rank {f}'s notify from node {m}", f)
                            read(s.table[f][h][m], n, f"rank {f}'s metas of node {m}", f)
                        yield
                    s.out_pos[me][h] = n
                    touch(me, h, n)
                    yield
                    yield from put_rows(h, n)  # the payload kernel
                    for f in peers:
                        read(s.ranges[f][h], n, f"rank {f}'s stream ranges", f)
                        yield from read_rows(f, h, n, metas=True)
                        yield
                    yield from end(h, n, (NOTIFY, ROWS))  # dispatch_finish
                    for j in peers:
                        read(s.out_pos[j][h], n, f"rank {j}'s placements", j)
                else:
                    kind = ROWS if op == "cached" else PARTIALS
                    s.out_pos[me][h] = n  # handle_clear, handle_scatter
                    s.ranges[me][h] = n
                    touch(me, h, n)
                    yield
                    if skip != "hello":  # handle_meet
                        for f in rail:
                            signal(f, h, kind, n)
                        yield
                        yield from wait_rail(h, kind, n)
                    yield from barrier(0, n)
                    if op == "combine":  # NVLink senders: into each node peer's NVLink ring
                        for f in peers:
                            read(s.ranges[f][h], n, f"rank {f}'s stream ranges", f)
                            s.nvl[f][h][local] = n
                            touch(f, h, n)
                            yield
                        for j in range(L):  # the reducer
                            yield wait(lambda: s.nvl[me][h][j] is not None and s.nvl[me][h][j] >= n,
                                       f"call {n}: NVLink rows of local {j}")
                            read(s.nvl[me][h][j], n, f"NVLink rows of local {j}", me)
                    yield from put_rows(h, n)
                    readers = [me] if op == "combine" else peers  # whose receive rings this rank reads
                    for f in readers:
                        if op == "cached":
                            read(s.ranges[f][h], n, f"rank {f}'s stream ranges", f)
                        yield from read_rows(f, h, n, metas=False)
                        yield
                    yield from end(h, n, (kind,))

        return s, {f"rank{r}": rank(r) for r in range(R)}

    return make
