"""Internode normal mode's abort: start R ranks in virtual nodes of
`ranks_per_node` of which the last never makes the call; rank 0 times out
first (10 s: on its rail peer with one rank per node, else on the node peer
that waits for the missing rank), every other rank must leave within 1 s of
it through the buffer's abort word (their own timeout is 60 s), with a
jax_ep.CommunicationError naming the failure and a status array that says so.

    python tests/gpu/check_internode_stopped_rank.py [R] [ranks_per_node]
"""

import sys

from check_stopped_rank import check_bounded_exit

R = int(sys.argv[1]) if len(sys.argv) > 1 else 4
RPN = int(sys.argv[2]) if len(sys.argv) > 2 else 2
env = dict(JAX_EP_TEST_RANKS_PER_NODE=str(RPN), NVSHMEM_SYMMETRIC_SIZE="268435456")
want = "timed out after 10.0 s in the internode dispatch"
sys.exit(0 if check_bounded_exit("internode_stopped_rank", "internode_stopped_rank.py", R, env, want) else 1)
