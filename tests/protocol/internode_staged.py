"""Model of the staged internode kernels (cuda/internode.cuh): buffer halves
reused across calls of every op, rail signal words reset by their reader,
node barriers A (data ready) and B (reads done).

``R = N * L`` ranks run the same list of ops, call n in half ``n % 2``, each
as the step list of its kernels:

* ``"dispatch"``: notify_send puts a message into every rail peer's half and
  signals its notify word; notify_wait waits for the rail's words and reads
  the messages; dispatch_send puts the rank's rows into every rail peer's
  table and signals its rows word; dispatch_scan waits for the rows words,
  meets barrier A, reads its node's messages and tables and writes its
  placements (out_pos, its own); dispatch_copy reads the node's tables;
  dispatch_finish meets barrier B, reads the node's placements and resets
  its rail words.
* ``"cached"``: cached_send puts rows into the rail's tables; cached_wait
  waits for the rows words, barrier A; cached_copy reads the node's tables;
  cached_finish meets barrier B and resets its words.
* ``"combine"``: combine_stage writes the rank's rows (its own half);
  barrier A; combine_reduce reads the node's staged rows and puts partials
  into the rail's receive rows, signalling their words; combine_wait meets
  barrier B and waits for the partials' words; combine_sum reads them;
  combine_finish resets its words.

Signal words hold the call that signalled them (None once reset); a writer
asserts the word is None (its previous use was read and reset), a reader
waits for its call. Every data read asserts it finds its own call's data
(not n - 2's or n + 2's). Each op (and each op's shapes) lays its half out
differently (cuda/internode.cuh: Layout::make), so any write into a half
may land on any region of an earlier call's layout: ``stamp[r][h]`` keeps
the latest call that wrote into rank r's half h (its own staging, a rail
peer's put), and every read of call n asserts that no later call wrote
there yet. Node barrier flags are monotonic call numbers.
``skip`` removes one step to show the model catches what it guards:
``"barrier_b"`` (a rank ends a call without waiting for its node's reads).
"""

from __future__ import annotations

import types

from explore import wait

OPS = ("dispatch", "cached", "combine")


def make_model(num_nodes: int, ranks_per_node: int, ops: tuple, skip: str | None = None):
    """A model factory for explore.*: every rank runs ``ops`` (calls 1, 2, ...)."""
    assert all(op in OPS for op in ops) and skip in (None, "barrier_b")
    N, L = num_nodes, ranks_per_node
    R = N * L

    def make():
        s = types.SimpleNamespace(
            notify=[[[None] * N for _ in range(2)] for _ in range(R)],   # notify[f][h][src node]
            table=[[[None] * N for _ in range(2)] for _ in range(R)],    # table[f][h][src node]
            recv=[[[None] * N for _ in range(2)] for _ in range(R)],     # recv[s][h][forwarder node]
            words=[[[[None] * N for _ in range(3)] for _ in range(2)] for _ in range(R)],  # [r][h][kind][node]
            out_pos=[[None] * 2 for _ in range(R)],
            y_stage=[[None] * 2 for _ in range(R)],
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
                    yield
                    touch(me, h, n)  # dispatch_send: the staged rows
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
                            read(s.table[f][h][m], n, f"rank {f}'s table rows of node {m}", f)
                        yield
                    s.out_pos[me][h] = n
                    touch(me, h, n)
                    yield
                    for f in peers:  # dispatch_copy
                        for m in range(N):
                            read(s.table[f][h][m], n, f"rank {f}'s table rows of node {m}", f)
                        yield
                    if skip != "barrier_b":  # dispatch_finish
                        yield from barrier(1, n)
                    for j in peers:
                        yield
                        read(s.out_pos[j][h], n, f"rank {j}'s placements", j)
                    for kind in (NOTIFY, ROWS):
                        for m in range(N):
                            s.words[me][h][kind][m] = None
                    yield
                elif op == "cached":
                    touch(me, h, n)  # cached_send: the staged rows
                    for f in rail:
                        s.table[f][h][node] = n
                        touch(f, h, n)
                        yield
                        signal(f, h, ROWS, n)
                    yield from wait_rail(h, ROWS, n)  # cached_wait
                    yield from barrier(0, n)
                    for f in peers:  # cached_copy
                        for m in range(N):
                            read(s.table[f][h][m], n, f"rank {f}'s table rows of node {m}", f)
                        yield
                    if skip != "barrier_b":  # cached_finish
                        yield from barrier(1, n)
                    for m in range(N):
                        s.words[me][h][ROWS][m] = None
                    yield
                else:
                    s.y_stage[me][h] = n  # combine_stage
                    touch(me, h, n)
                    yield
                    yield from barrier(0, n)  # combine_ready
                    for j in peers:  # combine_reduce
                        read(s.y_stage[j][h], n, f"rank {j}'s rows", j)
                        yield
                    touch(me, h, n)  # the partials (put sources)
                    for f in rail:
                        s.recv[f][h][node] = n
                        touch(f, h, n)
                        signal(f, h, PARTIALS, n)
                        yield
                    if skip != "barrier_b":  # combine_wait
                        yield from barrier(1, n)
                    yield from wait_rail(h, PARTIALS, n)
                    for m in range(N):  # combine_sum
                        read(s.recv[me][h][m], n, f"partials of node {m}", me)
                    yield
                    for m in range(N):  # combine_finish
                        s.words[me][h][PARTIALS][m] = None
                    yield

        return s, {f"rank{r}": rank(r) for r in range(R)}

    return make
