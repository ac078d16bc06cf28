"""Tuned static options for the CUDA kernels, per rank count.

The SM budgets were measured best with R ranks sharing one H100 under MPS
(docs/benchmarks/README.md). Ranks on separate GPUs have not been measured;
the default budget applies there.
"""

from __future__ import annotations

import dataclasses

from jax_ep.options import NormalOptions

# R -> SMs per rank (BF16/FP8 handle-reusing dispatch and combine, 4096 tokens, hidden 7168).
INTRANODE_NUM_SMS = {2: 48, 4: 32, 8: 8}


def tuned_normal_options(num_ranks: int, **overrides) -> NormalOptions:
    """``NormalOptions(backend="cuda")`` with the SM budget tuned for ``num_ranks``.

    Args:
      num_ranks: ranks on the EP axis.
      **overrides: any other ``NormalOptions`` field (layout, capacity, ...).
    """
    opts = NormalOptions(backend="cuda", **overrides)
    if "num_sms" not in overrides and num_ranks in INTRANODE_NUM_SMS:
        opts = dataclasses.replace(opts, num_sms=INTRANODE_NUM_SMS[num_ranks])
    return opts
