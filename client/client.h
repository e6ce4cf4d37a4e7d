// File: client/client.h
//
// The C++ client library behind `retnet-client`: a channel to a retnet-serve server (plaintext or
// TLS, optional API key), per-call contexts that carry the deadline, the bearer token and the
// `x-session-id` routing header, streaming Generate/Chat helpers, and plain-language explanations
// of every gRPC status code.
//
// Errors are absl::Status (the gRPC code maps one to one onto absl's); the RPC's own message is
// kept and a hint for the operator is available through Explain().
//
// Threading: a Client is immutable after Connect() and may be shared by any number of threads
// (the gRPC stub is thread-safe). Each call uses its own ClientContext.
#ifndef RETNET_CLIENT_CLIENT_H_
#define RETNET_CLIENT_CLIENT_H_

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "client/received.h"
#include "retnet/v1/retnet.grpc.pb.h"

namespace retnet::client {

namespace v1 = ::retnet::v1;

// The metadata key a gateway hashes on to keep a session on the replica that holds its state.
inline constexpr char kSessionHeader[] = "x-session-id";

struct ConnectionOptions {
  std::string target = "localhost:50051";
  bool tls = false;             // TLS with the system roots (or tls_ca_file)
  std::string tls_ca_file;      // PEM roots; implies tls
  std::string tls_server_name;  // overrides the name checked against the certificate
  std::string api_key;          // sent as "authorization: Bearer <key>"
  absl::Duration timeout = absl::Seconds(300);  // per call (a whole stream counts as one call)
  // Attempts after the first for a call that failed with UNAVAILABLE before the server sent it
  // anything (gRPC's own retry: exponential backoff from 0.1 s; at most 4). Behind a gateway
  // this carries a call over a replica's drain to the next replica. 0 = no retries.
  int retries = 3;
};

// The channel's service config for `retries` (empty for 0).
std::string RetryServiceConfig(int retries);

// A finished turn as the client saw it.
struct TurnResult {
  std::vector<int64_t> tokens;
  std::string text;  // streamed pieces plus Final.text
  v1::Final final;
};

class Client {
 public:
  static absl::StatusOr<Client> Connect(const ConnectionOptions& options);

  const ConnectionOptions& options() const { return options_; }
  v1::RetNet::Stub* stub() const { return stub_.get(); }
  const std::shared_ptr<grpc::Channel>& channel() const { return channel_; }

  // Deadline, authorization and (when `session_id` is not empty) x-session-id.
  void Prepare(grpc::ClientContext* context, const std::string& session_id = "") const;

  // Streams whose reads tell an unparsable message from the end of the stream (received.h):
  // on `!parsed`, cancel through the context and report UnparsableResponse<M>().
  using GenerateStream = grpc::ClientReader<Received<v1::GenerateResponse>>;
  using ChatStream = grpc::ClientReaderWriter<v1::ChatRequest, Received<v1::GenerateResponse>>;
  std::unique_ptr<GenerateStream> StartGenerate(grpc::ClientContext* context,
                                                const v1::GenerateRequest& request) const;
  std::unique_ptr<ChatStream> StartChat(grpc::ClientContext* context) const;

  // One Generate stream; `on_chunk` (may be empty) sees every TokenChunk as it arrives.
  // A message from the server that cannot be parsed ends the call at once with INTERNAL.
  absl::StatusOr<TurnResult> Generate(
      const v1::GenerateRequest& request,
      const std::function<void(const v1::TokenChunk&)>& on_chunk = nullptr) const;

  absl::StatusOr<v1::ModelInfo> GetModelInfo() const;
  absl::StatusOr<v1::Session> GetSession(const std::string& id) const;
  absl::StatusOr<std::vector<v1::Session>> ListSessions() const;
  absl::StatusOr<v1::Session> ForkSession(const std::string& id, const std::string& new_id) const;
  absl::Status DeleteSession(const std::string& id) const;
  absl::StatusOr<std::string> ExportSession(const std::string& id) const;
  absl::StatusOr<v1::Session> ImportSession(const std::string& id, const std::string& data,
                                            size_t chunk_bytes = 1 << 20) const;
  absl::StatusOr<std::vector<int64_t>> Tokenize(const std::string& text, bool add_bos) const;
  // The ids' text (valid UTF-8, U+FFFD for ill-formed bytes) and, in `raw`, their exact bytes.
  absl::StatusOr<v1::DetokenizeResponse> Detokenize(const std::vector<int64_t>& ids) const;
  // Every call above reports a response it cannot parse as INTERNAL naming the message type.
  // grpc.health.v1.Health/Check for `service` ("" = the whole server): true when SERVING.
  absl::StatusOr<bool> CheckHealth(const std::string& service = "") const;

 private:
  Client(ConnectionOptions options, std::shared_ptr<grpc::Channel> channel);
  // A unary call of the RetNet service (`method` = "GetSession", ...) whose response must parse.
  template <typename Response, typename Request>
  absl::Status Unary(const char* method, grpc::ClientContext* context, const Request& request,
                     Response* response) const;

  ConnectionOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::shared_ptr<v1::RetNet::Stub> stub_;
};

absl::Status FromGrpc(const grpc::Status& status);

// What an operator should do about a failed call (one sentence), e.g. for RESOURCE_EXHAUSTED.
std::string Explain(const absl::Status& status);

// A fresh client-side session id ("c-" + 16 hex digits): naming sessions on the client lets a
// gateway route the very first turn to the replica that will hold the state.
std::string NewSessionId();

// Finish reason without the enum prefix: "LENGTH", "EOS_TOKEN", ...
std::string FinishReasonName(v1::FinishReason reason);

}  // namespace retnet::client

#endif  // RETNET_CLIENT_CLIENT_H_
