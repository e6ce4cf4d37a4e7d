#include "engine/snapshot.h"

#include <xxhash.h>

#include <cstring>

#include "absl/strings/str_cat.h"

namespace retnet::engine {
namespace {

constexpr char kMagic[] = "RNSNAP01";

template <typename T>
void Put(std::string& out, T value) {
  char bytes[sizeof(T)];
  std::memcpy(bytes, &value, sizeof(T));  // the supported platforms are little-endian
  out.append(bytes, sizeof(T));
}

class Reader {
 public:
  explicit Reader(std::string_view bytes) : bytes_(bytes) {}
  template <typename T>
  bool Get(T* value) {
    if (bytes_.size() - pos_ < sizeof(T)) return false;
    std::memcpy(value, bytes_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return true;
  }
  bool GetBytes(size_t n, std::string* out) {
    if (bytes_.size() - pos_ < n) return false;
    out->assign(bytes_.data() + pos_, n);
    pos_ += n;
    return true;
  }
  size_t pos() const { return pos_; }
  size_t left() const { return bytes_.size() - pos_; }

 private:
  std::string_view bytes_;
  size_t pos_ = 0;
};

}  // namespace

uint64_t SnapshotChecksum(uint32_t version, std::string_view bytes) {
  if (version == 1) return common::Fnv1a(bytes);
  return XXH3_64bits(bytes.data(), bytes.size());
}

std::string EncodeSnapshot(const SnapshotData& d, uint32_t version) {
  std::string out;
  out.reserve(8 + 4 + 8 + 4 * 8 + 4 + 8 + 1 + 8 * 5 + 8 * d.history.size() + 17 + 8 +
              d.state.size() + 8);
  out.append(kMagic, 8);
  Put<uint32_t>(out, version);
  Put<uint64_t>(out, d.fingerprint);
  for (int64_t v : {d.layers, d.heads, d.d_k, d.d_v}) Put<int64_t>(out, v);
  Put<uint32_t>(out, d.dtype);
  Put<int64_t>(out, d.position);
  Put<uint8_t>(out, d.pending_token.has_value() ? 1 : 0);
  Put<int64_t>(out, d.pending_token.value_or(-1));
  Put<uint64_t>(out, d.seed);
  Put<uint64_t>(out, d.counter);
  Put<uint64_t>(out, d.history.size());
  for (int64_t t : d.history) Put<int64_t>(out, t);
  if (version >= 3) {
    Put<uint8_t>(out, d.transcript.has_value() ? 1 : 0);
    Put<int64_t>(out, d.transcript ? d.transcript->length : 0);
    Put<uint64_t>(out, d.transcript ? d.transcript->digest : 0);
  }
  Put<uint64_t>(out, d.state.size());
  out += d.state;
  Put<uint64_t>(out, SnapshotChecksum(version, out));
  return out;
}

absl::StatusOr<SnapshotData> DecodeSnapshot(std::string_view bytes) {
  auto bad = [](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat("snapshot: ", why));
  };
  if (bytes.size() < 8 + 4 + 8) return bad("truncated");
  if (bytes.substr(0, 8) != std::string_view(kMagic, 8))
    return bad("not a retnet-serve session snapshot (bad magic)");
  uint32_t version = 0;
  std::memcpy(&version, bytes.data() + 8, 4);
  if (version < kOldestSnapshotVersion || version > kSnapshotVersion) {
    return bad(absl::StrCat("unsupported version ", version, " (this server reads ",
                            kOldestSnapshotVersion, " to ", kSnapshotVersion, ")"));
  }
  uint64_t stored_sum = 0;
  std::memcpy(&stored_sum, bytes.data() + bytes.size() - 8, 8);
  if (SnapshotChecksum(version, bytes.substr(0, bytes.size() - 8)) != stored_sum)
    return bad("checksum mismatch (corrupted)");
  Reader r(bytes.substr(0, bytes.size() - 8));
  std::string magic;
  r.GetBytes(8, &magic);
  SnapshotData d;
  uint8_t has_pending = 0;
  int64_t pending = 0;
  uint64_t n = 0;
  r.Get(&version);  // checked above
  if (!r.Get(&d.fingerprint) || !r.Get(&d.layers) || !r.Get(&d.heads) || !r.Get(&d.d_k) ||
      !r.Get(&d.d_v) || !r.Get(&d.dtype) || !r.Get(&d.position) || !r.Get(&has_pending) ||
      !r.Get(&pending) || !r.Get(&d.seed) || !r.Get(&d.counter) || !r.Get(&n)) {
    return bad("truncated header");
  }
  if (n > r.left() / 8) return bad("history length exceeds the snapshot");
  d.history.resize(n);
  for (auto& t : d.history) r.Get(&t);
  if (has_pending) d.pending_token = pending;
  if (version >= 3) {
    uint8_t has_transcript = 0;
    common::Transcript t;
    if (!r.Get(&has_transcript) || !r.Get(&t.length) || !r.Get(&t.digest))
      return bad("truncated transcript");
    if (has_transcript > 1 || t.length < 0) return bad("invalid transcript");
    if (has_transcript) d.transcript = t;
  }
  uint64_t state_len = 0;
  if (!r.Get(&state_len) || state_len != r.left())
    return bad("state length does not match the snapshot");
  r.GetBytes(state_len, &d.state);
  return d;
}

}  // namespace retnet::engine
