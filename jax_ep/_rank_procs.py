"""The rank processes of one ``python -m jax_ep.launch`` run: forwarding their
output line by line, stopping them (SIGTERM to the process group, SIGKILL after
a grace period) and describing how each ended. Used by :mod:`jax_ep.launch`
only; no jax import.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import threading
import time
from typing import IO, Callable


class _Output:
    """Serialises whole lines onto the launcher's stdout."""

    def __init__(self, stream: IO[bytes]):
        self.stream = stream
        self.lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self.lock:
            try:
                self.stream.write(data)
                self.stream.flush()
            except (OSError, ValueError):
                pass


def _forward(pipe: IO[bytes], prefix: bytes, out: _Output, log_file: IO[bytes] | None) -> None:
    try:
        for line in iter(pipe.readline, b""):
            if not line.endswith(b"\n"):
                line += b"\n"
            out.write(prefix + line)
            if log_file is not None:
                try:
                    log_file.write(line)
                    log_file.flush()
                except (OSError, ValueError):
                    pass
    finally:
        pipe.close()


class _Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@dataclasses.dataclass
class _Rank:
    rank: int
    proc: subprocess.Popen | None = None
    reader: threading.Thread | None = None
    log_file: IO[bytes] | None = None
    killed: str | None = None  # "SIGTERM" / "SIGKILL" when the launcher stopped it


def _killpg(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _terminate(ranks: list[_Rank], grace: float, say: Callable) -> None:
    """SIGTERM every running child's process group, SIGKILL after ``grace`` s, reap all."""
    live = [r for r in ranks if r.proc is not None and r.proc.poll() is None]
    if not live:
        return
    say(f"stopping rank(s) {', '.join(str(r.rank) for r in live)}")
    for r in live:
        r.killed = "SIGTERM"
        _killpg(r.proc, signal.SIGTERM)
    deadline = time.monotonic() + max(grace, 0.0)
    while time.monotonic() < deadline and any(r.proc.poll() is None for r in live):
        time.sleep(0.02)
    for r in live:
        if r.proc.poll() is None:
            r.killed = "SIGKILL"
            _killpg(r.proc, signal.SIGKILL)
    for r in live:
        try:
            r.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            say(f"rank {r.rank} (pid {r.proc.pid}) did not exit after SIGKILL")


def _describe(r: _Rank) -> str:
    if r.proc is None:
        return "not started"
    rc = r.proc.returncode
    if rc is None:
        return "still running"
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return f"killed ({name})" if r.killed else f"died ({name})"
    return f"exit {rc}" + (" (after the launcher's SIGTERM)" if r.killed else "")


def _exit_code(rc: int) -> int:
    return 128 - rc if rc < 0 else rc
