// Stop strings are matched across token boundaries; partial stops and split UTF-8 are held back.
#include "engine/stop_matcher.h"

#include <gtest/gtest.h>

namespace retnet::engine {
namespace {

TEST(StopMatcherTest, MatchesAcrossTokensAndNeverEmitsAPartialStop) {
  StopMatcher m({"END", "\n\n"});
  std::string out;
  out += m.Append("hello E");
  EXPECT_EQ(out, "hello ");  // "E" could start "END"
  out += m.Append("N");
  EXPECT_EQ(out, "hello ");
  out += m.Append("Dless");
  EXPECT_TRUE(m.stopped());
  EXPECT_EQ(m.matched_stop(), "END");
  EXPECT_EQ(out, "hello ");
  EXPECT_EQ(m.Append("more"), "");
  EXPECT_EQ(m.Flush(), "");
}

TEST(StopMatcherTest, ReleasesHeldTextWhenTheStopDoesNotMaterialise) {
  StopMatcher m({"END"});
  EXPECT_EQ(m.Append("an E"), "an ");
  EXPECT_EQ(m.Append("X"), "EX");
  EXPECT_EQ(m.Append("EN"), "");
  EXPECT_EQ(m.Flush(), "EN");
  EXPECT_FALSE(m.stopped());
}

TEST(StopMatcherTest, EarliestStartingStopWinsAndUtf8IsNotSplit) {
  StopMatcher m({"bc", "abcd"});
  EXPECT_EQ(m.Append("xabcd"), "x");  // the stop that starts first wins
  EXPECT_EQ(m.matched_stop(), "abcd");
  StopMatcher u({});
  EXPECT_EQ(u.Append("caf\xc3"), "caf");
  EXPECT_EQ(u.Append("\xa9!"), "\xc3\xa9!");
}

}  // namespace
}  // namespace retnet::engine
