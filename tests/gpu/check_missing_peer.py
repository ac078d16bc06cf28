"""Start R ranks of which one never makes the call; the others must end with
jax_ep's timeout message naming that rank, well before the launcher's limit.

    python tests/gpu/check_missing_peer.py [R]
"""

import os
import subprocess
import sys
import time

R = int(sys.argv[1]) if len(sys.argv) > 1 else 2
here = os.path.dirname(os.path.abspath(__file__))
env = dict(os.environ, JAX_EP_TEST_TIMEOUT_S="5", JAX_EP_TEST_SLEEP_S="40")
t0 = time.time()
proc = subprocess.run(
    [sys.executable, "-m", "jax_ep.launch", "-n", str(R), "--timeout", "120", os.path.join(here, "missing_peer_rank.py")],
    env=env, capture_output=True, text=True,
)
elapsed = time.time() - t0
out = proc.stdout + proc.stderr
print("\n".join(line for line in out.splitlines() if "jax_ep" in line or "[launch]" in line or "[rank 0]" in line)[-6000:])
want = f"timed out after 5.0 s in the dispatch barrier waiting for rank {R - 1}"
ok = proc.returncode != 0 and want in out and "UNEXPECTED" not in out and elapsed < 100
print(f"missing peer (R={R}): exit {proc.returncode} after {elapsed:.1f} s; message {'found' if want in out else 'MISSING'}")
print("PASS missing_peer" if ok else "FAIL missing_peer")
sys.exit(0 if ok else 1)
