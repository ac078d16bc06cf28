"""Start R ranks of which the last makes a different call: another T, another
H (normal dispatch), another SM budget (low-latency dispatch). Every rank
must stop at once (not after its 60 s timeout) with jax_ep's message naming
both ranks and the first field that differs, and a status array saying
"mismatch" or "aborted".

    python tests/gpu/check_mismatch.py [R]
    python tests/gpu/check_mismatch.py R put [ranks_per_node]

With "put", the low-latency put path instead (virtual nodes of
`ranks_per_node`, default 1; the signatures travel by NVSHMEM puts): another
SM budget, an FP8 dispatch meeting a BF16 one (other shapes: its rows land
elsewhere, the signature in its fixed slot), FP8 combine rows meeting BF16.
"""

import re
import sys

from expect_failure import run

R = int(sys.argv[1]) if len(sys.argv) > 1 else 2
PUT = len(sys.argv) > 2 and sys.argv[2] == "put"
RPN = sys.argv[3] if len(sys.argv) > 3 else "1"
cases = {
    "T": ("dispatch", "T (tokens per rank) is"),
    "H": ("dispatch", "row bytes (hidden size x item size) is"),
    "ll_sms": ("low-latency dispatch", "num_sms is"),
}
if PUT:
    cases = {
        "put_sms": ("low-latency dispatch", "num_sms is"),
        "put_fp8": ("low-latency dispatch", "dtype / payload is"),
        "put_combine_fp8": ("low-latency combine", "mode (pull, FP8 combine rows) is"),
    }
failed = 0
for differ, (op, field) in cases.items():
    lines = []
    env = dict(JAX_EP_TEST_DIFFER=differ, JAX_EP_TEST_RANKS_PER_NODE=RPN)
    code = run(f"mismatch_{differ}", "mismatch_rank.py", R, env,
               want=field, forbid=("UNEXPECTED", "timed out"), max_seconds=60.0, output=lines)
    text = "\n".join(lines)
    ranks = set(int(r) for r in re.findall(r"rank (\d+) raised CommunicationError kind=(?:mismatch|aborted)", text))
    # The program run again on the dead buffer: refused by its handlers, or a status that is not ok.
    again = set(int(r) for r in re.findall(r"rank (\d+) ran the program again: (?:refused|status .* \(not ok\))", text))
    named = re.search(rf"rank (\d+) and rank (\d+) made different calls in the {re.escape(op)}", text)
    ok = (code == 0 and ranks == set(range(R)) and again == set(range(R)) and named is not None
          and str(R - 1) in named.groups())
    print(f"{'PASS' if ok else 'FAIL'} mismatch_{differ}: ranks that raised {sorted(ranks)}, "
          f"refused or not ok when run again {sorted(again)}")
    failed += not ok
sys.exit(1 if failed else 0)
