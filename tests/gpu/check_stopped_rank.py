"""Start R ranks of which the last never makes the call; rank 0 times out
first (10 s), every other rank must leave within 1 s of it through the abort
word (their own timeout is 60 s), with a jax_ep.CommunicationError naming the
failure and a status array that says so.

    python tests/gpu/check_stopped_rank.py [R]
"""

import re
import sys

from expect_failure import run


def check_bounded_exit(name: str, script: str, R: int, env: dict, want: str) -> bool:
    """Run `script` at R ranks (the last never calls); True when every live
    rank raised CommunicationError, refused the dead buffer, reported a
    timeout or aborted status, and all left within 1 s of each other."""
    lines = []
    code = run(name, script, R, dict(JAX_EP_TEST_TIMEOUT_S="10", JAX_EP_TEST_SLEEP_S="40", **env),
               want=want, max_seconds=90.0, output=lines)
    text = "\n".join(lines)
    left = {int(m.group(1)): (float(m.group(2)), m.group(3))
            for m in re.finditer(r"rank (\d+) left at ([\d.]+) status \[([^\]]*)\]", text)}
    raised = set(int(m) for m in re.findall(r"rank (\d+) raised CommunicationError", text))
    refused = set(int(m) for m in re.findall(r"rank (\d+) refuses the dead buffer", text))
    live = set(range(R - 1))
    ok = code == 0 and set(left) == live and raised == live and refused == live
    if ok:
        times = [v[0] for v in left.values()]
        spread = max(times) - min(times)
        print(f"live ranks left within {spread:.3f} s of each other")
        ok = spread < 1.0
        for r, (_, status) in left.items():
            kind = int(status.split(",")[0])
            ok = ok and kind in (1, 4)  # timeout (rank 0, or a rank that timed out with it) or aborted
            print(f"rank {r} status [{status}]")
    print(f"PASS {name} (bounded exit)" if ok else f"FAIL {name} (bounded exit)")
    return ok


if __name__ == "__main__":
    R = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    sys.exit(0 if check_bounded_exit("stopped_rank", "stopped_rank.py", R, {},
                                     f"timed out after 10.0 s in the dispatch barrier waiting for rank {R - 1}") else 1)
