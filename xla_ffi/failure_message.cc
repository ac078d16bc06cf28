// Messages of a failure record (intranode::TimeoutRecord): what
// timeout_message prints and the Python errors carry. See runtime.h.
#include "runtime.h"

#include <cstdio>
#include <string>

namespace jax_ep {

const char* signature_field_name(int field, int op) {
  if (field == intranode::kSigMode) {
    return op == 0 ? "expert_alignment" : "mode (pull, FP8 combine rows)";
  }
  if (field == intranode::kSigDtype && op <= 2) return op == 2 ? "dtype" : "payload parts (FP8 or not)";
  switch (field) {
    case intranode::kSigOp: return "op (which call)";
    case intranode::kSigTokens: return "T (tokens per rank)";
    case intranode::kSigRows: return "rows (C, or max_tokens M in low-latency calls)";
    case intranode::kSigRowBytes: return "row bytes (hidden size x item size)";
    case intranode::kSigTopk: return "K (num_topk)";
    case intranode::kSigExperts: return "E (num_experts)";
    case intranode::kSigSms: return "num_sms";
    case intranode::kSigChunkRows: return "combine_chunk_rows";
    case intranode::kSigRingRows: return "combine_ring_rows";
    case intranode::kSigLayout: return "layout";
    case intranode::kSigDtype: return "dtype / payload";
    default: return "unknown field";
  }
}

namespace {
const char* fail_kind(int code) {
  switch (code) {
    case intranode::kFailTimeout: return "timeout";
    case intranode::kFailOrder: return "calls out of order";
    case intranode::kFailMismatch: return "mismatch";
    case intranode::kFailAborted: return "aborted";
    case intranode::kFailBadHandle: return "bad handle";
    default: return "failure";
  }
}
}  // namespace

std::string timeout_message(const intranode::TimeoutRecord& rec) {
  if (rec.code == 0) return "";
  constexpr const char* kDead = "; this buffer is unusable until re-created (destroy it and create a new one)";
  char buf[1024];
  if (rec.code < 0) return "jax_ep: a kernel is recording a failure";
  if (rec.code == intranode::kFailOrder) {
    std::snprintf(buf, sizeof(buf),
                  "jax_ep: rank %d made a %s %s (call %llu): on one buffer each low-latency send must be "
                  "followed by its receive before the next send of that kind. XLA orders calls only by their "
                  "data: tie independent rounds with low_latency_dispatch_send(..., after=...) / "
                  "low_latency_combine_send(..., after=...)%s",
                  rec.rank, intranode::op_name(rec.op),
                  rec.peer == 0 ? "send while its previous send was not yet received" : "receive without a send",
                  rec.epoch, kDead);
    return buf;
  }
  if (rec.code == intranode::kFailMismatch) {
    int f = 0;
    while (f < intranode::kSigFields && rec.mine[f] == rec.theirs[f]) ++f;
    if (f == intranode::kSigFields) {
      std::snprintf(buf, sizeof(buf),
                    "jax_ep: rank %d and rank %d made different calls in the %s (call %llu): their signatures "
                    "differ%s",
                    rec.rank, rec.peer, intranode::op_name(rec.op), rec.epoch, kDead);
    } else {
      std::snprintf(buf, sizeof(buf),
                    "jax_ep: rank %d and rank %d made different calls in the %s (call %llu): %s is %u on rank %d "
                    "and %u on rank %d; every rank must make the same jax_ep calls with the same shapes and "
                    "options%s",
                    rec.rank, rec.peer, intranode::op_name(rec.op), rec.epoch,
                    signature_field_name(f, static_cast<int>(rec.mine[intranode::kSigOp])), rec.mine[f],
                    rec.rank, rec.theirs[f], rec.peer, kDead);
    }
    return buf;
  }
  if (rec.code == intranode::kFailBadHandle) {
    std::snprintf(buf, sizeof(buf),
                  "jax_ep: rank %d's %s was given a handle whose row %llu names %lld, out of range (a rank, "
                  "token or row no dispatch of these shapes on this buffer produces): pass the handle of the "
                  "dispatch that this call answers, from the same buffer; the row was skipped%s",
                  rec.rank, intranode::op_name(rec.op), rec.epoch, static_cast<long long>(rec.peer_epoch), kDead);
    return buf;
  }
  if (rec.code == intranode::kFailAborted) {
    std::snprintf(buf, sizeof(buf),
                  "jax_ep: rank %d stopped its %s: rank %d failed first (%s; see rank %d's error)%s", rec.rank,
                  rec.op < 0 ? "next call" : intranode::op_name(rec.op), rec.peer,
                  fail_kind(static_cast<int>(rec.peer_epoch)), rec.peer, kDead);
    return buf;
  }
  std::snprintf(buf, sizeof(buf),
                "jax_ep: rank %d timed out after %.1f s in the %s barrier waiting for rank %d "
                "(this rank is at call %llu, rank %d at %llu): a peer did not make the same jax_ep "
                "call; every rank was told to stop%s",
                rec.rank, rec.seconds, intranode::op_name(rec.op), rec.peer, rec.epoch, rec.peer,
                rec.peer_epoch, kDead);
  return buf;
}

}  // namespace jax_ep
