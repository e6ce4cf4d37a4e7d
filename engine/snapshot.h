// File: engine/snapshot.h
//
// The session snapshot byte format (version 3), all integers little-endian:
//
//   "RNSNAP01" | u32 version | u64 model fingerprint | i64 layers, heads, d_k, d_v | u32 dtype
//   (0 = float32) | i64 position | u8 has_pending | i64 pending token | u64 sampler seed |
//   u64 sampler counter | u64 n | n x i64 token history | u8 has_transcript | i64 transcript
//   length | u64 transcript digest | u64 state bytes | state (fp32, [layers, heads, d_k, d_v]) |
//   u64 checksum of every preceding byte
//
// Version 3 added the transcript (common/transcript.h); older snapshots restore with it unknown.
// The checksum is XXH3-64 (libxxhash, ~30 GB/s) from version 2 on; version 1 (FNV-1a 64, about
// 1 GB/s: 0.1 s for the 96 MiB state of a 1.3B model) is still decoded, so snapshots written by
// older servers restore. Decode() checks the framing and the checksum; the engine checks the
// fingerprint and dims. Free functions, no shared state; call them off the engine thread.
#ifndef RETNET_ENGINE_SNAPSHOT_H_
#define RETNET_ENGINE_SNAPSHOT_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "common/strings.h"
#include "common/transcript.h"

namespace retnet::engine {

inline constexpr uint32_t kSnapshotVersion = 3;
// The versions DecodeSnapshot() accepts.
inline constexpr uint32_t kOldestSnapshotVersion = 1;

struct SnapshotData {
  uint64_t fingerprint = 0;
  int64_t layers = 0, heads = 0, d_k = 0, d_v = 0;
  uint32_t dtype = 0;
  int64_t position = 0;
  std::optional<int64_t> pending_token;
  uint64_t seed = 0, counter = 0;
  std::vector<int64_t> history;
  std::optional<common::Transcript> transcript;  // unset when unknown (and before version 3)
  std::string state;                             // raw fp32 bytes
};

// `version` is for tests (writing what an older server wrote).
std::string EncodeSnapshot(const SnapshotData& data, uint32_t version = kSnapshotVersion);
// INVALID_ARGUMENT naming what is wrong (truncated, bad magic, unsupported version, checksum).
absl::StatusOr<SnapshotData> DecodeSnapshot(std::string_view bytes);

// The checksum of `version` over `bytes`.
uint64_t SnapshotChecksum(uint32_t version, std::string_view bytes);

}  // namespace retnet::engine

#endif  // RETNET_ENGINE_SNAPSHOT_H_
