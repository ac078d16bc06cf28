"""Checked mode fails every rank together: no device is left waiting in an
exchange that a failed peer never joins (which XLA ends by aborting the
process after a long wait). Each case runs in a subprocess with a timeout."""

import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 8 ranks; one rank's ids (or one rank's receive capacity) fail, and the
# program goes on to combine, whose exchange the failed rank never reaches.
SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
    import numpy as np
    import jax_ep
    from conftest import run_ranks

    R, T, K, E, H = 8, 4, 2, 16, 128
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((T, H)).astype(np.float32) for _ in range(R)]
    ws = [rng.random((T, K)).astype(np.float32) for _ in range(R)]

    def run(idxs, opts):
        def f(x, i, w):
            o = jax_ep.dispatch(x, i, w, num_experts=E, options=opts)
            return jax_ep.combine(o.recv_x, o.handle)
        try:
            with jax_ep.checked_errors():
                run_ranks(f, R, xs, idxs, ws)
        except (jax_ep.RoutingError, jax_ep.CapacityOverflowError) as e:
            print(type(e).__name__, e, flush=True)
        else:
            print("no error", flush=True)

    # rank 3 names expert E + 5
    idxs = [rng.integers(0, E, (T, K)).astype(np.int32) for _ in range(R)]
    idxs[3][0, 0] = E + 5
    run(idxs, jax_ep.NormalOptions(checked=True))
    # every token goes to rank 0's experts: only rank 0 overflows
    idxs = [np.tile(np.array([[0, 1]], np.int32), (T, 1)) for _ in range(R)]
    run(idxs, jax_ep.NormalOptions(checked=True, num_max_recv_tokens=R * T - 1))
    """
)


def test_one_failing_rank_fails_all_ranks_promptly(tmp_path):
    script = tmp_path / "checked.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        proc = subprocess.run([sys.executable, str(script), REPO], capture_output=True, text=True, timeout=30, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("a checked-mode failure left the other ranks waiting (no result in 30 s)")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "RoutingError 1 top-k ids are out of range on rank 3" in proc.stdout, out
    assert "CapacityOverflowError the receive buffer overflowed on rank 0: 1 rows did not fit" in proc.stdout, out
    assert "needed 32 rows" in proc.stdout, out
    # reported once, to the caller: not logged per device, not again at exit
    assert "Traceback" not in proc.stderr, out
