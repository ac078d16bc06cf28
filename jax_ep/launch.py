"""Run N jax_ep rank processes on the GPUs of one host (or on CPU).

Usage::

    python -m jax_ep.launch -n N [options] script.py [script args...]
    python -m jax_ep.launch -n N [options] -m package.module [args...]

Rank ``i`` runs with ``CUDA_VISIBLE_DEVICES`` set to the ``(i % G)``-th visible
GPU, so every rank process sees exactly one GPU (its local device 0). When
there are more ranks than GPUs, the ranks share GPUs and the launcher runs a
CUDA MPS control daemon for the duration of the run (cross-process spin-waits
take milliseconds without MPS, about a microsecond with it). Without GPUs the
ranks run on CPU (``JAX_PLATFORMS=cpu``).

Every child's stdout and stderr are forwarded, line by line and prefixed with
``[rank i]``, to the launcher's stdout (and to ``--log-dir/rank<i>.log``). When a
child fails, the run times out, or the launcher is interrupted, every other
child's process group gets SIGTERM, then SIGKILL after ``--grace`` seconds.

Inside a rank, :func:`rank_info` reads the launcher's environment and
:func:`initialize_distributed` starts ``jax.distributed`` from it.

This module does not import jax at import time: the launcher never touches a GPU.
See docs/launcher.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Sequence

# The MPS daemon and the rank-process helpers live in their own modules; their
# names stay importable from jax_ep.launch.
from jax_ep._rank_procs import (  # noqa: F401
    _describe, _exit_code, _forward, _Interrupted, _killpg, _Output, _Rank, _terminate,
)
from jax_ep.mps import (  # noqa: F401
    DEFAULT_MPS_PIPE_DIR, MPS_CONTROL, MPSDaemon, _pid_alive, mps_daemon_running, mps_start_command,
    mps_stop_command,
)

__all__ = [
    "RankInfo", "rank_info", "initialize_distributed", "main",
    "visible_gpus", "child_environment", "rank_command", "MPSDaemon", "ranks_per_gpu",
]

# --------------------------------------------------------------------------
# Environment contract between the launcher and the rank processes
# --------------------------------------------------------------------------

ENV_RANK = "JAX_EP_RANK"
ENV_NUM_RANKS = "JAX_EP_NUM_RANKS"
ENV_COORDINATOR = "JAX_EP_COORDINATOR"
ENV_LOCAL_GPU = "JAX_EP_LOCAL_GPU"
ENV_RANKS_PER_GPU = "JAX_EP_RANKS_PER_GPU"

EXIT_TIMEOUT = 124


@dataclasses.dataclass(frozen=True)
class RankInfo:
    """Where this process sits in a ``jax_ep.launch`` run.

    rank: this process's EP rank (0 .. num_ranks-1).
    num_ranks: the number of rank processes of the run.
    coordinator: ``host:port`` of the ``jax.distributed`` coordinator (rank 0).
    local_gpu: the GPU this rank runs on, as the launcher's ``CUDA_VISIBLE_DEVICES``
        entry names it (an index or a UUID); None when the run is on CPU. The
        process itself sees that GPU as its local device 0.
    """

    rank: int
    num_ranks: int
    coordinator: str
    local_gpu: str | None

    @property
    def on_gpu(self) -> bool:
        """True when the launcher gave this rank a GPU (``local_gpu`` is set)."""
        return self.local_gpu is not None


def rank_info(environ: dict | None = None) -> RankInfo:
    """This process's :class:`RankInfo`, read from the environment set by the launcher.

    Raises RuntimeError when the process was not started by ``jax_ep.launch``.
    """
    env = os.environ if environ is None else environ
    missing = [k for k in (ENV_RANK, ENV_NUM_RANKS, ENV_COORDINATOR) if not env.get(k)]
    if missing:
        raise RuntimeError(
            f"this process was not started by jax_ep.launch ({', '.join(missing)} unset); run it as "
            "`python -m jax_ep.launch -n N script.py`"
        )
    try:
        rank, num_ranks = int(env[ENV_RANK]), int(env[ENV_NUM_RANKS])
    except ValueError:
        raise RuntimeError(
            f"bad jax_ep.launch environment: {ENV_RANK}={env[ENV_RANK]!r}, "
            f"{ENV_NUM_RANKS}={env[ENV_NUM_RANKS]!r} (integers expected)"
        ) from None
    if not (num_ranks >= 1 and 0 <= rank < num_ranks):
        raise RuntimeError(f"bad jax_ep.launch environment: rank {rank} of {num_ranks} ranks")
    gpu = env.get(ENV_LOCAL_GPU, "")
    return RankInfo(rank, num_ranks, env[ENV_COORDINATOR], gpu if gpu not in ("", "-1") else None)


def ranks_per_gpu(environ: dict | None = None) -> int:
    """How many rank processes share this process's GPU: the launcher's
    ``JAX_EP_RANKS_PER_GPU`` (``ceil(ranks / GPUs)``; set it by hand for
    another launcher that puts several ranks on one GPU), else 1. Internode
    mode sizes its default rings by it (``jax_ep.internode_config.channel_cap``)."""
    env = os.environ if environ is None else environ
    value = env.get(ENV_RANKS_PER_GPU, "")
    if not value:
        return 1
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{ENV_RANKS_PER_GPU}={value!r}: a positive integer expected")
    return n


_init_lock = threading.Lock()
_initialized: RankInfo | None = None


def initialize_distributed(timeout_s: int = 300, **kwargs) -> RankInfo:
    """Start ``jax.distributed`` for this rank from the launcher's environment; idempotent.

    Calls ``jax.distributed.initialize(coordinator_address, num_processes=N,
    process_id=rank, local_device_ids=[0] on GPU (each rank sees one GPU) or None
    on CPU, initialization_timeout=timeout_s, **kwargs)``. A peer that never
    starts makes this raise after ``timeout_s`` seconds instead of hanging.
    Returns :func:`rank_info`. Call it before anything else initialises a JAX
    backend.
    """
    global _initialized
    info = rank_info()
    with _init_lock:
        if _initialized is not None:
            return _initialized
        import jax  # noqa: PLC0415 -- only inside a rank process

        if not jax.distributed.is_initialized():
            jax.distributed.initialize(
                coordinator_address=info.coordinator,
                num_processes=info.num_ranks,
                process_id=info.rank,
                local_device_ids=[0] if info.on_gpu else None,
                initialization_timeout=int(math.ceil(timeout_s)),
                **kwargs,
            )
        _initialized = info
        return info


# --------------------------------------------------------------------------
# GPUs, environment
# --------------------------------------------------------------------------


def _parse_visible(value: str) -> list[str]:
    """Entries of a CUDA_VISIBLE_DEVICES value, up to the first invalid one (as CUDA does)."""
    out = []
    for item in value.split(","):
        item = item.strip()
        if not item or item.startswith("-"):
            break
        out.append(item)
    return out


def count_physical_gpus(run: Callable | None = None) -> int:
    """GPUs that ``nvidia-smi -L`` lists (0 when nvidia-smi is missing or fails)."""
    run = run or subprocess.run
    try:
        res = run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return 0
    if res.returncode != 0:
        return 0
    return sum(1 for line in res.stdout.splitlines() if line.startswith("GPU "))


def visible_gpus(gpus: int | None = None, environ: dict | None = None, run: Callable | None = None) -> list[str]:
    """The GPUs the ranks are spread over, as CUDA_VISIBLE_DEVICES entries.

    gpus: the ``--gpus`` override (a count; 0 = CPU mode). Without it the GPUs are
    counted with ``nvidia-smi -L``, restricted to ``CUDA_VISIBLE_DEVICES`` when set.
    """
    env = os.environ if environ is None else environ
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    listed = _parse_visible(cvd) if cvd is not None else None
    if gpus is not None:
        if gpus < 0:
            raise ValueError(f"--gpus must be >= 0, got {gpus}")
        if listed is None:
            return [str(i) for i in range(gpus)]
        if gpus > len(listed):
            raise ValueError(f"--gpus {gpus}, but CUDA_VISIBLE_DEVICES={cvd!r} names only {len(listed)} GPU(s)")
        return listed[:gpus]
    n = count_physical_gpus(run)
    if n == 0:
        return []
    if listed is None:
        return [str(i) for i in range(n)]
    return listed


def _ephemeral_low(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> int | None:
    """The first port of the kernel's ephemeral range (Linux), or None."""
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` (and on every address) right now.

    Chosen below the kernel's ephemeral range where there is one: a port
    from ``bind(0)`` lies in that range, and between this check and the
    coordinator's own bind any process's outgoing connection may be given
    it (seen on a loaded GPU host: the coordinator failed with "Address
    already in use" and rank 0 died).
    """
    low = _ephemeral_low()
    if low is not None and low > _LOW_PORT + 1024:
        pick = random.SystemRandom()
        for _ in range(64):
            port = pick.randrange(_LOW_PORT, low)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("", port))  # the wildcard: the coordinator listens on every address
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


_LOW_PORT = 20000  # below it: well-known services' ports


def child_environment(
    base: dict,
    *,
    rank: int,
    num_ranks: int,
    gpus: Sequence[str],
    coordinator: str,
    mps_env: dict | None = None,
    single_host: bool = True,
    pythonpath: str | None = None,
) -> dict:
    """The environment of rank ``rank``'s process (a new dict; ``base`` is not changed).

    gpus: the visible GPUs ([] = CPU mode). mps_env: the MPS variables of the run
    (None without MPS). pythonpath: a folder put first on PYTHONPATH (where jax_ep lives).
    """
    env = dict(base)
    env[ENV_RANK] = str(rank)
    env[ENV_NUM_RANKS] = str(num_ranks)
    env[ENV_COORDINATOR] = coordinator
    env["PYTHONUNBUFFERED"] = "1"
    # A per-client MPS thread cap made spin-waiting runs hang: never pass one on.
    env.pop("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", None)
    if gpus:
        gpu = gpus[rank % len(gpus)]
        env["CUDA_VISIBLE_DEVICES"] = gpu
        env[ENV_LOCAL_GPU] = gpu
        sharing = math.ceil(num_ranks / len(gpus))
        env[ENV_RANKS_PER_GPU] = str(sharing)
        if "XLA_PYTHON_CLIENT_MEM_FRACTION" not in base and "XLA_PYTHON_CLIENT_PREALLOCATE" not in base:
            env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.85 / sharing:.3f}"
    else:
        env["JAX_PLATFORMS"] = "cpu"
        env[ENV_LOCAL_GPU] = ""
        env.pop(ENV_RANKS_PER_GPU, None)
    env.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    if single_host:
        env.setdefault("NVSHMEM_REMOTE_TRANSPORT", "none")
    env.setdefault("NVSHMEM_BOOTSTRAP", "UID")
    if mps_env is not None:
        env.update(mps_env)
        env.setdefault("NVSHMEM_IGNORE_CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "1")
    if pythonpath:
        parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if pythonpath not in parts:
            env["PYTHONPATH"] = os.pathsep.join([pythonpath, *parts])
    return env


ENV_RANK_WRAPPER = "JAX_EP_RANK_WRAPPER"


def rank_command(cmd: Sequence[str], rank: int, environ: dict | None = None) -> list[str]:
    """The command that starts rank ``rank``: ``cmd``, behind the wrapper that
    ``JAX_EP_RANK_WRAPPER`` names, if set (split as a shell would; ``{rank}``
    in it becomes the rank), e.g. ``compute-sanitizer --tool memcheck
    --error-exitcode 9``, so that a tool runs each rank process."""
    env = os.environ if environ is None else environ
    wrapper = env.get(ENV_RANK_WRAPPER, "").strip()
    if not wrapper:
        return list(cmd)
    return [a.replace("{rank}", str(rank)) for a in shlex.split(wrapper)] + list(cmd)


# --------------------------------------------------------------------------
# Running the ranks
# --------------------------------------------------------------------------


def _split_argv(argv: list[str], value_opts: set[str]) -> tuple[list[str], list[str], str | None]:
    """Split argv into launcher options, the program args, and the -m module (if any)."""
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            return argv[:i], argv[i + 1:], None
        if a == "-m":
            if i + 1 >= len(argv):
                raise SystemExit("jax_ep.launch: error: -m needs a module name")
            return argv[:i], argv[i + 2:], argv[i + 1]
        if a.startswith("-m") and len(a) > 2 and not a.startswith("--"):
            return argv[:i], argv[i + 1:], a[2:]
        if not a.startswith("-") or a == "-":
            return argv[:i], argv[i:], None
        name = a.split("=", 1)[0]
        if name in value_opts and "=" not in a:
            i += 2
        elif name.startswith("-") and not name.startswith("--") and len(name) > 2 and name[:2] in value_opts:
            i += 1  # -n4
        else:
            i += 1
    return argv, [], None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jax_ep.launch",
        usage="%(prog)s -n N [options] (script.py | -m module) [args...]",
        description="Run N jax_ep rank processes, one GPU each (ranks share GPUs under CUDA MPS "
        "when N exceeds the GPUs; CPU when there are none).",
    )
    p.add_argument("-n", "--num-ranks", type=int, required=True, help="number of rank processes")
    p.add_argument("--gpus", type=int, default=None,
                   help="use this many GPUs (default: all that nvidia-smi lists, within CUDA_VISIBLE_DEVICES; 0 = CPU)")
    p.add_argument("--mps", choices=("auto", "on", "off"), default="auto",
                   help="run a CUDA MPS daemon for the run (auto: when ranks share a GPU)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole run (exit 124 after)")
    p.add_argument("--grace", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL when stopping ranks")
    p.add_argument("--log-dir", default=None, help="also write each rank's output to DIR/rank<i>.log")
    p.add_argument("--ranks-only", default=None,
                   help="comma-separated ranks to start; the others are never started (tests of missing peers)")
    return p


_VALUE_OPTS = {"-n", "--num-ranks", "--gpus", "--mps", "--timeout", "--grace", "--log-dir", "--ranks-only"}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jax_ep.launch``: parse the command line (``argv``, default
    ``sys.argv[1:]``) and run the rank processes.

    Returns 0 when every rank exits 0, else the first failing rank's exit
    code (``128 + signal`` for a signal), ``EXIT_TIMEOUT`` (124) past
    ``--timeout``, ``128 + signal`` when the launcher itself is interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    own, prog_args, module = _split_argv(argv, _VALUE_OPTS)
    args = parser.parse_args(own)
    if args.num_ranks < 1:
        parser.error(f"-n must be at least 1, got {args.num_ranks}")
    if module is None:
        if not prog_args:
            parser.error("no script given (script.py or -m module)")
        script, prog_args = prog_args[0], prog_args[1:]
        if not os.path.isfile(script):
            parser.error(f"script not found: {script}")
        cmd = [sys.executable, script, *prog_args]
        what = script
    else:
        if not module:
            parser.error("-m needs a module name")
        cmd = [sys.executable, "-m", module, *prog_args]
        what = f"-m {module}"
    n = args.num_ranks
    if args.timeout <= 0:
        parser.error(f"--timeout must be positive, got {args.timeout}")
    if args.grace < 0:
        parser.error(f"--grace must be >= 0, got {args.grace}")
    if args.ranks_only is not None:
        try:
            to_start = sorted({int(x) for x in args.ranks_only.split(",") if x.strip()})
        except ValueError:
            parser.error(f"--ranks-only wants comma-separated integers, got {args.ranks_only!r}")
        bad = [r for r in to_start if not 0 <= r < n]
        if bad or not to_start:
            parser.error(f"--ranks-only {args.ranks_only!r}: ranks must lie in 0..{n - 1}")
    else:
        to_start = list(range(n))
    try:
        gpus = visible_gpus(args.gpus)
    except ValueError as e:
        parser.error(str(e))

    out = _Output(sys.stdout.buffer)

    def say(msg: str) -> None:
        out.write(f"[launch] {msg}\n".encode())

    sharing = bool(gpus) and n > len(gpus)
    use_mps = bool(gpus) and (args.mps == "on" or (args.mps == "auto" and sharing))
    if args.mps == "on" and not gpus:
        say("--mps on ignored: no GPUs (CPU mode)")
    if sharing and args.mps == "off":
        say(f"warning: {n} ranks share {len(gpus)} GPU(s) without MPS: cross-process spin-waits will time-slice")
    if "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" in os.environ:
        say("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE is not passed on: per-client MPS caps make spin-waiting kernels hang")

    ranks = [_Rank(i) for i in range(n)]
    mps: MPSDaemon | None = None
    failing: _Rank | None = None
    timed_out = False
    interrupted: int | None = None
    launch_error = False

    def on_signal(signum, _frame):
        raise _Interrupted(signum)

    old_handlers = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old_handlers[sig] = signal.signal(sig, on_signal)
        except ValueError:  # not the main thread
            pass

    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        try:
            mps_env = None
            if use_mps:
                mps = MPSDaemon(log=say)
                try:
                    mps_env = mps.start()
                except RuntimeError as e:
                    mps = None
                    say(f"error: {e}")
                    return 1
            coordinator = f"127.0.0.1:{free_port()}"
            mode = f"on {len(gpus)} GPU(s) [{','.join(gpus)}]" if gpus else "on CPU"
            say(f"{n} rank(s) of {what} {mode}, MPS {'on' if use_mps else 'off'}, coordinator {coordinator}"
                + (f", starting only rank(s) {','.join(map(str, to_start))}" if len(to_start) < n else ""))
            if os.environ.get(ENV_RANK_WRAPPER, "").strip():
                say(f"each rank runs under {ENV_RANK_WRAPPER}={os.environ[ENV_RANK_WRAPPER].strip()!r}")
            if args.log_dir:
                os.makedirs(args.log_dir, exist_ok=True)
            deadline = time.monotonic() + args.timeout
            for i in to_start:
                r = ranks[i]
                env = child_environment(os.environ, rank=i, num_ranks=n, gpus=gpus, coordinator=coordinator,
                                        mps_env=mps_env, pythonpath=package_root)
                if args.log_dir:
                    r.log_file = open(os.path.join(args.log_dir, f"rank{i}.log"), "wb")
                try:
                    r.proc = subprocess.Popen(rank_command(cmd, i), env=env, stdin=subprocess.DEVNULL,
                                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                              start_new_session=True)
                except OSError as e:
                    say(f"error: could not start rank {i}: {e}")
                    launch_error = True
                    break
                r.reader = threading.Thread(target=_forward, args=(r.proc.stdout, f"[rank {i}] ".encode(), out,
                                                                    r.log_file), daemon=True)
                r.reader.start()
            started = [r for r in ranks if r.proc is not None]
            while not launch_error:
                pending = [r for r in started if r.proc.poll() is None]
                failed = [r for r in started if r.proc.returncode not in (None, 0)]
                if failed:
                    failing = min(failed, key=lambda r: r.rank)
                    say(f"rank {failing.rank} failed ({_describe(failing)}); stopping the others")
                    break
                if not pending:
                    break
                if time.monotonic() >= deadline:
                    timed_out = True
                    say(f"timeout after {args.timeout:g} s; stopping all ranks")
                    break
                time.sleep(0.05)
        except _Interrupted as e:
            interrupted = e.signum
            say(f"interrupted ({signal.Signals(e.signum).name}); stopping all ranks")
        # Cleanup; a second Ctrl-C must not cut it short.
        for sig in old_handlers:
            signal.signal(sig, signal.SIG_IGN)
        _terminate(ranks, args.grace, say)
    finally:
        for sig in old_handlers:
            signal.signal(sig, signal.SIG_IGN)
        _terminate(ranks, 0.0, say)  # no-op unless an unexpected error left children running
        for r in ranks:
            if r.reader is not None:
                r.reader.join(timeout=2)
                if r.reader.is_alive():  # a grandchild still holds the pipe: kill the group
                    _killpg(r.proc, signal.SIGKILL)
                    r.reader.join(timeout=5)
            if r.log_file is not None:
                r.log_file.close()
        if mps is not None:
            mps.stop()
        for sig, h in old_handlers.items():
            signal.signal(sig, h)

    for r in ranks:
        say(f"rank {r.rank}: {_describe(r)}")
    if interrupted is not None:
        return 128 + interrupted
    if timed_out:
        return EXIT_TIMEOUT
    if failing is not None:
        return _exit_code(failing.proc.returncode)
    return 1 if launch_error else 0


if __name__ == "__main__":
    sys.exit(main())
