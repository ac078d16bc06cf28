// Low-latency buffers: the header words of a fresh buffer and its size. The
// kernels and their launchers are in low_latency_dispatch.cu (push dispatch),
// low_latency_pull.cu (pulled dispatch) and low_latency_combine.cu; their
// shared device helpers in low_latency_common.cuh and low_latency_dispatch.cuh.
// See low_latency.cuh for the protocol.
#include "low_latency_common.cuh"

namespace jax_ep {
namespace low_latency {

std::vector<unsigned long long> fresh_header(unsigned long long start) {
  std::vector<unsigned long long> words(workspace::kStagingOffset / 8, 0);
  auto* signals = reinterpret_cast<Signals*>(words.data());
  signals->epoch = start;
  for (auto& a : signals->arrived) a = start;
  signals->pad[kDispatchCounterPad] = start;
  signals->pad[kCombineCounterPad] = start;
  // Every protocol word of the workspace reads as the call before the first.
  for (std::size_t i = intranode::kSignalBytes / 8; i < words.size(); ++i) words[i] = serial_word(start, 0);
  words[kSentMarkOffset / 8] = words[kSentMarkOffset / 8 + 1] = start;
  return words;
}

std::size_t buffer_bytes(const Shape& s, int num_ranks) {
  return workspace::kStagingOffset + 2 * Layout::make(s, num_ranks).half_bytes + intranode::kAlign;
}

}  // namespace low_latency
}  // namespace jax_ep
