"""An executable model of the low-latency count/flag protocol with masked
ranks (cuda/low_latency_dispatch.cu: send_kernel / wait_counts_kernel for the
dispatch; cuda/low_latency_combine.cu: flag_combine_peers / wait_flags_kernel
for the combine), explored over random schedules on CPU.

Each rank runs calls 1..N of one kind (dispatch and combine each have their
own call counter and slots, and the same shape). A call publishes a count to
every peer it does not skip, in half call % 2 of the peer's slots, then waits
for every such peer's count. A rank skips a peer that is
masked in that call, and every peer when it is masked itself. A failed rank
stops before some call and is masked from then on. Checked in every schedule:
the surviving ranks finish every call (no rank waits for one that will never
publish), a slot is never overwritten before its reader read it, no rank
writes to a rank after it stopped, and each value read is the one sent for
that call. Without the skip the same model deadlocks, which shows it can.

A call also writes, before its counts, its signature hash into every peer it
does not skip (publish_call / publish_signature), and a rank that fails raises
the abort word (raise_abort) in itself and every rank it does not skip; a rank
that finds its abort word raised leaves (block_aborted, wait_until). Checked
too: neither write reaches a stopped rank, and a masked rank that fails does
not stop the others (they still finish every call). The ablations
``sig_to_all`` / ``abort_to_all`` write to every rank, as the kernels once did.
"""

import random

import pytest


class Model:
    def __init__(self, num_ranks, calls, failed=None, fail_at=None, masked_from=None, honour_mask=True,
                 raiser=None, sig_to_all=False, abort_to_all=False):
        self.R, self.calls = num_ranks, calls
        self.failed, self.fail_at = failed, fail_at  # rank `failed` stops before call `fail_at`
        self.masked_from = masked_from if masked_from is not None else fail_at  # first call it is masked in
        self.honour_mask = honour_mask
        self.raiser = raiser  # (rank, call): that rank fails at the start of that call and raises the abort
        self.sig_to_all, self.abort_to_all = sig_to_all, abort_to_all
        self.halves = 2
        # slots[kind][dest][half][src] = (call, value, read)
        self.slots = {"count": [[[None] * num_ranks for _ in range(2)] for _ in range(num_ranks)]}
        self.abort = [None] * num_ranks  # the raiser in each rank's abort word
        self.finished = set()  # ranks that ran every call
        self.errors = []

    def masked(self, rank, call):
        return self.honour_mask and rank == self.failed and call >= self.masked_from

    def skipped(self, me, peer, call):
        return self.masked(peer, call) or self.masked(me, call)

    def alive(self, rank, call):
        return rank != self.failed or self.fail_at is None or call < self.fail_at

    def rank(self, me):
        """A generator: each `yield` is one atomic step; it yields False while waiting."""
        for call in range(1, self.calls + 1):
            if not self.alive(me, call) or self.abort[me] is not None:  # stopped, or block_aborted
                return
            if self.raiser == (me, call):  # fail(): raise_abort, then return
                for dest in range(self.R):
                    if dest != me and self.skipped(me, dest, call) and not self.abort_to_all:
                        continue
                    if not self.alive(dest, call):
                        self.errors.append(f"rank {me} raised the abort in stopped rank {dest} in call {call}")
                    if self.abort[dest] is None:
                        self.abort[dest] = me
                    yield True
                return
            for dest in range(self.R):  # publish_call: the signature hash, before the counts
                if self.skipped(me, dest, call) and not self.sig_to_all:
                    continue
                if not self.alive(dest, call):
                    self.errors.append(f"rank {me} wrote its signature to stopped rank {dest} in call {call}")
                yield True
            for kind in ("count",):
                half = call % self.halves
                for dest in range(self.R):  # publish
                    if self.skipped(me, dest, call):
                        continue
                    if not self.alive(dest, call):
                        self.errors.append(f"rank {me} wrote to stopped rank {dest} in call {call}")
                    old = self.slots[kind][dest][half][me]
                    if old is not None and not old[2] and not self.skipped(dest, me, old[0]):
                        self.errors.append(f"rank {me} overwrote call {old[0]}'s {kind} at rank {dest} unread")
                    self.slots[kind][dest][half][me] = (call, (me, call), False)
                    yield True
                for src in range(self.R):  # wait
                    if self.skipped(me, src, call):
                        continue
                    while True:
                        slot = self.slots[kind][me][half][src]
                        if slot is not None and slot[0] == call:
                            break
                        if self.abort[me] is not None:  # wait_until polls the abort word
                            return
                        yield False
                    if slot[1] != (src, call):
                        self.errors.append(f"rank {me} read {slot[1]} as rank {src}'s call {call}")
                    self.slots[kind][me][half][src] = (slot[0], slot[1], True)
                    yield True
        self.finished.add(me)

    def run(self, rng, max_steps=100000):
        live = {r: self.rank(r) for r in range(self.R)}
        idle = 0
        for _ in range(max_steps):
            if not live:
                return True
            r = rng.choice(sorted(live))
            try:
                progressed = next(live[r])
            except StopIteration:
                del live[r]
                idle = 0
                continue
            idle = 0 if progressed else idle + 1
            if idle > 50 * self.R:  # every live rank only waits: a deadlock
                return False
        return False


CONFIGS = [
    dict(num_ranks=2, calls=6, failed=1, fail_at=3),
    dict(num_ranks=4, calls=8, failed=2, fail_at=4),
    dict(num_ranks=4, calls=8, failed=0, fail_at=4, masked_from=2),  # masked two calls before it stops
    dict(num_ranks=8, calls=6, failed=7, fail_at=1),  # gone from the start
    dict(num_ranks=4, calls=6),  # nobody masked
]


@pytest.mark.parametrize("config", CONFIGS)
def test_survivors_finish_and_nothing_is_overwritten(config):
    rng = random.Random(repr(config))
    for _ in range(100):
        model = Model(**config)
        assert model.run(rng), f"deadlock in {config}"
        assert not model.errors, model.errors[:3]


def test_the_model_detects_waiting_for_a_stopped_rank():
    rng = random.Random(0)
    model = Model(num_ranks=4, calls=6, failed=2, fail_at=3, honour_mask=False)
    assert not model.run(rng)


def test_the_model_detects_an_early_overwrite():
    """With one half instead of two a fast sender overwrites an unread count."""

    rng = random.Random(1)
    found = False
    for _ in range(200):
        model = Model(num_ranks=4, calls=8, failed=2, fail_at=4)
        model.halves = 1
        model.run(rng)
        found |= any("unread" in e for e in model.errors)
    assert found


def survivors(model):
    gone = {model.failed} if model.failed is not None else set()
    if model.raiser is not None:
        gone.add(model.raiser[0])
    return set(range(model.R)) - gone


# (config, whether the others must finish): a masked rank that fails stops
# nobody; a survivor that fails stops the others through the abort words.
FAILING = [
    (dict(num_ranks=4, calls=6, failed=0, fail_at=5, masked_from=2, raiser=(0, 3)), True),
    (dict(num_ranks=4, calls=6, failed=2, fail_at=2, raiser=(1, 4)), False),
    (dict(num_ranks=2, calls=5, failed=1, fail_at=2, raiser=(0, 3)), False),
]


@pytest.mark.parametrize("config,others_finish", FAILING)
def test_signature_and_abort_never_reach_a_skipped_rank(config, others_finish):
    rng = random.Random(repr(config))
    for _ in range(100):
        model = Model(**config)
        assert model.run(rng), f"deadlock in {config}"
        assert not model.errors, model.errors[:3]
        if others_finish:
            assert survivors(model) <= model.finished, (config, model.finished)


def test_the_model_detects_writes_to_skipped_ranks():
    """As the kernels once did: the signature and the abort go to every rank,
    so survivors write into a stopped rank, and a masked rank that fails
    stops the survivors."""
    rng = random.Random(2)
    model = Model(num_ranks=4, calls=6, failed=2, fail_at=2, sig_to_all=True)
    model.run(rng)
    assert any("signature to stopped rank" in e for e in model.errors), model.errors
    model = Model(num_ranks=4, calls=6, failed=2, fail_at=2, raiser=(1, 4), abort_to_all=True)
    model.run(rng)
    assert any("abort in stopped rank" in e for e in model.errors), model.errors
    model = Model(num_ranks=4, calls=6, failed=0, fail_at=5, masked_from=2, raiser=(0, 3), abort_to_all=True)
    assert model.run(rng)
    assert not survivors(model) <= model.finished
