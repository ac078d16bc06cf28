"""Tuned static options for the CUDA kernels, per rank count.

The SM budgets were measured best with R ranks sharing one H100 under MPS
(docs/benchmarks/README.md). Ranks on separate GPUs have not been measured;
the default budget applies there.
"""

from __future__ import annotations

import dataclasses

from jax_ep.options import NormalOptions

# R -> SMs per rank (BF16/FP8 handle-reusing dispatch and combine, 4096 tokens, hidden 7168).
INTRANODE_NUM_SMS = {2: 48, 4: 24, 8: 16}
# R -> rows of each (source, owner) ring of the rank-major combine. It must
# cover the rows all reducers hold at once (more reducers at small R), and all R*R
# rings must stay in L2 when the ranks share one GPU (R = 8: 64 rings).
COMBINE_RING_ROWS = {2: 256, 4: 64, 8: 24}
# R -> rows per readiness flag of the combine (small chunks keep the rings
# moving; at most 32 chunks per ring).
COMBINE_CHUNK_ROWS = {2: 8, 4: 2, 8: 2}


def tuned_normal_options(num_ranks: int, **overrides) -> NormalOptions:
    """``NormalOptions(backend="cuda")`` with the SM budget and the combine ring
    tuned for ``num_ranks``.

    Args:
      num_ranks: ranks on the EP axis.
      **overrides: any other ``NormalOptions`` field (layout, capacity, ...).
    """
    opts = NormalOptions(backend="cuda", **overrides)
    if "num_sms" not in overrides and num_ranks in INTRANODE_NUM_SMS:
        opts = dataclasses.replace(opts, num_sms=INTRANODE_NUM_SMS[num_ranks])
    if "combine_ring_rows" not in overrides and "combine_chunk_rows" not in overrides and num_ranks in COMBINE_RING_ROWS:
        opts = dataclasses.replace(opts, combine_ring_rows=COMBINE_RING_ROWS[num_ranks],
                                   combine_chunk_rows=COMBINE_CHUNK_ROWS[num_ranks])
    return opts
