"""Start R ranks that issue two low-latency sends without the receive in
between; each must end with jax_ep's message on call order, at once (not
after a timeout).

    python tests/gpu/check_misordered_calls.py [R]
"""

import sys

from expect_failure import run

R = int(sys.argv[1]) if len(sys.argv) > 1 else 2
sys.exit(run("misordered_calls", "misordered_rank.py", R, dict(JAX_EP_TEST_TIMEOUT_S="30"),
             want="made a low-latency dispatch send while its previous send was not yet received (call 1)",
             forbid=("UNEXPECTED", "timed out")))
