"""The low-latency benchmark's command line (benchmarks/ll_bench_args.py), on CPU."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import ll_bench_args as A  # noqa: E402


def test_flat_run_defaults():
    args = A.parse_args([], num_ranks=8)
    assert (args.transport, args.ranks_per_node, args.sms_list) == ("ipc", None, [4, 8, 16])
    assert A.result_name(8, None) == "low_latency_R8.json"


def test_virtual_nodes_take_the_put_path():
    args = A.parse_args(["--ranks-per-node", "2", "--sms", "8,16"], num_ranks=8)
    assert (args.transport, args.ranks_per_node, args.sms_list) == ("nvshmem", 2, [8, 16])
    assert A.result_name(8, 2) == "low_latency_R8_rpn2.json"
    # One node of every rank is the flat run.
    assert A.parse_args(["--ranks-per-node", "8"], num_ranks=8).ranks_per_node is None


@pytest.mark.parametrize("argv,message", [
    (["--ranks-per-node", "3"], "must be a positive divisor of the 8 ranks"),
    (["--ranks-per-node", "0"], "must be a positive divisor"),
    (["--ranks-per-node", "4", "--transport", "ipc"], "needs --transport nvshmem"),
    (["--sms", "4,x"], "--sms must be comma-separated ints"),
])
def test_bad_arguments(capsys, argv, message):
    with pytest.raises(SystemExit):
        A.parse_args(argv, num_ranks=8)
    assert message in capsys.readouterr().err
