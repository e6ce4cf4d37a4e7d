// TurnStream: tokens that arrive while a write is in flight leave merged in one chunk; the turn
// ends with a Final carrying usage, or with the right status.
#include "server/turn_stream.h"

#include <gtest/gtest.h>

namespace retnet::server {
namespace {

engine::TokenEvent Token(int64_t id, const std::string& text) {
  engine::TokenEvent e;
  e.token = id;
  e.text = text;
  return e;
}

TEST(TurnStreamTest, TokensReadyTogetherAreMergedIntoOneChunk) {
  TurnStream stream("s", 1024);
  int wakes = 0;
  stream.Attach([&] { ++wakes; });
  retnet::v1::GenerateResponse out;
  grpc::Status status;
  EXPECT_EQ(stream.Next(&out, &status), TurnStream::Action::kNothing);
  stream.OnToken(Token(1, "a"));
  ASSERT_EQ(stream.Next(&out, &status), TurnStream::Action::kWriteChunk);  // the first write
  EXPECT_EQ(out.chunk().tokens_size(), 1);
  // While that write is in flight the engine produces three more.
  stream.OnToken(Token(2, "b"));
  stream.OnToken(Token(3, ""));
  stream.OnToken(Token(4, "cd"));
  EXPECT_EQ(wakes, 4);
  ASSERT_EQ(stream.Next(&out, &status), TurnStream::Action::kWriteChunk);
  ASSERT_EQ(out.chunk().tokens_size(), 3);
  EXPECT_EQ(out.chunk().tokens(0).id(), 2);
  EXPECT_EQ(out.chunk().tokens(2).text(), "cd");
  engine::Finish f;
  f.reason = engine::FinishReason::kStop;
  f.stop_string = "\n";
  f.text = "tail";
  f.prompt_tokens = 5;
  f.completion_tokens = 4;
  f.position = 8;
  stream.OnFinish(f);
  ASSERT_EQ(stream.Next(&out, &status), TurnStream::Action::kWriteFinal);
  EXPECT_EQ(out.final().finish_reason(), retnet::v1::FINISH_REASON_STOP_SEQUENCE);
  EXPECT_EQ(out.final().text(), "tail");
  EXPECT_EQ(out.final().session_id(), "s");
  EXPECT_EQ(out.final().usage().session_tokens_total(), 9);
  EXPECT_EQ(out.final().usage().state_bytes(), 1024);
  EXPECT_EQ(stream.Next(&out, &status), TurnStream::Action::kNothing);  // over
  stream.Detach();
  stream.OnToken(Token(5, "late"));  // after Detach the reactor is not called
  EXPECT_EQ(wakes, 5);
}

TEST(TurnStreamTest, ErrorsCancellationAndDeadlinesEndWithTheirStatus) {
  auto end_with = [](engine::FinishReason reason, bool client_gone) {
    TurnStream stream("s", 0);
    if (client_gone) stream.ClientGone();
    engine::Finish f;
    f.reason = reason;
    f.status = absl::InternalError("boom");
    stream.OnFinish(f);
    retnet::v1::GenerateResponse out;
    grpc::Status status;
    EXPECT_EQ(stream.Next(&out, &status), TurnStream::Action::kEndWithStatus);
    return status.error_code();
  };
  EXPECT_EQ(end_with(engine::FinishReason::kError, false), grpc::StatusCode::INTERNAL);
  EXPECT_EQ(end_with(engine::FinishReason::kDeadline, false), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_EQ(end_with(engine::FinishReason::kCancelled, true), grpc::StatusCode::CANCELLED);
  EXPECT_EQ(end_with(engine::FinishReason::kLength, true), grpc::StatusCode::CANCELLED);
}

}  // namespace
}  // namespace retnet::server
