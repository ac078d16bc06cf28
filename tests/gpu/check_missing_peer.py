"""Start R ranks of which one never makes the call; the others must end with
jax_ep's timeout message naming that rank, well before the launcher's limit.

    python tests/gpu/check_missing_peer.py [R]
"""

import sys

from expect_failure import run

R = int(sys.argv[1]) if len(sys.argv) > 1 else 2
sys.exit(run("missing_peer", "missing_peer_rank.py", R, dict(JAX_EP_TEST_TIMEOUT_S="5", JAX_EP_TEST_SLEEP_S="40"),
             want=f"timed out after 5.0 s in the dispatch barrier waiting for rank {R - 1}"))
