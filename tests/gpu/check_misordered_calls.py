"""Start R ranks that issue two low-latency sends without the receive in
between; each must end with jax_ep's message on call order, at once (not
after a timeout).

    python tests/gpu/check_misordered_calls.py [R]
"""

import os
import subprocess
import sys
import time

R = int(sys.argv[1]) if len(sys.argv) > 1 else 2
here = os.path.dirname(os.path.abspath(__file__))
env = dict(os.environ, JAX_EP_TEST_TIMEOUT_S="30")
t0 = time.time()
proc = subprocess.run(
    [sys.executable, "-m", "jax_ep.launch", "-n", str(R), "--timeout", "120", os.path.join(here, "misordered_rank.py")],
    env=env, capture_output=True, text=True,
)
elapsed = time.time() - t0
out = proc.stdout + proc.stderr
print("\n".join(line for line in out.splitlines() if "jax_ep" in line or "[launch]" in line or "[rank 0]" in line)[-6000:])
want = "made a low-latency dispatch send while its previous send was not yet received (call 1)"
# The message must come from the order check, not from a 30 s timeout.
ok = proc.returncode != 0 and want in out and "UNEXPECTED" not in out and "timed out" not in out and elapsed < 100
print(f"misordered calls (R={R}): exit {proc.returncode} after {elapsed:.1f} s; message {'found' if want in out else 'MISSING'}")
print("PASS misordered_calls" if ok else "FAIL misordered_calls")
sys.exit(0 if ok else 1)
