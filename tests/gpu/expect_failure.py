"""Shared by the check_*.py scripts: run a rank script under the launcher and
require that it fails with a given jax_ep message, in time."""

import os
import subprocess
import sys
import time


def run(name: str, rank_script: str, ranks: int, env: dict, want: str, forbid=("UNEXPECTED",),
        max_seconds: float = 100.0, output: list | None = None) -> int:
    """Launch `ranks` copies of `rank_script`; PASS when they exit non-zero within
    `max_seconds`, the output holds `want` and none of `forbid`. Returns the exit
    code; the output's lines are appended to `output` when given."""
    here = os.path.dirname(os.path.abspath(__file__))
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "jax_ep.launch", "-n", str(ranks), "--timeout", "120", os.path.join(here, rank_script)],
        env=dict(os.environ, **env), capture_output=True, text=True,
    )
    elapsed = time.time() - t0
    out = proc.stdout + proc.stderr
    if output is not None:
        output.extend(out.splitlines())
    print("\n".join(line for line in out.splitlines() if "jax_ep" in line or "[launch]" in line or "[rank 0]" in line)[-6000:])
    ok = proc.returncode != 0 and want in out and not any(f in out for f in forbid) and elapsed < max_seconds
    print(f"{name} (R={ranks}): exit {proc.returncode} after {elapsed:.1f} s; message {'found' if want in out else 'MISSING'}")
    print(f"PASS {name}" if ok else f"FAIL {name}")
    return 0 if ok else 1
