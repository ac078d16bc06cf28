"""The CUDA MPS control daemon that ``python -m jax_ep.launch`` runs when ranks
share a GPU (cross-process spin-waits take milliseconds without MPS, about a
microsecond with it).

:class:`MPSDaemon` reuses a daemon already serving the caller's pipe folder or
starts (and later quits) one of its own. Like :mod:`jax_ep.launch`, this module
does not import jax and never touches a GPU. See docs/launcher.md.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from typing import Callable

__all__ = ["MPSDaemon", "mps_daemon_running", "mps_start_command", "mps_stop_command"]

MPS_CONTROL = "nvidia-cuda-mps-control"
DEFAULT_MPS_PIPE_DIR = "/tmp/nvidia-mps"


def mps_start_command() -> list[str]:
    """Command that starts the MPS control daemon (it forks and returns)."""
    return [MPS_CONTROL, "-d"]


def mps_stop_command() -> tuple[list[str], str]:
    """Command and stdin that make the MPS control daemon (and its server) exit."""
    return [MPS_CONTROL], "quit\n"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mps_daemon_running(pipe_dir: str, run: Callable | None = None) -> bool:
    """Whether an MPS control daemon serves ``pipe_dir``."""
    run = run or subprocess.run
    pidfile = os.path.join(pipe_dir, "nvidia-cuda-mps-control.pid")
    try:
        with open(pidfile) as f:
            if _pid_alive(int(f.read().strip())):
                return True
    except (OSError, ValueError):
        pass
    if not os.path.exists(os.path.join(pipe_dir, "control")):
        return False
    env = dict(os.environ, CUDA_MPS_PIPE_DIRECTORY=pipe_dir)
    try:
        res = run([MPS_CONTROL], input="get_server_list\n", env=env, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return False
    return res.returncode == 0


class MPSDaemon:
    """The CUDA MPS control daemon of one launcher run.

    :meth:`start` reuses a daemon already serving the caller's
    ``CUDA_MPS_PIPE_DIRECTORY`` (or the default ``/tmp/nvidia-mps``); otherwise
    it makes fresh pipe and log folders and starts ``nvidia-cuda-mps-control -d``
    there. :meth:`stop` quits only a daemon it started and removes its folders.
    No active-thread cap is set. ``run`` is ``subprocess.run`` (tests replace it).
    """

    def __init__(self, environ: dict | None = None, run: Callable | None = None, log: Callable = print):
        self.base = dict(os.environ if environ is None else environ)
        self.base.pop("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", None)
        self.run = run or subprocess.run
        self.log = log
        self.pipe_dir: str | None = None
        self.log_dir: str | None = None
        self.owned = False

    @property
    def env(self) -> dict:
        """The variables the ranks inherit."""
        return {"CUDA_MPS_PIPE_DIRECTORY": self.pipe_dir, "CUDA_MPS_LOG_DIRECTORY": self.log_dir}

    def _daemon_env(self) -> dict:
        return dict(self.base, **self.env)

    def start(self) -> dict:
        """Reuse a running daemon or start one; returns the environment the
        rank processes need to reach it (``CUDA_MPS_PIPE_DIRECTORY``, ...)."""
        existing = self.base.get("CUDA_MPS_PIPE_DIRECTORY") or DEFAULT_MPS_PIPE_DIR
        if mps_daemon_running(existing, self.run):
            self.pipe_dir = existing
            self.log_dir = self.base.get("CUDA_MPS_LOG_DIRECTORY") or "/var/log/nvidia-mps"
            self.owned = False
            self.log(f"MPS: using the daemon already running with pipe dir {existing}")
            return self.env
        self.pipe_dir = tempfile.mkdtemp(prefix="jax_ep_mps_pipe_")
        self.log_dir = tempfile.mkdtemp(prefix="jax_ep_mps_log_")
        # The daemon forks and may keep the output open: send it to a file, not a pipe.
        try:
            with tempfile.TemporaryFile("w+") as output:
                res = self.run(mps_start_command(), env=self._daemon_env(), stdin=subprocess.DEVNULL,
                               stdout=output, stderr=subprocess.STDOUT, text=True, timeout=60)
                output.seek(0)
                message = output.read().strip()
        except (OSError, subprocess.SubprocessError) as e:
            self._remove_dirs()
            raise RuntimeError(f"could not start CUDA MPS ({MPS_CONTROL} -d): {e}") from e
        if res.returncode != 0:
            self._remove_dirs()
            message = message or (res.stderr or res.stdout or "").strip()
            raise RuntimeError(f"could not start CUDA MPS ({MPS_CONTROL} -d exited {res.returncode}): {message}")
        self.owned = True
        self.log(f"MPS: started the control daemon (pipe dir {self.pipe_dir})")
        return self.env

    def stop(self) -> None:
        """Quit the daemon if :meth:`start` started it and remove its folders."""
        if not self.owned:
            return
        self.owned = False
        cmd, stdin = mps_stop_command()
        try:
            res = self.run(cmd, input=stdin, env=self._daemon_env(), capture_output=True, text=True, timeout=60)
            if res.returncode != 0:
                self.log(f"MPS: quit exited {res.returncode}: {(res.stderr or res.stdout or '').strip()}")
        except (OSError, subprocess.SubprocessError) as e:
            self.log(f"MPS: quit failed: {e}")
        # The daemon removes its pid file when it has exited; wait a little for it.
        pidfile = os.path.join(self.pipe_dir, "nvidia-cuda-mps-control.pid")
        deadline = time.monotonic() + 10
        while os.path.exists(pidfile) and time.monotonic() < deadline:
            time.sleep(0.1)
        self._remove_dirs()
        self.log("MPS: stopped")

    def _remove_dirs(self) -> None:
        for d in (self.pipe_dir, self.log_dir):
            if d:
                shutil.rmtree(d, ignore_errors=True)
