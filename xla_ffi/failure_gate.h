// When a handler refuses a buffer that failed (its failure record is set).
//
// Within the XLA execution in which the buffer failed, its later handlers go
// on: their kernels see the abort word and return at once, the execution's
// status arrays say why, and Buffer.check() raises CommunicationError. A
// refusal there would instead surface as XLA's own error, on whichever rank's
// host reached a later handler (a receive after its send, a combine after its
// dispatch) only after its GPU had recorded the failure. Every later
// execution is refused, so that a program run again on a dead buffer raises.
// Executions are told apart by XLA's run id; a failure first seen by an
// execution's first handler is refused (nothing of that execution used the
// buffer yet).
#pragma once

#include <atomic>
#include <cstdint>
#include <limits>

namespace jax_ep {

class FailureGate {
 public:
  // Whether a handler of execution `run` may launch on the buffer; `failed`:
  // its failure record is set.
  bool admit(bool failed, int64_t run) {
    if (!failed) {
      last_clean_run_.store(run, std::memory_order_relaxed);
      return true;
    }
    return last_clean_run_.load(std::memory_order_relaxed) == run;
  }

 private:
  // The last execution whose handler found the buffer healthy.
  std::atomic<int64_t> last_clean_run_{std::numeric_limits<int64_t>::min()};
};

}  // namespace jax_ep
