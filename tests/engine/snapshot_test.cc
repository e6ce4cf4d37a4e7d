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
  EXPECT_EQ(d->state, Sample().state);
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
