"""What jax_ep does when ranks disagree or fail.

Two checks keep ranks from computing garbage together:

* At creation, every rank publishes the configuration of its ``Buffer``
  (sizes, options, rank count) on the ``jax.distributed`` key-value store and
  compares it with every peer's (``first_difference``); a difference raises
  ``BufferMismatchError`` on every rank, naming both ranks and the field.
* At every communicating call (CUDA backend), each rank publishes a signature
  of the call (op, shapes, options, SM budget) beside its arrival flag; a peer
  that sees a different one fails the call.

A failed call (a peer that never arrives within ``timeout_s``, a signature
that differs, low-latency calls out of order) does not trap: the kernel that
noticed records what failed and raises an abort word in every rank, every
waiting kernel of every rank leaves at once, and the buffer is dead until
re-created. The failure reaches the program as ``CommunicationError`` (from
``Buffer.check()`` and from every later use of the buffer) and as data: the
``jax_ep.status`` op returns ``[code, rank at fault, this rank, op]``.
"""

from __future__ import annotations

import json

# Status codes (entry 0 of a status array).
STATUS_OK = 0
STATUS_TIMEOUT = 1
STATUS_OUT_OF_ORDER = 2
STATUS_MISMATCH = 3
STATUS_ABORTED = 4
STATUS_BAD_HANDLE = 5
STATUS_NAMES = {
    STATUS_OK: "ok", STATUS_TIMEOUT: "timeout", STATUS_OUT_OF_ORDER: "calls out of order",
    STATUS_MISMATCH: "mismatch", STATUS_ABORTED: "aborted", STATUS_BAD_HANDLE: "bad handle",
}


class CommunicationError(RuntimeError):
    """A communicating call failed on some rank; this buffer is unusable.

    Attributes: ``kind`` (a ``STATUS_NAMES`` value), ``rank`` (this rank),
    ``peer`` (the rank at fault: waited for, differing, or the one that
    raised the abort), ``call`` (the call number), ``message``.
    """

    def __init__(self, message: str, *, kind: str = "failure", rank: int = -1, peer: int = -1, call: int = 0):
        super().__init__(message)
        self.message, self.kind, self.rank, self.peer, self.call = message, kind, rank, peer, call


class BufferMismatchError(ValueError):
    """Ranks created different buffers (found at creation, before any call)."""

    def __init__(self, message: str, *, field: str, rank: int, peer: int, mine, theirs):
        super().__init__(message)
        self.field, self.rank, self.peer, self.mine, self.theirs = field, rank, peer, mine, theirs


def first_difference(mine: dict, theirs: dict):
    """The first field (in ``mine``'s order, then ``theirs``' extra keys)
    whose values differ: ``(field, mine_value, theirs_value)``, or None when
    the two configurations agree. A missing field reads as None."""
    for key in list(mine) + [k for k in theirs if k not in mine]:
        a, b = mine.get(key), theirs.get(key)
        if a != b:
            return key, a, b
    return None


def check_agreement(what: str, rank: int, configs: dict) -> None:
    """Raise ``BufferMismatchError`` when any rank's configuration differs
    from ``configs[rank]`` (the first such peer in rank order)."""
    mine = configs[rank]
    for peer in sorted(configs):
        if peer == rank:
            continue
        diff = first_difference(mine, configs[peer])
        if diff is not None:
            field, a, b = diff
            raise BufferMismatchError(
                f"jax_ep: rank {rank} and rank {peer} created different {what}: {field} is {a!r} on rank {rank} "
                f"and {b!r} on rank {peer}; every rank must create the same jax_ep.Buffer objects, with the same "
                f"arguments, in the same order",
                field=field, rank=rank, peer=peer, mine=a, theirs=b,
            )


def exchange_and_check(client, prefix: str, what: str, rank: int, num_ranks: int, config: dict,
                       timeout_s: float) -> None:
    """Publish this rank's ``config`` (JSON-able) under ``prefix`` on the
    key-value store, read every peer's and ``check_agreement``. Every rank
    that sees a difference raises, so no rank goes on to wait for a peer that
    will not come."""
    client.key_value_set_bytes(f"{prefix}/{rank}", json.dumps(config).encode())
    configs = {rank: json.loads(json.dumps(config))}
    for peer in range(num_ranks):
        if peer == rank:
            continue
        try:
            raw = client.blocking_key_value_get_bytes(f"{prefix}/{peer}", int(timeout_s * 1000))
        except Exception as e:  # the client raises a generic error on deadline
            raise TimeoutError(
                f"jax_ep: rank {rank} waited {timeout_s:.0f} s for rank {peer}'s {what}; every rank must create "
                f"the same jax_ep.Buffer objects in the same order"
            ) from e
        configs[peer] = json.loads(raw)
    check_agreement(what, rank, configs)


def error_from_record(record: dict) -> CommunicationError | None:
    """The ``CommunicationError`` of a buffer's failure record (``jax_ep._C.buffer_failure``), or None."""
    code = int(record.get("code", 0))
    if code == 0:
        return None
    return CommunicationError(
        record.get("message") or "jax_ep: a communicating call failed", kind=STATUS_NAMES.get(code, "failure"),
        rank=int(record.get("rank", -1)), peer=int(record.get("peer", -1)), call=int(record.get("call", 0)),
    )
