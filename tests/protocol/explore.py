"""A small schedule explorer for models of jax_ep's cross-rank wait/flag protocols.

A model is a function ``make()`` returning ``(shared, processes)``:

* ``shared``: any object whose attributes (ints, lists, dicts, tuples) are the
  memory every process sees (flags, counters, ring slots);
* ``processes``: a dict name -> generator. A process runs atomically from one
  ``yield`` to the next. It yields

  - ``None``: a scheduling point (any other process may run here);
  - ``wait(cond, label)``: block until ``cond()`` is true; the process then
    continues right after the ``yield`` in the same atomic step (a spin loop
    on a flag, modelled by its exit condition).

  A process signals a safety violation by raising ``AssertionError``.

The explorer runs schedules and reports

* **deadlock**: no process can run while some process is unfinished;
* **violation**: an ``AssertionError`` from a process or from ``invariant(shared)``;
* **depth**: a schedule longer than ``max_steps`` (a livelock, or a model bug).

``explore_exhaustive`` runs a depth-first search over every interleaving,
pruning states already seen. A state is the frozen ``vars(shared)`` with
each unfinished process's resume point and local variables (so locals must be
plain values: ints, tuples, lists; references to ``shared`` are skipped).
Generators cannot be copied, so going back to a state replays its schedule from
a fresh ``make()``: models must be deterministic. ``explore_random`` runs
random schedules (a uniformly chosen runnable process at each step), for
sizes too large to enumerate.
"""

from __future__ import annotations

import dataclasses
import random
import types
from typing import Callable

__all__ = ["Result", "Wait", "explore_exhaustive", "explore_random", "wait"]


@dataclasses.dataclass(frozen=True)
class Wait:
    """A blocking point: the process runs on only once ``cond()`` is true."""

    cond: Callable[[], bool]
    label: str = ""


def wait(cond: Callable[[], bool], label: str = "") -> Wait:
    return Wait(cond, label)


@dataclasses.dataclass
class Result:
    """Outcome of an exploration.

    kind: "ok", "deadlock", "violation" or "depth". trace: the schedule that
    led there (process names, in order). blocked: for a deadlock, each
    unfinished process's wait label. states: distinct states visited
    (exhaustive) or schedules run (random).
    """

    kind: str
    trace: list = dataclasses.field(default_factory=list)
    message: str = ""
    blocked: dict = dataclasses.field(default_factory=dict)
    states: int = 0
    runs: int = 0

    @property
    def ok(self) -> bool:
        return self.kind == "ok"

    def __str__(self) -> str:
        head = f"{self.kind} after {len(self.trace)} steps"
        if self.message:
            head += f": {self.message}"
        if self.blocked:
            head += "; blocked: " + ", ".join(f"{p} at {w!r}" for p, w in self.blocked.items())
        return head + "\n  schedule: " + " ".join(self.trace[-60:])


class _Violation(Exception):
    pass


def _freeze(value, shared_id):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if id(value) == shared_id:
        return "<shared>"
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v, shared_id) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v, shared_id)) for k, v in value.items()))
    if isinstance(value, (set, frozenset)):
        return frozenset(value)
    # Functions, closures and other objects are code, not state.
    return type(value).__name__


class _System:
    """One running instance of a model."""

    def __init__(self, make, invariant):
        self.shared, procs = make()
        self.names = list(procs)
        self.gens = [procs[n] for n in self.names]
        self.pending: list = [None] * len(self.gens)  # None: runnable; Wait; or "done"
        self.invariant = invariant

    def runnable(self) -> list[int]:
        out = []
        for i, p in enumerate(self.pending):
            if p is None or (isinstance(p, Wait) and p.cond()):
                out.append(i)
        return out

    def unfinished(self) -> dict:
        return {
            self.names[i]: (p.label if isinstance(p, Wait) else "")
            for i, p in enumerate(self.pending)
            if p != "done"
        }

    def step(self, i: int) -> None:
        try:
            got = next(self.gens[i])
        except StopIteration:
            got = "done"
        except AssertionError as e:
            raise _Violation(f"{self.names[i]}: {e}") from None
        if got is not None and got != "done" and not isinstance(got, Wait):
            raise TypeError(f"{self.names[i]} yielded {got!r}; yield None or wait(...)")
        self.pending[i] = got
        if self.invariant is not None:
            try:
                self.invariant(self.shared)
            except AssertionError as e:
                raise _Violation(f"invariant: {e}") from None

    def key(self):
        sid = id(self.shared)
        shared = _freeze(vars(self.shared) if not isinstance(self.shared, dict) else self.shared, sid)
        procs = []
        for g, p in zip(self.gens, self.pending):
            if p == "done":
                procs.append("done")
                continue
            frames = []
            while g is not None and isinstance(g, types.GeneratorType):
                f = g.gi_frame
                if f is None:
                    break
                frames.append((f.f_lasti, _freeze(dict(f.f_locals), sid)))
                g = g.gi_yieldfrom
            procs.append(tuple(frames))
        return (shared, tuple(procs))


def _replay(make, invariant, schedule) -> _System:
    s = _System(make, invariant)
    for i in schedule:
        s.step(i)
    return s


def explore_exhaustive(make, invariant=None, max_steps: int = 10_000, max_states: int = 200_000) -> Result:
    """Every interleaving of ``make()``'s processes, depth first, states deduplicated.

    Raises RuntimeError when more than ``max_states`` distinct states exist
    (the model is too large to enumerate: use explore_random).
    """
    seen: set = set()
    # Stack of (schedule prefix, runnable choices left at its end).
    system = _System(make, invariant)
    seen.add(system.key())
    stack = [([], system.runnable())]
    live: _System | None = system  # the system currently at the top prefix, if any
    while stack:
        prefix, choices = stack[-1]
        if not choices:
            stack.pop()
            live = None
            continue
        i = choices.pop()
        if live is None:
            live = _replay(make, invariant, prefix)
        names = live.names
        try:
            live.step(i)
        except _Violation as e:
            return Result("violation", [names[j] for j in prefix + [i]], str(e), states=len(seen))
        schedule = prefix + [i]
        key = live.key()
        if key in seen:
            live = None
            continue
        seen.add(key)
        if len(seen) > max_states:
            raise RuntimeError(f"more than {max_states} states: too large to enumerate")
        runnable = live.runnable()
        unfinished = live.unfinished()
        if not runnable:
            if unfinished:
                return Result("deadlock", [names[j] for j in schedule], blocked=unfinished, states=len(seen))
            live = None
            continue
        if len(schedule) >= max_steps:
            return Result("depth", [names[j] for j in schedule], f"over {max_steps} steps", states=len(seen))
        stack.append((schedule, runnable))
    return Result("ok", states=len(seen))


def explore_random(make, runs: int = 200, seed: int = 0, invariant=None, max_steps: int = 100_000) -> Result:
    """``runs`` random schedules; the first failing one is returned.

    Result.runs counts the schedules run (all of them when kind is "ok").
    """
    rng = random.Random(seed)
    for run in range(runs):
        s = _System(make, invariant)
        trace = []
        for _ in range(max_steps):
            runnable = s.runnable()
            if not runnable:
                unfinished = s.unfinished()
                if unfinished:
                    return Result("deadlock", trace, blocked=unfinished, runs=run + 1)
                break
            i = rng.choice(runnable)
            trace.append(s.names[i])
            try:
                s.step(i)
            except _Violation as e:
                return Result("violation", trace, str(e), runs=run + 1)
        else:
            return Result("depth", trace, f"over {max_steps} steps", runs=run + 1)
    return Result("ok", runs=runs)


def count_failures(make, runs: int = 200, seed: int = 0, invariant=None, max_steps: int = 100_000) -> int:
    """How many of ``runs`` random schedules (seeds seed, seed + 1, ...) fail."""
    return sum(
        not explore_random(make, 1, seed + k, invariant, max_steps).ok for k in range(runs)
    )
