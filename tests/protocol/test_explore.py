"""The schedule explorer finds what it must on textbook models."""

import types

from explore import count_failures, explore_exhaustive, explore_random, wait


def opposite_locks():
    """Two processes take two locks in opposite orders: deadlocks in some schedules."""
    s = types.SimpleNamespace(owner=[None, None])

    def proc(name, first, second):
        yield wait(lambda: s.owner[first] is None, f"lock {first}")
        s.owner[first] = name
        yield wait(lambda: s.owner[second] is None, f"lock {second}")
        s.owner[second] = name
        yield
        s.owner[second] = s.owner[first] = None

    return s, {"a": proc("a", 0, 1), "b": proc("b", 1, 0)}


def racy_counter():
    """Load then store in separate steps: increments get lost."""
    s = types.SimpleNamespace(count=0)

    def inc():
        v = s.count
        yield
        s.count = v + 1

    def check():
        yield wait(lambda: s.count >= 1)  # something happened
        yield wait(lambda: done[0] == 2, "both done")
        assert s.count == 2, f"count {s.count}"

    done = [0]

    def tracked():
        yield from inc()
        done[0] += 1

    return s, {"p": tracked(), "q": tracked(), "check": check()}


def ordered_locks():
    """The same two locks, taken in one order by both: never deadlocks."""
    s = types.SimpleNamespace(owner=[None, None], entered=0)

    def proc(name):
        for _ in range(2):
            yield wait(lambda: s.owner[0] is None, "lock 0")
            s.owner[0] = name
            yield wait(lambda: s.owner[1] is None, "lock 1")
            s.owner[1] = name
            s.entered += 1
            yield
            s.owner[1] = s.owner[0] = None

    return s, {"a": proc("a"), "b": proc("b")}


def test_exhaustive_finds_the_deadlock():
    r = explore_exhaustive(opposite_locks)
    assert r.kind == "deadlock", r
    assert set(r.blocked) == {"a", "b"}


def test_exhaustive_finds_the_lost_update():
    r = explore_exhaustive(racy_counter)
    assert r.kind == "violation" and "count 1" in r.message, r


def test_exhaustive_proves_the_safe_model():
    r = explore_exhaustive(ordered_locks, invariant=lambda s: None)
    assert r.ok, r
    assert r.states > 10


def test_invariant_violation_is_reported():
    def inv(s):
        assert s.entered < 2, "entered twice"

    r = explore_exhaustive(ordered_locks, invariant=inv)
    assert r.kind == "violation" and "entered twice" in r.message


def test_random_schedules():
    assert explore_random(ordered_locks, runs=50).ok
    assert 0 < count_failures(opposite_locks, runs=50) < 50
