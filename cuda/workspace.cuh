// The map of a registered buffer (IntranodeBuffer, xla_ffi/runtime.h), the
// one description of its offsets for normal mode (intranode*.cu) and low
// latency (low_latency*.cu):
//
//   [0, kSignalBytes)                    Signals (intranode.cuh): epoch,
//                                        arrival slots, call counters, the
//                                        abort word, the call signatures
//   [kSignalBytes, kStagingOffset)       workspace: fixed regions, below
//   [kStagingOffset, + 2 * half bytes)   two staging halves (call n uses
//                                        half n % 2), each kAlign-aligned
//
// The workspace holds words whose place must not depend on a call's shapes
// (a staging half's contents depend on earlier calls' shapes and could pass
// for a flag). Each mode has its own regions, disjoint within the mode and
// inside the workspace (checked below). The two modes' regions overlap: a
// buffer serves calls of one mode (jax_ep.Buffer creates one buffer per mode).
// Python reads these values through the extension (jax_ep._C.workspace_map,
// jax_ep/runtime.py).
#pragma once

#include <cstddef>

namespace jax_ep {
namespace intranode {

inline constexpr int kMaxRanks = 64;
inline constexpr std::size_t kSignalBytes = 4096;
inline constexpr std::size_t kWorkspaceBytes = 144 * 1024;
inline constexpr std::size_t kAlign = 256;  // of each staging half and of every offset inside one
// Normal mode's limits the workspace regions are sized for.
inline constexpr int kMaxExperts = 1024;
inline constexpr int kMaxChunks = 2048;
inline constexpr int kMaxRingChunks = 32;
inline constexpr int kMaxCombineBlocks = 512;

}  // namespace intranode

namespace low_latency {
inline constexpr std::size_t kCountSlots = 2048;  // >= (E/R) * R
}  // namespace low_latency

namespace workspace {

// Where the staging halves start, and the least a buffer can be (two empty
// halves, each rounded to kAlign).
inline constexpr std::size_t kStagingOffset = intranode::kSignalBytes + intranode::kWorkspaceBytes;
inline constexpr std::size_t kMinBufferBytes = kStagingOffset + 2 * intranode::kAlign;

// The bytes of each half of a buffer of num_bytes (the same on every rank:
// every rank's buffer has the same size).
inline constexpr std::size_t staging_half_bytes(std::size_t num_bytes) {
  return (num_bytes - kStagingOffset) / 2 / intranode::kAlign * intranode::kAlign;
}

// Byte offsets after the signal block. Normal mode:
inline constexpr std::size_t kRoute = 0;                    // RouteWorkspace (intranode_dispatch.cu, local only)
inline constexpr std::size_t kRouteBytes = 64 * 1024;
inline constexpr std::size_t kChunkFlags = 64 * 1024;       // u64 [2][kMaxChunks]: chunk_flags
inline constexpr std::size_t kRingFlags = 96 * 1024;        // u64 [2][kMaxRanks][kMaxRingChunks]: ring_flags
inline constexpr std::size_t kProgress = 128 * 1024;        // u64 [kMaxCombineBlocks]: reduce_progress
inline constexpr std::size_t kRegionStarts = 132 * 1024;    // u64 [2][kMaxRanks]: region_starts
// Low latency (low_latency.cuh, low_latency_common.cuh, low_latency_dispatch.cu, low_latency_pull.cu):
inline constexpr std::size_t kDispatchCounts = 0;           // u64 [2][kCountSlots]: dispatch_counts
inline constexpr std::size_t kCombineFlags = 32 * 1024;     // u64 [2][kMaxRanks]: combine_flags
inline constexpr std::size_t kPullFlags = 34 * 1024;        // u64 [2][kMaxRanks]: pull_flags
inline constexpr std::size_t kCombineDone = 36 * 1024;      // u64 [2][kMaxRanks]: combine_done
inline constexpr std::size_t kReceivedCounts = 40 * 1024;   // int [kCountSlots]: received_counts
inline constexpr std::size_t kSentMarks = 60 * 1024;        // u64 [2]: sent_mark
inline constexpr std::size_t kPullCounts = 64 * 1024;       // u64 [2][kCountSlots]: pull_counts

// One region of the map: its name (the accessor that addresses it), mode
// (0 normal, 1 low latency), offset after the signal block and bytes.
struct Region {
  const char* name;
  int mode;
  std::size_t offset, bytes;
};
inline constexpr std::size_t kU64 = 8;
inline constexpr Region kRegions[] = {
    {"route", 0, kRoute, kRouteBytes},
    {"chunk_flags", 0, kChunkFlags, 2 * intranode::kMaxChunks * kU64},
    {"ring_flags", 0, kRingFlags, 2 * intranode::kMaxRanks * intranode::kMaxRingChunks * kU64},
    {"reduce_progress", 0, kProgress, intranode::kMaxCombineBlocks * kU64},
    {"region_starts", 0, kRegionStarts, 2 * intranode::kMaxRanks * kU64},
    {"dispatch_counts", 1, kDispatchCounts, 2 * low_latency::kCountSlots * kU64},
    {"combine_flags", 1, kCombineFlags, 2 * intranode::kMaxRanks * kU64},
    {"pull_flags", 1, kPullFlags, 2 * intranode::kMaxRanks * kU64},
    {"combine_done", 1, kCombineDone, 2 * intranode::kMaxRanks * kU64},
    {"received_counts", 1, kReceivedCounts, low_latency::kCountSlots * sizeof(int)},
    {"sent_mark", 1, kSentMarks, 2 * kU64},
    {"pull_counts", 1, kPullCounts, 2 * low_latency::kCountSlots * kU64},
};
inline constexpr int kNumRegions = sizeof(kRegions) / sizeof(kRegions[0]);

// True when every region lies inside the workspace, 8-byte aligned, and no
// two regions of one mode overlap.
constexpr bool map_is_valid() {
  for (int i = 0; i < kNumRegions; ++i) {
    const Region& a = kRegions[i];
    if (a.offset % kU64 != 0 || a.offset + a.bytes > intranode::kWorkspaceBytes) return false;
    for (int j = i + 1; j < kNumRegions; ++j) {
      const Region& b = kRegions[j];
      if (a.mode == b.mode && a.offset < b.offset + b.bytes && b.offset < a.offset + a.bytes) return false;
    }
  }
  return true;
}
static_assert(map_is_valid(), "a workspace region leaves the workspace or overlaps another of its mode");
static_assert(intranode::kSignalBytes % intranode::kAlign == 0 && kStagingOffset % intranode::kAlign == 0,
              "the staging halves must start kAlign-aligned");

}  // namespace workspace
}  // namespace jax_ep
