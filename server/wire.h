// File: server/wire.h
//
// The service's own message (de)serialization. The service registers its methods as raw
// (ByteBuffer) callback methods and parses requests here, because gRPC's generated callback
// handlers answer a request they cannot parse with UNIMPLEMENTED and an empty message (as if the
// method did not exist), and a streaming read that cannot be parsed looks like the client closing
// its side. Parsing here turns both into INVALID_ARGUMENT naming the field: "turn.text: not valid
// UTF-8", or "request: not a valid retnet.v1.GenerateRequest message".
//
// Also the per-call log line every RPC and turn writes (LogCall).
//
// Threading: pure functions and per-call objects; UnaryReply is driven by one call.
#ifndef RETNET_SERVER_WIRE_H_
#define RETNET_SERVER_WIRE_H_

#include <google/protobuf/message.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/support/byte_buffer.h>

#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/time/clock.h"
#include "server/status.h"

namespace retnet::server {

// Parses `in` into `out`. InvalidArgument naming the first string field that is not valid UTF-8
// (as a path from the request's root, e.g. "stopping.stop"), or saying the bytes are not a valid
// message of `out`'s type. `out` is cleared on failure.
absl::Status ParseRequest(const grpc::ByteBuffer& in, google::protobuf::Message* out);

// Serializes `msg` into `out` (replacing its contents).
void SerializeTo(const google::protobuf::Message& msg, grpc::ByteBuffer* out);

// Routes protobuf's own log lines (e.g. its note about a string field with invalid UTF-8, which
// the service answers itself) to spdlog at debug level. Idempotent.
void RouteProtobufLogsToSpdlog();

// Makes every spdlog line one JSON object {"time","level","thread","msg"}: the message is
// escaped (quotes, backslashes, control characters) and made valid UTF-8 (U+FFFD). Call before
// other threads log.
void UseJsonLogs();

// One line per RPC and per turn: method, session, status code, tokens and milliseconds.
// `session` must already be bounded and printable (it is only logged after validation);
// `prompt_tokens`/`completion_tokens` are -1 when they do not apply.
void LogCall(std::string_view method, std::string_view session, grpc::StatusCode code,
             int64_t prompt_tokens, int64_t completion_tokens, absl::Time start);

// A unary call's reactor that owns the typed response: Done() serializes it (when OK) into the
// raw response buffer, logs the call and finishes. Deletes itself when gRPC is done with it.
template <typename Response>
class UnaryReply final : public grpc::ServerUnaryReactor {
 public:
  UnaryReply(const char* method, grpc::ByteBuffer* out) : method_(method), out_(out) {}
  Response* response() { return &response_; }
  // The session the call is about, for the log line (set once validated).
  void set_session(std::string session) { session_ = std::move(session); }
  // Exactly once.
  void Done(const absl::Status& status) {
    if (status.ok()) SerializeTo(response_, out_);
    const grpc::Status reply = ToGrpc(status);
    LogCall(method_, session_, reply.error_code(), -1, -1, start_);
    Finish(reply);
  }
  void OnDone() override { delete this; }

 private:
  const char* const method_;
  grpc::ByteBuffer* const out_;
  const absl::Time start_ = absl::Now();
  std::string session_;
  Response response_;
};

}  // namespace retnet::server

#endif  // RETNET_SERVER_WIRE_H_
