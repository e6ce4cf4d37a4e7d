// The snapshot format round-trips and refuses truncated, corrupted or foreign bytes.
#include "engine/snapshot.h"

#include <gtest/gtest.h>

namespace retnet::engine {
namespace {

SnapshotData Sample() {
  SnapshotData d;
  d.fingerprint = 0x1234;
  d.layers = 2;
  d.heads = 3;
  d.d_k = 4;
  d.d_v = 5;
  d.position = 77;
  d.pending_token = 9;
  d.seed = 42;
  d.counter = 7;
  d.history = {1, 2, 3};
  d.transcript = common::Transcript::Of("Hello there.");
  d.state = std::string(2 * 3 * 4 * 5 * 4, '\x07');
  return d;
}

TEST(SnapshotTest, RoundTrips) {
  auto d = DecodeSnapshot(EncodeSnapshot(Sample()));
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->fingerprint, 0x1234u);
  EXPECT_EQ(d->position, 77);
  EXPECT_EQ(d->pending_token, 9);
  EXPECT_EQ(d->seed, 42u);
  EXPECT_EQ(d->counter, 7u);
  EXPECT_EQ(d->history, std::vector<int64_t>({1, 2, 3}));
  EXPECT_EQ(d->transcript, Sample().transcript);
  EXPECT_EQ(d->state, Sample().state);
  SnapshotData unknown = Sample();
  unknown.transcript.reset();
  auto u = DecodeSnapshot(EncodeSnapshot(unknown));
  ASSERT_TRUE(u.ok()) << u.status();
  EXPECT_FALSE(u->transcript.has_value());
}

// Snapshots written by older servers (version 1: FNV-1a checksum; version 2: no transcript) still
// restore; versions this server does not know are refused by name.
TEST(SnapshotTest, DecodesTheOlderVersionsAndRefusesUnknownOnes) {
  const std::string v1 = EncodeSnapshot(Sample(), 1);
  const std::string v2 = EncodeSnapshot(Sample(), 2);
  ASSERT_EQ(v1.size(), v2.size());
  EXPECT_NE(v1.substr(v1.size() - 8), v2.substr(v2.size() - 8));  // different checksums
  EXPECT_EQ(EncodeSnapshot(Sample()).size(), v2.size() + 17);     // + the transcript
  for (const std::string& old : {v1, v2}) {
    auto d = DecodeSnapshot(old);
    ASSERT_TRUE(d.ok()) << d.status();
    EXPECT_EQ(d->history, Sample().history);
    EXPECT_EQ(d->state, Sample().state);
    EXPECT_FALSE(d->transcript.has_value());  // unknown: older servers did not keep it
  }
  std::string v1_damaged = v1;
  v1_damaged[v1.size() / 2] ^= 4;
  EXPECT_EQ(DecodeSnapshot(v1_damaged).status().code(), absl::StatusCode::kInvalidArgument);
  const auto future = DecodeSnapshot(EncodeSnapshot(Sample(), kSnapshotVersion + 1));
  EXPECT_EQ(future.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(future.status().message().find("unsupported version"), std::string::npos)
      << future.status();
}

TEST(SnapshotTest, RefusesDamage) {
  const std::string bytes = EncodeSnapshot(Sample());
  for (size_t i : {0ul, 9ul, 40ul, bytes.size() / 2, bytes.size() - 1}) {
    std::string bad = bytes;
    bad[i] ^= 1;
    EXPECT_EQ(DecodeSnapshot(bad).status().code(), absl::StatusCode::kInvalidArgument)
        << "byte " << i;
  }
  EXPECT_EQ(DecodeSnapshot(bytes.substr(0, bytes.size() - 3)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DecodeSnapshot("").status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace retnet::engine
