"""Model of the rank-major ring combine of cuda/intranode_combine.cu (one call).

Kernel: ``combine_kernel`` runs ``blocks`` blocks per rank; groups 0 and 1 of a
block are copiers (``ring_stage``), groups 2 and 3 reducers (``ring_reduce``),
with ``index = 2 * block + (group & 1)`` and ``count = 2 * blocks`` of each.
``launch_combine`` picks ``blocks`` and the reducer batch (``combine_launch``).

Owners are independent: copier ``index`` pushes only the stream of owner
``index % R`` and an owner's reducers read only the rings in its own buffer,
so the model is one owner with its ``R`` incoming streams:

* stream ``r`` = the owner's tokens that source ``r`` holds rows of, ascending
  (rank-major y is sorted by source then token, ``rank_major_regions``);
* ``ring_stage`` (copier ``sub`` of stream ``r``, ``per_stream = count // R``
  copiers per stream, the rest spare): publishes the region start
  (``sub == 0``), then for chunks ``j = sub, sub + per_stream, ...``: waits
  until the minimum of the owner's reducers' progress words passes the token
  of row ``(j + 1) * B - ring - 1`` (the row that last used the slots), writes
  rows ``[j B, (j + 1) B)`` into ring slots ``i % ring`` and publishes
  ``ring_flags[j % (ring / B)] = j``;
* ``ring_reduce`` (reducer ``index``): publishes ``progress[index]`` = its first
  token, waits for every region start, then for batches of ``batch`` tokens
  ``t0 = index * batch, + count * batch, ...``: waits for the flag of every
  row of the batch (``flag >= j``), reads the rows, then publishes
  ``progress[index] = t0 + count * batch``; at the end ``progress = T`` (the
  kernel's ``token_word``: tokens past the end read as 0xffffffff).

Words carry the epoch's serial in the kernel (``serial_word(epoch, value)``,
cuda/serial.cuh): a copier's wait takes a progress word of another call as 0
(``value_in_call``) and a reducer's wait takes a flag only when it is of this
call with a value of at least j (``word_reached``). One call is modelled, so a
stale word (an earlier call's) never counts: -1 here. (The serials across
calls are modelled in ll_halves.py.)

Safety checks: a copier never overwrites a ring slot whose row the owner has
not read (``ring space``), and a reducer reads in a slot exactly the row it
waited for.
"""

from __future__ import annotations

import types

from explore import wait

INF = 1 << 32


def routing_dense(num_ranks: int, num_tokens: int):
    """Every token of the owner has a row at every source (the longest streams)."""
    return [list(range(num_tokens)) for _ in range(num_ranks)]


def routing_shifted(num_ranks: int, num_tokens: int, shift: int):
    """Every token from `shift` on has a row at every source: row i holds token
    i + shift, so batches and chunks fall out of step."""
    return [list(range(shift, num_tokens)) for _ in range(num_ranks)]


def make_model(streams, num_tokens: int, blocks: int, batch: int, chunk_rows: int, ring_rows: int):
    """A model factory for explore.*: streams[r] = the owner's tokens with a row at source r."""
    R, T, B, ring = len(streams), num_tokens, chunk_rows, ring_rows
    assert ring % B == 0 and ring >= B
    count = 2 * blocks
    per_stream = count // R
    nslots = ring // B

    def make():
        s = types.SimpleNamespace(
            region=[False] * R,
            flags=[[-1] * nslots for _ in range(R)],
            ring=[[None] * ring for _ in range(R)],  # row index held by each slot
            read=[[False] * len(streams[r]) for r in range(R)],
            progress=[-1] * count,
        )

        def ring_stage(r, sub):
            rows = len(streams[r])
            if sub == 0:
                s.region[r] = True
                yield
            for j in range(sub, (rows + B - 1) // B, per_stream):
                reuse = (j + 1) * B - ring
                if reuse > 0:
                    need = streams[r][reuse - 1] + 1
                    yield wait(lambda: min(s.progress) >= need, f"ring space, stream {r} chunk {j}")
                for i in range(j * B, min((j + 1) * B, rows)):
                    old = s.ring[r][i % ring]
                    assert old is None or s.read[r][old], (
                        f"stream {r}: row {i} overwrites row {old} before the owner read it"
                    )
                    s.ring[r][i % ring] = i
                s.flags[r][j % nslots] = j  # (publish: after the group's writes)
                yield

        def ring_reduce(index):
            def word(t):
                return t if t < T else INF

            s.progress[index] = word(index * batch)
            yield wait(lambda: all(s.region), "region starts")
            t0 = index * batch
            while t0 < T:
                rows = [
                    (r, streams[r].index(t))
                    for t in range(t0, min(t0 + batch, T))
                    for r in range(R)
                    if t in streams[r]
                ]
                yield wait(
                    lambda: all(s.flags[r][(i // B) % nslots] >= i // B for r, i in rows),
                    f"rows of tokens {t0}..{min(t0 + batch, T) - 1}",
                )
                for r, i in rows:  # the sums read the rows
                    assert s.ring[r][i % ring] == i, f"stream {r}: slot of row {i} holds {s.ring[r][i % ring]}"
                    s.read[r][i] = True
                s.progress[index] = word(t0 + count * batch)  # (after the group's barrier)
                yield
                t0 += count * batch
            s.progress[index] = word(T)

        procs = {}
        for index in range(per_stream * R):  # spare copiers do nothing
            procs[f"copy{index % R}.{index // R}"] = ring_stage(index % R, index // R)
        for index in range(count):
            procs[f"reduce{index}"] = ring_reduce(index)
        return s, procs

    return make


def launch_shape(num_ranks: int, num_sms: int, chunk_rows: int, ring_rows: int) -> tuple[int, int]:
    """(blocks, batch) of launch_combine, from the compiled extension."""
    from jax_ep import _extension

    return tuple(_extension._C.combine_launch_shape(num_ranks, num_sms, chunk_rows, ring_rows))
