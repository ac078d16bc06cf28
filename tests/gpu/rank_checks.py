"""PASS/FAIL bookkeeping for the multi-rank GPU scripts (run under jax_ep.launch)."""

import os
import re
import time
import traceback


class Checks:
    """``@checks("name")`` runs the function now and records PASS/FAIL;
    ``checks.exit_code()`` is 1 when any failed.

    ``JAX_EP_CHECKS`` / ``JAX_EP_SKIP_CHECKS`` (regular expressions, searched
    in the name) run only the matching checks / skip the matching ones; every
    rank must see the same values (a check one rank skips, its peers would
    wait for)."""

    def __init__(self, environ=None):
        self.results = []
        env = os.environ if environ is None else environ
        self.only = env.get("JAX_EP_CHECKS") or None
        self.skip = env.get("JAX_EP_SKIP_CHECKS") or None

    def selected(self, name: str) -> bool:
        """Whether the check ``name`` runs under the filters."""
        if self.only and not re.search(self.only, name):
            return False
        return not (self.skip and re.search(self.skip, name))

    def __call__(self, name):
        def wrap(fn):
            if not self.selected(name):
                print(f"SKIP {name} (JAX_EP_CHECKS / JAX_EP_SKIP_CHECKS)", flush=True)
                return fn
            t0 = time.time()
            try:
                fn()
                self.results.append((name, True))
                print(f"PASS {name} ({time.time() - t0:.1f} s)", flush=True)
            except Exception as e:  # report and go on with the next check
                self.results.append((name, False))
                print(f"FAIL {name}: {e}\n{traceback.format_exc()}", flush=True)
            return fn
        return wrap

    @property
    def all_passed(self) -> bool:
        return all(ok for _, ok in self.results)

    def summary(self, rank: int, num_ranks: int) -> int:
        failed = sum(not ok for _, ok in self.results)
        print(f"rank {rank}/{num_ranks}: {len(self.results) - failed} passed, {failed} failed", flush=True)
        return 1 if failed else 0


def calc_diff(x, y) -> float:
    """DeepEP's similarity metric: 1 - 2 sum(xy) / sum(x^2 + y^2) over (x + 1, y + 1), in float64."""
    import numpy as np

    x, y = np.asarray(x, np.float64) + 1, np.asarray(y, np.float64) + 1
    denom = (x * x + y * y).sum()
    return float(1 - 2 * (x * y).sum() / denom) if denom else 0.0
