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
  // While that write is in flight the engine produces three more: only the first of them wakes
  // the reactor (one wake per write, not per token).
  stream.OnToken(Token(2, "b"));
  stream.OnToken(Token(3, ""));
  stream.OnToken(Token(4, "cd"));
  EXPECT_EQ(wakes, 2);
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
  EXPECT_EQ(wakes, 3);
}

// The engine thread hands over bare events; Next() builds the protobuf with everything the
// request asked for (log probabilities, alternatives, exact bytes) and in order, and the end
// waits until every token has been taken.
TEST(TurnStreamTest, NextBuildsTheChunkFromTheEventsInOrder) {
  TurnStream stream("s", 0);
  stream.SetTokenBytes(true);
  int wakes = 0;
  stream.Attach([&] { ++wakes; });
  for (int64_t i = 0; i < 50; ++i) {
    engine::TokenEvent e = Token(i, std::string(1, static_cast<char>('a' + i % 26)));
    e.bytes = e.text;
    e.has_logprob = true;
    e.logprob = -0.5f * static_cast<float>(i);
    e.top_logprobs = {{i, e.logprob}, {i + 1, e.logprob - 1}};
    stream.OnToken(std::move(e));
  }
  engine::Finish f;
  f.reason = engine::FinishReason::kLength;
  f.completion_tokens = 50;
  stream.OnFinish(f);
  EXPECT_EQ(wakes, 2);  // the first token, and the end
  retnet::v1::GenerateResponse out;
  grpc::Status status;
  ASSERT_EQ(stream.Next(&out, &status), TurnStream::Action::kWriteChunk);  // tokens before Final
  ASSERT_EQ(out.chunk().tokens_size(), 50);
  for (int i = 0; i < 50; ++i) {
    const retnet::v1::Token& t = out.chunk().tokens(i);
    EXPECT_EQ(t.id(), i);
    EXPECT_EQ(t.token_bytes(), t.text());
    EXPECT_FLOAT_EQ(t.logprob(), -0.5f * static_cast<float>(i));
    ASSERT_EQ(t.top_logprobs_size(), 2);
    EXPECT_EQ(t.top_logprobs(1).id(), i + 1);
  }
  ASSERT_EQ(stream.Next(&out, &status), TurnStream::Action::kWriteFinal);
  EXPECT_EQ(out.final().usage().completion_tokens(), 50);
  EXPECT_FALSE(out.has_chunk());
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
