"""Command line of benchmarks/bench_low_latency.py, apart from it so that it
can be checked without GPUs or rank processes (tests/test_bench_args.py)."""

from __future__ import annotations

import argparse


def parser(description: str = "") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--sms", default="4,8,16", help="comma-separated SM budgets per rank")
    p.add_argument("--matmul", type=int, default=2048, help="N of the N x N x N BF16 matmul used as compute")
    p.add_argument("--reps", type=int, default=7, help="timed repetitions of each loop (median)")
    p.add_argument("--no-profile", action="store_true", help="skip the profiler trace")
    p.add_argument("--no-overlap", action="store_true", help="skip the matmul overlap loops")
    p.add_argument("--out", default=None, help="folder for low_latency_R{R}.json (or _R{R}_rpn{N}.json)")
    p.add_argument("--transport", default=None, choices=("ipc", "nvshmem"),
                   help="how the low-latency buffer reaches peers (Buffer.ll_transport); default ipc, "
                        "and nvshmem (the only one) with --ranks-per-node")
    p.add_argument("--ranks-per-node", type=int, default=None,
                   help="group the ranks into virtual nodes of this many ranks (Buffer.ranks_per_node): peers "
                        "in other nodes are reached by NVSHMEM puts (the put path)")
    p.add_argument("--no-signatures", action="store_true",
                   help="run without the per-call signature check (JAX_EP_CALL_SIGNATURES=0 on every rank), "
                        "to measure its cost against a run with it")
    return p


def parse_args(argv=None, num_ranks: int = 1, description: str = "") -> argparse.Namespace:
    """Parsed arguments with ``transport`` and ``ranks_per_node`` resolved for
    ``num_ranks`` ranks: ``ranks_per_node`` is None for one node (the pointer
    path), else a divisor of ``num_ranks`` below it, with transport nvshmem."""
    p = parser(description)
    args = p.parse_args(argv)
    rpn = args.ranks_per_node
    if rpn is not None:
        if rpn < 1 or num_ranks % rpn:
            p.error(f"--ranks-per-node {rpn} must be a positive divisor of the {num_ranks} ranks")
        if rpn == num_ranks:
            rpn = None  # one node: the pointer path
    if rpn is not None and args.transport == "ipc":
        p.error("--ranks-per-node below the rank count runs the put path, which needs --transport nvshmem")
    args.ranks_per_node = rpn
    args.transport = args.transport or ("nvshmem" if rpn is not None else "ipc")
    try:
        args.sms_list = [int(s) for s in args.sms.split(",")]
    except ValueError:
        p.error(f"--sms must be comma-separated ints, got {args.sms!r}")
    return args


def result_name(num_ranks: int, ranks_per_node: int | None) -> str:
    """The JSON file name of a run."""
    return f"low_latency_R{num_ranks}" + (f"_rpn{ranks_per_node}" if ranks_per_node else "") + ".json"
