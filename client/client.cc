#include "client/client.h"

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/impl/client_unary_call.h>
#include <grpcpp/impl/rpc_method.h>
#include <grpcpp/support/sync_stream.h>

#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "common/strings.h"

namespace retnet::client {

namespace {

// RpcMethod keeps the pointer: the paths must be literals.
#define RETNET_METHOD(name) "/retnet.v1.RetNet/" name

grpc::internal::RpcMethod Method(const char* path, grpc::internal::RpcMethod::RpcType type) {
  return grpc::internal::RpcMethod(path, type);
}

}  // namespace

Client::Client(ConnectionOptions options, std::shared_ptr<grpc::Channel> channel)
    : options_(std::move(options)),
      channel_(std::move(channel)),
      stub_(v1::RetNet::NewStub(channel_)) {}

absl::StatusOr<Client> Client::Connect(const ConnectionOptions& options) {
  if (options.target.empty()) return absl::InvalidArgumentError("--target: empty address");
  std::shared_ptr<grpc::ChannelCredentials> creds = grpc::InsecureChannelCredentials();
  if (options.retries < 0 || options.retries > 4) {
    return absl::InvalidArgumentError("--retries: must be in [0, 4]");
  }
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  if (options.retries > 0) {
    args.SetInt(GRPC_ARG_ENABLE_RETRIES, 1);
    args.SetServiceConfigJSON(RetryServiceConfig(options.retries));
  } else {
    args.SetInt(GRPC_ARG_ENABLE_RETRIES, 0);
  }
  if (options.tls || !options.tls_ca_file.empty()) {
    grpc::SslCredentialsOptions ssl;
    if (!options.tls_ca_file.empty()) {
      std::ifstream in(options.tls_ca_file);
      if (!in) {
        return absl::NotFoundError(absl::StrCat("--tls-ca: cannot read ", options.tls_ca_file));
      }
      std::stringstream ss;
      ss << in.rdbuf();
      ssl.pem_root_certs = ss.str();
    }
    creds = grpc::SslCredentials(ssl);
    if (!options.tls_server_name.empty()) {
      args.SetSslTargetNameOverride(options.tls_server_name);
    }
  }
  return Client(options, grpc::CreateCustomChannel(options.target, creds, args));
}

void Client::Prepare(grpc::ClientContext* context, const std::string& session_id) const {
  context->set_deadline(std::chrono::system_clock::now() +
                        absl::ToChronoNanoseconds(options_.timeout));
  if (!options_.api_key.empty()) {
    context->AddMetadata("authorization", "Bearer " + options_.api_key);
  }
  if (!session_id.empty()) context->AddMetadata(kSessionHeader, session_id);
}

std::string RetryServiceConfig(int retries) {
  if (retries <= 0) return "";
  // gRPC retries only calls that have received nothing yet (no response headers): a refused call
  // (loading, draining, connection refused), never a turn that has started streaming, which the
  // server acknowledges with its headers at once. UNAVAILABLE, and CANCELLED: gRPC core cancels
  // a call that reaches a server after its shutdown began, before any handler ran
  // (grpc/grpc#41785); a call this client cancels itself is never retried.
  return absl::StrCat(
      R"({"methodConfig":[{"name":[{"service":"retnet.v1.RetNet"}],"retryPolicy":{"maxAttempts":)",
      retries + 1,
      R"(,"initialBackoff":"0.1s","maxBackoff":"2s","backoffMultiplier":2,)"
      R"("retryableStatusCodes":["UNAVAILABLE","CANCELLED"]}}]})");
}

absl::Status FromGrpc(const grpc::Status& status) {
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

template <typename Response, typename Request>
absl::Status Client::Unary(const char* method, grpc::ClientContext* context, const Request& request,
                           Response* response) const {
  Received<Response> received;
  const grpc::Status status = grpc::internal::BlockingUnaryCall(
      channel_.get(), Method(method, grpc::internal::RpcMethod::NORMAL_RPC), context, request,
      &received);
  if (!status.ok()) return FromGrpc(status);
  if (!received.parsed) {
    return UnparsableResponse<Response>(method + sizeof(RETNET_METHOD("")) - 1);  // the name
  }
  *response = std::move(received.message);
  return absl::OkStatus();
}

std::unique_ptr<Client::GenerateStream> Client::StartGenerate(
    grpc::ClientContext* context, const v1::GenerateRequest& request) const {
  return std::unique_ptr<GenerateStream>(
      grpc::internal::ClientReaderFactory<Received<v1::GenerateResponse>>::Create(
          channel_.get(),
          Method(RETNET_METHOD("Generate"), grpc::internal::RpcMethod::SERVER_STREAMING), context,
          request));
}

std::unique_ptr<Client::ChatStream> Client::StartChat(grpc::ClientContext* context) const {
  return std::unique_ptr<ChatStream>(
      grpc::internal::ClientReaderWriterFactory<v1::ChatRequest, Received<v1::GenerateResponse>>::
          Create(channel_.get(),
                 Method(RETNET_METHOD("Chat"), grpc::internal::RpcMethod::BIDI_STREAMING),
                 context));
}

absl::StatusOr<TurnResult> Client::Generate(
    const v1::GenerateRequest& request,
    const std::function<void(const v1::TokenChunk&)>& on_chunk) const {
  grpc::ClientContext ctx;
  Prepare(&ctx, request.session_id());
  auto reader = StartGenerate(&ctx, request);
  TurnResult result;
  Received<v1::GenerateResponse> received;
  const v1::GenerateResponse& msg = received.message;
  bool have_final = false;
  while (reader->Read(&received)) {
    if (!received.parsed) {
      ctx.TryCancel();
      (void)reader->Finish();
      return UnparsableResponse<v1::GenerateResponse>("Generate");
    }
    if (msg.has_chunk()) {
      for (const auto& t : msg.chunk().tokens()) {
        result.tokens.push_back(t.id());
        result.text += t.text();
      }
      if (on_chunk) on_chunk(msg.chunk());
    } else if (msg.has_final()) {
      result.final = msg.final();
      result.text += msg.final().text();
      have_final = true;
    }
  }
  grpc::Status status = reader->Finish();
  if (!status.ok()) return FromGrpc(status);
  if (!have_final) return absl::DataLossError("Generate: the stream ended without a Final message");
  return result;
}

absl::StatusOr<v1::ModelInfo> Client::GetModelInfo() const {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::ModelInfo info;
  if (absl::Status s = Unary(RETNET_METHOD("GetModelInfo"), &ctx, v1::GetModelInfoRequest(), &info);
      !s.ok())
    return s;
  return info;
}

absl::StatusOr<v1::Session> Client::GetSession(const std::string& id) const {
  grpc::ClientContext ctx;
  Prepare(&ctx, id);
  v1::GetSessionRequest req;
  req.set_session_id(id);
  v1::Session session;
  if (absl::Status s = Unary(RETNET_METHOD("GetSession"), &ctx, req, &session); !s.ok()) return s;
  return session;
}

absl::StatusOr<std::vector<v1::Session>> Client::ListSessions() const {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::ListSessionsResponse resp;
  if (absl::Status s = Unary(RETNET_METHOD("ListSessions"), &ctx, v1::ListSessionsRequest(), &resp);
      !s.ok())
    return s;
  return std::vector<v1::Session>(resp.sessions().begin(), resp.sessions().end());
}

absl::StatusOr<v1::Session> Client::ForkSession(const std::string& id,
                                                const std::string& new_id) const {
  // Routed by the source: the replica that holds the state makes the copy.
  grpc::ClientContext ctx;
  Prepare(&ctx, id);
  v1::ForkSessionRequest req;
  req.set_session_id(id);
  req.set_new_session_id(new_id);
  v1::Session session;
  if (absl::Status s = Unary(RETNET_METHOD("ForkSession"), &ctx, req, &session); !s.ok()) return s;
  return session;
}

absl::Status Client::DeleteSession(const std::string& id) const {
  grpc::ClientContext ctx;
  Prepare(&ctx, id);
  v1::DeleteSessionRequest req;
  req.set_session_id(id);
  v1::DeleteSessionResponse resp;
  return Unary(RETNET_METHOD("DeleteSession"), &ctx, req, &resp);
}

absl::StatusOr<std::string> Client::ExportSession(const std::string& id) const {
  grpc::ClientContext ctx;
  Prepare(&ctx, id);
  v1::ExportSessionRequest req;
  req.set_session_id(id);
  std::unique_ptr<grpc::ClientReader<Received<v1::SnapshotChunk>>> reader(
      grpc::internal::ClientReaderFactory<Received<v1::SnapshotChunk>>::Create(
          channel_.get(),
          Method(RETNET_METHOD("ExportSession"), grpc::internal::RpcMethod::SERVER_STREAMING), &ctx,
          req));
  Received<v1::SnapshotChunk> received;
  const v1::SnapshotChunk& chunk = received.message;
  std::string data;
  int64_t total = -1;
  while (reader->Read(&received)) {
    if (!received.parsed) {
      ctx.TryCancel();
      (void)reader->Finish();
      return UnparsableResponse<v1::SnapshotChunk>("ExportSession");
    }
    if (total < 0) {
      total = chunk.total_bytes();
      if (total > 0) data.reserve(static_cast<size_t>(total));
    }
    data += chunk.data();
  }
  grpc::Status s = reader->Finish();
  if (!s.ok()) return FromGrpc(s);
  if (total >= 0 && static_cast<int64_t>(data.size()) != total) {
    return absl::DataLossError(
        absl::StrCat("export: received ", data.size(), " bytes, the server announced ", total));
  }
  return data;
}

absl::StatusOr<v1::Session> Client::ImportSession(const std::string& id, const std::string& data,
                                                  size_t chunk_bytes) const {
  grpc::ClientContext ctx;
  Prepare(&ctx, id);
  Received<v1::Session> session;
  std::unique_ptr<grpc::ClientWriter<v1::ImportSessionRequest>> writer(
      grpc::internal::ClientWriterFactory<v1::ImportSessionRequest>::Create(
          channel_.get(),
          Method(RETNET_METHOD("ImportSession"), grpc::internal::RpcMethod::CLIENT_STREAMING), &ctx,
          &session));
  size_t off = 0;
  do {
    v1::ImportSessionRequest req;
    if (off == 0) req.set_session_id(id);
    req.set_data(data.substr(off, chunk_bytes));
    off += chunk_bytes;
    if (!writer->Write(req)) break;  // the server ended the call early: Finish() says why
  } while (off < data.size());
  writer->WritesDone();
  grpc::Status s = writer->Finish();
  if (!s.ok()) return FromGrpc(s);
  if (!session.parsed) return UnparsableResponse<v1::Session>("ImportSession");
  return std::move(session.message);
}

absl::StatusOr<std::vector<int64_t>> Client::Tokenize(const std::string& text, bool add_bos) const {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::TokenizeRequest req;
  req.set_text(text);
  req.set_add_bos(add_bos);
  v1::TokenizeResponse resp;
  if (absl::Status s = Unary(RETNET_METHOD("Tokenize"), &ctx, req, &resp); !s.ok()) return s;
  return std::vector<int64_t>(resp.ids().begin(), resp.ids().end());
}

absl::StatusOr<v1::DetokenizeResponse> Client::Detokenize(const std::vector<int64_t>& ids) const {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::DetokenizeRequest req;
  for (int64_t id : ids) req.add_ids(id);
  v1::DetokenizeResponse resp;
  if (absl::Status s = Unary(RETNET_METHOD("Detokenize"), &ctx, req, &resp); !s.ok()) return s;
  return resp;
}

absl::StatusOr<bool> Client::CheckHealth(const std::string& service) const {
  // grpc.health.v1 without its generated code: HealthCheckRequest{string service = 1} and
  // HealthCheckResponse{ServingStatus status = 1}, SERVING = 1.
  if (service.size() > 127) return absl::InvalidArgumentError("--service: at most 127 bytes");
  std::string request_bytes;
  if (!service.empty()) {
    request_bytes.push_back(0x0a);
    request_bytes.push_back(static_cast<char>(service.size()));
    request_bytes += service;
  }
  grpc::GenericStub stub(channel_);
  grpc::ClientContext ctx;
  Prepare(&ctx);
  grpc::Slice slice(request_bytes);
  grpc::ByteBuffer request(&slice, 1), response;
  grpc::Status status;
  absl::Notification done;
  stub.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request, &response,
                 [&](grpc::Status s) {
                   status = std::move(s);
                   done.Notify();
                 });
  done.WaitForNotification();
  if (!status.ok()) return FromGrpc(status);
  std::vector<grpc::Slice> slices;
  (void)response.Dump(&slices);
  std::string bytes;
  for (const auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return bytes.size() == 2 && bytes[0] == 0x08 && bytes[1] == 0x01;
}

std::string Explain(const absl::Status& status) {
  switch (status.code()) {
    case absl::StatusCode::kOk:
      return "";
    case absl::StatusCode::kInvalidArgument:
      return "the request was refused: fix the field the message names";
    case absl::StatusCode::kNotFound:
      return "no such session on this server (never created, deleted, or expired after its idle "
             "TTL); generate with --session ID creates it anew";
    case absl::StatusCode::kAlreadyExists:
      return "that session id is taken: choose another id or delete the old session";
    case absl::StatusCode::kResourceExhausted:
      return "the server is at capacity (session slots, host spill places or the admission "
             "queue): retry with backoff, delete idle sessions, or raise the server's "
             "--max-sessions / --state-memory-mb / --max-queued-requests";
    case absl::StatusCode::kFailedPrecondition:
      return "the session is busy with another generation: wait for it to finish or use "
             "another session";
    case absl::StatusCode::kUnavailable:
      return "the server cannot be reached, is still loading its model, or is draining: check "
             "--target (or RETNET_TARGET) and retry shortly";
    case absl::StatusCode::kDeadlineExceeded:
      return "the call ran past its deadline: raise --timeout";
    case absl::StatusCode::kCancelled:
      return "the call was cancelled";
    case absl::StatusCode::kUnauthenticated:
      return "the server wants an API key: pass --api-key or set RETNET_API_KEY";
    case absl::StatusCode::kPermissionDenied:
      return "this API key may not do that";
    case absl::StatusCode::kDataLoss:
      return "the session's state was lost or the data is corrupt: delete the session and start "
             "again";
    case absl::StatusCode::kUnimplemented:
      return "this server does not offer that call or option (check its version)";
    case absl::StatusCode::kOutOfRange:
    case absl::StatusCode::kAborted:
    case absl::StatusCode::kInternal:
    case absl::StatusCode::kUnknown:
    default:
      return "the server failed: see its log";
  }
}

std::string NewSessionId() { return common::RandomHexId("c-"); }

std::string FinishReasonName(v1::FinishReason reason) {
  std::string name = v1::FinishReason_Name(reason);
  constexpr char kPrefix[] = "FINISH_REASON_";
  if (name.rfind(kPrefix, 0) == 0) name = name.substr(sizeof(kPrefix) - 1);
  return name;
}

}  // namespace retnet::client
