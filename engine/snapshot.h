// File: engine/snapshot.h
//
// The session snapshot byte format (version 1), all integers little-endian:
//
//   "RNSNAP01" | u32 version | u64 model fingerprint | i64 layers, heads, d_k, d_v | u32 dtype
//   (0 = float32) | i64 position | u8 has_pending | i64 pending token | u64 sampler seed |
//   u64 sampler counter | u64 n | n x i64 token history | u64 state bytes | state (fp32,
//   [layers, heads, d_k, d_v]) | u64 FNV-1a checksum of every preceding byte
//
// Decode() checks the framing and the checksum; the engine checks the fingerprint and dims.
// Free functions, no shared state.
#ifndef RETNET_ENGINE_SNAPSHOT_H_
#define RETNET_ENGINE_SNAPSHOT_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "common/strings.h"

namespace retnet::engine {

inline constexpr uint32_t kSnapshotVersion = 1;

struct SnapshotData {
  uint64_t fingerprint = 0;
  int64_t layers = 0, heads = 0, d_k = 0, d_v = 0;
  uint32_t dtype = 0;
  int64_t position = 0;
  std::optional<int64_t> pending_token;
  uint64_t seed = 0, counter = 0;
  std::vector<int64_t> history;
  std::string state;  // raw fp32 bytes
};

std::string EncodeSnapshot(const SnapshotData& data);
// INVALID_ARGUMENT naming what is wrong (truncated, bad magic, unsupported version, checksum).
absl::StatusOr<SnapshotData> DecodeSnapshot(std::string_view bytes);

using common::Fnv1a;  // the snapshot checksum

}  // namespace retnet::engine

#endif  // RETNET_ENGINE_SNAPSHOT_H_
