"""The multi-rank launcher ``jax_ep.launch`` on CPU (``--gpus 0``), and its MPS and
environment logic with the GPU commands replaced by fakes.

Every launched child writes its pid to the test's folder; a fixture kills any
that is still alive when the test ends, pass or fail.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from jax_ep import launch
from jax_ep import mps as mps_module

REPO = Path(__file__).resolve().parents[1]

# Prologue of every child script: record the pid so that the test can clean up.
PROLOGUE = """\
import os, sys, time
open(os.path.join(os.environ["PIDDIR"], f"{os.getpid()}.pid"), "w").close()
rank = int(os.environ["JAX_EP_RANK"])
"""


class Launcher:
    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.piddir = tmp_path / "pids"
        self.piddir.mkdir()
        self.procs: list[subprocess.Popen] = []

    def script(self, body: str, name: str = "child.py") -> Path:
        path = self.tmp / name
        path.write_text(PROLOGUE + textwrap.dedent(body))
        return path

    def child_pids(self) -> list[int]:
        return [int(p.stem) for p in self.piddir.glob("*.pid")]

    def run(self, *args, timeout: float = 50, env: dict | None = None):
        """Run the launcher to completion; returns (returncode, stdout, wall seconds)."""
        full_env = dict(os.environ, PIDDIR=str(self.piddir), **(env or {}))
        full_env["PYTHONPATH"] = os.pathsep.join([str(REPO), full_env.get("PYTHONPATH", "")])
        cmd = [sys.executable, "-m", "jax_ep.launch", *map(str, args)]
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, cwd=self.tmp)
        self.procs.append(proc)
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out, time.monotonic() - t0

    def cleanup(self):
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        for pid in self.child_pids():
            if _alive(pid):
                try:
                    os.killpg(pid, signal.SIGKILL)  # each child leads its own process group
                except (ProcessLookupError, PermissionError):
                    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def launcher(tmp_path):
    lau = Launcher(tmp_path)
    try:
        yield lau
    finally:
        lau.cleanup()


def _lines(out: str, rank: int) -> list[str]:
    prefix = f"[rank {rank}] "
    return [line[len(prefix):] for line in out.splitlines() if line.startswith(prefix)]


# --------------------------------------------------------------------------
# End to end, on CPU
# --------------------------------------------------------------------------


def test_all_ranks_succeed_with_their_environment(launcher):
    script = launcher.script("""
        import json
        keys = ["JAX_EP_RANK", "JAX_EP_NUM_RANKS", "JAX_EP_COORDINATOR", "JAX_EP_LOCAL_GPU", "JAX_PLATFORMS",
                "PYTHONUNBUFFERED", "NVSHMEM_DISABLE_NVLS", "NVSHMEM_REMOTE_TRANSPORT", "NVSHMEM_BOOTSTRAP"]
        print("ENV " + json.dumps({k: os.environ.get(k) for k in keys}))
        print("ARGS " + json.dumps(sys.argv[1:]))
        print("to stderr", file=sys.stderr)
        from jax_ep.launch import rank_info
        info = rank_info()
        print("INFO", info.rank, info.num_ranks, info.local_gpu)
    """)
    logs = launcher.tmp / "logs"
    rc, out, _ = launcher.run("-n", 3, "--gpus", 0, "--log-dir", logs, script, "--flag", "x y")
    assert rc == 0, out
    coordinators = set()
    import json

    for r in range(3):
        lines = _lines(out, r)
        env = json.loads(next(line for line in lines if line.startswith("ENV "))[4:])
        assert env["JAX_EP_RANK"] == str(r)
        assert env["JAX_EP_NUM_RANKS"] == "3"
        assert env["JAX_EP_LOCAL_GPU"] == ""
        assert env["JAX_PLATFORMS"] == "cpu"
        assert env["PYTHONUNBUFFERED"] == "1"
        assert env["NVSHMEM_DISABLE_NVLS"] == "1"
        assert env["NVSHMEM_REMOTE_TRANSPORT"] == "none"
        assert env["NVSHMEM_BOOTSTRAP"] == "UID"
        host, port = env["JAX_EP_COORDINATOR"].rsplit(":", 1)
        assert host == "127.0.0.1" and 0 < int(port) < 65536
        coordinators.add(env["JAX_EP_COORDINATOR"])
        assert json.loads(next(line for line in lines if line.startswith("ARGS "))[5:]) == ["--flag", "x y"]
        assert "to stderr" in lines
        assert f"INFO {r} 3 None" in lines
        log = (logs / f"rank{r}.log").read_text().splitlines()
        assert "to stderr" in log and f"INFO {r} 3 None" in log
    assert len(coordinators) == 1
    assert len(launcher.child_pids()) == 3


def test_failing_rank_stops_the_others(launcher):
    script = launcher.script("""
        if rank == 1:
            time.sleep(0.3)
            sys.exit(3)
        print("sleeping", flush=True)
        time.sleep(40)
    """)
    rc, out, wall = launcher.run("-n", 3, "--gpus", 0, "--grace", 2, script)
    assert rc == 3, out
    assert wall < 15, (wall, out)  # far less than the siblings' 40 s sleep
    assert "rank 1: exit 3" in out
    assert "rank 0: killed" in out and "rank 2: killed" in out
    pids = launcher.child_pids()
    assert len(pids) == 3 and not any(_alive(p) for p in pids)


def test_timeout_kills_everything(launcher):
    script = launcher.script("""
        import signal
        if rank == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # needs the SIGKILL
        print("sleeping", flush=True)
        time.sleep(40)
    """)
    rc, out, wall = launcher.run("-n", 2, "--gpus", 0, "--timeout", 2, "--grace", 0.5, script)
    assert rc == 124, out
    assert wall < 15, (wall, out)
    assert "timeout" in out
    assert "rank 0: killed (SIGKILL)" in out and "rank 1: killed (SIGTERM)" in out
    pids = launcher.child_pids()
    assert len(pids) == 2 and not any(_alive(p) for p in pids)


def test_ranks_only_starts_the_named_ranks(launcher):
    script = launcher.script("""
        print("started", rank, os.environ["JAX_EP_NUM_RANKS"])
    """)
    rc, out, _ = launcher.run("-n", 3, "--gpus", 0, "--ranks-only", 1, script)
    assert rc == 0, out
    assert _lines(out, 1) == ["started 1 3"]
    assert not _lines(out, 0) and not _lines(out, 2)
    assert "rank 0: not started" in out and "rank 2: not started" in out
    assert len(launcher.child_pids()) == 1


def test_module_mode(launcher):
    (launcher.tmp / "mod_child.py").write_text(PROLOGUE + "print('module rank', rank, sys.argv[1:])\n")
    rc, out, _ = launcher.run("-n", 2, "--gpus", 0, "-m", "mod_child", "a", env={"PYTHONPATH": str(launcher.tmp)})
    assert rc == 0, out
    assert _lines(out, 0) == ["module rank 0 ['a']"] and _lines(out, 1) == ["module rank 1 ['a']"]


def test_rank_wrapper_runs_each_rank_behind_a_tool(launcher):
    """JAX_EP_RANK_WRAPPER prefixes every rank's command ({rank} = the rank),
    as compute-sanitizer wraps each rank in the GPU suite."""
    script = launcher.script("""
        print("WRAPPED", os.environ.get("WRAPPED_AS"), rank)
    """)
    rc, out, _ = launcher.run("-n", 2, "--gpus", 0, script, env={"JAX_EP_RANK_WRAPPER": "env WRAPPED_AS=r{rank}"})
    assert rc == 0, out
    assert "JAX_EP_RANK_WRAPPER='env WRAPPED_AS=r{rank}'" in out
    for r in range(2):
        assert f"WRAPPED r{r} {r}" in _lines(out, r)
    # The wrapper's own exit code is the rank's (compute-sanitizer --error-exitcode).
    rc, out, _ = launcher.run("-n", 2, "--gpus", 0, script, env={"JAX_EP_RANK_WRAPPER": "sh -c 'exit 9' x"})
    assert rc == 9, out


def test_rank_command():
    cmd = ["python", "s.py", "--a"]
    assert launch.rank_command(cmd, 3, {}) == cmd
    assert launch.rank_command(cmd, 3, {"JAX_EP_RANK_WRAPPER": "  "}) == cmd
    assert launch.rank_command(cmd, 3, {"JAX_EP_RANK_WRAPPER": "tool --log 'a b/{rank}.log'"}) == [
        "tool", "--log", "a b/3.log", "python", "s.py", "--a"]


def test_distributed_key_value_exchange_on_cpu(launcher):
    script = launcher.script("""
        import jax_ep.launch as L
        info = L.initialize_distributed(timeout_s=40)
        assert L.initialize_distributed() is info  # idempotent
        import jax
        from jax._src.distributed import global_state
        client = global_state.client
        client.key_value_set(f"jax_ep_test/{info.rank}", f"hello from rank {info.rank}")
        peer = 1 - info.rank
        got = client.blocking_key_value_get(f"jax_ep_test/{peer}", 30_000)
        print("GOT", got, "|", jax.process_index(), jax.process_count(), jax.default_backend())
    """)
    rc, out, _ = launcher.run("-n", 2, "--gpus", 0, "--timeout", 45, script)
    assert rc == 0, out
    assert "GOT hello from rank 1 | 0 2 cpu" in _lines(out, 0), out
    assert "GOT hello from rank 0 | 1 2 cpu" in _lines(out, 1), out


@pytest.mark.parametrize("args, message", [
    (["-n", "0", "x.py"], "at least 1"),
    (["-n", "2", "--gpus", "0", "missing_script.py"], "script not found"),
    (["-n", "2", "--gpus", "0"], "no script"),
    (["-n", "2", "--gpus", "0", "--ranks-only", "5", "x.py"], "--ranks-only"),
])
def test_argument_errors(launcher, args, message):
    (launcher.tmp / "x.py").write_text("")
    rc, out, _ = launcher.run(*args)
    assert rc == 2 and message in out, out
    assert not launcher.child_pids()


# --------------------------------------------------------------------------
# Pieces, in process
# --------------------------------------------------------------------------


def test_rank_info_outside_a_launch_is_a_clear_error():
    with pytest.raises(RuntimeError, match="not started by jax_ep.launch"):
        launch.rank_info({})
    with pytest.raises(RuntimeError, match="rank 4 of 2"):
        launch.rank_info({"JAX_EP_RANK": "4", "JAX_EP_NUM_RANKS": "2", "JAX_EP_COORDINATOR": "h:1"})
    info = launch.rank_info({"JAX_EP_RANK": "1", "JAX_EP_NUM_RANKS": "2", "JAX_EP_COORDINATOR": "h:1",
                             "JAX_EP_LOCAL_GPU": "0"})
    assert info == launch.RankInfo(1, 2, "h:1", "0") and info.on_gpu
    with pytest.raises(Exception):
        info.rank = 0  # frozen


def test_split_argv():
    opts = launch._VALUE_OPTS
    assert launch._split_argv(["-n", "2", "s.py", "-n", "5"], opts) == (["-n", "2"], ["s.py", "-n", "5"], None)
    assert launch._split_argv(["-n2", "--gpus=0", "-m", "pkg.mod", "--x"], opts) == (["-n2", "--gpus=0"], ["--x"], "pkg.mod")
    assert launch._split_argv(["-n", "2", "--", "-weird.py"], opts) == (["-n", "2"], ["-weird.py"], None)


def _smi(n):
    def run(cmd, **kw):
        assert cmd == ["nvidia-smi", "-L"]
        return subprocess.CompletedProcess(cmd, 0, "".join(f"GPU {i}: H100 (UUID: GPU-{i})\n" for i in range(n)), "")
    return run


def test_visible_gpus():
    assert launch.visible_gpus(None, {}, run=_smi(4)) == ["0", "1", "2", "3"]
    assert launch.visible_gpus(None, {"CUDA_VISIBLE_DEVICES": "2,3"}, run=_smi(4)) == ["2", "3"]
    assert launch.visible_gpus(None, {"CUDA_VISIBLE_DEVICES": ""}, run=_smi(4)) == []
    assert launch.visible_gpus(None, {}, run=_smi(0)) == []

    def missing(cmd, **kw):
        raise FileNotFoundError(cmd[0])

    assert launch.visible_gpus(None, {}, run=missing) == []
    assert launch.visible_gpus(2, {}, run=missing) == ["0", "1"]
    assert launch.visible_gpus(0, {"CUDA_VISIBLE_DEVICES": "1"}, run=missing) == []
    assert launch.visible_gpus(1, {"CUDA_VISIBLE_DEVICES": "3,1"}, run=missing) == ["3"]
    with pytest.raises(ValueError, match="names only 1"):
        launch.visible_gpus(2, {"CUDA_VISIBLE_DEVICES": "1"}, run=missing)


def test_child_environment_gpu_sharing_under_mps():
    base = {"PATH": "/bin", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "50", "NVSHMEM_BOOTSTRAP": "MPI"}
    mps = {"CUDA_MPS_PIPE_DIRECTORY": "/tmp/p", "CUDA_MPS_LOG_DIRECTORY": "/tmp/l"}
    envs = [launch.child_environment(base, rank=r, num_ranks=5, gpus=["4", "6"], coordinator="127.0.0.1:9",
                                     mps_env=mps, pythonpath="/repo") for r in range(5)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["4", "6", "4", "6", "4"]
    assert [e["JAX_EP_LOCAL_GPU"] for e in envs] == ["4", "6", "4", "6", "4"]
    e = envs[3]
    assert e["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.283"  # 0.85 / 3 ranks on GPU 4
    assert {x["JAX_EP_RANKS_PER_GPU"] for x in envs} == {"3"}  # the most on one GPU, the same on every rank
    assert launch.ranks_per_gpu(e) == 3
    assert e["JAX_EP_RANK"] == "3" and e["JAX_EP_NUM_RANKS"] == "5" and e["JAX_EP_COORDINATOR"] == "127.0.0.1:9"
    assert e["CUDA_MPS_PIPE_DIRECTORY"] == "/tmp/p" and e["CUDA_MPS_LOG_DIRECTORY"] == "/tmp/l"
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in e
    assert e["NVSHMEM_IGNORE_CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "1"
    assert e["NVSHMEM_BOOTSTRAP"] == "MPI"  # the caller's choice wins
    assert e["NVSHMEM_DISABLE_NVLS"] == "1" and e["NVSHMEM_REMOTE_TRANSPORT"] == "none"
    assert e["PYTHONUNBUFFERED"] == "1" and e["PYTHONPATH"] == "/repo"
    assert "JAX_PLATFORMS" not in e
    assert base == {"PATH": "/bin", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "50", "NVSHMEM_BOOTSTRAP": "MPI"}


def test_child_environment_memory_and_cpu():
    one = launch.child_environment({}, rank=0, num_ranks=2, gpus=["0", "1"], coordinator="c:1")
    assert one["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.850"
    assert "NVSHMEM_IGNORE_CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in one
    for caller in ({"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.1"}, {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}):
        e = launch.child_environment(caller, rank=0, num_ranks=8, gpus=["0"], coordinator="c:1")
        assert e.get("XLA_PYTHON_CLIENT_MEM_FRACTION") == caller.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
    cpu = launch.child_environment({"CUDA_VISIBLE_DEVICES": "0"}, rank=1, num_ranks=2, gpus=[], coordinator="c:1")
    assert cpu["JAX_PLATFORMS"] == "cpu" and cpu["JAX_EP_LOCAL_GPU"] == ""
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" not in cpu
    assert one["JAX_EP_RANKS_PER_GPU"] == "1"
    stale = launch.child_environment({"JAX_EP_RANKS_PER_GPU": "4"}, rank=0, num_ranks=2, gpus=[], coordinator="c:1")
    assert "JAX_EP_RANKS_PER_GPU" not in stale and launch.ranks_per_gpu(stale) == 1


def test_ranks_per_gpu_reads_the_launcher_variable():
    assert launch.ranks_per_gpu({}) == 1 and launch.ranks_per_gpu({"JAX_EP_RANKS_PER_GPU": ""}) == 1
    assert launch.ranks_per_gpu({"JAX_EP_RANKS_PER_GPU": "8"}) == 8
    for bad in ("0", "-2", "two"):
        with pytest.raises(ValueError, match="JAX_EP_RANKS_PER_GPU"):
            launch.ranks_per_gpu({"JAX_EP_RANKS_PER_GPU": bad})


class FakeMPS:
    """Stands in for subprocess.run on nvidia-cuda-mps-control."""

    def __init__(self):
        self.calls = []

    def __call__(self, cmd, **kw):
        self.calls.append((list(cmd), kw.get("input"), dict(kw.get("env") or {})))
        if cmd == ["nvidia-cuda-mps-control", "-d"]:
            pipe = kw["env"]["CUDA_MPS_PIPE_DIRECTORY"]
            Path(pipe, "nvidia-cuda-mps-control.pid").write_text(str(os.getpid()))
        elif cmd == ["nvidia-cuda-mps-control"] and kw.get("input") == "quit\n":
            Path(kw["env"]["CUDA_MPS_PIPE_DIRECTORY"], "nvidia-cuda-mps-control.pid").unlink(missing_ok=True)
        return subprocess.CompletedProcess(cmd, 0, "", "")


def test_mps_commands():
    assert launch.mps_start_command() == ["nvidia-cuda-mps-control", "-d"]
    assert launch.mps_stop_command() == (["nvidia-cuda-mps-control"], "quit\n")


def test_mps_daemon_start_stop(tmp_path):
    fake = FakeMPS()
    environ = {"PATH": "/bin", "CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "none"),
               "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "30"}
    mps = launch.MPSDaemon(environ, run=fake, log=lambda m: None)
    env = mps.start()
    pipe, log = env["CUDA_MPS_PIPE_DIRECTORY"], env["CUDA_MPS_LOG_DIRECTORY"]
    assert os.path.isdir(pipe) and os.path.isdir(log) and pipe != str(tmp_path / "none")
    (cmd, stdin, denv), = fake.calls
    assert cmd == ["nvidia-cuda-mps-control", "-d"] and stdin is None
    assert denv["CUDA_MPS_PIPE_DIRECTORY"] == pipe and denv["CUDA_MPS_LOG_DIRECTORY"] == log
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in denv  # never a per-client cap
    mps.stop()
    cmd, stdin, denv = fake.calls[-1]
    assert cmd == ["nvidia-cuda-mps-control"] and stdin == "quit\n" and denv["CUDA_MPS_PIPE_DIRECTORY"] == pipe
    assert not os.path.exists(pipe) and not os.path.exists(log)
    mps.stop()  # twice is harmless
    assert len(fake.calls) == 2


def test_mps_daemon_reuses_a_running_one(tmp_path):
    pipe = tmp_path / "mps"
    pipe.mkdir()
    (pipe / "nvidia-cuda-mps-control.pid").write_text(str(os.getpid()))  # a live pid
    fake = FakeMPS()
    mps = launch.MPSDaemon({"CUDA_MPS_PIPE_DIRECTORY": str(pipe)}, run=fake, log=lambda m: None)
    assert mps.start()["CUDA_MPS_PIPE_DIRECTORY"] == str(pipe)
    mps.stop()
    assert fake.calls == [] and pipe.is_dir()  # neither started nor stopped


def test_mps_start_failure_is_clear(tmp_path):
    def failing(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "An instance of this daemon is already running")

    mps = launch.MPSDaemon({"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "none")}, run=failing, log=lambda m: None)
    with pytest.raises(RuntimeError, match="could not start CUDA MPS.*already running"):
        mps.start()
    assert mps.pipe_dir and not os.path.exists(mps.pipe_dir)


def test_main_runs_mps_when_ranks_share_gpus(tmp_path, monkeypatch, capfd):
    """In process, with fake GPUs: 3 ranks on 2 'GPUs' start and stop MPS around the run."""
    fake = FakeMPS()
    real_run = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: (fake if cmd[0] == "nvidia-cuda-mps-control"
                                                              else real_run)(cmd, **kw))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    script = tmp_path / "s.py"
    script.write_text("import os; print(os.environ['CUDA_VISIBLE_DEVICES'], os.environ['CUDA_MPS_PIPE_DIRECTORY'],"
                      " os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION'])\n")
    monkeypatch.setattr(mps_module, "DEFAULT_MPS_PIPE_DIR", str(tmp_path / "no_default_daemon"))  # MPSDaemon reads it there
    rc = launch.main(["-n", "3", "--gpus", "2", "--timeout", "30", str(script)])
    out = capfd.readouterr().out
    assert rc == 0, out
    started = [c for c in fake.calls if c[0] == ["nvidia-cuda-mps-control", "-d"]]
    stopped = [c for c in fake.calls if c[1] == "quit\n"]
    assert len(started) == 1 and len(stopped) == 1
    pipe = started[0][2]["CUDA_MPS_PIPE_DIRECTORY"]
    assert _lines(out, 0) == [f"0 {pipe} 0.425"] and _lines(out, 1) == [f"1 {pipe} 0.425"]
    assert _lines(out, 2) == [f"0 {pipe} 0.425"]
    assert not os.path.exists(pipe)

    fake.calls.clear()  # one rank per GPU: no MPS under --mps auto
    script.write_text("import os; print(os.environ['CUDA_VISIBLE_DEVICES'], os.environ.get('CUDA_MPS_PIPE_DIRECTORY'),"
                      " os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION'])\n")
    rc = launch.main(["-n", "2", "--gpus", "2", "--timeout", "30", str(script)])
    out = capfd.readouterr().out
    assert rc == 0, out
    assert fake.calls == []
    assert _lines(out, 0) == ["0 None 0.850"] and _lines(out, 1) == ["1 None 0.850"]


def test_free_port_lies_below_the_ephemeral_range(tmp_path, monkeypatch):
    """The coordinator's port is bindable on every address and, where the
    kernel names its ephemeral range, below it (outgoing connections are given
    ports from that range and could take it before the coordinator binds)."""
    import socket

    low = launch._ephemeral_low()
    for _ in range(20):
        port = launch.free_port()
        if low is not None and low > launch._LOW_PORT + 1024:
            assert launch._LOW_PORT <= port < low
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", port))  # still free
    bad = tmp_path / "range"
    bad.write_text("garbage")
    assert launch._ephemeral_low(str(bad)) is None
    bad.write_text("32768\t60999\n")
    assert launch._ephemeral_low(str(bad)) == 32768
    # Without a readable range: a port from bind(0).
    monkeypatch.setattr(launch, "_ephemeral_low", lambda: None)
    assert 0 < launch.free_port() < 65536
