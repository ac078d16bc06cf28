"""The abort across (virtual) nodes: start R ranks in virtual nodes of
`ranks_per_node` (NVSHMEM puts between nodes) of which the last never makes
the call, in `mode` ("low_latency": the put path, default; "internode": the
internode normal mode); rank 0 times out first (10 s; in internode mode on
its rail peer with one rank per node, else on the node peer that waits for
the missing rank), every other rank must leave within 1 s of it through the
buffer's abort word (their own timeout is 60 s), with a
jax_ep.CommunicationError naming the failure and a status array that says so.

    python tests/gpu/check_put_stopped_rank.py [R] [ranks_per_node] [mode]
"""

import sys

from check_stopped_rank import check_bounded_exit

R = int(sys.argv[1]) if len(sys.argv) > 1 else 4
RPN = int(sys.argv[2]) if len(sys.argv) > 2 else 1
MODE = sys.argv[3] if len(sys.argv) > 3 else "low_latency"
WANT = {
    "low_latency": f"timed out after 10.0 s in the low-latency dispatch barrier waiting for rank {R - 1}",
    "internode": "timed out after 10.0 s in the internode dispatch",
}
env = dict(JAX_EP_TEST_RANKS_PER_NODE=str(RPN), JAX_EP_TEST_MODE=MODE, NVSHMEM_SYMMETRIC_SIZE="268435456")
name = "put_stopped_rank" if MODE == "low_latency" else f"{MODE}_stopped_rank"
sys.exit(0 if check_bounded_exit(name, "put_stopped_rank.py", R, env, WANT[MODE]) else 1)
